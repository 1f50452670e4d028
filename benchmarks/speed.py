"""How long compression and loading take.

1. **Compression time per parameter**, :func:`impart_peft.compress_delta` against the straightforward reference in
   the same run, on deltas of several shapes: the reference is what a direct transcription of the paper does
   (``torch.linalg.svd`` of the whole delta, the allocation, then ``torch.bernoulli`` masks over the *whole*
   ``(m, R)`` and ``(n, R)`` factors, rescale, gather the kept values). The library's own steps are timed
   separately (SVD, allocation, masks + packing) so the table shows where the time goes.
2. **Load time**: rebuilding every ΔW from a saved ImPart adapter (``PeftModel.from_pretrained`` + ``merge_and_unload``,
   and ``from_pretrained`` + one forward, which rebuilds the factors lazily) against loading the fine-tune's dense
   weights from its safetensors file into the same architecture (``safetensors.torch.load_file`` +
   ``load_state_dict``). Measured on the benchmark's real fine-tune (tiny) and on a larger Llama with a synthetic
   full-rank delta, so that fixed per-call costs do not hide the per-parameter ones.

Every time is the minimum over repeats (the machine is shared; the minimum is the least disturbed run), on the
CPU with ``IMPART_BENCH_THREADS`` threads (default 1). No GPU is lent to this benchmark's sessions: the JSON says
``"gpu": null``; on a machine with CUDA, ``--device cuda`` times the compression there too.

Run: ``python benchmarks/speed.py`` (writes ``benchmarks/results/speed.json``).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pairs as P  # noqa: E402
from impart_peft import ImPartConfig, allocate_keep_prob, compress_delta, from_finetuned  # noqa: E402
from impart_peft.delta import pairs_needed, svd_top  # noqa: E402
from impart_peft.masks import FACTOR_U, FACTOR_V, keep_mask, pack_columns  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((256, 256), (512, 512), (1024, 1024), (1024, 2816))
RATIO = 16
BETA, EXPONENT = 0.8, 1.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device | None = None) -> tuple[float, object]:
    """Minimum wall time of ``repeats`` calls of ``fn()`` and the last result (synchronising ``device``)."""
    device = device or torch.device("cpu")
    best, out = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def reference_compress(delta: torch.Tensor, ratio: float, beta: float, exponent: float, seed: int):
    """The straightforward ImPart: full SVD, then in every column of U and V a random permutation keeps exactly the
    allocation's count of rows (the official code's way, from a stateful generator), gather the kept values.

    Returns ``(u_values, v_values, u_mask, v_mask, sigma)``; unlike the library, this needs the masks (or indices)
    stored beside the values, since a stateful generator cannot regenerate them portably.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    v = vh.t()
    alloc = allocate_keep_prob(s, tuple(delta.shape), ratio, beta, exponent)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    masks = []
    for factor, counts in ((u, alloc.keep_count[0]), (v, alloc.keep_count[1])):
        mask = torch.zeros(factor.shape, dtype=torch.bool)
        for k, c in enumerate(counts.tolist()):
            mask[torch.randperm(factor.shape[0], generator=gen)[:c], k] = True
        masks.append(mask.to(delta.device))
    mask_u, mask_v = masks
    r = alloc.boundary
    scale_u = torch.zeros(u.shape[1], dtype=delta.dtype, device=delta.device)
    scale_v = torch.zeros_like(scale_u)
    scale_u[:r] = u.shape[0] / alloc.keep_count[0].to(delta.dtype).clamp(min=1).to(delta.device)
    scale_v[:r] = v.shape[0] / alloc.keep_count[1].to(delta.dtype).clamp(min=1).to(delta.device)
    u_tilde = u * mask_u * scale_u
    v_tilde = v * mask_v * scale_v
    return u_tilde[mask_u], v_tilde[mask_v], mask_u, mask_v, s


