"""Allocation of keep probabilities (ALGORITHM.md section 4): formula, budget, shape, edge cases, bad input."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from impart_peft.allocation import (
    allocate_keep_prob,
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
    """ALGORITHM.md section 4, steps 1 to 4, written out literally with Python floats (no edge cases)."""
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
def test_matches_a_literal_statement_of_algorithm_1(name, beta, exponent):
    shape, ratio = (256, 256), 8.0  # budget 16 pairs, never below the pre-prune boundary for these beta
    sigma = spectra(256)[name]
    expected, boundary, gamma = reference_allocation(sigma, shape, ratio, beta, exponent)
    got = allocate_keep_prob(sigma, shape, ratio, beta, exponent)
    assert not got.pre_prune_lowered and not got.under_budget
    assert torch.allclose(got.keep_prob, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert got.gamma == pytest.approx(gamma, rel=1e-12)
    assert got.boundary <= boundary  # a pair whose p lands on exactly 1 counts as dropped


def test_drop_is_gamma_times_importance_inside_the_boundary():
    sigma = power_law(128)
    got = allocate_keep_prob(sigma, (128, 300), 16.0, 0.7, 0.5)
    b = got.boundary
    importance = 1 - (sigma / sigma[0]) ** 0.5
    assert torch.allclose(1 - got.keep_prob[:b], got.gamma * importance[:b], atol=1e-12, rtol=0)
    assert (got.keep_prob[b:] == 0).all()
    assert (got.keep_prob <= 1).all() and (got.keep_prob >= 0).all()


# ----------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", CRS)
@pytest.mark.parametrize("beta", [0.0, 0.6, 0.8, 0.95])
def test_budget_expected_values_equal_dense_over_ratio(shape, ratio, beta):
    m, n = shape
    for name, sigma in spectra(min(shape)).items():
        got = allocate_keep_prob(sigma, shape, ratio, beta, 1.0)
        expected_values = float(got.keep_prob.sum()) * (m + n)
        assert abs(expected_values - m * n / ratio) <= 1.0, (name, expected_values, m * n / ratio)
        assert got.achieved_keep_fraction == pytest.approx(
            got.target_keep_fraction, abs=1 / (min(shape) * (m + n))
        )
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
def test_shape_q1_one_non_increasing_zero_past_boundary(shape, ratio, beta, exponent):
    rank = min(shape)
    for name, sigma in spectra(rank).items():
        got = allocate_keep_prob(sigma, shape, ratio, beta, exponent)
        q = got.keep_prob
        budget = target_keep_fraction(shape, ratio) * rank
        if budget > 1:  # with less than one pair to spend, the single kept pair is partial (q_1 = budget)
            assert q[0] == 1.0, name
        assert (q[1:] <= q[:-1]).all(), name
        assert (q[got.boundary :] == 0).all() and (q[: got.boundary] > 0).all(), name
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
    results = [allocate_keep_prob(sigma, (64, 64), 4.0, 0.5, c) for c in exponents]
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
    results = [allocate_keep_prob(sigma, (rank, rank), 4.0, b, 1.0) for b in betas]
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
    # A flat spectrum spreads the budget over exactly the pre-pruned range: 1024 pairs, not 1023.
    assert allocate_keep_prob(torch.ones(5120), (5120, 5120), 16.0, 0.8, 1.0).boundary == 1024


# ------------------------------------------------------------------------------------ edge cases (4.5)


def test_zero_delta_stores_nothing():
    got = allocate_keep_prob(torch.zeros(16), (16, 30), 8.0, 0.8, 1.0)
    assert got.boundary == 0 and (got.keep_prob == 0).all() and got.achieved_keep_fraction == 0.0
    assert allocate_keep_prob(torch.zeros(16), (16, 30), None).boundary == 0


def test_all_sigma_equal_spreads_the_drop_uniformly():
    shape, ratio, beta = (64, 64), 8.0, 0.6
    budget = target_keep_fraction(shape, ratio) * 64  # 4 pairs
    boundary = pre_prune_boundary(64, beta)  # 25 pairs
    got = allocate_keep_prob(torch.full((64,), 3.0), shape, ratio, beta, 1.0)
    assert got.boundary == boundary
    assert torch.allclose(
        got.keep_prob[:boundary], torch.full((boundary,), budget / boundary, dtype=torch.float64)
    )
    assert (got.keep_prob[boundary:] == 0).all()
    # Equal up to float32 SVD rounding is treated as equal: the noise does not pick the survivors.
    noise = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-6
    jittered = allocate_keep_prob((3.0 * (1 - noise)).sort(descending=True).values, shape, ratio, beta, 1.0)
    assert jittered.boundary == boundary
    assert torch.allclose(jittered.keep_prob, got.keep_prob, atol=1e-12)


def test_single_pair():
    for shape in [(1, 50), (50, 1), (1, 1)]:
        for ratio in [1.5, 4.0, 40.0]:
            got = allocate_keep_prob(torch.tensor([2.0]), shape, ratio, 0.8, 1.0)
            q_bar = target_keep_fraction(shape, ratio)
            assert got.boundary == 1
            assert float(got.keep_prob[0]) == pytest.approx(q_bar)
            assert float(got.keep_prob[0]) * sum(shape) == pytest.approx(shape[0] * shape[1] / ratio)


def test_pre_pruning_alone_over_budget_lowers_the_pre_pruning():
    # beta = 0.9 keeps floor(6.4) = 6 pairs, but CR 2 pays for 16 whole pairs of a 64 x 64 matrix.
    sigma = power_law(64)
    got = allocate_keep_prob(sigma, (64, 64), 2.0, 0.9, 1.0)
    assert got.pre_prune_lowered and not got.under_budget
    assert got.boundary == 16
    assert (got.keep_prob[:16] == 1).all() and (got.keep_prob[16:] == 0).all()
    assert got.achieved_keep_fraction == pytest.approx(got.target_keep_fraction)
    # A fractional budget: the last pair is partial and the mean still holds.
    got = allocate_keep_prob(sigma, (64, 64), 2.2, 0.9, 1.0)
    budget = target_keep_fraction((64, 64), 2.2) * 64
    assert got.pre_prune_lowered and got.boundary == math.ceil(budget)
    assert got.keep_prob[0] == 1.0 and float(got.keep_prob.sum()) == pytest.approx(budget)
    assert not allocate_keep_prob(sigma, (64, 64), 16.0, 0.9, 1.0).pre_prune_lowered


def test_pre_prune_boundary_zero():
    # R = 3, beta = 0.7: floor(0.9) = 0 pairs survive pre-pruning; the boundary is raised to the budget.
    sigma = torch.tensor([3.0, 2.0, 1.0])
    got = allocate_keep_prob(sigma, (3, 3), 4.0, 0.7, 1.0)
    budget = target_keep_fraction((3, 3), 4.0) * 3
    assert got.pre_prune_lowered and got.boundary == math.ceil(budget) == 1
    assert float(got.keep_prob.sum()) == pytest.approx(budget)


def test_rank_deficient_delta_never_stores_zero_directions():
    sigma = torch.cat([torch.tensor([5.0, 3.0, 1.0]), torch.zeros(61)])
    # Budget 16 pairs > 3 non-zero pairs: keep the 3 whole, report the higher ratio achieved.
    got = allocate_keep_prob(sigma, (64, 64), 2.0, 0.5, 1.0)
    assert got.under_budget and got.boundary == 3
    assert got.keep_prob.tolist() == [1.0, 1.0, 1.0] + [0.0] * 61
    assert got.achieved_keep_fraction < got.target_keep_fraction
    # Budget 2 pairs < 3 non-zero pairs < pre-prune boundary 32: spend it on the 3, none on the zeros.
    got = allocate_keep_prob(sigma, (64, 64), 16.0, 0.5, 1.0)
    assert not got.under_budget and got.boundary == 3
    assert float(got.keep_prob.sum()) == pytest.approx(target_keep_fraction((64, 64), 16.0) * 64)
    # Float noise below max(m, n) * eps * sigma_1 counts as zero.
    sigma[3:] = 1e-7 * 5.0
    assert allocate_keep_prob(sigma, (64, 64), 2.0, 0.5, 1.0).boundary == 3


def test_lossless_keeps_every_nonzero_pair():
    sigma = torch.cat([power_law(10), torch.zeros(6)])
    got = allocate_keep_prob(sigma, (16, 20), None)
    assert got.keep_prob.tolist() == [1.0] * 10 + [0.0] * 6 and got.boundary == 10


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
