"""Allocation of keep probabilities over singular pairs (ALGORITHM.md section 4, the paper's Algorithm 1).

Pure math on a 1-D tensor of singular values; no PEFT, no model. Everything is computed in float64 on the
CPU so that the result does not depend on the device the SVD ran on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

__all__ = [
    "Allocation",
    "allocate_keep_prob",
    "check_compression_ratio",
    "check_importance_exponent",
    "check_pre_prune_ratio",
    "pre_prune_boundary",
    "target_keep_fraction",
]


def check_compression_ratio(compression_ratio: float | None) -> None:
    """Raise ``ValueError`` unless ``compression_ratio`` is ``None`` (lossless) or a finite number > 1."""
    if compression_ratio is None:
        return
    if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)):
        raise ValueError(f"compression_ratio must be a number > 1, got {compression_ratio!r}")
    if not math.isfinite(compression_ratio) or compression_ratio <= 1:
        raise ValueError(
            f"compression_ratio must be > 1 (stored values = dense values / ratio), got {compression_ratio}. "
            "Use e.g. 16 for a 16x smaller delta, or None to keep every factor element."
        )


def check_pre_prune_ratio(pre_prune_ratio: float) -> None:
    """Raise ``ValueError`` unless ``0 <= pre_prune_ratio < 1``."""
    if (
        isinstance(pre_prune_ratio, bool)
        or not isinstance(pre_prune_ratio, (int, float))
        or not (0.0 <= pre_prune_ratio < 1.0)
    ):
        raise ValueError(
            f"pre_prune_ratio (beta) must be in [0, 1), got {pre_prune_ratio!r}: it is the fraction of the "
            "smallest singular pairs dropped whole (the paper uses 0.6 to 0.8)."
        )


def check_importance_exponent(importance_exponent: float) -> None:
    """Raise ``ValueError`` unless ``importance_exponent`` (C) is a finite number > 0."""
    if (
        isinstance(importance_exponent, bool)
        or not isinstance(importance_exponent, (int, float))
        or not math.isfinite(importance_exponent)
        or importance_exponent <= 0
    ):
        raise ValueError(
            f"importance_exponent (C) must be a finite number > 0, got {importance_exponent!r} "
            "(the paper uses 0.5 or 1)."
        )


def target_keep_fraction(shape: tuple[int, int], compression_ratio: float) -> float:
    """Mean keep probability ``q̄`` of the factor elements that meets ``compression_ratio``.

    The dense delta holds ``m*n`` values, the factors ``R*(m+n)`` with ``R = min(m, n)``; keeping ``q̄`` of the
    factor elements stores ``(1 - alpha) * m * n = m * n / compression_ratio`` values. ``q̄ < 1`` always,
    because ``R * (m + n) >= m * n``.
    """
    check_compression_ratio(compression_ratio)
    m, n = shape
    rank = min(m, n)
    return (m * n / compression_ratio) / (rank * (m + n))


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate_keep_prob`.

    Attributes:
        keep_prob: float64 tensor of shape ``(R,)``, ``q_k`` for every singular pair, non-increasing.
        boundary: number of leading pairs with ``q_k > 0`` after allocation (the final ``r``).
        gamma: the scale of the drop probabilities, ``p_k = gamma * (1 - (sigma_k / sigma_1) ** C)``.
        target_keep_fraction: the ``q̄`` asked for.
        achieved_keep_fraction: ``mean(keep_prob)``; equal to the target except in the cases below.
        pre_prune_lowered: the pre-pruning alone would drop more than the budget allows, so the boundary
            was moved right until the top pairs, kept whole, meet the budget exactly.
        under_budget: the delta has fewer non-zero singular pairs than the budget could pay for; they are
            all kept whole and the achieved compression ratio is higher than asked.
    """

    keep_prob: torch.Tensor
    boundary: int
    gamma: float
    target_keep_fraction: float
    achieved_keep_fraction: float
    pre_prune_lowered: bool
    under_budget: bool


def _noise_floor(shape: tuple[int, int]) -> float:
    """Relative size of float32 SVD noise: ``max(m, n) * eps(float32)`` (LAPACK's rank tolerance)."""
    return max(shape) * torch.finfo(torch.float32).eps


