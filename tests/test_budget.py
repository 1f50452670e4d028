"""The pure math of the model-wide size budget and of "auto" beta and C (impart_peft.budget)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from impart_peft.allocation import allocate_keep_prob
from impart_peft.budget import (
    AUTO_EXPONENTS,
    AUTO_PRE_PRUNE_RATIOS,
    PAIR_BYTES,
    BudgetTooSmallError,
    MatrixSpectrum,
    TargetSize,
    choose_settings,
    expected_damage,
    noise_discount,
    paper_keep_prob,
    parse_target_size,
    plan_budget,
    ratio_grid,
)

SHAPES = [(64, 64), (100, 37), (37, 100), (192, 576), (5, 3)]


def spectrum_of(kind: str, rank: int) -> np.ndarray:
    k = np.arange(rank, dtype=np.float64)
    return {
        "exp": np.exp(-k / 8),
        "flat": np.ones(rank),
        "power": 1.0 / (1.0 + k) ** 0.7,
        "lowrank": np.where(k < 3, 1.0 / (1.0 + k), 0.0),
    }[kind]


@pytest.mark.parametrize(
    "text, expected",
    [
        (30_000_000, TargetSize(nbytes=30_000_000)),
        ("30MB", TargetSize(nbytes=30_000_000)),
        ("30 mb", TargetSize(nbytes=30_000_000)),
        ("30MiB", TargetSize(nbytes=30 * 2**20)),
        ("1.5GB", TargetSize(nbytes=1_500_000_000)),
        ("0.1kB", TargetSize(nbytes=100)),
        ("800", TargetSize(nbytes=800)),
        ("16x", TargetSize(ratio=16.0)),
        ("2.5X", TargetSize(ratio=2.5)),
    ],
)
def test_parse_target_size(text, expected):
    assert parse_target_size(text) == expected


@pytest.mark.parametrize(
    "bad, words",
    [
        ("12parsecs", "not a size"),
        ("", "not a size"),
        ("MB", "not a size"),
        (0, "positive"),
        (-5, "positive"),
        ("1x", "> 1"),
        ("0.5x", "> 1"),
        ("0.0001B", "less than one byte"),
        (1.5, "must be a number of bytes"),
        (True, "must be a number of bytes"),
        (None, "must be a number of bytes"),
    ],
)
def test_parse_target_size_refuses(bad, words):
    with pytest.raises(ValueError, match=words):
        parse_target_size(bad)


def test_ratio_cap_is_exact_in_decimal():
    # 1000 / 1.6 = 625 exactly; a float division would give 624.99999...
    assert TargetSize(ratio=1.6).cap(1000) == 625
    assert TargetSize(nbytes=7).cap(10**9) == 7


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["exp", "flat", "power", "lowrank"])
def test_paper_keep_prob_is_the_allocation_rule(shape, kind):
    """The vectorised rule the planner scores is allocate_keep_prob's (before the exact counts), row for row."""
    rank = min(shape)
    sigma = spectrum_of(kind, rank)
    budgets = ratio_grid(shape)
    checked = 0
    for beta in (0.0, 0.3, 0.6, 0.8, 0.9):
        for exponent in (0.25, 0.5, 1.0, 2.0):
            fast = paper_keep_prob(sigma, shape, budgets, beta, exponent)
            for row, budget in zip(fast, budgets, strict=True):
                mean_keep = budget / (rank * sum(shape))
                reference = allocate_keep_prob(
                    torch.tensor(sigma), shape, None, beta, exponent, mean_keep=mean_keep
                )
                if reference.pre_prune_lowered or not (reference.keep_prob > 0).any():
                    # kept whole from the top; the partial last pair is the fraction the budget pays for
                    whole = int((row == 1.0).sum())
                    nonzero = int((sigma > sigma[0] * max(shape) * np.finfo(np.float32).eps).sum())
                    assert whole == min(math.floor(budget / sum(shape)), nonzero)
                    if reference.pre_prune_lowered:
                        assert int((reference.keep_prob == 1.0).sum()) >= whole
                    else:  # the rule keeps nothing: the exact counts spend the budget on the top pairs
                        assert reference.keep_count[:, 0].tolist() == list(shape)
                    continue
                np.testing.assert_allclose(row, reference.keep_prob.numpy(), rtol=0, atol=1e-12)
                checked += 1
    assert checked > 0


