"""How close base + adapter is to the fine-tune: next-token KL and perplexities on a text. Backs ``impart eval``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_io import check_device, load_adapter_config, resolve_folder
from .filenames import TOKENIZER_FILE_PATTERNS

__all__ = ["DEFAULT_EVAL_TEXT", "EvalResult", "evaluate_adapter"]


DEFAULT_EVAL_TEXT = """\
The lighthouse keeper kept two notebooks. In the first he wrote the weather every hour: the direction of the wind,
the height of the swell, the colour of the sky at dawn and at dusk. In the second he wrote everything else. He
noted which ships passed and how late they were, the birds that rested on the gallery rail, the letters he meant
to send and the ones he had received. Over thirty years the first notebook filled eleven volumes and the second
only three, because most days, he said, nothing else happened that was worth more than a line.

When the station was automated, an engineer came to install the new lamp and the sensors that would report the
weather by radio. She read the notebooks while the concrete dried. The weather volumes were precise and a little
dull; the other three were full of small surprises. A seal had slept on the landing stage for a week in 1987. A
yacht had once asked for directions to a harbour that had closed before the war. The keeper had learned to bake
bread in a storm, because the oven was the only warm place when the generator failed.

The engineer asked whether he minded that a machine would now do his work. He said the machine would do the first
notebook better than he had, and that nobody had ever asked anyone to keep the second one. Then he packed both
into a crate, left the kettle for whoever came next, and took the supply boat to the mainland. The lamp has turned
every night since, and the radio reports the wind to the minute, but nobody writes down the seals any more.
"""


@dataclass
class EvalResult:
    """What ``impart eval`` measures on one text, in nats; ``kl_*`` are mean per-token KL(fine-tune || model)."""

    tokens: int
    tokenizer: (
        str  # where the token ids came from: "base tokenizer", "fine-tune tokenizer" or "UTF-8 bytes: ..."
    )
    kl_adapter: float
    kl_base: float
    perplexity_finetuned: float
    perplexity_adapter: float
    perplexity_base: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _has_tokenizer(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in TOKENIZER_FILE_PATTERNS)


def _token_ids(
    text: str, folders: list[tuple[str, Path]], vocab_size: int, max_tokens: int
) -> tuple[torch.Tensor, str]:
    for role, folder in folders:
        if _has_tokenizer(folder):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
            return ids, f"{role} tokenizer"
    # No tokenizer anywhere (e.g. a model built from a config for tests): UTF-8 bytes as ids, folded into the
    # vocabulary. Meaningless as language, but the same ids go to every model, so the KL still compares them.
    data = list(text.encode("utf-8"))[:max_tokens]
    return torch.tensor(
        [[b % vocab_size for b in data]]
    ), "UTF-8 bytes: no tokenizer in the base or the fine-tune"


def _next_token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def evaluate_adapter(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    adapter: str | os.PathLike,
    text: str | None = None,
    *,
    max_tokens: int = 1024,
    device: str | torch.device | None = None,
    dtype: str = "auto",
) -> EvalResult:
    """Next-token KL(fine-tune || base + adapter), KL(fine-tune || base) and the three perplexities on ``text``.

    Args:
        text: the text (default :data:`DEFAULT_EVAL_TEXT`), tokenised with the base's tokenizer, else the
            fine-tune's, else as UTF-8 bytes; at most ``max_tokens`` tokens.
        device: where the models run (default the CPU).
        dtype: ``"auto"`` (the checkpoints' dtype), ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    One model is in memory at a time (the fine-tune, then the base, then the base with the adapter), plus the
    fine-tune's log-probabilities ``(tokens, vocab)`` in float32.
    """
    import gc

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = check_device(device) or torch.device("cpu")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    base_folder = resolve_folder(base, "base")
    ft_folder = resolve_folder(finetuned, "fine-tune")
    adapter_folder = resolve_folder(adapter, "adapter", adapter=True)
    load_adapter_config(adapter_folder)
    for role, folder in (("base", base_folder), ("fine-tune", ft_folder)):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the {role} folder {os.fspath(folder)!r} has no config.json")

    def load(folder: Path) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()

    finetuned_model = load(ft_folder)
    vocab_size = finetuned_model.get_output_embeddings().weight.shape[0]
    ids, source = _token_ids(
        text if text is not None else DEFAULT_EVAL_TEXT,
        [("base", base_folder), ("fine-tune", ft_folder)],
        vocab_size,
        max_tokens,
    )
    if ids.shape[1] < 2:
        raise ValueError("the text gives fewer than 2 tokens: nothing to predict")
    targets = ids[0, 1:]
    ft_logp = _next_token_logprobs(finetuned_model, ids)
    del finetuned_model
    gc.collect()

    def kl_and_ppl(logp: torch.Tensor) -> tuple[float, float]:
        kl = (ft_logp.exp() * (ft_logp - logp)).sum(-1).mean()
        nll = -logp.gather(-1, targets[:, None]).mean()
        return float(kl), float(torch.exp(nll))

    base_model = load(base_folder)
    kl_base, ppl_base = kl_and_ppl(_next_token_logprobs(base_model, ids))
    adapted = PeftModel.from_pretrained(base_model, os.fspath(adapter_folder)).eval()
    kl_adapter, ppl_adapter = kl_and_ppl(_next_token_logprobs(adapted, ids))
    _, ppl_ft = kl_and_ppl(ft_logp)
    return EvalResult(
        tokens=int(ids.shape[1]),
        tokenizer=source,
        kl_adapter=kl_adapter,
        kl_base=kl_base,
        perplexity_finetuned=ppl_ft,
        perplexity_adapter=ppl_adapter,
        perplexity_base=ppl_base,
    )
