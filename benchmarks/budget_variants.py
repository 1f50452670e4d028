"""Why the planner's two limits are there: the "auto" grid and the factor-2 window (docs/algorithm.md section 12).

On one real pair and ratio (default arith, CR 32, seed 0), through ``from_finetuned``, against the tuned paper
setting at equal bytes:

* ``auto_wide``: ``"auto"`` beta and C searched over beta 0 to 0.9, C 1/4 to 2 instead of the paper's grid;
* ``size_tuned_nowindow``: ``target_size`` with the tuned (beta, C), per-matrix ratios unrestricted;
* ``auto`` and ``size_tuned``: the library's defaults, for reference in the same process.

Run: ``python benchmarks/budget_variants.py`` (writes ``benchmarks/results/budget_variants.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import budget as B  # noqa: E402
import impart_peft.budget as library_budget  # noqa: E402
import impart_peft.planning as planning  # noqa: E402
import pairs as P  # noqa: E402
import quality as Q  # noqa: E402

WIDE = ((0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), (0.25, 0.5, 1.0, 2.0))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="arith")
    parser.add_argument("--ratio", type=float, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=B.RESULTS / "budget_variants.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("IMPART_BENCH_THREADS", "2")))
    suite = Q.load_suite("real", (args.task,))
    base, ft = suite.pairs.base, suite.pairs.finetuned[args.task]
    ref = Q.reference(ft, suite.pairs.data[args.task]["test"][:40], suite.heldout[:8], suite.batch, True)
    acc = {"base": Q.score(base, ref, False)["acc"], "finetuned": Q.score(ft, ref, False)["acc"]}
    tuned = B.tuned_settings(args.task, args.ratio)
    rows = []

    def run(name: str, method: str, size: int | None) -> dict:
        out = B.run_one(base, ft, B.method_config(method, args.ratio, args.seed, tuned, size), ref)
        row = {"variant": name, **out, "kept": Q.kept(out["acc"], acc["base"], acc["finetuned"])}
        rows.append(row)
        print(
            f"{name:22} kept {row['kept']:5.1f}%  kl_task {row['kl_task']:.5f}  kl_text {row['kl_text']:.5f}  "
            f"bytes {row['file_bytes']}  matrix ratios {row.get('matrix_ratio')}",
            flush=True,
        )
        return row

    size = run("paper_tuned", "paper_tuned", None)["file_bytes"]
    run("auto", "auto", size)
    run("size_tuned", "size_tuned", size)
    grid = (library_budget.AUTO_PRE_PRUNE_RATIOS, library_budget.AUTO_EXPONENTS)
    library_budget.AUTO_PRE_PRUNE_RATIOS, library_budget.AUTO_EXPONENTS = WIDE
    try:
        run("auto_wide", "auto", size)
    finally:
        library_budget.AUTO_PRE_PRUNE_RATIOS, library_budget.AUTO_EXPONENTS = grid
    spread, planning.SPREAD = planning.SPREAD, None
    try:
        run("size_tuned_nowindow", "size_tuned", size)
    finally:
        planning.SPREAD = spread
    result = {
        "meta": {
            "command": "python benchmarks/budget_variants.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "task": args.task,
            "ratio": args.ratio,
            "seed": args.seed,
            "tuned": tuned,
            "library": Q.library_fingerprint(),
        },
        "rows": rows,
    }
    P.write_json_atomic(result, args.out)
    return result


if __name__ == "__main__":
    main()