def test_expected_damage_is_the_closed_form_with_full_noise():
    sigma = np.array([3.0, 2.0, 1.0, 0.5])
    q = np.array([1.0, 0.5, 0.25, 0.0])
    frobenius = 4 * 0 + 4 * (1 / 0.25 - 1) + 1 * (1 / 0.0625 - 1) + 0.25
    assert expected_damage(sigma, q, 1.0) == pytest.approx(frobenius)
    # with the input-side noise fully discounted, only the output side's (1/q - 1) is left
    assert expected_damage(sigma, q, 0.0) == pytest.approx(4 * 1 + 1 * 3 + 0.25)
    # dropping everything costs the whole energy, keeping everything whole costs nothing
    assert expected_damage(sigma, np.zeros(4), 0.3) == pytest.approx((sigma**2).sum())
    assert expected_damage(sigma, np.ones(4), 0.3) == 0.0


def test_noise_discount_is_effective_rank_over_rank():
    assert noise_discount(np.array([1.0, 0, 0, 0]), (4, 9)) == pytest.approx(0.25)
    assert noise_discount(np.ones(8), (8, 8)) == pytest.approx(1.0)
    assert noise_discount(np.zeros(5), (5, 5)) == 1.0
    sigma = np.array([2.0, 1.0, 1.0])
    energy = sigma**2
    assert noise_discount(sigma, (3, 3)) == pytest.approx(energy.sum() ** 2 / (energy**2).sum() / 3)


@pytest.mark.parametrize("kind", ["exp", "power", "flat"])
def test_choose_settings_is_the_best_grid_point(kind):
    shape = (96, 64)
    sigma = spectrum_of(kind, 64)
    spectrum = MatrixSpectrum("m", shape, sigma, 2)
    budget = 96 * 64 // 12
    plan = choose_settings(spectrum, budget)
    discount = noise_discount(sigma, shape)
    damages = {}
    for beta in AUTO_PRE_PRUNE_RATIOS:
        for c in AUTO_EXPONENTS:
            keep = paper_keep_prob(sigma, shape, np.array([budget]), beta, c)[0]
            damages[(beta, c)] = float(expected_damage(sigma, keep, discount))
    assert plan.damage == pytest.approx(min(damages.values()))
    assert damages[(plan.pre_prune_ratio, plan.importance_exponent)] == pytest.approx(plan.damage)
    assert plan.budget == budget
    assert math.floor(96 * 64 / plan.compression_ratio + 1e-6) == budget
    # a fixed field is not searched
    fixed = choose_settings(spectrum, budget, 0.7, "auto")
    assert fixed.pre_prune_ratio == 0.7


def _spectra(seed: int = 0) -> list[MatrixSpectrum]:
    rng = np.random.default_rng(seed)
    out = []
    for i, shape in enumerate([(64, 64), (64, 64), (128, 64), (64, 128), (32, 96)]):
        rank = min(shape)
        decay = rng.uniform(2, 30)
        sigma = np.sort(rng.uniform(0.5, 2.0) * np.exp(-np.arange(rank) / decay))[::-1]
        out.append(MatrixSpectrum(f"m{i}", shape, sigma, 2, overhead_bytes=20))
    return out


def _estimated_bytes(spectra, plans, beta, c):
    total = 0
    for s in spectra:
        p = plans[s.name]
        keep = paper_keep_prob(
            s.singular_values, s.shape, np.array([p.budget]), p.pre_prune_ratio, p.importance_exponent
        )
        total += p.budget * s.value_bytes + PAIR_BYTES * int((keep > 0).sum()) + s.overhead_bytes
    return total


@pytest.mark.parametrize("auto", [False, True])
@pytest.mark.parametrize("spread", [None, 2.0])
def test_plan_budget_fits_and_uses_the_budget(auto, spread):
    spectra = _spectra()
    beta, c = ("auto", "auto") if auto else (0.6, 0.5)
    dense = sum(math.prod(s.shape) * 2 for s in spectra)
    previous = None
    for ratio in (16, 8, 4, 2):
        available = dense // ratio
        plans = plan_budget(spectra, available, beta, c, spread=spread)
        used = _estimated_bytes(spectra, plans, beta, c)
        assert used <= available
        assert used >= 0.85 * available  # the greedy fill leaves less than one grid step of one matrix
        total = sum(p.damage for p in plans.values())
        if previous is not None:
            assert total <= previous + 1e-12  # more bytes never plan more damage
        previous = total
        if spread is not None:
            uniform = dense / (available - sum(s.overhead_bytes for s in spectra))
            for p in plans.values():
                assert uniform / spread / 1.2 <= p.compression_ratio <= uniform * spread * 1.2


