"""Allocation of keep probabilities over singular pairs (ALGORITHM.md section 4, the paper's Algorithm 1).

Pure math on a 1-D tensor of singular values; no PEFT, no model. Everything is computed in float64 on the
CPU so that the result does not depend on the device the SVD ran on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

ALLOCATION_RULES = ("paper", "rescaled")

__all__ = [
    "ALLOCATION_RULES",
    "Allocation",
    "allocate_keep_prob",
    "check_compression_ratio",
    "check_importance_exponent",
    "check_pre_prune_ratio",
    "factor_value_budget",
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
        keep_prob: float64 tensor of shape ``(R,)``, the rule's ``q_k = 1 - p_k`` for every singular pair,
            non-increasing, 0 past the boundary. (What the masks realise is ``keep_count``.)
        keep_count: int64 ``(2, boundary)``: rows kept in each column of U (row 0, out of ``m``) and of V (row 1,
            out of ``n``), ``round(q_k * rows)`` except on the last pairs, which absorb the remainder so that the
            total is exactly ``budget`` (ALGORITHM.md section 5). The estimator rescales by ``rows / count``.
        boundary: number of stored pairs (columns of ``keep_count``).
        gamma: the scale of the drop probabilities, ``p_k = gamma * (1 - (sigma_k / sigma_1) ** C)``.
        rule: ``"paper"`` or ``"rescaled"``.
        target_keep_fraction: the ``q̄`` asked for.
        achieved_keep_fraction: ``keep_count.sum() / (R (m + n))``.
        budget: factor values the budget pays for (``floor(q̄ R (m + n))``), ``None`` when lossless.
        pre_prune_lowered: the pre-pruning alone would drop more than the budget allows, so the top pairs are
            kept whole until the budget is spent.
        under_budget: the delta has fewer non-zero singular pairs than the budget could pay for; they are
            all kept whole and the achieved compression ratio is higher than asked.
    """

    keep_prob: torch.Tensor
    keep_count: torch.Tensor
    boundary: int
    gamma: float
    rule: str
    target_keep_fraction: float
    achieved_keep_fraction: float
    budget: int | None
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


def factor_value_budget(shape: tuple[int, int], mean_keep: float) -> int:
    """Factor values the budget pays for: ``floor(q̄ * R * (m + n))`` (``= floor(m n / CR)`` for a ratio).

    The floor (with a guard against binary rounding just below an integer) means a delta never stores more values
    than asked, so the achieved ratio is never below the nominal one.
    """
    m, n = shape
    return max(0, math.floor(mean_keep * min(m, n) * (m + n) + 1e-6))


def _importance(sigma: torch.Tensor, shape: tuple[int, int], importance_exponent: float) -> torch.Tensor:
    """``1 - sigma_k^C / sigma_1^C`` (float64), 0 for pairs equal to ``sigma_1`` up to float32 SVD noise.

    Written as the authors' code computes it (the exponent first, then the ratio), so that their values are
    reproduced to the last bit. The noise rule keeps an SVD's rounding of a flat spectrum from deciding which
    pairs are dropped.
    """
    powered = sigma**importance_exponent
    importance = 1.0 - powered / powered[0]
    importance[sigma / sigma[0] >= 1.0 - _noise_floor(shape)] = 0.0
    return importance


def _paper_drop(
    sigma: torch.Tensor,
    shape: tuple[int, int],
    mean_keep: float,
    boundary: int,
    nonzero: int,
    exponent: float,
    pre_prune_ratio: float,
) -> tuple[torch.Tensor, float]:
    """The authors' ``cal_sparsity_ratios`` on the top ``boundary`` pairs: drop probabilities ``(boundary,)``.

    ``gamma = (alpha' - beta) / (1 - beta)`` is fixed; ``p_k = gamma * (1 - (sigma_k / sigma_1)^C)``; then
    ``p_k = 1`` for the last pairs, one at a time from the end, while ``mean(p) < gamma`` (the mean is over all
    ``boundary`` entries, the dropped ones counting as 1). Pairs past the numerical rank start at ``p = 1``.
    """
    target_drop = 1.0 - mean_keep
    beta = float(pre_prune_ratio)
    gamma = (target_drop - beta) / (1.0 - beta)
    drop = gamma * _importance(sigma[:boundary], shape, exponent)
    drop[nonzero:] = 1.0
    # Dropping the last j pairs makes the sum prefix(boundary - j) + j; it grows with j (each step adds 1 - p).
    # The smallest j with sum >= gamma * boundary is where the authors' while loop stops.
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(drop, 0)])
    dropped = torch.arange(boundary, -1, -1, dtype=torch.float64)  # j for kept = 0..boundary
    total = prefix + dropped  # total[kept] = sum of p with the first `kept` pairs at their step-3 value
    reaching = (total / boundary >= gamma).nonzero().flatten()
    kept = int(reaching.max()) if reaching.numel() else 0
    drop[kept:] = 1.0
    return drop, gamma


