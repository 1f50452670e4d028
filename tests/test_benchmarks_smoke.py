"""Smoke test of the benchmark code (benchmarks/quality.py, speed.py) on a tiny real pair made in seconds.

The benchmark itself (``benchmarks/run_all.sh``) takes tens of minutes; this checks that its pieces measure what
they claim: lossless ImPart gives the fine-tune back (KL ~ 0), every method stores the budget it is asked for,
vectors are restored densely for every method, and the summary / ordering logic computes the right numbers.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pairs as P  # noqa: E402
import quality as Q  # noqa: E402
import speed as S  # noqa: E402

TINY = replace(
    P.RECIPE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    seq_len=64,
    finetune_steps={"add": 1, "extract": 6},
    finetune_batch=16,
    finetune_lr={"add": 1e-2, "extract": 1e-2},
    n_val=8,
    n_test=24,
    n_heldout=4,
)


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    base = P.LlamaForCausalLM(P.model_config(TINY)).eval()
    splits = P.task_splits("extract", TINY, TINY.finetune_steps["extract"] * TINY.finetune_batch)
    ft = P.finetune(base, "extract", TINY, splits["train"])  # real AdamW steps on every parameter
    heldout = P.text_batch(P.general_text(__import__("random").Random(0), 4 * 64), 64, 4)
    return base, ft, splits, heldout


def _compressed_model(base, ft, method, ratio, seed=0, params=None):
    deltas = Q.matrix_deltas(base.state_dict(), ft.state_dict())
    sd, stored, dense = Q.compressed_state_dict(
        base.state_dict(), ft.state_dict(), deltas, Q.METHODS[method], ratio, seed, params or {}
    )
    model = P.LlamaForCausalLM(P.model_config(TINY)).eval()
    model.load_state_dict(sd)
    return model, sd, stored, dense


def test_splits_are_disjoint_and_answers_are_exact():
    splits = P.task_splits("add", TINY, 200)
    prompts = {k: {p for p, _ in v} for k, v in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]
    for prompt, answer in splits["test"]:
        a, b = (int(x) for x in prompt.rstrip("=").split("+"))
        assert int(answer[::-1]) == a + b
    ids, mask = P.example_batch([("12+34=", "640")])
    # the 3 positions that predict the answer are those of "=" and the first 2 answer chars
    assert P.decode(ids[0][mask[0]].tolist()) == "=64"


def test_lossless_impart_is_the_finetune_and_compression_costs_kl(tiny_pair):
    base, ft, splits, heldout = tiny_pair
    ref = Q.reference(ft, splits["test"], heldout)
    model, _, _, _ = _compressed_model(base, ft, "impart_default", None, params=Q.DEFAULT_IMPART)
    lossless = Q.score(model, ref, with_text=True)
    assert lossless["kl_task"] < 1e-7 and lossless["kl_text"] < 1e-7
    assert lossless["acc"] == Q.score(ft, ref, with_text=False)["acc"]
    dare, _, _, _ = _compressed_model(base, ft, "dare", 64)
    dare_kl = Q.score(dare, ref, with_text=True)["kl_text"]
    # A 64x sparser delta moves the model measurably away from the fine-tune.
    assert 1e3 * max(lossless["kl_text"], 1e-9) < dare_kl


@pytest.mark.parametrize("ratio", [4, 8])
def test_every_method_stores_the_budget_and_restores_vectors_densely(tiny_pair, ratio):
    base, ft, _, _ = tiny_pair
    ft_sd = ft.state_dict()
    counts = {}
    for method in ("impart_default", "dare", "lowrank", "magnitude"):
        _, sd, stored, dense = _compressed_model(base, ft, method, ratio, params=None)
        counts[method] = stored
        for key, value in ft_sd.items():
            if value.dim() == 1:  # RMSNorm weights: the fine-tune's own values, for every method
                assert torch.equal(sd[key], value), (method, key)
            else:
                assert not torch.equal(sd[key], value), (method, key)
        assert dense == sum(v.numel() for v in ft_sd.values() if v.dim() == 2)
    budget = dense / ratio
    # DARE and ImPart store the same number of values in expectation (ImPart also stores its r singular values).
    assert abs(counts["dare"] - budget) < 0.05 * budget
    assert abs(counts["impart_default"] - budget) < 0.15 * budget
    assert abs(counts["magnitude"] - budget) < 0.01 * budget
    assert abs(counts["lowrank"] - budget) < 0.35 * budget  # whole pairs: rounding to an integer rank


def test_kept_summary_and_ordering_logic():
    assert Q.kept(0.55, 0.1, 1.0) == pytest.approx(50.0)
    rows = []
    for seed, (a, b) in enumerate([(80.0, 60.0), (90.0, 70.0)]):
        for task, value in (("t1", a), ("t2", b)):
            for method, ratio, v in (("impart", 8, value), ("dare", 4, value - 5), ("lowrank", 16, 99.0)):
                rows.append(
                    {
                        "split": "test",
                        "method": method,
                        "ratio": ratio,
                        "task": task,
                        "seed": seed,
                        "kept": v,
                        "acc": 0.0,
                        "kl_text": 1.0 / v,
                        "kl_task": 0.0,
                        "achieved_ratio": ratio,
                    }
                )
    for method, ratio in (("impart", 16), ("impart", 4), ("dare", 8)):
        for task in ("t1", "t2"):
            rows.append(
                {
                    "split": "test",
                    "method": method,
                    "ratio": ratio,
                    "task": task,
                    "seed": 0,
                    "kept": 50.0,
                    "acc": 0.0,
                    "kl_text": 0.02,
                    "kl_task": 0.0,
                    "achieved_ratio": ratio,
                }
            )
    summary = Q.summarize(rows, ("t1", "t2"), (4, 8, 16))
    assert summary["t1"]["impart"]["8"]["kept"]["mean"] == pytest.approx(85.0)
    assert summary["t1"]["impart"]["8"]["kept"]["std"] == pytest.approx(7.0710678)
    # mean over tasks of each seed, then over seeds
    assert summary["mean"]["impart"]["8"]["kept"]["mean"] == pytest.approx(75.0)
    checks = {(c["task"], c["claim"]): c for c in Q.ordering_checks(summary, (4, 8, 16))}
    assert checks[("t1", "impart at CR 8 >= DARE at CR 4")]["holds_kept"]
    assert checks[("t1", "impart at CR 16 >= DARE at CR 8")]["holds_kept"]  # 50 vs 50: "at least matches"
    assert checks[("t1", "impart at CR 16 >= DARE at CR 8")]["kept"] == [50.0, 50.0]
    assert not checks[("t1", "impart > LowRank at CR 16")]["holds_kept"]  # 50 vs 99


def test_speed_reference_stores_the_same_budget_and_its_masks(tiny_pair):
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 96, generator=gen) * torch.linspace(1, 0.05, 96)
    u_vals, v_vals, mask_u, mask_v, sigma = S.reference_compress(delta, 8, 0.8, 1.0, seed=0)
    lib = Q.compress_delta(delta, 8, 0.8, 1.0, seed=0, name="x")
    assert abs((u_vals.numel() + v_vals.numel()) - lib.num_factor_values) < 0.15 * lib.num_factor_values
    assert mask_u.shape == (64, 64) and mask_v.shape == (96, 64)  # the reference must store every mask bit
    rows = S.compression_times(((32, 48),), torch.device("cpu"), lambda _: None)
    assert rows[0]["library_stored_values"] > 0 and rows[0]["reference_s"] > 0


def test_reusing_svd_changes_no_bit_of_any_method(tiny_pair):
    """ReuseSVD (the benchmark's reuse of svd_top results) gives the very same compressed weights."""
    base, ft, _, _ = tiny_pair
    base_sd, ft_sd = base.state_dict(), ft.state_dict()
    deltas = Q.matrix_deltas(base_sd, ft_sd)  # one tensor per matrix for the whole run, as run_task does
    plan = [("impart", 0), ("impart", 1), ("lowrank", 0), ("impart_qt", 0), ("impart_qt", 1), ("impart", 0)]
    plan = [(m, s) for m, s in plan if Q.METHODS[m].available() is None]

    def compress_all():
        out = []
        for method, seed in plan:
            params = Q.DEFAULT_IMPART if method.startswith("impart") else {}
            out.append(
                Q.compressed_state_dict(base_sd, ft_sd, deltas, Q.METHODS[method], 8, seed, params)[:2]
            )
        return out

    plain = compress_all()
    with Q.ReuseSVD() as reuse:
        reused = compress_all()
    assert reuse.hits > 0  # the reuse did happen
    for (sd_a, stored_a), (sd_b, stored_b) in zip(plain, reused, strict=True):
        assert stored_a == stored_b
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_teacher_forced_exact_match_is_greedy_decoding(tiny_pair):
    """The scorer's exact match (argmax at every answer position, terminator included) equals generating greedily
    and comparing, on id sequences batched the way the real suite batches them: gold answers are the model's own
    greedy continuations for half the prompts and the same with the last token changed for the other half."""
    import real_pairs as R

    _, ft, splits, _ = tiny_pair
    end = P.STOI["."]

    def greedy(prompt, n):
        out = ft.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=end, pad_token_id=end
        )
        return out[0, len(prompt) :].tolist()

    examples = []
    for i, (prompt, _) in enumerate(splits["test"]):
        ids = P.encode(prompt)
        answer = greedy(ids, 4)
        if i % 2:
            answer = answer[:-1] + [(answer[-1] + 1) % len(P.CHARS)]
        examples.append([ids, answer])
    ref = Q.reference(ft, examples, None, lambda ex: R.example_batch(ex, end))
    acc = Q.score(ft, ref, with_text=False)["acc"]
    by_generation = [greedy(p, len(a)) == a for p, a in examples]
    assert acc == sum(by_generation) / len(examples)
    assert 0.3 < acc < 0.7  # both outcomes occur: the check is not vacuous
