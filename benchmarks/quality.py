"""Quality at a given size: ImPart against DARE, LowRank and magnitude pruning on real fine-tunes.

For every task of :mod:`pairs` (a base and its full fine-tune), every compression ratio in ``--ratios`` and every
method of :data:`METHODS`, each changed weight matrix ``W`` (every ``nn.Linear``, the embeddings and the output head)
is replaced by ``W_base + C(W_ft - W_base)`` where ``C`` is the method at that ratio; every changed vector (the
RMSNorm weights) is restored densely, for every method alike. The compressed model is then scored on:

* ``kept``: the percentage of the fine-tune's gain over the base that survives,
  ``100 * (acc_c - acc_base) / (acc_ft - acc_base)`` (exact-match accuracy, the paper's way of reporting);
* ``kl_text``: mean next-token ``KL(p_ft || p_c)`` (nats per token) on held-out text of the pre-training
  distribution, and ``kl_task`` on the split's task examples (every position).

ImPart's (beta, C) is chosen per task and ratio on the ``val`` split from the paper's grid
(beta in {0.6, 0.7, 0.8}, C in {0.5, 1}; mean over seeds of ``kept``, ties broken by ``kl_task``) and reported on
the disjoint ``test`` split, beside the fixed default config (beta 0.8, C 1, :class:`impart_peft.ImPartConfig`'s).
Randomised methods (ImPart, DARE) run with several seeds: the tables give mean and standard deviation over seeds.

Hooks: :data:`METHODS` is a registry of single-fine-tune compressors (``fn(delta, ratio, seed, name, **params)`` ->
``(reconstructed delta, stored value count)``) and :data:`MERGES` one of merging runs; entries whose module does
not exist yet (ImPart-QT in ``impart_peft.quantization``, merging in ``impart_peft.merging``) are skipped and the
JSON says so.

Run: ``python benchmarks/quality.py`` (writes ``benchmarks/results/quality.json``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pairs as P  # noqa: E402
from impart_peft import compress_delta, dare_delta, lowrank_delta, magnitude_delta  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (4, 8, 16, 32, 64)
SEEDS = (0, 1, 2)
GRID = tuple((beta, c) for beta in (0.6, 0.7, 0.8) for c in (0.5, 1.0))
DEFAULT_IMPART = {"pre_prune_ratio": 0.8, "importance_exponent": 1.0}
MERGE_DENSITY = (
    0.2  # merge_finetunes' default: each task vector sparsified to CR 5 before merging (weights 1)
)


# ----------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """A single-delta compressor.

    ``fn(delta (m, n) float32, ratio, seed, name, **params) -> (reconstructed delta (m, n) float32, stored values)``.
    ``randomized``: run with every seed. ``available()``: ``None`` if it can run, else why not.
    """

    fn: Callable
    randomized: bool
    available: Callable[[], str | None] = lambda: None
    description: str = ""


def _impart(delta, ratio, seed, name, pre_prune_ratio=0.8, importance_exponent=1.0):
    c = compress_delta(
        delta,
        compression_ratio=ratio,
        pre_prune_ratio=pre_prune_ratio,
        importance_exponent=importance_exponent,
        seed=seed,
        name=name,
    )
    return c.reconstruct(), c.num_stored_values


def _impart_trim(delta, ratio, seed, name, pre_prune_ratio=0.8, importance_exponent=1.0, min_keep_prob=0.1):
    """Diagnostic, not a method of the paper or the library: ImPart exactly as ``_impart`` (same allocation, masks
    and values), then the pairs with ``q_k < min_keep_prob`` are dropped whole. It stores *fewer* values than
    ImPart; if it is nonetheless better, the pairs with tiny ``q_k`` (whose error is ``s_k^2 (1/q_k^2 - 1)``) are
    what hurts ImPart."""
    c = compress_delta(
        delta,
        compression_ratio=ratio,
        pre_prune_ratio=pre_prune_ratio,
        importance_exponent=importance_exponent,
        seed=seed,
        name=name,
    )
    u, sigma, v = c.factors()
    keep = c.keep_prob >= min_keep_prob
    mask_u, mask_v = c.masks()
    stored = int(mask_u[:, keep].sum() + mask_v[:, keep].sum() + keep.sum())
    return (u[:, keep] * sigma[keep]) @ v[:, keep].t(), stored


def _dare(delta, ratio, seed, name):
    c = dare_delta(delta, ratio, seed=seed, name=name)
    return c.reconstruct(), c.num_stored_values


def _lowrank(delta, ratio, seed, name):
    c = lowrank_delta(delta, ratio)
    return c.reconstruct(), c.num_stored_values


def _magnitude(delta, ratio, seed, name):
    c = magnitude_delta(delta, ratio)
    return c.reconstruct(), c.num_stored_values


def _module_missing(module: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet (issue 6)"
        return None

    return check


def _impart_qt(delta, ratio, seed, name, pre_prune_ratio=0.8, importance_exponent=1.0):
    """ImPart-QT (``impart_peft.quantization.compress_delta_quantized``, default scheme 8/4/3/2 bits). Its ratio
    counts bits against a 16-bit fine-tune (``reference_dtype=float16``), so at CR c it stores the bits of
    ``m*n/c`` 16-bit values, like the others; the stored count returned is its bytes in 16-bit values."""
    qt = importlib.import_module("impart_peft.quantization")
    c = qt.compress_delta_quantized(
        delta,
        compression_ratio=ratio,
        pre_prune_ratio=pre_prune_ratio,
        importance_exponent=importance_exponent,
        seed=seed,
        name=name,
        reference_dtype=torch.float16,
    )
    return c.reconstruct().float(), (c.nbytes + 1) // 2


def _qt_available() -> str | None:
    missing = _module_missing("impart_peft.quantization")()
    if missing:
        return missing
    if not hasattr(importlib.import_module("impart_peft.quantization"), "compress_delta_quantized"):
        return "impart_peft.quantization has no compress_delta_quantized yet"
    return None


METHODS: dict[str, Method] = {
    "impart": Method(_impart, True, description="ImPart, (beta, C) chosen on val from the paper's grid"),
    "impart_default": Method(_impart, True, description="ImPart, fixed default beta 0.8, C 1"),
    "dare": Method(_dare, True, description="DARE: keep each element w.p. 1/CR, rescale"),
    "lowrank": Method(_lowrank, False, description="top singular pairs kept whole"),
    "magnitude": Method(_magnitude, False, description="largest |dW| elements, unscaled"),
    "impart_trim": Method(
        _impart_trim,
        True,
        description="diagnostic: default ImPart minus its pairs with q_k < 0.1 (fewer values)",
    ),
    "impart_qt": Method(_impart_qt, True, _qt_available, "ImPart with quantized factors (issue 6)"),
}


# ----------------------------------------------------------------------------------------------- model surgery
def matrix_deltas(base_sd: dict, ft_sd: dict) -> dict[str, torch.Tensor]:
    """float32 ``W_ft - W_base`` of every changed 2-D parameter, keyed by state-dict key."""
    out = {}
    for key, w in ft_sd.items():
        if w.dim() == 2 and not torch.equal(w, base_sd[key]):
            out[key] = w.float() - base_sd[key].float()
    return out


def compressed_state_dict(
    base_sd: dict, ft_sd: dict, deltas: dict[str, torch.Tensor], method: Method, ratio, seed, params
) -> tuple[dict, int, int]:
    """``(state dict, stored values, dense values)``: compressed matrices, every vector restored densely."""
    sd = {}
    stored = dense = 0
    for key, w in ft_sd.items():
        if key in deltas:
            name = key.removesuffix(".weight")
            recon, count = method.fn(deltas[key], ratio, seed, name, **params)
            sd[key] = (base_sd[key].float() + recon).to(w.dtype)
            stored += count
            dense += deltas[key].numel()
        else:
            sd[key] = w  # vectors (norms) and unchanged tensors: the fine-tune's own values
    return sd, stored, dense


# ----------------------------------------------------------------------------------------------- scoring
@dataclass
class Reference:
    """The fine-tune's log-probs on the evaluation inputs (computed once per task and split)."""

    examples: list
    ids: torch.Tensor
    pos: torch.Tensor  # bool (B, T-1): non-pad positions of the task sequences
    logp_task: torch.Tensor  # (B, T-1, V) log-probs of the fine-tune at those inputs
    text_ids: torch.Tensor
    logp_text: torch.Tensor


