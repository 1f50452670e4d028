"""A size budget for the whole model and data-free beta, C, against the paper's tuned uniform ratio (issue 12).

On every real SmolLM2 pair (:mod:`real_pairs`) and at each ratio of ``--ratios``, through the library's own path
(``from_finetuned`` -> ``save_pretrained`` -> merged model), with every seed of ``--seeds``:

* ``paper_tuned``: one ratio for every matrix, (beta, C) as chosen on the val split by ``benchmarks/quality.py``
  (read from ``benchmarks/results/quality_real.json``: the reference setting, which needs validation data);
* ``paper_default``: one ratio, the library's default beta 0.8, C 1 (what a user with no validation data gets
  without this issue);
* ``auto``: one ratio, ``pre_prune_ratio="auto"``, ``importance_exponent="auto"`` (no data);
* ``size_tuned``: ``target_size`` = the bytes of ``paper_tuned``'s file, spread over the matrices by their spectra
  (``size_rule="spectral"``), the tuned (beta, C) (the budget rule alone);
* ``size_auto``: the same, with ``"auto"`` beta and C (no data at all);
* ``size_uniform_auto``: the same ``target_size`` with the default ``size_rule="uniform"`` (one ratio, the
  smallest that fits) and ``"auto"`` beta and C: what ``impart compress --size S --pre-prune auto --exponent auto``
  does.

Scores as in ``benchmarks/quality.py`` (same test split, same held-out text): accuracy kept (% of the fine-tune's
gain), ``kl_task`` at the answer positions and ``kl_text`` on held-out text. The file size of every adapter is
measured on disk.

Run: ``python benchmarks/budget.py`` (writes ``benchmarks/results/budget_real.json`` after every row; a run that
is stopped resumes from it with ``--resume``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pairs as P  # noqa: E402
import quality as Q  # noqa: E402
from impart_peft import ImPartConfig, from_finetuned  # noqa: E402
from impart_peft.filenames import ADAPTER_WEIGHTS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("paper_tuned", "paper_default", "auto", "size_tuned", "size_auto", "size_uniform_auto")


def tuned_settings(task: str, ratio: float) -> tuple[float, float]:
    """(beta, C) that ``benchmarks/quality.py`` chose on val for ImPart (paper rule) on this task and ratio."""
    data = json.loads((RESULTS / "quality_real.json").read_text())
    sel = data["tasks"][task]["selection"]["impart"][str(int(ratio))]
    return float(sel["pre_prune_ratio"]), float(sel["importance_exponent"])


def method_config(method: str, ratio: float, seed: int, tuned: tuple[float, float], size: int | None):
    beta, c = tuned
    common = {"compression_ratio": ratio, "seed": seed}
    if method == "paper_tuned":
        return ImPartConfig(**common, pre_prune_ratio=beta, importance_exponent=c)
    if method == "paper_default":
        return ImPartConfig(**common)
    if method == "auto":
        return ImPartConfig(**common, pre_prune_ratio="auto", importance_exponent="auto")
    spectral = {"target_size": size, "size_rule": "spectral"}
    if method == "size_tuned":
        return ImPartConfig(**common, **spectral, pre_prune_ratio=beta, importance_exponent=c)
    if method == "size_auto":
        return ImPartConfig(**common, **spectral, pre_prune_ratio="auto", importance_exponent="auto")
    if method == "size_uniform_auto":
        return ImPartConfig(**common, target_size=size, pre_prune_ratio="auto", importance_exponent="auto")
    raise ValueError(method)


def run_one(base, ft, config, ref) -> dict:
    t0 = time.time()
    model = from_finetuned(copy.deepcopy(base), ft, config)
    compress_s = time.time() - t0
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        nbytes = os.path.getsize(Path(folder) / ADAPTER_WEIGHTS)
    meta = model.peft_config["default"].module_meta
    ratios = [m["compression_ratio"] for m in meta.values() if "compression_ratio" in m]
    settings = [
        (m["pre_prune_ratio"], m["importance_exponent"]) for m in meta.values() if "pre_prune_ratio" in m
    ]
    merged = model.merge_and_unload().eval()
    scores = Q.score(merged, ref, with_text=True)
    out = {**scores, "file_bytes": nbytes, "compress_s": compress_s}
    if ratios:
        out["matrix_ratio"] = {
            "min": min(ratios),
            "median": statistics.median(ratios),
            "max": max(ratios),
        }
    if settings:
        counts: dict[str, int] = {}
        for beta, c in settings:
            counts[f"{beta:g}/{c:g}"] = counts.get(f"{beta:g}/{c:g}", 0) + 1
        out["settings"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return out


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        key = (row["task"], str(row["ratio"]), row["method"])
        out.setdefault(key, []).append(row)
    table: dict = {}
    for (task, ratio, method), group in out.items():
        cell = {}
        for metric in ("kept", "kl_task", "kl_text", "file_bytes"):
            values = [r[metric] for r in group]
            cell[metric] = statistics.fmean(values)
            cell[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        cell["seeds"] = len(group)
        table.setdefault(task, {}).setdefault(ratio, {})[method] = cell
    tasks = list(table)
    mean: dict = {}
    for ratio in {r for t in table.values() for r in t}:
        for method in METHODS:
            cells = [table[t][ratio][method] for t in tasks if method in table[t].get(ratio, {})]
            if len(cells) == len(tasks):
                mean.setdefault(ratio, {})[method] = {
                    m: statistics.fmean(c[m] for c in cells)
                    for m in ("kept", "kl_task", "kl_text", "file_bytes")
                }
    table["mean"] = mean
    return table


def print_table(summary: dict) -> None:
    print(f"{'task':8} {'CR':>4} {'method':14} {'kept %':>8} {'kl_task':>9} {'kl_text':>9} {'bytes':>10}")
    for task, by_ratio in summary.items():
        for ratio in sorted(by_ratio, key=float):
            for method, cell in by_ratio[ratio].items():
                print(
                    f"{task:8} {ratio:>4} {method:14} {cell['kept']:8.1f} {cell['kl_task']:9.5f} "
                    f"{cell['kl_text']:9.5f} {cell['file_bytes']:10.0f}"
                )


def markdown(summary: dict) -> str:
    """The table of docs/benchmarks.md: per task and ratio, mean ± std over seeds of kept / kl_task / kl_text."""
    lines = [
        "| task | CR | method | kept % | KL answers (nats) | KL text (nats) | file MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, by_ratio in summary.items():
        for ratio in sorted(by_ratio, key=float):
            for method, cell in sorted(by_ratio[ratio].items(), key=lambda kv: METHODS.index(kv[0])):
                spread = (
                    f" ± {cell['kept_std']:.1f}" if cell.get("kept_std") else "",
                    f" ± {cell['kl_task_std']:.5f}" if cell.get("kl_task_std") else "",
                    f" ± {cell['kl_text_std']:.5f}" if cell.get("kl_text_std") else "",
                )
                lines.append(
                    f"| {task} | {float(ratio):g} | {method} | {cell['kept']:.1f}{spread[0]} | "
                    f"{cell['kl_task']:.5f}{spread[1]} | {cell['kl_text']:.5f}{spread[2]} | "
                    f"{cell['file_bytes'] / 1e6:.3f} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[16, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--heldout-chunks", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "budget_real.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    parser.add_argument(
        "--markdown", action="store_true", help="print the table of --out as markdown and stop"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(summarize(json.loads(args.out.read_text())["rows"])))
        return {}
    torch.set_num_threads(int(os.environ.get("IMPART_BENCH_THREADS", "2")))
    suite = Q.load_suite("real", tuple(args.tasks) if args.tasks else None)
    previous = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    rows = previous.get("rows", [])
    done = {(r["task"], r["ratio"], r["method"], r["seed"]) for r in rows}
    meta = {
        "command": "python benchmarks/budget.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "suite": "real",
        "pairs": suite.manifest.get("key"),
        "n_test": args.n_test,
        "heldout_chunks": args.heldout_chunks,
        "torch_threads": torch.get_num_threads(),
        "library": Q.library_fingerprint(),
        # a resumed run: every command that added rows, in order (one plain run of the default methods does it all)
        "runs": [
            *previous.get("meta", {}).get("runs", [previous["meta"]["command"]] if previous else []),
            None,
        ],
    }
    meta["runs"][-1] = meta["command"]

    def flush() -> dict:
        result = {"meta": meta, "summary": summarize(rows), "rows": rows}
        P.write_json_atomic(result, args.out)
        return result

    result = flush()
    for task in suite.tasks:
        base, ft = suite.pairs.base, suite.pairs.finetuned[task]
        test = suite.pairs.data[task]["test"][: args.n_test]
        ref = Q.reference(ft, test, suite.heldout[: args.heldout_chunks], suite.batch, suite.share_prefix)
        anchors = {"base": Q.score(base, ref, False)["acc"], "finetuned": Q.score(ft, ref, False)["acc"]}
        for ratio in args.ratios:
            tuned = tuned_settings(task, ratio)
            for seed in args.seeds:
                size = None
                for method in args.methods:
                    previous = [r for r in rows if (r["task"], r["ratio"], r["seed"]) == (task, ratio, seed)]
                    size = next((r["file_bytes"] for r in previous if r["method"] == "paper_tuned"), size)
                    if (task, ratio, method, seed) in done:
                        continue
                    if method.startswith("size") and size is None:
                        raise RuntimeError("run paper_tuned first: its file size is the size budget")
                    config = method_config(method, ratio, seed, tuned, size)
                    out = run_one(base, ft, config, ref)
                    row = {
                        "task": task,
                        "ratio": ratio,
                        "method": method,
                        "seed": seed,
                        "tuned": list(tuned),
                        "target_size": size if method.startswith("size") else None,
                        **out,
                        "kept": Q.kept(out["acc"], anchors["base"], anchors["finetuned"]),
                    }
                    rows.append(row)
                    print(
                        f"{task} CR {ratio:g} seed {seed} {method}: kept {row['kept']:.1f}% "
                        f"kl_task {row['kl_task']:.5f} kl_text {row['kl_text']:.5f} bytes {row['file_bytes']}",
                        flush=True,
                    )
                    result = flush()
    print_table(result["summary"])
    return result


if __name__ == "__main__":
    main()