def library_steps(delta: torch.Tensor, ratio: float, beta: float, exponent: float, seed: int, repeats: int):
    """Times of the library's steps as ``compress_delta`` runs them: the top pairs (``svd_top``, ``"auto"``: a Gram
    eigendecomposition when fewer than R pairs can be kept), the allocation, masks + packing."""
    m, n = delta.shape
    needed = pairs_needed((m, n), ratio, beta)  # as compress_delta: only the pairs that can be kept
    t_svd, (u, s, v) = timed(lambda: svd_top(delta, num_pairs=needed, method="auto"), repeats)
    t_alloc, alloc = timed(lambda: allocate_keep_prob(s, (m, n), ratio, beta, exponent), repeats)

    def masks():
        r = alloc.boundary
        mu = keep_mask(seed, "bench", FACTOR_U, alloc.keep_count[0].to(delta.device), m)
        mv = keep_mask(seed, "bench", FACTOR_V, alloc.keep_count[1].to(delta.device), n)
        return pack_columns(u[:, :r], mu), pack_columns(v[:, :r], mv)

    t_masks, _ = timed(masks, repeats)
    return {
        "svd_s": t_svd,
        "pairs_computed": needed,
        "allocation_s": t_alloc,
        "masks_pack_s": t_masks,
        "rank_kept": alloc.boundary,
    }


def compression_times(shapes, device: torch.device, log) -> list[dict]:
    rows = []
    for m, n in shapes:
        gen = torch.Generator().manual_seed(m * 7 + n)
        # A full-rank delta with a decaying spectrum, like a fine-tune's (the SVD's cost barely depends on it).
        delta = (torch.randn(m, n, generator=gen) * torch.linspace(1.0, 0.05, n)).mul_(1e-3).to(device)
        repeats = 3 if m * n <= 1024 * 1024 else 2
        t_lib, c = timed(
            lambda d=delta: compress_delta(d, RATIO, BETA, EXPONENT, seed=0, name="bench"), repeats, device
        )
        t_ref, ref = timed(lambda d=delta: reference_compress(d, RATIO, BETA, EXPONENT, 0), repeats, device)
        steps = library_steps(delta, RATIO, BETA, EXPONENT, 0, repeats) if device.type == "cpu" else {}
        row = {
            "shape": [m, n],
            "params": m * n,
            "device": str(device),
            "library_s": t_lib,
            "reference_s": t_ref,
            "library_ns_per_param": 1e9 * t_lib / (m * n),
            "reference_ns_per_param": 1e9 * t_ref / (m * n),
            "reference_over_library": t_ref / t_lib,
            "library_stored_values": c.num_stored_values,
            "reference_stored_values": int(ref[0].numel() + ref[1].numel() + ref[4].numel()),
            "reference_mask_bits": int(ref[2].numel() + ref[3].numel()),
            **{f"library_{k}": v for k, v in steps.items()},
        }
        rows.append(row)
        log(
            f"  compress {m}x{n} on {device}: library {t_lib:.3f}s, reference {t_ref:.3f}s "
            f"({row['library_ns_per_param']:.1f} vs {row['reference_ns_per_param']:.1f} ns/param)"
        )
        del delta
    return rows


