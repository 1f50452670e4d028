"""Quality at a given size: ImPart against DARE, LowRank and magnitude pruning on real fine-tunes.

Two suites of (base, full fine-tune) pairs:

* ``real`` (the default, the headline): SmolLM2-135M-Instruct and three full fine-tunes of it
  (:mod:`real_pairs`: ``arith``, ``json``, ``date``);
* ``toy``: the 0.8M-parameter model pre-trained here and its two fine-tunes (:mod:`pairs`), a fast smoke run.

For every task, every compression ratio in ``--ratios`` and every method of :data:`METHODS`, each changed weight
matrix ``W`` is replaced by ``W_base + C(W_ft - W_base)`` where ``C`` is the method at that ratio; every changed
vector (RMSNorm weights, when a suite trains them) is restored densely, for every method alike. The compressed
model is then scored on:

* ``kept``: the percentage of the fine-tune's gain over the base that survives,
  ``100 * (acc_c - acc_base) / (acc_ft - acc_base)`` (exact-match accuracy, the paper's way of reporting);
  exact match is teacher-forced: the argmax at every answer position (terminator included) must be the gold
  token, which is exactly when greedy decoding writes the answer, so one batched forward pass scores a split;
* ``kl_text``: mean next-token ``KL(p_ft || p_c)`` (nats per token) on held-out text, and ``kl_task`` at the
  answer positions of the split's task examples.

ImPart's (beta, C) is chosen per task, ratio and allocation rule on the ``val`` split from the paper's grid
(beta in {0.6, 0.7, 0.8}, C in {0.5, 1}; mean over ``--val-seeds`` of ``kept``, ties broken by ``kl_task``) and
reported on the disjoint ``test`` split with every seed of ``--seeds``: the tables give mean and standard
deviation over seeds.

Hooks: :data:`METHODS` is a registry of single-fine-tune compressors (``fn(delta, ratio, seed, name, **params)`` ->
``(reconstructed delta, stored value count)``); entries whose library support does not exist (an allocation rule,
ImPart-QT) are skipped and the JSON says why. Results are written after every task (and after the merges), so a
partial run is usable.

Run: ``python benchmarks/quality.py`` (real pairs, writes ``benchmarks/results/quality_real.json``) or
``python benchmarks/quality.py --suite toy`` (writes ``benchmarks/results/quality_toy.json``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import json
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
RATIOS = (8, 16, 32, 64)
SEEDS = (0, 1, 2)
VAL_SEEDS = (0,)
GRID = tuple((beta, c) for beta in (0.6, 0.7, 0.8) for c in (0.5, 1.0))
DEFAULT_IMPART = {"pre_prune_ratio": 0.8, "importance_exponent": 1.0}
MERGE_DENSITY = (
    0.2  # merge_finetunes' default: each task vector sparsified to CR 5 before merging (weights 1)
)
# Methods whose (beta, C) the val split chooses, and the methods run on test (in this order).
TUNED = ("impart", "impart_rescaled")
TEST_METHODS = {
    "real": ("impart", "impart_rescaled", "dare", "lowrank", "magnitude", "impart_qt"),
    "toy": ("impart", "impart_rescaled", "impart_default", "dare", "lowrank", "magnitude", "impart_qt"),
}


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


def _takes_allocation(fn: Callable) -> bool:
    return "allocation" in inspect.signature(fn).parameters


def _rule_kwargs(fn: Callable, allocation: str) -> dict:
    """``{"allocation": rule}`` where the library takes the keyword; the default rule needs nothing (the library
    before issue 10 has one rule only, then the default)."""
    if _takes_allocation(fn):
        return {"allocation": allocation}
    if allocation != "paper":
        raise RuntimeError(f"{fn.__name__} has no allocation keyword: rule {allocation!r} unavailable")
    return {}


def _impart(delta, ratio, seed, name, pre_prune_ratio=0.8, importance_exponent=1.0, allocation="paper"):
    c = compress_delta(
        delta,
        compression_ratio=ratio,
        pre_prune_ratio=pre_prune_ratio,
        importance_exponent=importance_exponent,
        seed=seed,
        name=name,
        **_rule_kwargs(compress_delta, allocation),
    )
    return c.reconstruct(), c.num_stored_values


def _impart_rescaled(delta, ratio, seed, name, pre_prune_ratio=0.8, importance_exponent=1.0):
    return _impart(delta, ratio, seed, name, pre_prune_ratio, importance_exponent, allocation="rescaled")


def _rescaled_available() -> str | None:
    if not _takes_allocation(compress_delta):
        return "compress_delta has no allocation keyword yet (issue 10): only its single rule runs"
    return None


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
        **_rule_kwargs(qt.compress_delta_quantized, "paper"),
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
    "impart": Method(
        _impart,
        True,
        description="ImPart, the paper's allocation rule; (beta, C) chosen on val from its grid",
    ),
    "impart_rescaled": Method(
        _impart_rescaled,
        True,
        _rescaled_available,
        "ImPart with the project's older 'rescaled' allocation rule (gamma solved for the exact mean); (beta, C) "
        "chosen on val",
    ),
    "impart_default": Method(_impart, True, description="ImPart, fixed default beta 0.8, C 1"),
    "dare": Method(_dare, True, description="DARE: keep each element w.p. 1/CR, rescale"),
    "lowrank": Method(_lowrank, False, description="top singular pairs kept whole"),
    "magnitude": Method(_magnitude, False, description="largest |dW| elements, unscaled"),
    "impart_trim": Method(
        _impart_trim,
        True,
        description="diagnostic: default ImPart minus its pairs with q_k < 0.1 (fewer values)",
    ),
    "impart_qt": Method(
        _impart_qt, True, _qt_available, "ImPart-QT: quantized factors, paper rule, default beta 0.8, C 1"
    ),
}


# ----------------------------------------------------------------------------------------------- SVD reuse
class ReuseSVD:
    """Within the ``with`` block, ``impart_peft``'s ``svd_top`` returns its last result for the same delta tensor
    and arguments instead of computing it again.

    Why: a run compresses each of the 210 deltas of a real pair about a hundred times (grid x seeds x rules x
    ratios), and the SVD, not the masks, is most of ImPart's CPU time. ``svd_top`` is a pure function of its
    input ("deterministic for the same input, device and thread count"), so reusing its output changes no bit of
    any result (``tests/test_benchmarks_smoke.py`` checks that). One entry per delta (the latest arguments) bounds
    the memory; the run orders its loops so that calls with the same arguments are consecutive. The deltas are
    never modified in place, so a tensor's identity stands for its value while the block runs."""

    MODULES = ("impart_peft.delta", "impart_peft.quantization", "impart_peft.baselines")

    def __init__(self):
        self.cache: dict[int, tuple] = {}
        self.hits = self.calls = 0
        self._saved: list = []

    def __enter__(self):
        original = importlib.import_module("impart_peft.delta").svd_top

        def svd_top(delta, num_pairs=None, svd_dtype=torch.float32, method="svd"):
            self.calls += 1
            key = (num_pairs, svd_dtype, method, tuple(delta.shape))
            entry = self.cache.get(id(delta))
            if entry is not None and entry[0] is delta and entry[1] == key:
                self.hits += 1
                return entry[2]
            out = original(delta, num_pairs=num_pairs, svd_dtype=svd_dtype, method=method)
            self.cache[id(delta)] = (delta, key, out)
            return out

        for name in self.MODULES:
            module = importlib.import_module(name)
            if hasattr(module, "svd_top"):
                self._saved.append((module, module.svd_top))
                module.svd_top = svd_top
        return self

    def __exit__(self, *exc):
        for module, fn in self._saved:
            module.svd_top = fn
        self._saved.clear()
        self.cache.clear()
        return False


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
    mask: torch.Tensor  # bool (B, T): positions whose next token is an answer token
    logp_task: torch.Tensor  # (N, V) log-probs of the fine-tune at the N answer positions
    text_ids: torch.Tensor | None
    logp_text: torch.Tensor | None
    prefix: int = 0  # leading tokens shared by every sequence (see answer_logits)