def _rescaled_drop(
    importance: torch.Tensor, boundary: int, keep_budget: float, min_boundary: int
) -> tuple[torch.Tensor, float]:
    """This project's first reading of Algorithm 1 (``allocation="rescaled"``): gamma re-solved.

    ``gamma = (boundary - q̄ R) / sum_k importance_k`` so the mean is exact; pairs whose ``p_k`` exceeds 1 are dropped
    and gamma solved again over the rest. Gamma may then exceed 1, so the pairs next to the boundary can get keep
    probabilities of ``1e-3`` or less.
    """
    drop = torch.ones(importance.numel(), dtype=torch.float64)
    gamma = 0.0
    while boundary > 0:
        drop_inside = boundary - keep_budget  # total drop probability to spread over the top `boundary` pairs
        if drop_inside <= 0:
            drop[:boundary] = 0.0
            break
        weight_sum = float(importance[:boundary].sum())
        if weight_sum <= 1e-12 * boundary:  # all sigma equal, or a single pair: spread the drop uniformly
            gamma = 0.0
            drop[:boundary] = drop_inside / boundary
            break
        gamma = drop_inside / weight_sum
        inside = gamma * importance[:boundary]
        over = int((inside > 1.0).sum())
        next_boundary = max(boundary - over, min_boundary)
        if over == 0 or next_boundary == boundary:  # the second: float rounding only; the clamp settles it
            drop[:boundary] = inside
            break
        # p grows with k, so the pairs with p > 1 are the last ones: drop them whole and solve again.
        # Never past ceil(budget): there the drop inside is < 1 in total, so every p_k <= 1 is feasible.
        boundary = next_boundary
    return drop.clamp_(0.0, 1.0), gamma