def _numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Pairs with sigma above the float32 noise floor; directions below it are not worth a stored value."""
    sigma_max = float(singular_values[0]) if singular_values.numel() else 0.0
    if sigma_max == 0.0:
        return 0
    tolerance = sigma_max * _noise_floor(shape)
    return int((singular_values > tolerance).sum())


def pre_prune_boundary(rank: int, pre_prune_ratio: float) -> int:
    """``floor(R * (1 - beta))`` with beta read as the decimal it is written as.

    ``0.8`` is stored as ``0.8000000000000000444``, so in floating point ``5120 * (1 - 0.8)`` is
    ``1023.9999999999998`` and a plain ``floor`` gives 1023, not the 1024 the user asked for. ``Fraction(repr)``
    takes the shortest decimal that round-trips (``4/5``), so the floor is exact.
    """
    check_pre_prune_ratio(pre_prune_ratio)
    return math.floor(rank * (1 - Fraction(repr(float(pre_prune_ratio)))))


def allocate_keep_prob(
    singular_values: torch.Tensor,
    shape: tuple[int, int],
    compression_ratio: float | None,
    pre_prune_ratio: float = 0.8,
    importance_exponent: float = 1.0,
) -> Allocation:
    """Keep probability of every singular pair of a delta of ``shape`` (ALGORITHM.md section 4).

    Args:
        singular_values: ``(R,)`` tensor of any float dtype, descending, ``R = min(shape)``.
        shape: ``(m, n)`` of the delta.
        compression_ratio: dense values / stored values, ``> 1``; ``None`` keeps every non-zero pair whole.
        pre_prune_ratio: beta in ``[0, 1)``; pairs past ``floor(R * (1 - beta))`` are dropped whole.
        importance_exponent: C ``> 0``.

    Returns:
        An :class:`Allocation`; ``keep_prob`` is float64 on the CPU.

    Edge cases (each has a defined result):
        * ``sigma_1 == 0`` (the delta is zero): every ``q_k = 0``, nothing is stored.
        * pre-pruning alone drops more than the budget (low ratio, high beta): the boundary is moved right
          to ``ceil(q̄ * R)`` so the asked ratio is still met (``pre_prune_lowered``).
        * all kept sigma equal (or one pair kept): the importance weights ``1 - (sigma_k/sigma_1)**C`` are all
          zero, so the remaining drop is spread uniformly over the kept pairs. "Equal" is up to float32 SVD
          noise: a sigma_k within ``max(m, n) * eps(float32)`` (relative) of sigma_1 gets importance 0, so an
          SVD's rounding of a flat spectrum cannot decide which pairs are dropped.
        * ``floor(R * (1 - beta)) == 0`` (tiny R, large beta): the boundary is raised to the budget as above.
        * ``R == 1``: the single pair is kept with ``q_1 = q̄`` (the uniform rule with one pair).
        * exactly-zero directions (rank-deficient delta) are never stored; if they are too few to spend the
          budget on, every non-zero pair is kept whole (``under_budget``).
    """
    if singular_values.dim() != 1:
        raise ValueError(f"singular_values must be 1-D, got shape {tuple(singular_values.shape)}")
    m, n = shape
    rank = min(m, n)
    if singular_values.numel() != rank:
        raise ValueError(f"expected {rank} singular values for shape {shape}, got {singular_values.numel()}")
    check_pre_prune_ratio(pre_prune_ratio)
    check_importance_exponent(importance_exponent)
    sigma = singular_values.detach().to("cpu", torch.float64)
    if not torch.isfinite(sigma).all():
        raise ValueError("singular_values contain NaN or inf")
    if rank > 1 and (sigma[1:] > sigma[:-1]).any():
        raise ValueError("singular_values must be sorted in descending order")
    if rank and float(sigma[-1]) < 0:
        raise ValueError("singular_values must be non-negative")

    nonzero = _numerical_rank(sigma, shape)
    if compression_ratio is None:
        keep_prob = torch.zeros(rank, dtype=torch.float64)
        keep_prob[:nonzero] = 1.0
        fraction = nonzero / rank
        return Allocation(keep_prob, nonzero, 0.0, 1.0, fraction, False, False)

    mean_keep = target_keep_fraction(shape, compression_ratio)
    keep_prob = torch.zeros(rank, dtype=torch.float64)
    if nonzero == 0:
        return Allocation(keep_prob, 0, 0.0, mean_keep, 0.0, False, False)

    # Budget in units of "whole pairs": sum_k q_k must equal mean_keep * R.
    keep_budget = mean_keep * rank
    boundary = pre_prune_boundary(rank, pre_prune_ratio)
    min_boundary = math.ceil(keep_budget - 1e-9)
    pre_prune_lowered = boundary < min_boundary
    boundary = max(boundary, min_boundary)
    under_budget = nonzero < min_boundary
    boundary = min(boundary, nonzero)

    ratio = sigma / sigma[0]
    importance = 1.0 - ratio**importance_exponent  # 0 for k = 1, grows as sigma shrinks
    importance[ratio >= 1.0 - _noise_floor(shape)] = 0.0  # equal to sigma_1 up to SVD rounding
    gamma = 0.0
    while boundary > 0:
        drop_inside = boundary - keep_budget  # total drop probability to spread over the top `boundary` pairs
        if drop_inside <= 0:
            keep_prob[:boundary] = 1.0
            break
        weight_sum = float(importance[:boundary].sum())
        if weight_sum <= 1e-12 * boundary:
            # Degenerate importance (all sigma equal, or a single pair): spread the drop uniformly.
            gamma = 0.0
            keep_prob[:boundary] = 1.0 - drop_inside / boundary
            break
        gamma = drop_inside / weight_sum
        drop = gamma * importance[:boundary]
        over = int((drop > 1.0).sum())
        if over == 0:
            keep_prob[:boundary] = 1.0 - drop
            break
        # p grows with k, so the pairs with p > 1 are the last ones: drop them whole and solve again.
        # Never past ceil(budget): there the drop inside is < 1 in total, so every p_k <= 1 is feasible.
        next_boundary = max(boundary - over, min(min_boundary, nonzero))
        if next_boundary == boundary:  # only float rounding can land here; the clamp below settles it
            keep_prob[:boundary] = 1.0 - drop
            break
        boundary = next_boundary
    keep_prob.clamp_(0.0, 1.0)
    final_boundary = int((keep_prob > 0).sum())
    return Allocation(
        keep_prob=keep_prob,
        boundary=final_boundary,
        gamma=gamma,
        target_keep_fraction=mean_keep,
        achieved_keep_fraction=float(keep_prob.mean()),
        pre_prune_lowered=pre_prune_lowered,
        under_budget=under_budget,
    )