def shared_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Number of leading tokens every row of ``ids`` shares and that no answer position needs (the chat
    template, the system message and the start of the user turn: about 40% of a real task's tokens)."""
    same = (ids == ids[:1]).all(dim=0)
    length = int(same.cumprod(0).sum())
    first_scored = int(mask.float().argmax(dim=1).min())
    return max(0, min(length, first_scored))


def answer_logits(model, ids: torch.Tensor, mask: torch.Tensor, prefix: int = 0):
    """Logits ``(N, V)`` at the ``N`` answer positions of ``mask`` and their targets ``(N,)``.

    The output head runs at those positions only: on a 49152-token vocabulary it would otherwise cost as much as
    the blocks. With ``prefix > 0`` the first ``prefix`` tokens, the same in every row, go through the model once
    and their key/value cache is shared by the batch (the same function up to float rounding; CPU time)."""
    inner = model.model
    if prefix:
        cache = inner(input_ids=ids[:1, :prefix], use_cache=True).past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        hidden = inner(input_ids=ids[:, prefix:], past_key_values=cache, use_cache=True).last_hidden_state
    else:
        hidden = inner(input_ids=ids).last_hidden_state
    m = mask[:, prefix:-1]
    return model.lm_head(hidden[:, :-1][m]).float(), ids[:, prefix + 1 :][m]


@torch.no_grad()
def reference(ft, examples, heldout_ids, batch_fn=None, share_prefix: bool = False) -> Reference:
    """``batch_fn(examples) -> (ids, answer mask)``; default the toy suite's (character-level strings)."""
    ids, mask = (batch_fn or P.example_batch)(examples)
    prefix = shared_prefix(ids, mask) if share_prefix else 0
    logits, _ = answer_logits(ft, ids, mask, prefix)
    logp_text = (
        F.log_softmax(ft(input_ids=heldout_ids).logits.float(), -1) if heldout_ids is not None else None
    )
    return Reference(examples, ids, mask, F.log_softmax(logits, -1), heldout_ids, logp_text, prefix)


def _kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(ref || model), nats."""
    return float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean())


@torch.no_grad()
def score(model, ref: Reference, with_text: bool) -> dict[str, float]:
    """Exact-match accuracy and KLs of ``model`` against the fine-tune's reference."""
    logits, targets = answer_logits(model, ref.ids, ref.mask, ref.prefix)
    rows = ref.mask[:, ref.prefix : -1].nonzero()[:, 0]  # the example of each answer position
    wrong = torch.zeros(ref.ids.shape[0]).index_add_(0, rows, (logits.argmax(-1) != targets).float())
    out = {"acc": float((wrong == 0).float().mean())}
    out["kl_task"] = _kl(ref.logp_task, F.log_softmax(logits, -1))
    if with_text and ref.text_ids is not None:
        out["kl_text"] = _kl(ref.logp_text, F.log_softmax(model(input_ids=ref.text_ids).logits.float(), -1))
    return out


def kept(acc: float, acc_base: float, acc_ft: float) -> float:
    """% of the fine-tune's gain over the base that ``acc`` keeps."""
    return 100.0 * (acc - acc_base) / (acc_ft - acc_base)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------- suites
@dataclass
class Suite:
    """One set of pairs and how to feed it: ``batch(examples) -> (ids, answer mask)``, the held-out text ids for
    the KL, and a fresh model to load compressed weights into."""

    name: str
    tasks: tuple
    pairs: object  # .base, .finetuned[task], .data[task]["val" | "test"], .manifest
    batch: Callable
    heldout: torch.Tensor
    manifest: dict
    share_prefix: bool = False

    def work_model(self):
        return copy.deepcopy(self.pairs.base).eval()


def load_suite(name: str, tasks: tuple | None = None) -> Suite:
    if name == "toy":
        pairs = P.load_pairs()
        heldout = P.text_batch(pairs.data["heldout_text"], P.RECIPE.seq_len, P.RECIPE.n_heldout)
        return Suite("toy", P.TASKS, pairs, P.example_batch, heldout, pairs.manifest)
    if name == "real":
        import real_pairs as R

        pairs = R.load_pairs(tasks=tasks)
        pad_id = pairs.data["pad_id"]
        heldout = torch.tensor(pairs.data["heldout_ids"], dtype=torch.int64)
        batch = lambda ex: R.example_batch(ex, pad_id)  # noqa: E731
        return Suite("real", tuple(pairs.finetuned), pairs, batch, heldout, pairs.manifest, share_prefix=True)
    raise ValueError(f"unknown suite {name!r}: 'real' or 'toy'")


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    suite: Suite
    ratios: tuple
    seeds: tuple
    grid: tuple
    val_seeds: tuple = VAL_SEEDS
    test_methods: tuple = ()
    tune_ratios: tuple | None = None  # ratios whose (beta, C) val chooses; None: every ratio
    single_seed: tuple = ()  # methods run with the first seed only (CPU budget)
    only_at: dict = field(default_factory=dict)  # method -> the only ratios it runs at (CPU budget)
    n_val: int | None = None  # first examples of each split used (None: all)
    n_test: int | None = None
    rows: list = field(default_factory=list)
    checked: list = field(default_factory=list)  # the info of each task run so far
    on_progress: Callable | None = None  # (task, info) after each ratio of the test phase
    fixed_selection: dict = field(default_factory=dict)  # method -> (beta, C) used instead of a val grid
    lossless_check: bool = True

    @property
    def pairs(self):
        return self.suite.pairs


def evaluate(run: Run, task: str, split: str, method_name: str, ratio, seed, params, model, ref, anchors):
    method = METHODS[method_name]
    base_sd = run.pairs.base.state_dict()
    ft_sd = run.pairs.finetuned[task].state_dict()
    deltas = anchors["deltas"]
    t0 = time.time()
    sd, stored, dense = compressed_state_dict(base_sd, ft_sd, deltas, method, ratio, seed, params)
    compress_s = time.time() - t0
    model.load_state_dict(sd)
    t0 = time.time()
    s = score(model, ref, with_text=(split == "test"))
    score_s = time.time() - t0
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
        "score_s": score_s,
    }
    run.rows.append(row)
    return row


