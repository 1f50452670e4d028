"""Compress and reconstruct one matrix: impart_peft against a straightforward reference, in the same process.

For each size a float32 delta on the CPU is compressed at CR 16, beta 0.8, C 1 (the paper's setting) by

* **ours**: :func:`impart_peft.compress_delta` (``svd_method="auto"``: the top pairs from the eigendecomposition
  of the smaller Gram matrix; masks from the counter-based hash; only the kept values packed) and
  :meth:`CompressedDelta.reconstruct` (masks regenerated from the seed, unpacked, rescaled, one matmul);
* **reference**: what a direct transcription of the paper does: full ``torch.linalg.svd``, the same allocation,
  ``torch.bernoulli`` masks over the kept ``(m, r)`` and ``(n, r)`` factors, kept as dense tensors, the rescaled
  dense factors held in memory; reconstruct is the one matmul of those factors.

The delta is synthetic but shaped like a fine-tune's: a strong low-rank part (64 directions with a decaying
spectrum) plus a full-rank Gaussian bulk, so the allocation has a real spectrum to work with. Times are the
minimum over ``--repeats`` runs (the machine may be shared; the minimum is the least disturbed run). Also
recorded: the masks alone (both factors), the kept rank, the stored values, the Frobenius error of both
methods (they are different draws of the same estimator, so only similar, not equal), how far apart the two
allocations are, and how well the Gram route's kept part matches the exact (float32) SVD's: its distance, and
the excess of its truncation residual over the exact truncation's.

Run::

    python benchmarks/compress_matrix.py                      # 1024x1024, 4096x4096, 4096x11008 (minutes)
    python benchmarks/compress_matrix.py --quick              # 1024x1024 only, 3 repeats (seconds)
    python benchmarks/compress_matrix.py --sizes 2048x2048,1024x4096 --threads 1 --repeats 2

Prints a table and writes JSON to ``benchmarks/results/compress_matrix.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from impart_peft import allocate_keep_prob, compress_delta
from impart_peft.delta import svd_top
from impart_peft.masks import FACTOR_U, FACTOR_V, keep_mask

DEFAULT_SIZES = "1024x1024,4096x4096,4096x11008"
RATIO, BETA, EXPONENT = 16.0, 0.8, 1.0


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            m, n = (int(x) for x in item.split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: cannot read {item!r}; write e.g. 1024x1024,4096x11008") from None
        if m < 1 or n < 1:
            raise SystemExit(f"--sizes: {item!r} must be two positive sizes")
        sizes.append((m, n))
    if not sizes:
        raise SystemExit("--sizes: no size given")
    return sizes


def synthetic_delta(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A fine-tune-like delta: 64 strong directions (sigma ~ k^-0.5) on top of a small full-rank bulk."""
    generator = torch.Generator().manual_seed(seed)
    k = min(64, m, n)
    left = torch.randn(m, k, generator=generator) / m**0.5
    right = torch.randn(k, n, generator=generator) / n**0.5
    strength = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    bulk = torch.randn(m, n, generator=generator) * (0.05 / max(m, n) ** 0.5)
    return (left * strength) @ right + bulk