def test_plan_budget_favours_the_matrix_with_more_energy_and_treats_twins_alike():
    sigma = np.exp(-np.arange(64) / 10)
    spectra = [
        MatrixSpectrum("small", (64, 64), 0.1 * sigma, 2),
        MatrixSpectrum("big", (64, 64), 3.0 * sigma, 2),
        MatrixSpectrum("big_twin", (64, 64), 3.0 * sigma, 2),
    ]
    plans = plan_budget(spectra, 3 * 64 * 64 * 2 // 16, 0.6, 0.5)
    assert plans["big"].budget == plans["big_twin"].budget
    assert plans["big"].budget > plans["small"].budget


def test_plan_budget_too_small_names_the_smallest():
    spectra = _spectra()
    smallest = sum(sum(s.shape) * 2 + PAIR_BYTES + s.overhead_bytes for s in spectra)
    with pytest.raises(BudgetTooSmallError) as info:
        plan_budget(spectra, smallest - 1, 0.6, 0.5)
    assert info.value.smallest == smallest
    assert str(smallest) in str(info.value)
    plans = plan_budget(spectra, smallest, 0.6, 0.5)
    assert all(p.budget == sum(s.shape) for p, s in zip(plans.values(), spectra, strict=True))


def test_ratio_grid_bounds():
    grid = ratio_grid((64, 128))
    assert grid[0] == 64 + 128 and grid[-1] == math.floor(64 * 128 / 1.05)
    assert (np.diff(grid) > 0).all()
    window = ratio_grid((64, 128), ratio_range=(8.0, 16.0))
    assert window[0] >= math.floor(64 * 128 / 16) and window[-1] <= math.floor(64 * 128 / 8)


def test_plan_budget_spends_the_budget_when_the_criterion_rises_with_bytes():
    # With beta 0.6, C 1 on a 1/k spectrum, a bigger budget keeps more pairs at small q, and the criterion rises
    # from ratio ~18 to ~8 (their variance outweighs their bias). The plan must still fill the size asked for.
    sigma = 1.0 / (1.0 + np.arange(64))
    spectra = [MatrixSpectrum(f"m{i}", (64, 64), (1 + 0.1 * i) * sigma, 2) for i in range(3)]
    damage_by_budget = [
        expected_damage(
            sigma, paper_keep_prob(sigma, (64, 64), np.array([b]), 0.6, 1.0), noise_discount(sigma, (64, 64))
        )[0]
        for b in (64 * 64 // 18, 64 * 64 // 8)
    ]
    assert damage_by_budget[1] > damage_by_budget[0]  # the situation this test is about
    available = 3 * 64 * 64 * 2 // 8
    for spread in (None, 2.0):
        plans = plan_budget(spectra, available, 0.6, 1.0, spread=spread)
        used = _estimated_bytes(spectra, plans, 0.6, 1.0)
        assert 0.95 * available <= used <= available  # within one grid step (10%) of one matrix
        if spread is not None:
            assert all(8 / 2 / 1.2 <= p.compression_ratio <= 8 * 2 * 1.2 for p in plans.values())


@pytest.mark.parametrize("shape", [(64, 64), (100, 37), (37, 100), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_values_match_svdvals(shape, dtype):
    from impart_peft.delta import singular_values

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(0, -3, shape[1]))
    expected = torch.linalg.svdvals(delta.double())
    got = singular_values(delta, dtype)
    assert got.dtype == torch.float64 and got.shape == (min(shape),)
    assert (got[:-1] >= got[1:]).all()
    # squared values to an absolute eps(dtype) * sigma_1**2 (what planning needs), relative near the top
    tol = (1e-5 if dtype == torch.float32 else 1e-12) * float(expected[0]) ** 2
    assert torch.allclose(got**2, expected**2, atol=tol, rtol=0)
    assert torch.allclose(got[:3], expected[:3], rtol=1e-5)