def run_task(run: Run, task: str, log) -> dict:
    suite = run.suite
    base, ft = suite.pairs.base, suite.pairs.finetuned[task]
    val = suite.pairs.data[task]["val"][: run.n_val]
    test = suite.pairs.data[task]["test"][: run.n_test]
    refs = {
        "val": reference(ft, val, None, suite.batch, suite.share_prefix),
        "test": reference(ft, test, suite.heldout, suite.batch, suite.share_prefix),
    }
    anchors = {"deltas": matrix_deltas(base.state_dict(), ft.state_dict())}
    for split in ("val", "test"):
        b = score(base, refs[split], with_text=(split == "test"))
        f = score(ft, refs[split], with_text=(split == "test"))
        anchors[split] = {"base": b["acc"], "finetuned": f["acc"], "base_scores": b, "finetuned_scores": f}
    if anchors["val"]["finetuned"] <= anchors["val"]["base"]:
        raise RuntimeError(f"the {task} fine-tune is no better than the base on val: rebuild the pairs")
    model = suite.work_model()
    t0 = time.time()
    info = {
        "diagnostics": diagnostics(anchors["deltas"], base.state_dict(), run.ratios, run.grid),
        "anchors": {s: {k: v for k, v in anchors[s].items()} for s in ("val", "test")},
        "matrices": len(anchors["deltas"]),
        "matrix_values": sum(d.numel() for d in anchors["deltas"].values()),
        "selection": {},
    }
    log(f"  {task}: diagnostics in {time.time() - t0:.0f}s")
    # Sanity: ImPart with every factor element kept (lossless) must give the fine-tune back. Checked on the first
    # task of a run only (210 full SVDs: minutes of CPU); the smoke test checks it on the toy pair.
    if run.lossless_check and not any("lossless" in other for other in run.checked):
        lossless = evaluate(
            run, task, "test", "impart_default", None, 0, DEFAULT_IMPART, model, refs["test"], anchors
        )
        info["lossless"] = {k: lossless[k] for k in ("acc", "kl_task", "kl_text")}
        run.rows.remove(lossless)
        if lossless["kl_text"] > 1e-4 or lossless["acc"] != anchors["test"]["finetuned"]:
            raise RuntimeError(f"lossless ImPart does not give the {task} fine-tune back: {info['lossless']}")
    run.checked.append(info)
    # 1. ImPart's grid on val, per allocation rule. Loops ordered ratio > beta > (C, rule) so that consecutive
    # compressions of a delta share its SVD (ReuseSVD).
    for name, (beta, c) in run.fixed_selection.items():
        info["selection"][name] = {
            str(ratio): {
                "pre_prune_ratio": beta,
                "importance_exponent": c,
                "val_kept": float("nan"),
                "val_kl_task": float("nan"),
                "chosen_at_ratio": "given (--fixed-selection)",
            }
            for ratio in run.ratios
        }
    tuned = [
        n
        for n in TUNED
        if n in run.test_methods and METHODS[n].available() is None and n not in run.fixed_selection
    ]
    tune_ratios = [r for r in run.ratios if run.tune_ratios is None or r in run.tune_ratios]
    for ratio in tune_ratios:
        scores: dict = {name: {} for name in tuned}
        for beta, c in run.grid:
            for name in tuned:
                params = {"pre_prune_ratio": beta, "importance_exponent": c}
                rows = [
                    evaluate(run, task, "val", name, ratio, seed, params, model, refs["val"], anchors)
                    for seed in run.val_seeds
                ]
                scores[name][(beta, c)] = (
                    statistics.fmean(r["kept"] for r in rows),
                    -statistics.fmean(r["kl_task"] for r in rows),
                )
        for name in tuned:
            best = max(scores[name], key=scores[name].get)
            info["selection"].setdefault(name, {})[str(ratio)] = {
                "pre_prune_ratio": best[0],
                "importance_exponent": best[1],
                "val_kept": scores[name][best][0],
                "val_kl_task": -scores[name][best][1],
                "chosen_at_ratio": ratio,
                "val_grid": [
                    {"pre_prune_ratio": b, "importance_exponent": c, "val_kept": v[0], "val_kl_task": -v[1]}
                    for (b, c), v in scores[name].items()
                ],
            }
            log(
                f"  {task} {name} CR {ratio}: val picks beta={best[0]} C={best[1]} "
                f"(kept {scores[name][best][0]:.1f}%)"
            )
    # Ratios not tuned take the choice of the nearest tuned ratio.
    for name in info["selection"]:
        for ratio in run.ratios:
            if str(ratio) not in info["selection"][name]:
                nearest = min(tune_ratios, key=lambda r: abs(math.log(r / ratio)))
                info["selection"][name][str(ratio)] = {
                    k: v for k, v in info["selection"][name][str(nearest)].items() if k != "val_grid"
                }
    # 2. Every method on test.
    for ratio in run.ratios:
        for name in run.test_methods:
            method = METHODS[name]
            if method.available() is not None or ratio not in run.only_at.get(name, (ratio,)):
                continue
            if name in info["selection"]:
                sel = info["selection"][name][str(ratio)]
                params = {k: sel[k] for k in ("pre_prune_ratio", "importance_exponent")}
            elif name.startswith("impart"):
                params = DEFAULT_IMPART
            else:
                params = {}
            seeds = run.seeds if method.randomized else (0,)
            for seed in seeds[:1] if name in run.single_seed else seeds:
                evaluate(run, task, "test", name, ratio, seed, params, model, refs["test"], anchors)
        if run.on_progress is not None:  # results after every ratio: a run cut short keeps what it measured
            run.on_progress(task, info)
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
        for imp in ("impart", "impart_rescaled", "impart_default", "impart_qt", "impart_trim"):
            if imp not in table:
                continue
            for r in ratios:
                if 2 * r in ratios and str(r) in table.get("dare", {}) and str(2 * r) in table[imp]:
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


