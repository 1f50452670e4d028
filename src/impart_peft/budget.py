"""A size budget for the whole model, and beta and C chosen from the deltas alone (docs/algorithm.md section 12).

Pure math on singular values (numpy float64 on the CPU): no PEFT, no model, no file. The compressor
(:mod:`impart_peft.compressor`) measures every matrix's spectrum in a first pass, asks this module how many factor
values each matrix gets and with which (beta, C), and then compresses in a second pass.

The criterion. ImPart's estimate of one matrix has expected squared error (ALGORITHM.md section 2)
``sum_dropped sigma_k^2 + sum_kept sigma_k^2 (1 / (q_k^U q_k^V) - 1)``. On that Frobenius error alone plain
truncation always wins (ALGORITHM.md section 6), yet task quality prefers ImPart: the error terms do not harm the
model alike. For an input ``x``, pair ``k``'s error is ``sigma_k [e_U (v_k^T x) + u_k (e_V^T x) + e_U (e_V^T x)]``
with ``e_U, e_V`` the mask noise of its two columns. A fine-tune's delta is a sum of gradient outer products, so
its inputs lie along its right singular vectors: a dropped pair costs ``sigma_k^2 (v_k^T x)^2``, and so does the
output-side noise, times ``1/q - 1``. The input-side noise is spread over all ``n`` coordinates at random and meets
the inputs only where they are: if they occupy the ``r_eff`` directions the delta acts on, a fraction
``r_eff / R`` of it. Per pair, in units of ``(v_k^T x)^2``, :func:`expected_damage` is therefore

    D = sum_dropped sigma_k^2 + sum_kept sigma_k^2 (1/q_k - 1) (1 + rho / q_k),   rho = r_eff / R,

with ``r_eff = (sum sigma^2)^2 / sum sigma^4`` (the participation ratio of the delta's energy), ``R = min(m, n)``,
and ``q_k`` the pair's keep probability (the two factors alike). With ``rho = 1`` this is the Frobenius error.
Everything in ``D`` comes from the two checkpoints. The budget is spread over matrices to minimise the sum of
their ``D`` (a Lagrangian water-filling over a grid of per-matrix budgets, each matrix's ratio within a factor 2 of
the uniform one), and ``"auto"`` beta and C are, per matrix and budget, the grid point with the smallest ``D``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "AUTO",
    "AUTO_EXPONENTS",
    "AUTO_PRE_PRUNE_RATIOS",
    "BudgetTooSmallError",
    "MatrixPlan",
    "MatrixSpectrum",
    "SIZE_RULES",
    "TargetSize",
    "choose_settings",
    "expected_damage",
    "noise_discount",
    "paper_keep_prob",
    "parse_target_size",
    "plan_budget",
    "ratio_grid",
]

AUTO = "auto"
SIZE_RULES = ("uniform", "spectral")
# The grid "auto" searches per matrix: the paper's own grid (beta 0.6 to 0.8, C 0.5 or 1). A wider one (beta 0 to
# 0.9, C 1/4 to 2) let the criterion, like any error criterion, drift toward truncation (few pairs nearly whole),
# which lowered the task quality on the real pairs (docs/algorithm.md section 12).
AUTO_PRE_PRUNE_RATIOS = (0.6, 0.7, 0.8)
AUTO_EXPONENTS = (0.5, 1.0)
# Bytes per stored pair besides its factor values: sigma_k (float32) and its two keep counts (int32).
PAIR_BYTES = 12

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)
_RATIO = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*x\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class TargetSize:
    """A parsed ``target_size``: a cap on ``adapter_model.safetensors`` in bytes, or a global compression ratio
    (dense delta bytes of the compressed matrices / file bytes). Exactly one of the two is set."""

    nbytes: int | None = None
    ratio: float | None = None

    def cap(self, dense_matrix_bytes: int) -> int:
        """The byte cap: ``nbytes``, or ``floor(dense_matrix_bytes / ratio)``."""
        if self.nbytes is not None:
            return self.nbytes
        return math.floor(Fraction(dense_matrix_bytes) / Fraction(repr(self.ratio)))

    def __str__(self) -> str:
        return f"{self.nbytes} bytes" if self.nbytes is not None else f"{self.ratio:g}x"


def parse_target_size(value: int | str) -> TargetSize:
    """``target_size`` as given to :class:`~impart_peft.ImPartConfig` or ``impart compress --size``.

    Accepted: an integer number of bytes (``30_000_000``); a string with a unit, decimal (``"30MB"``, ``"1.5 GB"``,
    ``"800kB"``) or binary (``"30MiB"``); or a global ratio (``"16x"``: the file at most 1/16 of the dense deltas of
    the compressed matrices, in the fine-tune's dtype).

    Raises:
        ValueError: anything else, or a size of 0 bytes or a ratio ``<= 1``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(
            f"target_size must be a number of bytes (int), a size such as '30MB' or '1.5GiB', or a ratio such as "
            f"'16x', got {value!r}"
        )
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"target_size must be a positive number of bytes, got {value}")
        return TargetSize(nbytes=value)
    ratio = _RATIO.match(value)
    if ratio:
        number = float(ratio.group(1))
        if not number > 1:
            raise ValueError(
                f"target_size ratio must be > 1 (the file is 1/ratio of the dense deltas), got {value!r}"
            )
        return TargetSize(ratio=number)
    size = _SIZE.match(value)
    unit = size.group(2).lower() if size else None
    if size is None or unit not in _UNITS:
        raise ValueError(
            f"target_size {value!r} is not a size: write bytes with a unit (B, kB, MB, GB, KiB, MiB, GiB), e.g. "
            "'30MB', or a global ratio, e.g. '16x'"
        )
    nbytes = math.floor(Fraction(size.group(1)) * _UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"target_size {value!r} is less than one byte")
    return TargetSize(nbytes=nbytes)