# ----------------------------------------------------------------------------------------------- loading
def synthetic_pair(hidden: int, inter: int, layers: int, vocab: int, seed: int = 0):
    """A larger Llama base and a "fine-tune" = base + a full-rank delta with a decaying spectrum on every
    matrix and a small dense change on every norm (a stand-in for a real fine-tune, for timing only)."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).eval()
    ft = LlamaForCausalLM(cfg).eval()
    sd = base.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, w in sd.items():
            if w.dim() == 2:
                scale = torch.linspace(1.0, 0.05, w.shape[1])
                sd[k] = w + 2e-3 * torch.randn(w.shape, generator=gen) * scale
            else:
                sd[k] = w + 1e-3 * torch.randn(w.shape, generator=gen)
    ft.load_state_dict(sd)
    return base, ft


def load_times(name: str, base, ft, workdir: Path, repeats: int, log) -> dict:
    """Dense safetensors load vs. ImPart adapter load + rebuild of every ΔW, for one pair."""
    from peft import PeftModel

    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = base.config
    ft_dir = workdir / f"{name}-ft"
    ad_dir = workdir / f"{name}-adapter"
    ft.save_pretrained(ft_dir, safe_serialization=True)
    compress_base = LlamaForCausalLM(cfg).eval()
    compress_base.load_state_dict(base_sd)
    t_compress = time.perf_counter()
    peft_model = from_finetuned(
        compress_base,
        ft,
        ImPartConfig(compression_ratio=RATIO, pre_prune_ratio=BETA, importance_exponent=EXPONENT),
    )
    t_compress = time.perf_counter() - t_compress
    peft_model.save_pretrained(ad_dir)
    del peft_model, compress_base
    ids = torch.randint(0, cfg.vocab_size, (1, 16))

    def fresh():  # every variant starts from the base in memory (not timed)
        model = LlamaForCausalLM(cfg).eval()
        model.load_state_dict(base_sd)
        return model

    def dense():
        model = holder["model"]
        model.load_state_dict(load_file(ft_dir / "model.safetensors"))
        return model

    def adapter_merge():
        return PeftModel.from_pretrained(holder["model"], ad_dir).merge_and_unload()

    def adapter_forward():
        peft = PeftModel.from_pretrained(holder["model"], ad_dir)
        with torch.no_grad():
            peft(input_ids=ids)
        return peft

    def adapter_only():
        return PeftModel.from_pretrained(holder["model"], ad_dir)

    holder = {}
    out = {
        "params": sum(p.numel() for p in ft.parameters()),
        "config": {
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size,
        },
        "dense_file_bytes": (ft_dir / "model.safetensors").stat().st_size,
        "adapter_file_bytes": (ad_dir / "adapter_model.safetensors").stat().st_size,
        "compress_s": t_compress,
        "compression_ratio": RATIO,
    }
    for key, fn in (
        ("dense_safetensors_s", dense),
        ("adapter_load_s", adapter_only),
        ("adapter_load_merge_s", adapter_merge),
        ("adapter_load_forward_s", adapter_forward),
    ):
        best = float("inf")
        for _ in range(repeats):
            holder["model"] = fresh()  # not timed
            gc.collect()
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[key] = best
    # Correctness of what was timed: the merged adapter is the compressed fine-tune, close to but not the dense one.
    holder["model"] = fresh()
    merged = adapter_merge()
    out["merged_max_abs_diff_to_ft"] = max(
        float((merged.state_dict()[k] - v).abs().max()) for k, v in ft.state_dict().items()
    )
    out["merge_over_dense"] = out["adapter_load_merge_s"] / out["dense_safetensors_s"]
    out["forward_over_dense"] = out["adapter_load_forward_s"] / out["dense_safetensors_s"]
    log(
        f"  load {name} ({out['params'] / 1e6:.1f}M params): dense {out['dense_safetensors_s']:.3f}s, "
        f"adapter+merge {out['adapter_load_merge_s']:.3f}s, adapter+forward {out['adapter_load_forward_s']:.3f}s"
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Compression and load times of ImPart.")
    parser.add_argument("--device", default="cpu", help="device for the compression timings (cpu or cuda)")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    parser.add_argument("--quick", action="store_true", help="small shapes only (for the smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("IMPART_BENCH_THREADS", "1")))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start = time.time()
    device = torch.device(args.device)
    shapes = ((128, 128), (128, 344)) if args.quick else SHAPES
    result = {
        "meta": {
            "command": "python benchmarks/speed.py",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "ratio": RATIO,
            "pre_prune_ratio": BETA,
            "importance_exponent": EXPONENT,
            "timing": "minimum over repeats, seconds",
        },
        "compression": compression_times(shapes, device, log),
        "load": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="impart-speed-"))
    try:
        if args.quick:
            base, ft = synthetic_pair(64, 128, 2, 64)
            result["load"]["tiny_synthetic"] = load_times("tiny", base, ft, workdir, 1, log)
        else:
            pairs = P.load_pairs()
            result["load"]["benchmark_pair_add"] = load_times(
                "add", pairs.base, pairs.finetuned["add"], workdir, 5, log
            )
            base, ft = synthetic_pair(768, 2048, 4, 4096)
            result["load"]["synthetic_34M"] = load_times("synthetic", base, ft, workdir, 3, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["meta"]["elapsed_s"] = time.time() - start
    P.write_json_atomic(result, args.out)
    log(f"speed: wrote {args.out} in {result['meta']['elapsed_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