def _matrix_type(key: str) -> str:
    """``"q_proj"`` of ``"model.layers.3.self_attn.q_proj.weight"``."""
    return key.removesuffix(".weight").rsplit(".", 1)[-1]


def _allocate(sigma, shape, ratio, beta, c, rule):
    from impart_peft import allocate_keep_prob

    if "rule" in inspect.signature(allocate_keep_prob).parameters:
        return allocate_keep_prob(sigma, shape, ratio, beta, c, rule=rule)
    if rule != "paper":
        return None
    return allocate_keep_prob(sigma, shape, ratio, beta, c)


def _realised_keep(allocation, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep fractions of U's and V's columns as the masks realise them (exact counts where the library stores
    them, else the probabilities)."""
    m, n = shape
    counts = getattr(allocation, "keep_count", None)
    if counts is not None:
        return counts[0].double() / m, counts[1].double() / n
    q = allocation.keep_prob.double()
    q = q[q > 0]
    return q, q


def diagnostics(deltas: dict, base_sd: dict, ratios, grid) -> dict:
    """Why methods rank as they do, from the spectra alone (no model run): the size of the deltas next to the
    base weights (per matrix type), the share of the energy in the top singular pairs, and per method and ratio
    the expected squared error ``E||dW_c - dW||_F^2`` summed over matrices, relative to ``||dW||_F^2`` (ImPart
    ``sum_k s_k^2 (1/(q_U,k q_V,k) - 1)`` over kept pairs + the dropped energy, ALGORITHM.md section 2; DARE
    ``CR - 1``; LowRank the energy of the dropped pairs), and the smallest keep fraction ImPart gives a kept pair."""
    spectra = {k: torch.linalg.svdvals(d.double()) for k, d in deltas.items()}
    energy = sum(float((s**2).sum()) for s in spectra.values())
    rel_by_type: dict[str, list[float]] = {}
    for k, d in deltas.items():
        rel_by_type.setdefault(_matrix_type(k), []).append(
            float(d.double().norm() / base_sd[k].double().norm())
        )
    out: dict = {
        "delta_rel_norm": math.sqrt(energy / sum(float(base_sd[k].double().pow(2).sum()) for k in deltas)),
        "delta_rel_norm_by_type_mean": {t: statistics.fmean(v) for t, v in rel_by_type.items()},
        "mean_abs_delta": sum(float(d.abs().sum()) for d in deltas.values())
        / sum(d.numel() for d in deltas.values()),
        "energy_top": {},
        "relative_error": {},
        "impart_min_keep_prob": {},
        "impart_pairs_below_0.1": {},
    }
    for frac in (0.01, 0.05, 0.1, 0.2, 0.5):
        top = sum(float((s[: max(1, int(len(s) * frac))] ** 2).sum()) for s in spectra.values())
        out["energy_top"][str(frac)] = top / energy
    # the grid's two corners under the paper's rule, and the older rule at its default (CPU time: 210 allocations
    # per config and ratio)
    configs = [("paper", 0.8, 1.0), ("paper", 0.6, 0.5), ("rescaled", 0.8, 1.0)]
    for ratio in ratios:
        errs = {"dare": ratio - 1.0}
        low = 0.0
        for k, s in spectra.items():
            m, n = deltas[k].shape
            rank = max(1, min(min(m, n), round(m * n / (ratio * (m + n)))))
            low += float((s[rank:] ** 2).sum())
        errs["lowrank"] = low / energy
        for rule, beta, c in configs:
            err, min_q, small, kept_pairs = 0.0, 1.0, 0, 0
            for k, s in spectra.items():
                allocation = _allocate(s, tuple(deltas[k].shape), ratio, beta, c, rule)
                if allocation is None:
                    break
                qu, qv = _realised_keep(allocation, tuple(deltas[k].shape))
                r = len(qu)
                err += float((s[:r] ** 2 * (1 / (qu * qv) - 1)).sum() + (s[r:] ** 2).sum())
                if r:
                    min_q = min(min_q, float(torch.minimum(qu, qv).min()))
                small += int((torch.minimum(qu, qv) < 0.1).sum())
                kept_pairs += r
            else:
                key = f"impart_{rule}_b{beta}_C{c:g}"
                errs[key] = err / energy
                out["impart_min_keep_prob"].setdefault(key, {})[str(ratio)] = min_q
                out["impart_pairs_below_0.1"].setdefault(key, {})[str(ratio)] = small / max(1, kept_pairs)
        out["relative_error"][str(ratio)] = errs
    return out


def run_merges(suite: Suite, seeds, log, n_test: int | None = None) -> dict:
    """Merging of all the fine-tunes into one model (TA / TIES with DARE vs ImPart, and unsparsified), each task's
    accuracy kept by the merged model, when ``impart_peft.merging`` exists."""
    missing = _module_missing("impart_peft.merging")()
    if missing:
        return {"status": "not run", "reason": missing}
    merging = importlib.import_module("impart_peft.merging")
    if not hasattr(merging, "merge_finetunes"):
        return {"status": "not run", "reason": "impart_peft.merging has no merge_finetunes yet"}
    pairs = suite.pairs
    out = {"status": "run", "rows": [], "tasks": list(suite.tasks), "density": MERGE_DENSITY}
    anchors = {}
    refs = {}
    for task in suite.tasks:
        refs[task] = reference(
            pairs.finetuned[task], pairs.data[task]["test"][:n_test], None, suite.batch, suite.share_prefix
        )
        anchors[task] = (
            score(pairs.base, refs[task], False)["acc"],
            score(pairs.finetuned[task], refs[task], False)["acc"],
        )
    for method in ("task_arithmetic", "ties"):
        for sparsify in (None, "dare", "impart"):
            for seed in seeds if sparsify else (0,):
                t0 = time.time()
                try:
                    merged = merging.merge_finetunes(
                        pairs.base,
                        [pairs.finetuned[t] for t in suite.tasks],
                        method=method,
                        sparsify=sparsify,
                        density=MERGE_DENSITY,
                        seed=seed,
                    )
                except TypeError as exc:  # the API differs from what this hook expects: report, do not guess
                    return {"status": "not run", "reason": f"merge_finetunes signature: {exc}"}
                row = {"method": method, "sparsify": sparsify, "seed": seed, "density": MERGE_DENSITY}
                for task in suite.tasks:
                    s = score(merged, refs[task], False)
                    row[f"{task}_acc"] = s["acc"]
                    row[f"{task}_kept"] = kept(s["acc"], *anchors[task])
                row["mean_kept"] = statistics.fmean(row[f"{t}_kept"] for t in suite.tasks)
                row["seconds"] = time.time() - t0
                out["rows"].append(row)
                del merged
                log(f"  merge {method}/{sparsify} seed {seed}: {row}")
    return out


def library_fingerprint() -> dict[str, str]:
    """sha256 (first 16 hex digits) of each source file of the compression code the numbers come from, so that a
    result file can be matched to the library version that made it."""
    import hashlib

    src = Path(importlib.import_module("impart_peft").__file__).parent
    names = ("allocation.py", "delta.py", "masks.py", "quantization.py", "baselines.py", "merging.py")
    return {n: hashlib.sha256((src / n).read_bytes()).hexdigest()[:16] for n in names if (src / n).exists()}


def suite_tasks(suite: str) -> tuple:
    """Every task of ``suite`` (a run is complete when it has all of them)."""
    if suite == "real":
        import real_pairs as R

        return R.TASKS
    return P.TASKS


def write_json_atomic(obj, path: Path) -> None:
    P.write_json_atomic(obj, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="ImPart vs baselines: task accuracy kept and KL, by CR.")
    parser.add_argument("--suite", choices=("real", "toy"), default="real")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--val-seeds", type=int, nargs="+", default=list(VAL_SEEDS))
    parser.add_argument("--methods", nargs="+", default=None, help="test methods (default: the suite's list)")
    parser.add_argument("--tasks", nargs="+", default=None, help="a subset of the suite's tasks")
    parser.add_argument("--merge-seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--tune-ratios",
        type=int,
        nargs="+",
        default=None,
        help="ratios whose (beta, C) val chooses (default all)",
    )
    parser.add_argument("--single-seed", nargs="*", default=[], help="methods run with the first seed only")
    parser.add_argument(
        "--only-at",
        nargs="*",
        default=[],
        help="METHOD:R1,R2 runs METHOD at those ratios only (e.g. impart_qt:16,32)",
    )
    parser.add_argument("--n-val", type=int, default=None, help="first N val examples per task (default all)")
    parser.add_argument(
        "--n-test", type=int, default=None, help="first N test examples per task (default all)"
    )
    parser.add_argument("--heldout-chunks", type=int, default=None, help="first N held-out text chunks")
    parser.add_argument("--no-merge", action="store_true")
    parser.add_argument("--merge-only", action="store_true", help="run only the merges (no per-task tables)")
    parser.add_argument(
        "--fixed-selection",
        nargs="*",
        default=[],
        help="METHOD=BETA,C: use this (beta, C) at every ratio instead of choosing on val",
    )
    parser.add_argument("--no-lossless", action="store_true", help="skip the lossless sanity check")
    parser.add_argument(
        "--merging-from",
        type=Path,
        default=None,
        help="take the merges from this result file instead of running them",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the tasks an earlier run of the same plan already wrote to --out, run only the others",
    )
    parser.add_argument(
        "--resume-from",
        type=Path,
        nargs="*",
        default=[],
        help="like --resume, from these result files (e.g. tasks run in parallel with --tasks and their own --out)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("IMPART_BENCH_THREADS", "1")))
    ratios = tuple(int(r) if float(r).is_integer() else r for r in args.ratios)
    out_path = args.out or RESULTS / f"quality_{args.suite}.json"

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start = time.time()
    sources = [p for p in ([out_path] if args.resume else []) + list(args.resume_from) if p.exists()]
    previous_runs = [json.loads(p.read_text()) for p in sources]
    suite = load_suite(args.suite, tuple(args.tasks) if args.tasks else None)
    tasks_run = tuple(args.tasks or suite.tasks)
    methods = tuple(args.methods or TEST_METHODS[args.suite])
    if args.heldout_chunks:
        suite.heldout = suite.heldout[: args.heldout_chunks]
    run = Run(
        suite,
        ratios,
        tuple(args.seeds),
        GRID,
        tuple(args.val_seeds),
        methods,
        tune_ratios=tuple(args.tune_ratios) if args.tune_ratios else None,
        single_seed=tuple(args.single_seed),
        only_at={m: tuple(int(r) for r in rs.split(",")) for m, rs in (a.split(":") for a in args.only_at)},
        n_val=args.n_val,
        n_test=args.n_test,
        fixed_selection={
            m: tuple(float(x) for x in bc.split(","))
            for m, bc in (a.split("=") for a in args.fixed_selection)
        },
        lossless_check=not args.no_lossless,
    )
    result = {
        "meta": {
            "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "suite": args.suite,
            "pairs": suite.manifest,
            "ratios": list(ratios),
            "seeds": list(args.seeds),
            "val_seeds": list(args.val_seeds),
            "tune_ratios": args.tune_ratios,
            "single_seed": list(args.single_seed),
            "only_at": list(args.only_at),
            "fixed_selection": list(args.fixed_selection),
            "n_val": args.n_val,
            "n_test": args.n_test,
            "heldout_shape": list(suite.heldout.shape),
            "grid": [{"pre_prune_ratio": b, "importance_exponent": c} for b, c in GRID],
            "default_impart": DEFAULT_IMPART,
            "test_methods": list(methods),
            "methods": {
                k: {"description": m.description, "randomized": m.randomized, "unavailable": m.available()}
                for k, m in METHODS.items()
                if k in methods
            },
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "library_sha256": library_fingerprint(),
            "elapsed_s": None,
            "complete": False,
        },
        "tasks": {},
        "summary": {},
        "ordering": [],
        "merging": {"status": "not run", "reason": "the run has not reached the merges"},
        "rows": run.rows,
    }

    for previous in previous_runs:
        plan_keys = (
            "suite",
            "ratios",
            "seeds",
            "val_seeds",
            "tune_ratios",
            "single_seed",
            "only_at",
            "n_val",
        )
        plan_keys += ("n_test", "heldout_shape", "test_methods", "library_sha256")
        differ = [k for k in plan_keys if previous["meta"].get(k) != result["meta"].get(k)]
        if differ:
            sys.exit(
                f"resume: a result file was written with another plan ({differ}); rerun it or leave it out"
            )
        for task, info in previous["tasks"].items():
            if task in tasks_run and task not in result["tasks"]:
                result["tasks"][task] = info
                run.rows.extend(r for r in previous["rows"] if r["task"] == task)
                result["meta"]["resumed_s"] = result["meta"].get("resumed_s", 0.0) + info["elapsed_s"]
                log(f"quality: {task} kept from an earlier run (resume)")

    def flush():
        done = tuple(result["tasks"])
        try:
            result["summary"] = summarize(run.rows, done, ratios) if done else {}
            result["ordering"] = ordering_checks(result["summary"], ratios) if done else []
        except Exception as exc:  # the rows are what matter: never lose them to a summary bug
            result["summary_error"] = repr(exc)
            log(f"quality: summary failed ({exc!r}); the rows are written, rerun report after a fix")
        # with --resume, the time of the run that measured the kept tasks counts too
        result["meta"]["elapsed_s"] = time.time() - start + result["meta"].get("resumed_s", 0.0)
        write_json_atomic(result, out_path)

    def progress(task, info):
        result["tasks"][task] = {**info, "partial": True, "elapsed_s": time.time() - start}
        flush()
        del result["tasks"][task]

    run.on_progress = progress

    for task in () if args.merge_only else tasks_run:
        if task in result["tasks"]:
            continue
        log(f"quality ({args.suite}): {task}")
        t0 = time.time()
        with ReuseSVD() as reuse:
            result["tasks"][task] = run_task(run, task, log)
        result["tasks"][task]["svd_calls_reused"] = [reuse.hits, reuse.calls]
        result["tasks"][task]["elapsed_s"] = time.time() - t0
        flush()  # a partial run is usable
        log(f"  {task} done in {time.time() - t0:.0f}s, wrote {out_path}")
    if args.merging_from:
        result["merging"] = json.loads(args.merging_from.read_text())["merging"]
        log(f"quality: merges taken from {args.merging_from}")
    elif not args.no_merge and len(suite.tasks) > 1:
        t0 = time.time()
        result["merging"] = run_merges(suite, tuple(args.merge_seeds), log, args.n_test)
        result["merging"]["elapsed_s"] = time.time() - t0
    elif args.no_merge:
        result["merging"] = {"status": "not run", "reason": "--no-merge"}
    result["meta"]["complete"] = set(result["tasks"]) >= set(suite_tasks(args.suite))
    flush()
    log(f"quality: wrote {out_path} in {result['meta']['elapsed_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
