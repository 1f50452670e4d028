"""Allocation of keep probabilities (ALGORITHM.md section 4): formula, budget, shape, edge cases, bad input.

Two rules: ``"paper"`` (the default, the authors' ``cal_sparsity_ratios``: gamma fixed, whole pairs dropped from the
end) and ``"rescaled"`` (this project's first reading: gamma re-solved). Each is checked against a literal statement
of itself, and the paper rule's defining properties are shown to fail for the rescaled one.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from impart_peft.allocation import (
    ALLOCATION_RULES,
    allocate_keep_prob,
    factor_value_budget,
    pre_prune_boundary,
    target_keep_fraction,
)

CRS = [2, 3, 4, 8, 16, 32, 64, 128]
SHAPES = [(64, 64), (40, 96), (96, 40), (7, 200), (200, 7)]


def power_law(rank: int, exponent: float = 1.0) -> torch.Tensor:
    return torch.arange(1, rank + 1, dtype=torch.float64) ** -exponent


def spectra(rank: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    noisy = torch.rand(rank, generator=generator, dtype=torch.float64).sort(descending=True).values + 0.01
    return {
        "power": power_law(rank),
        "sqrt": power_law(rank, 0.5),
        "exp": torch.exp(-torch.arange(rank, dtype=torch.float64) / max(1, rank / 8)),
        "linear": torch.linspace(1.0, 0.05, rank, dtype=torch.float64),
        "random": noisy,
    }


def reference_allocation(sigma, shape, ratio, beta, exponent):
    """The "rescaled" rule (gamma re-solved until no p_k > 1), written out literally with Python floats."""
    m, n = shape
    rank = min(m, n)
    target_drop = 1 - (m * n / ratio) / (rank * (m + n))  # alpha' = 1 - q_bar
    boundary = math.floor(rank * (1 - beta) + 1e-9)
    weights = [1 - (float(s) / float(sigma[0])) ** exponent for s in sigma]
    while True:
        gamma = (target_drop * rank - (rank - boundary)) / sum(weights[:boundary])
        drop = [gamma * w if k < boundary else 1.0 for k, w in enumerate(weights)]
        over = sum(1 for p in drop[:boundary] if p > 1)
        if over == 0:
            return [1 - p for p in drop], boundary, gamma
        boundary -= over


# ---------------------------------------------------------------------------------------------- formula


@pytest.mark.parametrize("name", ["power", "sqrt", "exp", "linear", "random"])
@pytest.mark.parametrize("beta, exponent", [(0.8, 1.0), (0.6, 0.5), (0.7, 1.0), (0.5, 2.0), (0.0, 1.0)])
def test_rescaled_rule_matches_its_literal_statement(name, beta, exponent):
    shape, ratio = (256, 256), 8.0  # budget 16 pairs, never below the pre-prune boundary for these beta
    sigma = spectra(256)[name]
    expected, boundary, gamma = reference_allocation(sigma, shape, ratio, beta, exponent)
    got = allocate_keep_prob(sigma, shape, ratio, beta, exponent, rule="rescaled")
    assert not got.pre_prune_lowered and not got.under_budget
    assert torch.allclose(got.keep_prob, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert got.gamma == pytest.approx(gamma, rel=1e-12)
    assert got.boundary <= boundary  # a pair whose p lands on exactly 1 counts as dropped


@pytest.mark.parametrize("rule", ALLOCATION_RULES)
def test_drop_is_gamma_times_importance_inside_the_boundary(rule):
    sigma = power_law(128)
    got = allocate_keep_prob(sigma, (128, 300), 16.0, 0.7, 0.5, rule=rule)
    b = int((got.keep_prob > 0).sum())
    importance = 1 - (sigma / sigma[0]) ** 0.5
    assert torch.allclose(1 - got.keep_prob[:b], got.gamma * importance[:b], atol=1e-12, rtol=0)
    assert (got.keep_prob[b:] == 0).all()
    assert (got.keep_prob <= 1).all() and (got.keep_prob >= 0).all()


# ----------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", CRS)
@pytest.mark.parametrize("beta", [0.0, 0.6, 0.8, 0.95])
def test_budget_is_exact_for_both_rules(shape, ratio, beta):
    # The stored values (kept rows of U and V over every column) are exactly floor(m n / CR), for both rules.
    m, n = shape
    for rule in ALLOCATION_RULES:
        for name, sigma in spectra(min(shape)).items():
            got = allocate_keep_prob(sigma, shape, ratio, beta, 1.0, rule=rule)
            assert not got.under_budget
            assert (
                got.budget
                == math.floor(m * n / ratio + 1e-6)
                == factor_value_budget(shape, 1 / ratio * m * n / (min(shape) * (m + n)))
            )
            assert int(got.keep_count.sum()) == got.budget, (rule, name)
            assert got.keep_count.shape == (2, got.boundary)
            assert (got.keep_count[0] >= 1).all() and (got.keep_count[0] <= m).all()
            assert (got.keep_count[1] >= 1).all() and (got.keep_count[1] <= n).all()
            assert got.achieved_keep_fraction <= got.target_keep_fraction + 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", CRS)
@pytest.mark.parametrize("beta", [0.0, 0.6, 0.8, 0.95])
def test_rescaled_rule_spends_the_mean_in_keep_prob(shape, ratio, beta):
    m, n = shape
    for name, sigma in spectra(min(shape)).items():
        got = allocate_keep_prob(sigma, shape, ratio, beta, 1.0, rule="rescaled")
        expected_values = float(got.keep_prob.sum()) * (m + n)
        assert abs(expected_values - m * n / ratio) <= 1.0, (name, expected_values, m * n / ratio)
        assert got.target_keep_fraction == pytest.approx(target_keep_fraction(shape, ratio))


def test_target_keep_fraction_square_is_half_of_one_minus_alpha():
    # The paper's "alpha <- (1 + alpha) / 2" for U and V of a square matrix.
    for ratio in CRS:
        assert target_keep_fraction((512, 512), ratio) == pytest.approx((1 / ratio) / 2)
    assert target_keep_fraction((100, 300), 10) == pytest.approx(100 * 300 / 10 / (100 * 400))


# ------------------------------------------------------------------------------------------------ shape


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [4, 16, 64])
@pytest.mark.parametrize("beta", [0.6, 0.8])
@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("rule", ALLOCATION_RULES)
def test_shape_q1_one_non_increasing_zero_past_boundary(shape, ratio, beta, exponent, rule):
    rank = min(shape)
    for name, sigma in spectra(rank).items():
        got = allocate_keep_prob(sigma, shape, ratio, beta, exponent, rule=rule)
        q = got.keep_prob
        kept = int((q > 0).sum())
        budget = target_keep_fraction(shape, ratio) * rank
        if budget > 1:  # with less than one pair to spend, the single kept pair is partial (q_1 = budget)
            assert q[0] == 1.0, name
        assert (q[1:] <= q[:-1]).all(), name
        assert (q[kept:] == 0).all() and got.boundary >= kept - 1, name
        pre_pruned = pre_prune_boundary(rank, beta)
        if not got.pre_prune_lowered:
            assert (q[pre_pruned:] == 0).all(), name
        else:
            assert got.boundary <= math.ceil(budget - 1e-9)


def test_larger_exponent_flattens_the_drop_profile():
    # By the formula, the share of the drop that pair k takes is (1 - s_k^C) / sum_j (1 - s_j^C) with
    # s = sigma / sigma_1 < 1. As C grows every s^C -> 0, so every weight -> 1: the drop spreads evenly and
    # the important pairs (k = 2, 3, ...) lose MORE while the tail of the kept range loses less. Small C
    # concentrates the drop on the small-sigma end. (The paper summaries in ../seeds claim the opposite
    # direction; the formula is what is implemented and asserted here.)
    sigma = power_law(64)
    exponents = [0.25, 0.5, 1.0, 2.0, 4.0]
    results = [allocate_keep_prob(sigma, (64, 64), 4.0, 0.5, c, rule="rescaled") for c in exponents]
    assert {r.boundary for r in results} == {32}  # no clipping: only the profile moves
    second = [float(r.keep_prob[1]) for r in results]
    last = [float(r.keep_prob[31]) for r in results]
    assert all(a > b for a, b in pairwise(second)), second
    assert all(a < b for a, b in pairwise(last)), last
    spread = [float((1 - r.keep_prob[1:32]).std()) for r in results]
    assert all(a > b for a, b in pairwise(spread)), spread


@pytest.mark.parametrize("name", ["power", "sqrt", "random"])
def test_larger_beta_prunes_more_and_gives_the_budget_to_the_top_pairs(name):
    rank = 64
    sigma = spectra(rank)[name]
    betas = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
    results = [allocate_keep_prob(sigma, (rank, rank), 4.0, b, 1.0, rule="rescaled") for b in betas]
    budget = target_keep_fraction((rank, rank), 4.0) * rank
    for beta, result in zip(betas, results, strict=True):
        assert result.boundary <= max(pre_prune_boundary(rank, beta), math.ceil(budget))
    for lower, higher in pairwise(results):
        assert higher.boundary <= lower.boundary
        top = higher.boundary
        # All of the budget goes to the top pairs that survive the larger beta; the smaller beta gives some
        # of it to pairs further down (true for any spectrum) ...
        assert float(higher.keep_prob[:top].sum()) >= float(lower.keep_prob[:top].sum()) - 1e-12
        # ... and for decaying spectra every surviving pair is kept at least as often.
        assert (higher.keep_prob[:top] >= lower.keep_prob[:top] - 1e-12).all()
    assert results[-1].boundary < results[0].boundary


def test_pre_prune_boundary_is_exact_for_decimal_beta():
    assert pre_prune_boundary(10, 0.8) == 2  # float: 10 * (1 - 0.8) = 1.9999999999999996
    assert pre_prune_boundary(5120, 0.8) == 1024
    assert pre_prune_boundary(4096, 0.8) == 819
    assert pre_prune_boundary(10, 0.9) == 1
    assert pre_prune_boundary(10, 0.0) == 10
    assert pre_prune_boundary(3, 0.7) == 0
    # A flat spectrum spreads the budget (rescaled rule) over exactly the pre-pruned range: 1024 pairs, not 1023.
    assert (
        allocate_keep_prob(torch.ones(5120), (5120, 5120), 16.0, 0.8, 1.0, rule="rescaled").boundary == 1024
    )


# ------------------------------------------------------------------------------------ edge cases (4.5)


def test_zero_delta_stores_nothing():
    got = allocate_keep_prob(torch.zeros(16), (16, 30), 8.0, 0.8, 1.0)
    assert got.boundary == 0 and (got.keep_prob == 0).all() and got.achieved_keep_fraction == 0.0
    assert allocate_keep_prob(torch.zeros(16), (16, 30), None).boundary == 0


def test_all_sigma_equal_paper_rule_keeps_whole_pairs():
    # Importance 0 everywhere: p_k = 0 inside the boundary, so the authors' shift drops whole pairs from the end
    # until the mean reaches gamma: the survivors are kept whole (uniform q = 1), and the counts spend the rest.
    shape, ratio, beta = (64, 64), 8.0, 0.6
    got = allocate_keep_prob(torch.full((64,), 3.0), shape, ratio, beta, 1.0)
    kept = int((got.keep_prob > 0).sum())
    assert (got.keep_prob[:kept] == 1).all() and kept <= 4  # budget: 4 whole pairs
    assert got.keep_count.tolist() == [[64] * 4, [64] * 4]
    noise = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-6
    jittered = allocate_keep_prob((3.0 * (1 - noise)).sort(descending=True).values, shape, ratio, beta, 1.0)
    assert torch.equal(jittered.keep_count, got.keep_count)


def test_all_sigma_equal_rescaled_rule_spreads_the_drop_uniformly():
    shape, ratio, beta = (64, 64), 8.0, 0.6
    budget = target_keep_fraction(shape, ratio) * 64  # 4 pairs
    boundary = pre_prune_boundary(64, beta)  # 25 pairs
    got = allocate_keep_prob(torch.full((64,), 3.0), shape, ratio, beta, 1.0, rule="rescaled")
    assert got.boundary == boundary
    assert torch.allclose(
        got.keep_prob[:boundary], torch.full((boundary,), budget / boundary, dtype=torch.float64)
    )
    assert (got.keep_prob[boundary:] == 0).all()
    # Equal up to float32 SVD rounding is treated as equal: the noise does not pick the survivors.
    noise = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-6
    jittered = allocate_keep_prob(
        (3.0 * (1 - noise)).sort(descending=True).values, shape, ratio, beta, 1.0, rule="rescaled"
    )
    assert jittered.boundary == boundary
    assert torch.allclose(jittered.keep_prob, got.keep_prob, atol=1e-12)


@pytest.mark.parametrize("rule", ALLOCATION_RULES)
def test_single_pair(rule):
    # R = 1: the one pair stores floor(m n / CR) values, at least one row of each factor; a budget under 2 values
    # cannot hold a pair, so nothing is stored.
    for shape in [(1, 50), (50, 1), (1, 1), (3, 80)]:
        for ratio in [1.5, 4.0, 40.0]:
            sigma = torch.tensor([2.0]) if min(shape) == 1 else torch.tensor([2.0, 1.0, 0.5])
            got = allocate_keep_prob(sigma, shape, ratio, 0.8, 1.0, rule=rule)
            budget = math.floor(shape[0] * shape[1] / ratio + 1e-6)
            assert got.boundary == (0 if budget < 2 else got.boundary) and got.boundary <= min(shape)
            assert int(got.keep_count.sum()) == (budget if budget >= 2 else 0), (shape, ratio)
            if got.boundary:
                assert float(got.keep_prob[0]) > 0


@pytest.mark.parametrize("rule", ALLOCATION_RULES)
def test_pre_pruning_alone_over_budget_lowers_the_pre_pruning(rule):
    # beta = 0.9 keeps floor(6.4) = 6 pairs, but CR 2 pays for 16 whole pairs of a 64 x 64 matrix.
    sigma = power_law(64)
    got = allocate_keep_prob(sigma, (64, 64), 2.0, 0.9, 1.0, rule=rule)
    assert got.pre_prune_lowered and not got.under_budget
    assert got.boundary == 16
    assert (got.keep_prob[:16] == 1).all() and (got.keep_prob[16:] == 0).all()
    assert got.keep_count.tolist() == [[64] * 16, [64] * 16]
    # A fractional budget: the top pairs whole, the last one partial, the count exact.
    got = allocate_keep_prob(sigma, (64, 64), 2.2, 0.9, 1.0, rule=rule)
    budget = target_keep_fraction((64, 64), 2.2) * 64
    assert got.pre_prune_lowered and got.boundary == math.ceil(budget)
    if rule == "paper":  # the rescaled rule spreads the drop over the raised boundary by importance instead
        assert got.keep_count[:, :-1].tolist() == [[64] * 14, [64] * 14]
    assert got.keep_prob[0] == 1.0 and int(got.keep_count.sum()) == math.floor(64 * 64 / 2.2)
    assert not allocate_keep_prob(sigma, (64, 64), 16.0, 0.9, 1.0, rule=rule).pre_prune_lowered


def test_pre_prune_boundary_zero():
    # R = 3, beta = 0.7: floor(0.9) = 0 pairs survive pre-pruning; the boundary is raised to the budget.
    sigma = torch.tensor([3.0, 2.0, 1.0])
    for rule in ALLOCATION_RULES:
        got = allocate_keep_prob(sigma, (3, 3), 4.0, 0.7, 1.0, rule=rule)
        budget = target_keep_fraction((3, 3), 4.0) * 3
        assert got.pre_prune_lowered and got.boundary == math.ceil(budget) == 1
        assert int(got.keep_count.sum()) == math.floor(9 / 4)


@pytest.mark.parametrize("rule", ALLOCATION_RULES)
def test_rank_deficient_delta_never_stores_zero_directions(rule):
    sigma = torch.cat([torch.tensor([5.0, 3.0, 1.0]), torch.zeros(61)])
    # Budget 16 pairs > 3 non-zero pairs: keep the 3 whole, report the higher ratio achieved.
    got = allocate_keep_prob(sigma, (64, 64), 2.0, 0.5, 1.0, rule=rule)
    assert got.under_budget and got.boundary == 3
    assert got.keep_count.tolist() == [[64] * 3, [64] * 3]
    assert (got.keep_prob[3:] == 0).all()
    assert got.achieved_keep_fraction < got.target_keep_fraction
    # Budget 2 pairs < 3 non-zero pairs < pre-prune boundary 32: spend it on at most the 3, none on the zeros.
    got = allocate_keep_prob(sigma, (64, 64), 16.0, 0.5, 1.0, rule=rule)
    assert not got.under_budget and got.boundary <= 3 and (got.keep_prob[3:] == 0).all()
    assert int(got.keep_count.sum()) == 64 * 64 // 16
    # Float noise below max(m, n) * eps * sigma_1 counts as zero.
    sigma[3:] = 1e-7 * 5.0
    assert allocate_keep_prob(sigma, (64, 64), 2.0, 0.5, 1.0, rule=rule).boundary == 3


def test_lossless_keeps_every_nonzero_pair():
    sigma = torch.cat([power_law(10), torch.zeros(6)])
    got = allocate_keep_prob(sigma, (16, 20), None)
    assert got.keep_prob.tolist() == [1.0] * 10 + [0.0] * 6 and got.boundary == 10
    assert got.keep_count.tolist() == [[16] * 10, [20] * 10] and got.budget is None


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ratio", [1, 1.0, 0.5, 0, -4, float("nan"), float("inf"), True, "16"])
def test_bad_compression_ratio(ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        allocate_keep_prob(power_law(8), (8, 8), ratio)
    with pytest.raises(ValueError, match="compression_ratio"):
        target_keep_fraction((8, 8), ratio)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan"), True, "0.8", None])
def test_bad_pre_prune_ratio(beta):
    with pytest.raises(ValueError, match=r"pre_prune_ratio \(beta\)"):
        allocate_keep_prob(power_law(8), (8, 8), 4.0, beta)


@pytest.mark.parametrize("exponent", [0, 0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_importance_exponent(exponent):
    with pytest.raises(ValueError, match=r"importance_exponent \(C\)"):
        allocate_keep_prob(power_law(8), (8, 8), 4.0, 0.8, exponent)


def test_bad_singular_values():
    with pytest.raises(ValueError, match="1-D"):
        allocate_keep_prob(torch.ones(2, 4), (8, 8), 4.0)
    with pytest.raises(ValueError, match="expected 8 singular values"):
        allocate_keep_prob(torch.ones(7), (8, 9), 4.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        allocate_keep_prob(torch.tensor([1.0, float("nan")]), (2, 2), 4.0)
    with pytest.raises(ValueError, match="descending"):
        allocate_keep_prob(torch.tensor([1.0, 2.0]), (2, 2), 4.0)
    with pytest.raises(ValueError, match="non-negative"):
        allocate_keep_prob(torch.tensor([1.0, -2.0]), (2, 2), 4.0)


# ------------------------------------------------------------------------- the paper's rule (the default)


def authors_rule(sigma, target_drop, beta, exponent):
    """A literal restatement of ``cal_sparsity_ratios`` in the authors' sparsify/sparsify.py (X1AOX1A/ImPart),
    Python floats and lists as there: returns the drop rates of the kept pairs (the list it returns)."""
    powered = [float(s) ** exponent for s in sigma]
    kept = powered[: int(len(powered) * (1 - beta))]
    largest = max(kept)
    gamma = (target_drop - beta) / (1 - beta)
    drops = [(1 - s / largest) * gamma for s in kept]
    last = len(drops) - 1
    while sum(drops) / len(drops) < gamma:
        drops[last] = 1
        last -= 1
    return drops[: last + 1], gamma


PAPER_CASES = [  # (shape, CR, beta, C): shapes whose R (1 - beta) is not near an integer (int() vs exact floor)
    ((256, 256), 16.0, 0.8, 1.0),
    ((256, 256), 32.0, 0.6, 0.5),
    ((256, 256), 8.0, 0.7, 1.0),
    ((203, 600), 16.0, 0.8, 0.5),
    ((600, 200), 64.0, 0.6, 1.0),
    ((300, 300), 128.0, 0.7, 2.0),
]


@pytest.mark.parametrize("name", ["power", "sqrt", "exp", "linear", "random"])
@pytest.mark.parametrize("shape, ratio, beta, exponent", PAPER_CASES)
def test_paper_rule_matches_the_authors_code_value_for_value(name, shape, ratio, beta, exponent):
    sigma = spectra(min(shape))[name]
    target_drop = 1 - target_keep_fraction(shape, ratio)
    drops, gamma = authors_rule(sigma, target_drop, beta, exponent)
    got = allocate_keep_prob(sigma, shape, ratio, beta, exponent)
    kept = int((got.keep_prob > 0).sum())
    assert kept == len(drops), (kept, len(drops))
    assert got.gamma == pytest.approx(gamma, rel=1e-15)
    expected = torch.tensor([1 - p for p in drops], dtype=torch.float64)
    assert torch.allclose(got.keep_prob[:kept], expected, rtol=0, atol=1e-15)
    # ... and the counts realise those q: round(q m), round(q n), except on the last pairs, which take the rest of
    # the budget from the end backwards: every one of them raised, all but the first of them whole.
    m, n = shape
    rounded = torch.stack([(expected * m).round(), (expected * n).round()]).to(torch.int64)
    counts = got.keep_count[:, :kept]
    differs = (counts != rounded).any(dim=0).nonzero().flatten().tolist()
    assert differs == list(range(kept - len(differs), kept)), differs
    assert (counts[:, differs].sum(0) > rounded[:, differs].sum(0)).all()
    assert counts[:, differs[1:]].tolist() == [[m] * len(differs[1:]), [n] * len(differs[1:])]


def paper_rule_violations(got, sigma, shape, ratio, beta, exponent) -> list[str]:
    """What the authors' rule guarantees, checked on an allocation; empty when it holds."""
    problems = []
    q = got.keep_prob
    kept = int((q > 0).sum())
    gamma = (1 - target_keep_fraction(shape, ratio) - beta) / (1 - beta)
    if kept and float(q[:kept].min()) < 1 - gamma - 1e-12:
        problems.append(f"min kept q {float(q[:kept].min()):.3g} < 1 - gamma = {1 - gamma:.3g}")
    if abs(got.gamma - gamma) > 1e-12:
        problems.append(f"gamma {got.gamma} re-solved (fixed value {gamma})")
    importance = 1 - (sigma / sigma[0]) ** exponent
    step3 = 1 - gamma * importance[:kept]
    if not torch.allclose(q[:kept], step3, rtol=0, atol=1e-12):
        problems.append("kept q differ from the step-3 values")
    if (q[kept:] != 0).any():
        problems.append("dropped pairs are not a suffix")
    if kept > pre_prune_boundary(min(shape), beta):
        problems.append("kept past the pre-prune boundary")
    return problems


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("beta, exponent", [(0.8, 1.0), (0.6, 0.5), (0.7, 1.0)])
def test_paper_rule_properties_hold_and_the_rescaled_rule_breaks_them(shape, ratio, beta, exponent):
    broken = 0
    for name, sigma in spectra(min(shape)).items():
        if 1 - target_keep_fraction(shape, ratio) <= beta or pre_prune_boundary(min(shape), beta) == 0:
            continue  # the pre-pruning edge case, tested on its own
        paper = allocate_keep_prob(sigma, shape, ratio, beta, exponent, rule="paper")
        assert paper_rule_violations(paper, sigma, shape, ratio, beta, exponent) == [], name
        rescaled = allocate_keep_prob(sigma, shape, ratio, beta, exponent, rule="rescaled")
        broken += bool(paper_rule_violations(rescaled, sigma, shape, ratio, beta, exponent))
    if ratio >= 16 and min(shape) >= 40:
        assert broken >= 3, "the rescaled rule should fail the paper's checks on most spectra"