def noise_discount(singular_values: np.ndarray, shape: tuple[int, int]) -> float:
    """``r_eff / R``: how much less the model sees of mask noise than of a dropped direction of the same energy.

    ``r_eff = (sum sigma^2)^2 / sum sigma^4`` is the participation ratio of the delta's energy (1 for a rank-1
    delta, ``R`` for a flat spectrum), ``R = min(m, n)``. In ``(0, 1]``; 1 for a zero delta.
    """
    energy = np.asarray(singular_values, dtype=np.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 1.0
    effective_rank = total**2 / float((energy**2).sum())
    return min(1.0, effective_rank / min(shape))


def _numerical_rank(sigma: np.ndarray, shape: tuple[int, int]) -> int:
    # As allocation._numerical_rank: pairs above the float32 SVD noise floor.
    if sigma.size == 0 or sigma[0] == 0.0:
        return 0
    return int((sigma > sigma[0] * max(shape) * np.finfo(np.float32).eps).sum())


def paper_keep_prob(
    singular_values: np.ndarray,
    shape: tuple[int, int],
    budgets: np.ndarray,
    pre_prune_ratio: float,
    importance_exponent: float,
) -> np.ndarray:
    """The paper rule's keep probabilities for many budgets at once: float64 ``(len(budgets), R)``.

    Row ``j`` is ``allocate_keep_prob(sigma, shape, None, beta, C, mean_keep=budgets[j] / (R (m + n))).keep_prob``
    (the rule before the exact counts), except that where pre-pruning is lowered (the pairs kept whole), the last
    pair's entry is the fraction of it the budget pays for. ``budgets`` are factor values, ``>= 0``.
    """
    from .allocation import pre_prune_boundary

    sigma = np.asarray(singular_values, dtype=np.float64)
    m, n = shape
    rank = min(m, n)
    budgets = np.asarray(budgets, dtype=np.float64)
    out = np.zeros((budgets.size, rank))
    nonzero = _numerical_rank(sigma, shape)
    if nonzero == 0:
        return out
    mean_keep = budgets / (rank * (m + n))
    beta = float(pre_prune_ratio)
    boundary = pre_prune_boundary(rank, pre_prune_ratio)
    lowered = (1.0 - mean_keep <= beta) if boundary > 0 else np.ones(budgets.size, dtype=bool)
    rows = np.flatnonzero(~lowered)
    if rows.size and boundary:
        out[rows, :boundary] = _paper_rows(
            sigma, shape, mean_keep[rows], boundary, nonzero, beta, importance_exponent
        )
    # Lowered, or a budget so small that the rule keeps no pair (the exact counts then spend it on the top
    # pairs): whole pairs from the top, the last one in part.
    whole = np.minimum(np.floor(budgets / (m + n) + 1e-9), nonzero).astype(np.int64)
    part = np.where(whole < nonzero, budgets / (m + n) - whole, 0.0)
    for j in np.flatnonzero(lowered | ((out == 0).all(axis=1) & (budgets >= 2))):
        out[j, : whole[j]] = 1.0
        if whole[j] < rank and part[j] > 1e-12:
            out[j, whole[j]] = part[j]
    return out


def _paper_rows(
    sigma: np.ndarray,
    shape: tuple[int, int],
    mean_keep: np.ndarray,
    boundary: int,
    nonzero: int,
    beta: float,
    importance_exponent: float,
) -> np.ndarray:
    """``allocation._paper_drop`` for several mean keeps at once: keep probabilities ``(len(mean_keep), boundary)``."""
    powered = sigma[:boundary] ** importance_exponent
    importance = 1.0 - powered / powered[0]
    importance[sigma[:boundary] / sigma[0] >= 1.0 - max(shape) * np.finfo(np.float32).eps] = 0.0
    gamma = ((1.0 - mean_keep) - beta) / (1.0 - beta)
    drop = gamma[:, None] * importance[None, :]
    drop[:, nonzero:] = 1.0
    prefix = np.concatenate([np.zeros((mean_keep.size, 1)), np.cumsum(drop, axis=1)], axis=1)
    total = prefix + np.arange(boundary, -1, -1, dtype=np.float64)[None, :]
    reaching = total / boundary >= gamma[:, None]
    # total falls as more pairs are kept, so the kept counts that reach gamma are a prefix 0..kept.
    kept = np.where(reaching.any(axis=1), reaching.sum(axis=1) - 1, 0)
    keep = 1.0 - drop
    keep[np.arange(boundary)[None, :] >= kept[:, None]] = 0.0
    return keep


def expected_damage(singular_values: np.ndarray, keep_prob: np.ndarray, discount: float) -> np.ndarray:
    """``sum_dropped sigma^2 + sum_kept sigma^2 (1/q - 1) (1 + discount / q)`` per row of ``keep_prob`` (``(..., R)``).

    ``discount`` is :func:`noise_discount` (the share of the input-side mask noise the inputs meet); with 1 this is
    ImPart's expected squared (Frobenius) error ``sum sigma^2 (1/q^2 - 1)``, with 0 only the output side's is left.
    """
    energy = np.asarray(singular_values, dtype=np.float64) ** 2
    q = np.asarray(keep_prob, dtype=np.float64)
    kept = q > 0
    inverse = 1.0 / np.where(kept, q, 1.0)
    noise = np.where(kept, (inverse - 1.0) * (1.0 + discount * inverse), 0.0)
    return ((~kept) * energy).sum(axis=-1) + (noise * energy).sum(axis=-1)


@dataclass(frozen=True)
class MatrixSpectrum:
    """What the planner knows of one matrix: from the first pass over the checkpoints.

    Attributes:
        name: module name.
        shape: ``(m, n)`` of the delta.
        singular_values: float64 ``(R,)``, descending.
        value_bytes: bytes per stored factor value (the fine-tune's dtype).
        overhead_bytes: an upper bound of the file bytes this matrix costs besides its values and pairs (its
            entries in the safetensors header).
    """

    name: str
    shape: tuple[int, int]
    singular_values: np.ndarray
    value_bytes: int
    overhead_bytes: int = 0

    @property
    def min_values(self) -> int:
        """Factor values of the smallest plan: the top pair whole (``m + n``), or nothing for a zero delta."""
        return 0 if _numerical_rank(self.singular_values, self.shape) == 0 else sum(self.shape)


@dataclass(frozen=True)
class MatrixPlan:
    """The planner's answer for one matrix: ``budget`` factor values at (``pre_prune_ratio``,
    ``importance_exponent``), expected ``damage`` (:func:`expected_damage`), and ``compression_ratio`` =
    ``m n / budget``, the per-matrix ratio the compressor passes on (its floor gives ``budget`` back)."""

    name: str
    budget: int
    compression_ratio: float
    pre_prune_ratio: float
    importance_exponent: float
    damage: float


class BudgetTooSmallError(ValueError):
    """The size asked for cannot hold the smallest adapter; ``smallest`` is the smallest size (bytes) that can."""

    def __init__(self, message: str, smallest: int) -> None:
        super().__init__(message)
        self.smallest = smallest


def ratio_grid(
    shape: tuple[int, int],
    step: float = 1.1,
    largest_ratio: float = 4096.0,
    ratio_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Per-matrix budgets the planner chooses from: int64 factor values, ascending, unique.

    ``floor(m n / CR)`` for CR from 1.05 up by factors of ``step``, from the top pair kept whole (``m + n``) to
    every factor element (``R (m + n)``) or ``m n / 1.05``, whichever is smaller. ``ratio_range=(lo, hi)`` keeps
    only the ratios between ``lo`` and ``hi`` (the top pair whole stays the floor).
    """
    m, n = shape
    low = m + n
    high = min(min(m, n) * (m + n), math.floor(m * n / 1.05))
    if ratio_range is not None:
        low = min(high, max(low, math.floor(m * n / ratio_range[1])))
        high = max(low, min(high, math.floor(m * n / ratio_range[0])))
    ratios = 1.05 * step ** np.arange(0, math.ceil(math.log(largest_ratio / 1.05) / math.log(step)) + 1)
    budgets = np.floor(m * n / ratios).astype(np.int64)
    budgets = budgets[(budgets >= low) & (budgets <= high)]
    return np.unique(np.concatenate([budgets, [low, max(low, high)]]))


def _settings_grid(
    pre_prune_ratio: float | str, importance_exponent: float | str
) -> list[tuple[float, float]]:
    betas = AUTO_PRE_PRUNE_RATIOS if pre_prune_ratio == AUTO else (float(pre_prune_ratio),)
    exponents = AUTO_EXPONENTS if importance_exponent == AUTO else (float(importance_exponent),)
    return [(b, c) for b in betas for c in exponents]


KeepProbFn = Callable[[np.ndarray, tuple[int, int], np.ndarray, float, float], np.ndarray]


def _damage_table(
    spectrum: MatrixSpectrum,
    budgets: np.ndarray,
    settings: Sequence[tuple[float, float]],
    keep_prob_fn: KeepProbFn,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each budget: the smallest damage over ``settings``, the index of that setting, and the stored pairs."""
    discount = noise_discount(spectrum.singular_values, spectrum.shape)
    best = np.full(budgets.size, np.inf)
    choice = np.zeros(budgets.size, dtype=np.int64)
    pairs = np.zeros(budgets.size, dtype=np.int64)
    for index, (beta, exponent) in enumerate(settings):
        keep = keep_prob_fn(spectrum.singular_values, spectrum.shape, budgets, beta, exponent)
        damage = expected_damage(spectrum.singular_values, keep, discount)
        better = damage < best  # ties: the earlier setting
        best = np.where(better, damage, best)
        choice = np.where(better, index, choice)
        pairs = np.where(better, (keep > 0).sum(axis=1), pairs)
    return best, choice, pairs


def choose_settings(
    spectrum: MatrixSpectrum,
    budget: int,
    pre_prune_ratio: float | str = AUTO,
    importance_exponent: float | str = AUTO,
    keep_prob_fn: KeepProbFn = paper_keep_prob,
) -> MatrixPlan:
    """(beta, C) for one matrix at a fixed ``budget`` of factor values: the grid point (``"auto"`` fields) with the
    smallest :func:`expected_damage`; ties go to the first in grid order (smaller beta, then smaller C)."""
    settings = _settings_grid(pre_prune_ratio, importance_exponent)
    damage, choice, _ = _damage_table(spectrum, np.array([budget]), settings, keep_prob_fn)
    beta, exponent = settings[int(choice[0])]
    m, n = spectrum.shape
    return MatrixPlan(
        spectrum.name, budget, m * n / budget if budget else math.inf, beta, exponent, float(damage[0])
    )


def plan_budget(
    spectra: Sequence[MatrixSpectrum],
    available_bytes: int,
    pre_prune_ratio: float | str,
    importance_exponent: float | str,
    keep_prob_fn: KeepProbFn = paper_keep_prob,
    step: float = 1.1,
    spread: float | None = None,
) -> dict[str, MatrixPlan]:
    """Spread ``available_bytes`` over ``spectra`` to minimise the total :func:`expected_damage`.

    Each matrix chooses a budget from :func:`ratio_grid`; its bytes are estimated as ``budget * value_bytes +
    PAIR_BYTES * pairs + overhead_bytes``. The Lagrangian ``sum D_i + lam * bytes_i`` is minimised for the ``lam``
    (found by bisection) whose total fits, then the bytes left are spent greedily on the upgrades with the most
    damage saved per byte, and what is still left one grid step at a time on the steps that raise the damage least
    per byte (so the plan ends within one grid step of ``available_bytes``). Deterministic: ties go to the cheaper
    choice and to the earlier matrix.

    Raises:
        BudgetTooSmallError: ``available_bytes`` is below the smallest plan (every matrix its top pair whole).
    """
    settings = _settings_grid(pre_prune_ratio, importance_exponent)
    ratio_range = None
    if spread is not None:
        # Per-matrix ratios within a factor ``spread`` of the one ratio that would fill the budget uniformly.
        dense = sum(math.prod(s.shape) * s.value_bytes for s in spectra)
        uniform = dense / max(1, available_bytes - sum(s.overhead_bytes for s in spectra))
        ratio_range = (uniform / spread, uniform * spread)
    tables = []
    for spectrum in spectra:
        budgets = ratio_grid(spectrum.shape, step, ratio_range=ratio_range)
        damage, choice, pairs = _damage_table(spectrum, budgets, settings, keep_prob_fn)
        cost = budgets * spectrum.value_bytes + PAIR_BYTES * pairs + spectrum.overhead_bytes
        order = np.lexsort((damage, cost))
        budgets, cost, damage, choice = budgets[order], cost[order], damage[order], choice[order]
        # The Lagrangian sees only the points no cheaper point beats (damage falls strictly as bytes grow).
        frontier, lowest = [], np.inf
        for index in range(cost.size):
            if damage[index] < lowest:
                frontier.append(index)
                lowest = damage[index]
        tables.append((budgets, cost, damage, choice, np.array(frontier, dtype=np.int64)))
    smallest = int(sum(int(t[1][0]) for t in tables))
    if available_bytes < smallest:
        raise BudgetTooSmallError(
            f"{available_bytes} bytes cannot hold the {len(tables)} compressed matrices: the smallest plan (each "
            f"matrix's top singular pair whole) needs {smallest} bytes",
            smallest,
        )

    def pick(lam: float) -> list[int]:
        return [int(t[4][np.argmin(t[2][t[4]] + lam * t[1][t[4]])]) for t in tables]

    def total(picks: list[int]) -> int:
        return sum(int(t[1][p]) for t, p in zip(tables, picks, strict=True))

    picks = [int(t[4][-1]) for t in tables]
    if total(picks) > available_bytes:
        low, high = 0.0, 1.0
        while total(pick(high)) > available_bytes:
            high *= 4.0
        for _ in range(100):  # total(pick(lam)) falls as lam grows; keep the smallest lam that fits
            mid = 0.5 * (low + high)
            if total(pick(mid)) > available_bytes:
                low = mid
            else:
                high = mid
            if high - low <= 1e-12 * high:
                break
        picks = pick(high)
        left = available_bytes - total(picks)
        while True:  # greedy: the frontier upgrade with the most damage saved per byte that still fits
            best_gain, best = 0.0, None
            for i, (_, cost, damage, _, frontier) in enumerate(tables):
                ahead = frontier[frontier > picks[i]]
                extra = cost[ahead] - cost[picks[i]]
                fits = np.flatnonzero(extra <= left)
                if fits.size == 0:
                    continue
                gains = (damage[picks[i]] - damage[ahead][fits]) / extra[fits]
                j = int(np.argmax(gains))
                if gains[j] > best_gain:
                    best_gain, best = float(gains[j]), (i, int(ahead[fits[j]]))
            if best is None:
                break
            i, p = best
            left -= int(tables[i][1][p] - tables[i][1][picks[i]])
            picks[i] = p
    # A fixed (beta, C) can make the criterion rise with the budget (more pairs kept at small q, whose variance
    # outweighs their bias), so the frontier may stop well below the cap. The user asked for a size: spend what is
    # left one grid step at a time on the steps that raise the estimate least per byte.
    left = available_bytes - total(picks)
    while True:
        best_rise, best = np.inf, None
        for i, (_, cost, damage, _, _) in enumerate(tables):
            p = picks[i]
            if p + 1 >= cost.size or cost[p + 1] - cost[p] > left:
                continue
            rise = (damage[p + 1] - damage[p]) / max(1, int(cost[p + 1] - cost[p]))
            if rise < best_rise:
                best_rise, best = rise, i
        if best is None:
            break
        left -= int(tables[best][1][picks[best] + 1] - tables[best][1][picks[best]])
        picks[best] += 1
    plans = {}
    for spectrum, (budgets, _, damage, choice, _), p in zip(spectra, tables, picks, strict=True):
        m, n = spectrum.shape
        beta, exponent = settings[int(choice[p])]
        budget = int(budgets[p])
        plans[spectrum.name] = MatrixPlan(
            spectrum.name, budget, m * n / budget, beta, exponent, float(damage[p])
        )
    return plans


def shrink(
    spectrum: MatrixSpectrum,
    plan: MatrixPlan,
    pre_prune_ratio: float | str,
    importance_exponent: float | str,
    keep_prob_fn: KeepProbFn = paper_keep_prob,
    step: float = 1.1,
) -> MatrixPlan | None:
    """The next smaller grid budget for one matrix (with its best settings), or ``None`` at the smallest."""
    budgets = ratio_grid(spectrum.shape, step)
    smaller = budgets[budgets < plan.budget]
    if smaller.size == 0:
        return None
    return choose_settings(spectrum, int(smaller[-1]), pre_prune_ratio, importance_exponent, keep_prob_fn)