def _split_pair(total: int, m: int, n: int) -> tuple[int, int]:
    """Kept rows of U and of V for one pair that stores ``total`` values (``2 <= total <= m + n``): as equal a keep
    fraction in both factors as integers allow, at least one row each."""
    u_count = min(m, max(1, (2 * total * m + m + n) // (2 * (m + n))))  # round(total * m / (m + n))
    v_count = total - u_count
    if v_count > n:
        u_count, v_count = total - n, n
    elif v_count < 1:
        u_count, v_count = total - 1, 1
    return u_count, v_count


def _exact_counts(
    keep_prob: torch.Tensor, shape: tuple[int, int], budget: int | None, nonzero: int
) -> tuple[list[int], list[int], bool]:
    """Kept rows per column (ALGORITHM.md section 5) that spend ``budget`` factor values exactly.

    Column k of U keeps ``round(q_k m)`` rows and of V ``round(q_k n)`` (at least one each). The difference to the
    budget (the boundary shift drops up to one pair too many, and rounding) is spent on the last kept pairs, from
    the end, each up to whole; what is still left then opens the next non-zero pair(s) (only when every kept pair
    is whole, e.g. a flat spectrum). A surplus is taken back from the end. ``budget=None`` keeps the counts.
    Returns (U counts, V counts, under_budget).
    """
    m, n = shape
    kept = int((keep_prob > 0).sum())
    u_counts = [min(m, max(1, round(float(q) * m))) for q in keep_prob[:kept]]
    v_counts = [min(n, max(1, round(float(q) * n))) for q in keep_prob[:kept]]
    if budget is None:
        return u_counts, v_counts, False
    remainder = budget - sum(u_counts) - sum(v_counts)
    k = len(u_counts) - 1
    while remainder > 0 and k >= 0:  # spend: raise the last kept pairs toward whole
        room = (m - u_counts[k]) + (n - v_counts[k])
        add = min(remainder, room)
        if add:
            u_counts[k], v_counts[k] = _split_pair(u_counts[k] + v_counts[k] + add, m, n)
            remainder -= add
        k -= 1
    while remainder >= 2 and len(u_counts) < nonzero:  # every kept pair is whole: open the next one
        total = min(remainder, m + n)
        u_count, v_count = _split_pair(total, m, n)
        u_counts.append(u_count)
        v_counts.append(v_count)
        remainder -= total
    k = len(u_counts) - 1
    while remainder < 0 and k >= 0:  # surplus: take back from the end, dropping a pair that falls below 2
        pair_total = u_counts[k] + v_counts[k]
        if pair_total + remainder >= 2:
            u_counts[k], v_counts[k] = _split_pair(pair_total + remainder, m, n)
            remainder = 0
        else:
            remainder += pair_total
            del u_counts[k], v_counts[k]
        k -= 1
    # Dropping a pair can overshoot by one value; give it back to the last pair if that pair has room.
    if remainder > 0 and u_counts and u_counts[-1] + v_counts[-1] + remainder <= m + n:
        u_counts[-1], v_counts[-1] = _split_pair(u_counts[-1] + v_counts[-1] + remainder, m, n)
        remainder = 0
    return u_counts, v_counts, remainder >= 2 and len(u_counts) >= nonzero


def allocate_keep_prob(
    singular_values: torch.Tensor,
    shape: tuple[int, int],
    compression_ratio: float | None,
    pre_prune_ratio: float = 0.8,
    importance_exponent: float = 1.0,
    rule: str = "paper",
    *,
    mean_keep: float | None = None,
) -> Allocation:
    """Keep probability and exact kept-row counts of every singular pair of a delta of ``shape``.

    Args:
        singular_values: ``(R,)`` tensor of any float dtype, descending, ``R = min(shape)``.
        shape: ``(m, n)`` of the delta.
        compression_ratio: dense values / stored factor values, ``> 1``; ``None`` with ``mean_keep=None`` keeps
            every non-zero pair whole.
        pre_prune_ratio: beta in ``[0, 1)``; pairs past ``floor(R * (1 - beta))`` are dropped whole.
        importance_exponent: C ``> 0``.
        rule: ``"paper"`` (default; ALGORITHM.md section 4, the authors' ``cal_sparsity_ratios``: gamma fixed,
            every kept pair has ``q_k >= 1 - gamma``, the budget met by dropping whole pairs from the end) or
            ``"rescaled"`` (this project's first reading: gamma re-solved so the mean is exact; see
            docs/algorithm.md for where each wins).
        mean_keep: instead of ``compression_ratio``, the budget as the mean keep fraction ``q̄`` of the factor
            elements, in ``(0, 1]`` (ImPart-QT spends a bit budget this way; it may exceed ``m n / (R (m + n))``).

    Returns:
        An :class:`Allocation`; ``keep_prob`` is float64 on the CPU, ``keep_count`` int64 ``(2, boundary)``.

    Edge cases (each has a defined result):
        * ``sigma_1 == 0`` (the delta is zero): nothing is stored.
        * ``alpha' <= beta`` or ``floor(R (1 - beta)) == 0`` (pre-pruning alone drops at least the target; low
          ratio, high beta, tiny R): the top ``ceil(q̄ R)`` pairs are kept whole, the last one partly, so the asked
          ratio is met (``pre_prune_lowered``). ``R == 1`` lands here for any ``beta > 0``.
        * all sigma equal (importance 0): ``"paper"`` keeps the top pairs whole (the shift drops the rest, as the
          authors' code does); ``"rescaled"`` spreads the drop uniformly.
        * exactly-zero directions (below float32 SVD noise) are never stored; if they are too few to spend the
          budget on, every non-zero pair is kept whole (``under_budget``).
    """
    if rule not in ALLOCATION_RULES:
        raise ValueError(f"allocation rule must be one of {ALLOCATION_RULES}, got {rule!r}")
    if singular_values.dim() != 1:
        raise ValueError(f"singular_values must be 1-D, got shape {tuple(singular_values.shape)}")
    m, n = shape
    rank = min(m, n)
    if singular_values.numel() != rank:
        raise ValueError(f"expected {rank} singular values for shape {shape}, got {singular_values.numel()}")
    check_pre_prune_ratio(pre_prune_ratio)
    check_importance_exponent(importance_exponent)
    if mean_keep is not None:
        if compression_ratio is not None:
            raise ValueError("give the budget as compression_ratio or as mean_keep, not both")
        if isinstance(mean_keep, bool) or not isinstance(mean_keep, (int, float)) or not 0 < mean_keep <= 1:
            raise ValueError(f"mean_keep must be in (0, 1], got {mean_keep!r}")
    sigma = singular_values.detach().to("cpu", torch.float64)
    if not torch.isfinite(sigma).all():
        raise ValueError("singular_values contain NaN or inf")
    if rank > 1 and (sigma[1:] > sigma[:-1]).any():
        raise ValueError("singular_values must be sorted in descending order")
    if rank and float(sigma[-1]) < 0:
        raise ValueError("singular_values must be non-negative")

    nonzero = _numerical_rank(sigma, shape)
    keep_prob = torch.zeros(rank, dtype=torch.float64)
    if compression_ratio is None and mean_keep is None:
        keep_prob[:nonzero] = 1.0
        return _finish(keep_prob, shape, None, nonzero, rule, 0.0, 1.0, False)
    if mean_keep is None:
        mean_keep = target_keep_fraction(shape, compression_ratio)
    budget = factor_value_budget(shape, mean_keep)
    if nonzero == 0:
        return _finish(keep_prob, shape, budget, 0, rule, 0.0, mean_keep, False)

    keep_budget = mean_keep * rank  # in units of whole pairs
    boundary = pre_prune_boundary(rank, pre_prune_ratio)
    min_boundary = min(math.ceil(keep_budget - 1e-9), rank)
    gamma = 0.0
    if rule == "paper":
        pre_prune_lowered = boundary == 0 or 1.0 - mean_keep <= float(pre_prune_ratio)
        if pre_prune_lowered:
            keep_prob[: min(min_boundary, nonzero)] = 1.0  # _exact_counts trims the last pair to the budget
        else:
            drop, gamma = _paper_drop(
                sigma, shape, mean_keep, boundary, nonzero, importance_exponent, pre_prune_ratio
            )
            keep_prob[:boundary] = 1.0 - drop
    else:
        pre_prune_lowered = boundary < min_boundary
        boundary = min(max(boundary, min_boundary), nonzero)
        importance = _importance(sigma, shape, importance_exponent)
        drop, gamma = _rescaled_drop(importance, boundary, keep_budget, min(min_boundary, nonzero))
        keep_prob[:boundary] = 1.0 - drop[:boundary]
    return _finish(keep_prob, shape, budget, nonzero, rule, gamma, mean_keep, pre_prune_lowered)


def _finish(
    keep_prob: torch.Tensor,
    shape: tuple[int, int],
    budget: int | None,
    nonzero: int,
    rule: str,
    gamma: float,
    mean_keep: float,
    pre_prune_lowered: bool,
) -> Allocation:
    m, n = shape
    u_counts, v_counts, under_budget = _exact_counts(keep_prob, shape, budget, nonzero)
    keep_count = torch.tensor([u_counts, v_counts], dtype=torch.int64).reshape(2, len(u_counts))
    stored = int(keep_count.sum())
    return Allocation(
        keep_prob=keep_prob,
        keep_count=keep_count,
        boundary=len(u_counts),
        gamma=gamma,
        rule=rule,
        target_keep_fraction=mean_keep,
        achieved_keep_fraction=stored / (min(m, n) * (m + n)),
        budget=budget,
        pre_prune_lowered=pre_prune_lowered,
        under_budget=under_budget,
    )
