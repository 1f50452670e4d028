"""What a planned compression (``target_size``, ``"auto"`` beta and C) costs in time against a plain one.

On one real SmolLM2 pair (:mod:`real_pairs`, default arith), ``from_finetuned`` on the CPU, the four configs
interleaved ``--repeats`` times in one process (this machine is shared and noisy: the ratio to the plain run of
the same round is the number to read):

* ``plain``: ``compression_ratio=32``, beta 0.6, C 0.5;
* ``auto``: the same ratio, ``"auto"`` beta and C (one extra pass: the spectra);
* ``size_uniform_auto``: ``target_size`` = the plain file's bytes, ``size_rule="uniform"``, ``"auto"``;
* ``size_spectral``: the same size, ``size_rule="spectral"``, beta 0.6, C 0.5.

Also the time of the first pass alone (every matrix's singular values, ``compressor.measure_module``).

Run: ``python benchmarks/planning_time.py`` (prints a table, writes ``benchmarks/results/planning_time.json``).
"""

from __future__ import annotations

import argparse
import copy
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
from impart_peft.compressor import measure_module, plan_modules  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _configs(ratio: float, size: int | None) -> dict[str, dict]:
    tuned = {"pre_prune_ratio": 0.6, "importance_exponent": 0.5}
    auto = {"pre_prune_ratio": "auto", "importance_exponent": "auto"}
    configs = {"plain": {"compression_ratio": ratio, **tuned}, "auto": {"compression_ratio": ratio, **auto}}
    if size is not None:
        configs["size_uniform_auto"] = {"target_size": size, "size_rule": "uniform", **auto}
        configs["size_spectral"] = {"target_size": size, "size_rule": "spectral", **tuned}
    return configs


def _file_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return (Path(folder) / "adapter_model.safetensors").stat().st_size


def _measure_pass(base, finetuned, config: ImPartConfig) -> float:
    finetuned_modules = dict(finetuned.named_modules())
    start = time.perf_counter()
    with torch.no_grad():
        for name, plan in plan_modules(base, config).items():
            base_params = dict(base.get_submodule(name).named_parameters(recurse=False))
            ft_params = dict(finetuned_modules[name].named_parameters(recurse=False))
            measure_module(plan, base_params, ft_params, config)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="arith")
    parser.add_argument("--ratio", type=float, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "planning_time.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("IMPART_BENCH_THREADS", "2")))
    suite = Q.load_suite("real", (args.task,))
    base, finetuned = suite.pairs.base, suite.pairs.finetuned[args.task]
    size = _file_bytes(
        from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(**_configs(args.ratio, None)["plain"]))
    )
    configs = _configs(args.ratio, size)
    times: dict[str, list[float]] = {name: [] for name in [*configs, "measure_pass"]}
    for _ in range(args.repeats):
        for name, fields in configs.items():
            model = copy.deepcopy(base)
            start = time.perf_counter()
            from_finetuned(model, finetuned, ImPartConfig(**fields))
            times[name].append(time.perf_counter() - start)
            del model
        times["measure_pass"].append(_measure_pass(base, finetuned, ImPartConfig(**configs["auto"])))
    # each round's ratio to that round's plain run, then the median over rounds
    ratios = {
        name: statistics.median(t / p for t, p in zip(values, times["plain"], strict=True))
        for name, values in times.items()
    }
    rows = [
        {
            "config": name,
            "median_s": statistics.median(values),
            "ratio_to_plain": ratios[name],
            "runs_s": values,
        }
        for name, values in times.items()
    ]
    print(f"{'config':<20} {'median s':>9} {'x plain':>8}")
    for row in rows:
        print(f"{row['config']:<20} {row['median_s']:9.1f} {row['ratio_to_plain']:8.2f}")
    result = {
        "meta": {
            "command": "python benchmarks/planning_time.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "task": args.task,
            "ratio": args.ratio,
            "target_size": size,
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "library": Q.library_fingerprint(),
        },
        "rows": rows,
    }
    P.write_json_atomic(result, args.out)
    return result


if __name__ == "__main__":
    main()