def residual_excess(delta: torch.Tensor, ours: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖Δ − ours‖ / ‖Δ − exact‖ − 1`` in float64 (float32 norms cannot resolve the 1e-8 it usually is)."""
    delta = delta.double()
    return float((delta - ours.double()).norm() / (delta - exact.double()).norm()) - 1.0


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def ours(delta: torch.Tensor, name: str):
    compressed, t_compress = timed(
        lambda: compress_delta(delta, RATIO, BETA, EXPONENT, seed=0, name=name, svd_method="auto")
    )
    rebuilt, t_reconstruct = timed(compressed.reconstruct)
    m, n = delta.shape
    _, t_masks = timed(
        lambda: (
            keep_mask(0, name, FACTOR_U, compressed.keep_count[0], m),
            keep_mask(0, name, FACTOR_V, compressed.keep_count[1], n),
        )
    )
    return compressed, rebuilt, t_compress, t_reconstruct, t_masks


def reference(delta: torch.Tensor):
    """The direct transcription: full SVD, the allocation's q_k, dense Bernoulli masks (independent draws at the
    same q: the estimator without exact counts), dense rescaled factors."""

    def compress():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        allocation = allocate_keep_prob(s, tuple(delta.shape), RATIO, BETA, EXPONENT)
        r = allocation.boundary
        q = allocation.keep_prob[:r].to(torch.float32)
        generator = torch.Generator().manual_seed(0)
        m, n = delta.shape
        mask_u = torch.bernoulli(q.expand(m, r), generator=generator)
        mask_v = torch.bernoulli(q.expand(n, r), generator=generator)
        u_tilde = u[:, :r] * mask_u / q
        v_tilde = vh[:r].t() * mask_v / q
        stored = int(mask_u.sum() + mask_v.sum())
        return u, s, vh, allocation, u_tilde, v_tilde, stored

    (u, s, vh, allocation, u_tilde, v_tilde, stored), t_compress = timed(compress)
    sigma = s[: allocation.boundary]
    rebuilt, t_reconstruct = timed(lambda: (u_tilde * sigma) @ v_tilde.t())
    return u, s, vh, allocation, stored, rebuilt, t_compress, t_reconstruct


def run_size(m: int, n: int, repeats: int) -> dict:
    delta = synthetic_delta(m, n)
    name = f"bench.{m}x{n}"
    best = {}
    for _ in range(repeats):
        compressed, rebuilt, t_c, t_r, t_m = ours(delta, name)
        u, s, vh, allocation, ref_stored, ref_rebuilt, rt_c, rt_r = reference(delta)
        for key, value in (
            ("ours_compress_s", t_c),
            ("ours_reconstruct_s", t_r),
            ("ours_masks_s", t_m),
            ("ref_compress_s", rt_c),
            ("ref_reconstruct_s", rt_r),
        ):
            best[key] = min(best.get(key, float("inf")), value)
    norm = float(delta.norm())
    r = compressed.rank
    exact_kept = (u[:, :r] * s[:r]) @ vh[:r]
    # The kept part of our SVD route against the exact SVD's (the dense factors, before any mask).
    gu, gs, gv = svd_top(delta, r, torch.float32, "gram")
    gram_kept = (gu * gs[:r]) @ gv.t()
    q_ref = allocation.keep_prob[: allocation.boundary]
    q_ours = compressed.keep_prob[0].to(q_ref.dtype)  # c_k / m: the q the U masks realise
    common = min(q_ref.numel(), q_ours.numel())
    row = {
        "shape": [m, n],
        "rank_kept": r,
        "rank_kept_ref": allocation.boundary,
        "stored_factor_values": compressed.num_factor_values,
        "stored_factor_values_ref": ref_stored,
        "target_factor_values": m * n / RATIO,
        "disk_compression_ratio": compressed.disk_compression_ratio,
        "rel_error_ours": float((rebuilt - delta).norm()) / norm,
        "rel_error_ref": float((ref_rebuilt - delta).norm()) / norm,
        "max_abs_keep_prob_difference": float((q_ours[:common] - q_ref[:common]).abs().max())
        if common
        else 0.0,
        # Which directions straddle the boundary is ill-conditioned when neighbouring sigma nearly tie (the
        # Gaussian bulk here), so the kept parts can differ while capturing the same energy: the second
        # number, the excess of the Gram route's truncation residual over the exact one, is what matters.
        "gram_kept_part_rel_difference": float((gram_kept - exact_kept).norm() / exact_kept.norm()),
        "gram_residual_rel_excess": residual_excess(delta, gram_kept, exact_kept),
        **{k: round(v, 4) for k, v in best.items()},
    }
    row["compress_speedup"] = row["ref_compress_s"] / row["ours_compress_s"]
    row["reconstruct_speedup"] = row["ref_reconstruct_s"] / row["ours_reconstruct_s"]
    return row


def print_header() -> None:
    header = (
        f"{'shape':>11} {'rank':>5} {'compress ours':>14} {'ref':>8} {'x':>6} "
        f"{'reconstruct ours':>17} {'ref':>7} {'x':>6} {'masks':>7} {'err ours':>9} {'err ref':>8}"
    )
    print(header)
    print("-" * len(header))


def print_row(row: dict) -> None:
    m, n = row["shape"]
    print(
        f"{f'{m}x{n}':>11} {row['rank_kept']:>5} {row['ours_compress_s']:>13.2f}s {row['ref_compress_s']:>7.2f}s "
        f"{row['compress_speedup']:>5.1f}x {row['ours_reconstruct_s']:>16.3f}s {row['ref_reconstruct_s']:>6.3f}s "
        f"{row['reconstruct_speedup']:>5.2f}x {row['ours_masks_s']:>6.3f}s {row['rel_error_ours']:>9.4f} "
        f"{row['rel_error_ref']:>8.4f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help=f"comma-separated MxN (default {DEFAULT_SIZES})")
    parser.add_argument("--quick", action="store_true", help="1024x1024 only, 3 repeats (unless given)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per size, minimum reported (default 1)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results" / "compress_matrix.json"),
        help="where to write the JSON",
    )
    args = parser.parse_args(argv)
    sizes = parse_sizes(args.sizes or ("1024x1024" if args.quick else DEFAULT_SIZES))
    repeats = args.repeats or (3 if args.quick else 1)
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(
        f"CR {RATIO:g}, beta {BETA:g}, C {EXPONENT:g}; float32 on the CPU, {torch.get_num_threads()} thread(s)"
    )
    print_header()
    rows = []
    for m, n in sizes:
        rows.append(run_size(m, n, repeats))
        print_row(rows[-1])
    result = {
        "benchmark": "compress_matrix",
        "command": " ".join(
            ["python", "benchmarks/compress_matrix.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "settings": {"compression_ratio": RATIO, "pre_prune_ratio": BETA, "importance_exponent": EXPONENT},
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