@torch.no_grad()
def reference(ft, examples, heldout_ids) -> Reference:
    ids, _ = P.example_batch(examples)
    lengths = torch.tensor([len(p) + len(a) for p, a in examples])
    pos = torch.arange(ids.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    logp = F.log_softmax(ft(input_ids=ids).logits[:, :-1].float(), -1)
    logp_text = (
        F.log_softmax(ft(input_ids=heldout_ids).logits.float(), -1) if heldout_ids is not None else None
    )
    return Reference(examples, ids, pos, logp, heldout_ids, logp_text)


def _kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(ref || model), nats."""
    return float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean())


@torch.no_grad()
def score(model, ref: Reference, with_text: bool) -> dict[str, float]:
    """Exact-match accuracy and KLs of ``model`` against the fine-tune's reference."""
    _, mask = P.example_batch(ref.examples)
    logits = model(input_ids=ref.ids).logits[:, :-1].float()
    pred = logits.argmax(-1)
    ok = (pred == ref.ids[:, 1:]) | ~mask[:, :-1]
    out = {"acc": float(ok.all(dim=1).float().mean())}
    logp = F.log_softmax(logits, -1)
    out["kl_task"] = _kl(ref.logp_task[ref.pos], logp[ref.pos])
    if with_text and ref.text_ids is not None:
        out["kl_text"] = _kl(ref.logp_text, F.log_softmax(model(input_ids=ref.text_ids).logits.float(), -1))
    return out


def kept(acc: float, acc_base: float, acc_ft: float) -> float:
    """% of the fine-tune's gain over the base that ``acc`` keeps."""
    return 100.0 * (acc - acc_base) / (acc_ft - acc_base)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    pairs: P.Pairs
    ratios: tuple
    seeds: tuple
    grid: tuple
    recipe: P.Recipe = P.RECIPE
    rows: list = field(default_factory=list)

    def work_model(self):
        return P.LlamaForCausalLM(P.model_config(self.recipe)).eval()


def evaluate(run: Run, task: str, split: str, method_name: str, ratio, seed, params, model, ref, anchors):
    method = METHODS[method_name]
    base_sd = run.pairs.base.state_dict()
    ft_sd = run.pairs.finetuned[task].state_dict()
    deltas = anchors["deltas"]
    t0 = time.time()
    sd, stored, dense = compressed_state_dict(base_sd, ft_sd, deltas, method, ratio, seed, params)
    compress_s = time.time() - t0
    model.load_state_dict(sd)
    s = score(model, ref, with_text=(split == "test"))
    row = {
        "task": task,
        "split": split,
        "method": method_name,
        "ratio": ratio,
        "seed": seed,
        "params": params,
        **s,
        "kept": kept(s["acc"], anchors[split]["base"], anchors[split]["finetuned"]),
        "stored_values": stored,
        "dense_values": dense,
        "achieved_ratio": dense / stored if stored else math.inf,
        "compress_s": compress_s,
    }
    run.rows.append(row)
    return row


def run_task(run: Run, task: str, log) -> dict:
    pairs = run.pairs
    base, ft = pairs.base, pairs.finetuned[task]
    heldout = P.text_batch(pairs.data["heldout_text"], run.recipe.seq_len, run.recipe.n_heldout)
    refs = {
        "val": reference(ft, pairs.data[task]["val"], None),
        "test": reference(ft, pairs.data[task]["test"], heldout),
    }
    anchors = {"deltas": matrix_deltas(base.state_dict(), ft.state_dict())}
    for split in ("val", "test"):
        b = score(base, refs[split], with_text=(split == "test"))
        f = score(ft, refs[split], with_text=(split == "test"))
        anchors[split] = {"base": b["acc"], "finetuned": f["acc"], "base_scores": b, "finetuned_scores": f}
    if anchors["val"]["finetuned"] <= anchors["val"]["base"]:
        raise RuntimeError(f"the {task} fine-tune is no better than the base on val: rebuild the pairs")
    model = run.work_model()
    info = {
        "diagnostics": diagnostics(base, ft, run.ratios, run.grid),
        "anchors": {s: {k: v for k, v in anchors[s].items()} for s in ("val", "test")},
        "matrices": len(anchors["deltas"]),
        "matrix_values": sum(d.numel() for d in anchors["deltas"].values()),
        "selection": {},
    }
    # Sanity: ImPart with every factor element kept (lossless) must give the fine-tune back.
    lossless = evaluate(
        run, task, "test", "impart_default", None, 0, DEFAULT_IMPART, model, refs["test"], anchors
    )
    info["lossless"] = {k: lossless[k] for k in ("acc", "kl_task", "kl_text")}
    run.rows.remove(lossless)
    # 1. ImPart's grid on val.
    for ratio in run.ratios:
        scores = {}
        for beta, c in run.grid:
            params = {"pre_prune_ratio": beta, "importance_exponent": c}
            rows = [
                evaluate(run, task, "val", "impart", ratio, seed, params, model, refs["val"], anchors)
                for seed in run.seeds
            ]
            scores[(beta, c)] = (
                statistics.fmean(r["kept"] for r in rows),
                -statistics.fmean(r["kl_task"] for r in rows),
            )
        best = max(scores, key=scores.get)
        info["selection"][str(ratio)] = {
            "pre_prune_ratio": best[0],
            "importance_exponent": best[1],
            "val_kept": scores[best][0],
            "val_kl_task": -scores[best][1],
        }
        log(f"  {task} CR {ratio}: val picks beta={best[0]} C={best[1]} (kept {scores[best][0]:.1f}%)")
    # 2. Every method on test.
    for ratio in run.ratios:
        sel = info["selection"][str(ratio)]
        plans = {
            "impart": {
                "pre_prune_ratio": sel["pre_prune_ratio"],
                "importance_exponent": sel["importance_exponent"],
            },
            "impart_default": DEFAULT_IMPART,
            "dare": {},
            "lowrank": {},
            "magnitude": {},
            "impart_trim": DEFAULT_IMPART,
            "impart_qt": DEFAULT_IMPART,
        }
        for name, params in plans.items():
            method = METHODS[name]
            if method.available() is not None:
                continue
            for seed in run.seeds if method.randomized else (0,):
                evaluate(run, task, "test", name, ratio, seed, params, model, refs["test"], anchors)
        done = [r for r in run.rows if r["task"] == task and r["split"] == "test" and r["ratio"] == ratio]
        log(
            f"  {task} CR {ratio} test: "
            + ", ".join(
                f"{m} {statistics.fmean(r['kept'] for r in done if r['method'] == m):.1f}%"
                for m in dict.fromkeys(r["method"] for r in done)
            )
        )
    return info


def summarize(rows: list[dict], tasks, ratios) -> dict:
    """Mean and std over seeds of every metric, per task, method and ratio; and the mean over tasks."""
    out: dict = {}
    methods = list(dict.fromkeys(r["method"] for r in rows if r["split"] == "test"))
    for task in [*tasks, "mean"]:
        out[task] = {}
        for m in methods:
            out[task][m] = {}
            for ratio in ratios:
                sel = [
                    r
                    for r in rows
                    if r["split"] == "test"
                    and r["method"] == m
                    and r["ratio"] == ratio
                    and (task == "mean" or r["task"] == task)
                ]
                if not sel:
                    continue
                entry = {}
                for metric in ("kept", "acc", "kl_text", "kl_task", "achieved_ratio"):
                    if task == "mean":
                        # mean over tasks of each seed's value, then mean/std over seeds
                        by_seed: dict = {}
                        for r in sel:
                            by_seed.setdefault(r["seed"], []).append(r[metric])
                        values = [statistics.fmean(v) for v in by_seed.values()]
                    else:
                        values = [r[metric] for r in sel]
                    mean, std = _mean_std(values)
                    entry[metric] = {"mean": mean, "std": std, "n": len(values)}
                out[task][m][str(ratio)] = entry
    return out


def ordering_checks(summary: dict, ratios) -> list[dict]:
    """The paper's two claims, per task and on the mean over tasks, for the chosen and the default ImPart (and for
    ImPart-QT and the trimmed diagnostic when they ran)."""
    checks = []
    for task, table in summary.items():
        for imp in ("impart", "impart_default", "impart_qt", "impart_trim"):
            if imp not in table:
                continue
            for r in ratios:
                if 2 * r in ratios and str(r) in table.get("dare", {}):
                    a = table[imp][str(2 * r)]["kept"]["mean"]
                    d = table["dare"][str(r)]["kept"]["mean"]
                    ka = table[imp][str(2 * r)]["kl_text"]["mean"]
                    kd = table["dare"][str(r)]["kl_text"]["mean"]
                    checks.append(
                        {
                            "task": task,
                            "claim": f"{imp} at CR {2 * r} >= DARE at CR {r}",
                            "kept": [a, d],
                            "kl_text": [ka, kd],
                            "holds_kept": a >= d,
                            "holds_kl": ka <= kd,
                        }
                    )
            for r in (16, 32):
                if str(r) in table.get("lowrank", {}) and str(r) in table[imp]:
                    a = table[imp][str(r)]["kept"]["mean"]
                    low = table["lowrank"][str(r)]["kept"]["mean"]
                    ka = table[imp][str(r)]["kl_text"]["mean"]
                    kl_ = table["lowrank"][str(r)]["kl_text"]["mean"]
                    checks.append(
                        {
                            "task": task,
                            "claim": f"{imp} > LowRank at CR {r}",
                            "kept": [a, low],
                            "kl_text": [ka, kl_],
                            "holds_kept": a > low,
                            "holds_kl": ka < kl_,
                        }
                    )
    return checks


def diagnostics(base, ft, ratios, grid) -> dict:
    """Why methods rank as they do, from the spectra alone (no model run): per method and ratio, the expected
    squared error ``E||dW_c - dW||_F^2`` summed over matrices, relative to ``||dW||_F^2`` (closed forms: ImPart
    ``sum_k s_k^2 (1/q_k^2 - 1)`` over kept pairs + the dropped energy, ALGORITHM.md section 2; DARE ``CR - 1``;
    LowRank the energy of the dropped pairs), the smallest keep probability ImPart gives a kept pair, and what the
    deltas look like (size relative to the base weights, energy in the top singular pairs)."""
    from impart_peft import allocate_keep_prob
    from impart_peft.masks import keep_prob_from_threshold, keep_threshold_from_prob

    base_sd, ft_sd = base.state_dict(), ft.state_dict()
    deltas = matrix_deltas(base_sd, ft_sd)
    spectra = {k: torch.linalg.svdvals(d.double()) for k, d in deltas.items()}
    energy = sum(float((s**2).sum()) for s in spectra.values())
    out: dict = {
        "delta_rel_norm": math.sqrt(energy / sum(float(base_sd[k].double().pow(2).sum()) for k in deltas)),
        "energy_top": {},
        "relative_error": {},
        "impart_min_keep_prob": {},
        "impart_pairs_below_0.1": {},
    }
    for frac in (0.05, 0.1, 0.2, 0.5):
        top = sum(float((s[: max(1, int(len(s) * frac))] ** 2).sum()) for s in spectra.values())
        out["energy_top"][str(frac)] = top / energy
    for ratio in ratios:
        errs = {"dare": ratio - 1.0}
        low = 0.0
        for k, s in spectra.items():
            m, n = deltas[k].shape
            rank = max(1, min(min(m, n), round(m * n / (ratio * (m + n)))))
            low += float((s[rank:] ** 2).sum())
        errs["lowrank"] = low / energy
        for beta, c in grid:
            err, min_q, small, kept_pairs = 0.0, 1.0, 0, 0
            for k, s in spectra.items():
                q = allocate_keep_prob(s, tuple(deltas[k].shape), ratio, beta, c).keep_prob
                # as compress_delta stores it: q rounded to its integer threshold, pairs rounding to 0 dropped
                q = keep_prob_from_threshold(keep_threshold_from_prob(q))
                kept_mask = q > 0
                qk = q[kept_mask]
                err += float((s[kept_mask] ** 2 * (1 / qk**2 - 1)).sum() + (s[~kept_mask] ** 2).sum())
                min_q = min(min_q, float(qk.min()))
                small += int((qk < 0.1).sum())
                kept_pairs += int(kept_mask.sum())
            key = f"impart_b{beta}_C{c:g}"
            errs[key] = err / energy
            out["impart_min_keep_prob"].setdefault(key, {})[str(ratio)] = min_q
            out["impart_pairs_below_0.1"].setdefault(key, {})[str(ratio)] = small / kept_pairs
        out["relative_error"][str(ratio)] = errs
    return out


def run_merges(pairs: P.Pairs, log) -> dict:
    """Merging of the fine-tunes (TA / TIES with DARE vs ImPart) when ``impart_peft.merging`` exists."""
    missing = _module_missing("impart_peft.merging")()
    if missing:
        return {"status": "not run", "reason": missing}
    merging = importlib.import_module("impart_peft.merging")
    if not hasattr(merging, "merge_finetunes"):
        return {"status": "not run", "reason": "impart_peft.merging has no merge_finetunes yet"}
    heldout = P.text_batch(pairs.data["heldout_text"], P.RECIPE.seq_len, P.RECIPE.n_heldout)
    out = {"status": "run", "rows": []}
    anchors = {}
    refs = {}
    for task in P.TASKS:
        refs[task] = reference(pairs.finetuned[task], pairs.data[task]["test"], heldout)
        anchors[task] = (
            score(pairs.base, refs[task], False)["acc"],
            score(pairs.finetuned[task], refs[task], False)["acc"],
        )
    for method in ("task_arithmetic", "ties"):
        for sparsify in (None, "dare", "impart"):
            for seed in SEEDS if sparsify else (0,):
                try:
                    merged = merging.merge_finetunes(
                        pairs.base,
                        [pairs.finetuned[t] for t in P.TASKS],
                        method=method,
                        sparsify=sparsify,
                        density=MERGE_DENSITY,
                        seed=seed,
                    )
                except TypeError as exc:  # the API differs from what this hook expects: report, do not guess
                    return {"status": "not run", "reason": f"merge_finetunes signature: {exc}"}
                row = {"method": method, "sparsify": sparsify, "seed": seed, "density": MERGE_DENSITY}
                for task in P.TASKS:
                    s = score(merged, refs[task], False)
                    row[f"{task}_acc"] = s["acc"]
                    row[f"{task}_kept"] = kept(s["acc"], *anchors[task])
                out["rows"].append(row)
                log(f"  merge {method}/{sparsify} seed {seed}: {row}")
    return out


def write_json_atomic(obj, path: Path) -> None:
    P._write_json_atomic(obj, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="ImPart vs baselines: task accuracy kept and KL, by CR.")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("IMPART_BENCH_THREADS", "1")))
    ratios = tuple(int(r) if float(r).is_integer() else r for r in args.ratios)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start = time.time()
    pairs = P.load_pairs()
    run = Run(pairs, ratios, tuple(args.seeds), GRID)
    tasks = {}
    for task in P.TASKS:
        log(f"quality: {task}")
        tasks[task] = run_task(run, task, log)
    summary = summarize(run.rows, P.TASKS, ratios)
    result = {
        "meta": {
            "command": "python benchmarks/quality.py",
            "pairs": pairs.manifest,
            "ratios": list(ratios),
            "seeds": list(args.seeds),
            "grid": [{"pre_prune_ratio": b, "importance_exponent": c} for b, c in GRID],
            "default_impart": DEFAULT_IMPART,
            "methods": {
                k: {"description": m.description, "randomized": m.randomized, "unavailable": m.available()}
                for k, m in METHODS.items()
            },
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "elapsed_s": None,
        },
        "tasks": tasks,
        "summary": summary,
        "ordering": ordering_checks(summary, ratios),
        "merging": run_merges(pairs, log),
        "rows": run.rows,
    }
    result["meta"]["elapsed_s"] = time.time() - start
    write_json_atomic(result, args.out)
    log(f"quality: wrote {args.out} in {result['meta']['elapsed_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