def test_rescaled_rule_keeps_pairs_at_tiny_probabilities_where_the_paper_rule_does_not():
    # The failure the benchmark traced: at high CR the re-solved gamma exceeds 1 and the pairs next to the
    # boundary get q of 1e-3 or less; the paper's rule never goes below 1 - gamma.
    sigma = power_law(512, 0.5)
    paper = allocate_keep_prob(sigma, (512, 512), 64.0, 0.8, 1.0)
    rescaled = allocate_keep_prob(sigma, (512, 512), 64.0, 0.8, 1.0, rule="rescaled")
    kept = lambda got: got.keep_prob[got.keep_prob > 0]  # noqa: E731
    assert float(kept(paper).min()) >= 1 - paper.gamma > 0.03
    assert rescaled.gamma > 1 and float(kept(rescaled).min()) < 0.01
    assert int(paper.keep_count.sum()) == int(rescaled.keep_count.sum()) == 512 * 512 // 64


def test_budget_as_mean_keep_equals_budget_as_ratio():
    # ImPart-QT gives the budget as a mean keep fraction; the same allocation routine serves both.
    for rule in ALLOCATION_RULES:
        for name, sigma in spectra(96).items():
            by_ratio = allocate_keep_prob(sigma, (96, 200), 16.0, 0.7, 1.0, rule=rule)
            by_mean = allocate_keep_prob(
                sigma, (96, 200), None, 0.7, 1.0, rule=rule, mean_keep=target_keep_fraction((96, 200), 16.0)
            )
            assert torch.equal(by_ratio.keep_prob, by_mean.keep_prob), name
            assert torch.equal(by_ratio.keep_count, by_mean.keep_count), name
    # A mean keep above m n / (R (m + n)) (more values than the dense matrix) is allowed: quantised values pay for it.
    got = allocate_keep_prob(power_law(64), (64, 64), None, 0.0, 1.0, mean_keep=0.9)
    assert int(got.keep_count.sum()) == math.floor(0.9 * 64 * 128)


def test_bad_rule_and_budget():
    with pytest.raises(ValueError, match="allocation rule must be one of"):
        allocate_keep_prob(power_law(8), (8, 8), 4.0, rule="dare")
    with pytest.raises(ValueError, match="not both"):
        allocate_keep_prob(power_law(8), (8, 8), 4.0, mean_keep=0.5)
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="mean_keep"):
            allocate_keep_prob(power_law(8), (8, 8), None, mean_keep=bad)
