"""ImPart-QT: the kept factor values stored as packed low-bit integers, more bits for more important pairs.

The sparsification is ImPart's (same SVD, same allocation rule, same deterministic masks); what changes is how the
kept values of ``U[:, :r]`` and ``V[:, :r]`` are stored and how large a budget they get:

* **Bit schedule.** The stored pairs, in singular-value order, are split into tiers
  (:class:`QuantizationScheme`): by default the top ~7% of pairs get 8 bits, the next ~13% 4 bits, the next ~27%
  3 bits and the rest 2 bits (each tier covers twice the pairs of the one above). Pair ``k``'s bit width is
  stored per module (``module_meta[name]["quantized"]["bits"]``, run-length), so loading never recomputes it.
* **Quantiser.** Symmetric, mid-rise, per group: a group is ``group_size`` consecutive kept values of one column
  (one pair of one factor), with one float16 scale ``s``. A ``b``-bit code ``c`` in ``[0, 2^b - 1]`` stands for
  ``(c - (2^b - 1)/2) * s``: ``2^b`` levels symmetric about 0 (no level is wasted on an exact zero, which a kept
  value never is). ``s`` is chosen per group among 15 clipping factors of the group's absolute maximum, the one
  with the least squared error (the absolute maximum itself is far from optimal at 2 or 3 bits).
* **Packing.** The codes of a factor form one little-endian bit stream, column by column in the packing order of
  the values (:func:`~impart_peft.masks.pack_columns`), each code taking its pair's width; the stream is stored
  as ``uint8`` bytes (the last byte zero-padded). The scales are stored as ``float16``.
* **Budget in bits.** ``compression_ratio`` is counted in bits against the fine-tune's dtype: the codes and the
  scales of a ``m x n`` matrix get ``m * n * bits(dtype) / CR`` bits. The allocation spends that bit budget
  (:func:`allocate_bit_budget`), so at 2-3 bits per value about 5-8 times more values are kept than without
  quantisation at the same ratio.

Everything is integer arithmetic or a single float32 multiply per value at load time, so the dequantised values
are the same bits on every device. Pure torch: no PEFT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from .allocation import (
    ALLOCATION_RULES,
    Allocation,
    allocate_keep_prob,
    check_compression_ratio,
    check_importance_exponent,
    check_pre_prune_ratio,
    pre_prune_boundary,
)
from .delta import CompressedDelta, SparseFactors, check_delta, check_keep_count, dtype_bits, svd_top
from .masks import FACTOR_U, FACTOR_V, keep_mask, pack_columns

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_GROUP_SIZE",
    "SCALE_DTYPE",
    "BitAllocation",
    "QuantizationScheme",
    "QuantizedDelta",
    "allocate_bit_budget",
    "compress_delta_quantized",
    "dequantize_values",
    "expected_payload_bits",
    "pack_codes",
    "quantize_values",
    "unpack_codes",
]

DEFAULT_BITS = (8, 4, 3, 2)
DEFAULT_GROUP_SIZE = 128
SCALE_DTYPE = torch.float16
_SCALE_BITS = 16
_MAX_BITS = 8
# Clipping factors tried for each group's scale: 1.0 (the absolute maximum) down to 0.3 (what a 1-bit quantiser of
# Gaussian-like values wants); the first with the least squared error wins.
_CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(15))


# ---------------------------------------------------------------------------------------------------- the scheme
def _default_fractions(num_tiers: int) -> tuple[float, ...]:
    """Each tier covers twice the pairs of the tier above: ``2^j / (2^L - 1)``."""
    total = (1 << num_tiers) - 1
    return tuple((1 << j) / total for j in range(num_tiers))


def _exact(value: float) -> Fraction:
    # The fraction the user meant (0.1 -> 1/10, 0.06666666666666667 -> 1/15), so that tier boundaries such as
    # ceil(15 * 1/15) = 1 do not depend on binary rounding.
    return Fraction(repr(float(value))).limit_denominator(10**6)


@dataclass(frozen=True)
class QuantizationScheme:
    """How the kept factor values are quantised (the ``quantization`` field of :class:`~impart_peft.ImPartConfig`).

    Args:
        bits: bit widths of the tiers, from the most important pairs to the least, each an integer in ``[1, 8]``,
            non-increasing (default ``(8, 4, 3, 2)``).
        fractions: share of the stored pairs in each tier, same length as ``bits``, non-negative, summing to 1.
            Default: each tier twice the size of the one above (``(1, 2, 4, 8) / 15`` for four tiers). Tier ``j``
            ends at pair ``ceil(r * (f_1 + ... + f_j))`` of the ``r`` stored pairs, so a non-zero tier gets at
            least one pair when ``r >= 1`` (the top pair always gets the most bits).
        group_size: kept values of one column that share one float16 scale (default 128, as GPTQ and Delta-CoMe);
            a column's last group may be shorter.
    """

    bits: tuple[int, ...] = DEFAULT_BITS
    fractions: tuple[float, ...] | None = None
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        bits = self.bits
        if isinstance(bits, (int, str)) or not isinstance(bits, Sequence) or not bits:
            raise ValueError(f"quantization bits must be a non-empty list of integers, got {bits!r}")
        for b in bits:
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= _MAX_BITS:
                raise ValueError(
                    f"quantization bits must be integers from 1 to {_MAX_BITS}, got {list(bits)!r} (e.g. [8, 4, 3, 2])"
                )
        if any(later > earlier for earlier, later in zip(bits, bits[1:], strict=False)):
            raise ValueError(
                f"quantization bits must be non-increasing (the most important pairs first), got {list(bits)!r}"
            )
        object.__setattr__(self, "bits", tuple(int(b) for b in bits))
        fractions = self.fractions
        if fractions is None:
            fractions = _default_fractions(len(bits))
        if isinstance(fractions, (int, float, str)) or not isinstance(fractions, Sequence):
            raise ValueError(f"quantization fractions must be a list of numbers, got {fractions!r}")
        if len(fractions) != len(bits):
            raise ValueError(
                f"quantization fractions {list(fractions)!r} must have one entry per bit width {list(bits)!r}"
            )
        for f in fractions:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 0:
                raise ValueError(
                    f"quantization fractions must be finite numbers >= 0, got {list(fractions)!r}"
                )
        total = sum(_exact(f) for f in fractions)
        if abs(total - 1) > Fraction(1, 10**9):
            raise ValueError(
                f"quantization fractions must sum to 1 (shares of the stored pairs), got {list(fractions)!r} "
                f"(sum {float(total):g})"
            )
        object.__setattr__(self, "fractions", tuple(float(f) for f in fractions))
        group_size = self.group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"quantization group_size must be a positive integer, got {group_size!r}")

    @classmethod
    def parse(
        cls, value: QuantizationScheme | Mapping[str, Any] | Sequence[int] | None
    ) -> QuantizationScheme | None:
        """A scheme from a scheme, a dict (``{"bits": [...], "fractions": [...], "group_size": g}``, any key
        optional), a list of bit widths, or ``None`` (no quantisation).

        Raises:
            ValueError: an unknown key or an invalid value, naming it.
        """
        if value is None or isinstance(value, QuantizationScheme):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"bits", "fractions", "group_size"})
            if unknown:
                raise ValueError(
                    f"unknown quantization setting(s) {unknown}: the keys are 'bits', 'fractions' and 'group_size'"
                )
            bits = value.get("bits", DEFAULT_BITS)
            fractions = value.get("fractions")
            return cls(
                bits=tuple(bits) if isinstance(bits, Sequence) and not isinstance(bits, str) else bits,
                fractions=tuple(fractions)
                if isinstance(fractions, Sequence) and not isinstance(fractions, str)
                else fractions,
                group_size=value.get("group_size", DEFAULT_GROUP_SIZE),
            )
        if isinstance(value, Sequence) and not isinstance(value, str):
            return cls(bits=tuple(value))
        raise ValueError(
            f"quantization must be None, a dict with 'bits' (and optionally 'fractions', 'group_size') or a list "
            f"of bit widths, got {value!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in ``adapter_config.json``."""
        return {"bits": list(self.bits), "fractions": list(self.fractions), "group_size": self.group_size}

    @property
    def min_bits(self) -> int:
        return min(b for b, f in zip(self.bits, self.fractions, strict=True) if f > 0)

    def pair_bits(self, rank: int) -> torch.Tensor:
        """int64 ``(rank,)``: the bit width of each of ``rank`` stored pairs (descending singular value)."""
        out = torch.empty(rank, dtype=torch.int64)
        start = 0
        cumulative = Fraction(0)
        for j, (bits, fraction) in enumerate(zip(self.bits, self.fractions, strict=True)):
            cumulative += _exact(fraction)
            end = rank if j == len(self.bits) - 1 else min(rank, math.ceil(cumulative * rank))
            out[start:end] = bits
            start = max(start, end)
        return out


def bits_to_runs(pair_bits: torch.Tensor) -> list[list[int]]:
    """Run-length form ``[[bits, count], ...]`` of per-pair bit widths (what ``module_meta`` stores)."""
    runs: list[list[int]] = []
    for b in pair_bits.tolist():
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([int(b), 1])
    return runs


def runs_to_bits(runs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Inverse of :func:`bits_to_runs`: int64 ``(r,)``."""
    out = []
    for entry in runs:
        bits, count = int(entry[0]), int(entry[1])
        if not 1 <= bits <= _MAX_BITS or count < 0:
            raise ValueError(f"invalid bit run {list(entry)!r}: bits must be 1 to {_MAX_BITS}, count >= 0")
        out.extend([bits] * count)
    return torch.tensor(out, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------- the budget
def expected_payload_bits(keep_count: torch.Tensor, pair_bits: torch.Tensor, group_size: int) -> int:
    """Bits of the codes and scales of both factors for kept-row counts ``keep_count (2, r)`` and bit widths
    ``pair_bits (r,)``: per factor ``8 * ceil(sum_k c_k b_k / 8)`` (the packed stream, its last byte padded) plus
    ``16 * sum_k ceil(c_k / g)`` (the scales). Exact: the counts are known before any value is sampled."""
    counts = keep_count.to("cpu", torch.int64)
    bits = pair_bits.to("cpu", torch.int64)
    total = 0
    for factor_counts in counts:
        code_bits = int((factor_counts * bits).sum())
        groups = int(((factor_counts + group_size - 1) // group_size).sum())
        total += 8 * ((code_bits + 7) // 8) + _SCALE_BITS * groups
    return total


@dataclass(frozen=True)
class BitAllocation:
    """Result of :func:`allocate_bit_budget`.

    Attributes:
        allocation: the ImPart allocation of keep probabilities that spends the bit budget.
        pair_bits: int64 ``(boundary,)`` bit width of each kept pair.
        mean_keep: the mean keep probability ``q̄`` the allocation was made at; ``None`` when every non-zero pair
            is kept whole (the budget is not binding).
        budget_bits: ``m * n * reference_bits / CR`` (``None`` for ``compression_ratio=None``).
        expected_bits: payload bits (codes + scales) of the allocation, exact.
    """

    allocation: Allocation
    pair_bits: torch.Tensor
    mean_keep: float | None
    budget_bits: float | None
    expected_bits: int


def allocate_bit_budget(
    singular_values: torch.Tensor,
    shape: tuple[int, int],
    compression_ratio: float | None,
    scheme: QuantizationScheme,
    reference_bits: int,
    pre_prune_ratio: float = 0.8,
    importance_exponent: float = 1.0,
    rule: str = "paper",
) -> BitAllocation:
    """ImPart's allocation with a budget in bits.

    The budget is ``m * n * reference_bits / compression_ratio`` bits for the codes and scales. The allocation is
    :func:`~impart_peft.allocation.allocate_keep_prob`'s (same rule, same pre-pruning), given its budget as a mean
    keep fraction ``q̄``: the largest ``q̄`` whose exact payload fits the bit budget, by bisection on ``q̄`` in
    float64 (deterministic). The bit widths follow the scheme's tiers over the pairs kept at ``q̄``. With
    ``compression_ratio=None``, or when keeping every non-zero pair whole fits the budget, every non-zero pair is
    kept whole.
    """
    check_compression_ratio(compression_ratio)
    m, n = shape

    def bits_of(allocation: Allocation) -> tuple[Allocation, torch.Tensor, int]:
        pair_bits = scheme.pair_bits(allocation.boundary)
        return (
            allocation,
            pair_bits,
            expected_payload_bits(allocation.keep_count, pair_bits, scheme.group_size),
        )

    whole = bits_of(
        allocate_keep_prob(singular_values, shape, None, pre_prune_ratio, importance_exponent, rule=rule)
    )
    if compression_ratio is None:
        return BitAllocation(whole[0], whole[1], None, None, whole[2])
    budget = m * n * reference_bits / compression_ratio
    if whole[2] <= budget or whole[0].boundary == 0:
        return BitAllocation(whole[0], whole[1], None, budget, whole[2])

    def at(mean_keep: float) -> tuple[Allocation, torch.Tensor, int]:
        return bits_of(
            allocate_keep_prob(
                singular_values,
                shape,
                None,
                pre_prune_ratio,
                importance_exponent,
                rule=rule,
                mean_keep=mean_keep,
            )
        )

    # Invariant: the payload at `low` fits (0 keeps nothing), the one at `high` (every non-zero pair) does not.
    low, high = 0.0, whole[0].boundary / min(m, n)
    best = None
    for _ in range(200):
        if high - low <= 1e-12 * high:
            break
        middle = (low + high) / 2
        candidate = at(middle)
        if candidate[2] <= budget:
            low, best = middle, candidate
        else:
            high = middle
    if best is None:  # not even the scale of one group fits: nothing is stored
        empty = Allocation(
            keep_prob=torch.zeros(min(m, n), dtype=torch.float64),
            keep_count=torch.zeros((2, 0), dtype=torch.int64),
            boundary=0,
            gamma=0.0,
            rule=rule,
            target_keep_fraction=0.0,
            achieved_keep_fraction=0.0,
            budget=0,
            pre_prune_lowered=False,
            under_budget=False,
        )
        return BitAllocation(empty, scheme.pair_bits(0), 0.0, budget, 0)
    return BitAllocation(best[0], best[1], low, budget, best[2])


def _pairs_for_budget(
    shape: tuple[int, int],
    compression_ratio: float | None,
    pre_prune_ratio: float,
    scheme: QuantizationScheme,
    reference_bits: int,
) -> int:
    """Most pairs the bit budget can keep: ``max(floor(R(1-beta)), ceil(budget / (min_bits (m+n))))``, or R."""
    m, n = shape
    rank = min(m, n)
    if compression_ratio is None:
        return rank
    whole_pairs = m * n * reference_bits / compression_ratio / (scheme.min_bits * (m + n))
    return min(rank, max(pre_prune_boundary(rank, pre_prune_ratio), math.ceil(whole_pairs - 1e-9) + 1))


# ------------------------------------------------------------------------------------------------- the quantiser
def _layout(counts: torch.Tensor, pair_bits: torch.Tensor, group_size: int):
    """Per-element column, group and slot (position inside a ``(groups, group_size)`` grid) of packed values."""
    device = counts.device
    r = counts.numel()
    total = int(counts.sum())
    column = torch.repeat_interleave(torch.arange(r, device=device), counts)
    column_start = torch.cumsum(counts, 0) - counts
    position = torch.arange(total, device=device) - column_start[column]
    groups_per_column = (counts + group_size - 1) // group_size
    group_start = torch.cumsum(groups_per_column, 0) - groups_per_column
    group = group_start[column] + position // group_size
    slot = group * group_size + position % group_size
    group_bits = torch.repeat_interleave(pair_bits.to(device), groups_per_column)
    return column, group, slot, int(groups_per_column.sum()), group_bits


def _check_counts(counts: torch.Tensor, pair_bits: torch.Tensor, total: int, what: str) -> None:
    if counts.dim() != 1 or pair_bits.dim() != 1 or counts.numel() != pair_bits.numel():
        raise ValueError(
            f"{what}: {counts.numel()} column counts for {pair_bits.numel()} bit widths (one per stored pair)"
        )
    if int(counts.sum()) != total:
        raise ValueError(f"{what}: the columns hold {int(counts.sum())} values but {total} were given")


def quantize_values(
    values: torch.Tensor, counts: torch.Tensor, pair_bits: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise packed factor values column by column.

    Args:
        values: ``(N,)`` floating values, packed column by column (``counts[k]`` values of column ``k``).
        counts: int64 ``(r,)`` values per column; ``pair_bits``: int64 ``(r,)`` bit width per column.
        group_size: values per scale within a column.

    Returns:
        ``(codes, scales)``: int64 ``(N,)`` codes in ``[0, 2^b - 1]`` and float16 ``(G,)`` scales,
        ``G = sum_k ceil(counts[k] / group_size)``, on the values' device.
    """
    counts = counts.to(device=values.device, dtype=torch.int64)
    _check_counts(counts, pair_bits, values.numel(), "quantize_values")
    _, group, slot, num_groups, group_bits = _layout(counts, pair_bits, group_size)
    x = torch.zeros(num_groups * group_size, dtype=torch.float32, device=values.device)
    valid = torch.zeros(num_groups * group_size, dtype=torch.bool, device=values.device)
    x[slot] = values.to(torch.float32)
    valid[slot] = True
    x = x.view(num_groups, group_size)
    valid = valid.view(num_groups, group_size)
    half = (((1 << group_bits) - 1).to(torch.float32) / 2).unsqueeze(1)  # (G, 1): (2^b - 1) / 2
    absmax = x.abs().amax(dim=1, keepdim=True) if num_groups else torch.zeros(0, 1, device=values.device)

    def rounded(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(x / safe + half), min=0).minimum(2 * half)
        return codes, (codes - half) * scale

    best_scale = torch.zeros_like(absmax)
    best_error = torch.full_like(absmax, math.inf)
    for factor in _CLIP_GRID:
        # The scale as it will be stored (float16), so that the error measured is the error loaded.
        scale = (absmax * factor / half).to(SCALE_DTYPE).to(torch.float32)
        _, approx = rounded(scale)
        error = ((x - approx) ** 2 * valid).sum(dim=1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    codes, _ = rounded(best_scale)
    return codes.view(-1)[slot].to(torch.int64), best_scale.view(-1).to(SCALE_DTYPE)


def dequantize_values(
    codes: torch.Tensor,
    scales: torch.Tensor,
    counts: torch.Tensor,
    pair_bits: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Inverse of :func:`quantize_values`: float32 ``(N,)`` values ``(c - (2^b - 1)/2) * s`` on the codes' device.

    The subtraction is exact in float32 and the product is one correctly rounded multiply, so the result is the
    same on every device.

    Raises:
        ValueError: the number of scales does not match ``counts`` (a corrupt file or another seed).
    """
    device = codes.device
    counts = counts.to(device=device, dtype=torch.int64)
    _check_counts(counts, pair_bits, codes.numel(), "dequantize_values")
    _, group, _, num_groups, group_bits = _layout(counts, pair_bits, group_size)
    if scales.numel() != num_groups:
        raise ValueError(
            f"{scales.numel()} quantisation scales for {num_groups} groups of the columns the masks keep: the file is "
            "corrupt or was written with another seed, module name or group size"
        )
    half = ((1 << group_bits) - 1).to(torch.float32) / 2
    return (codes.to(torch.float32) - half[group]) * scales.to(device=device, dtype=torch.float32)[group]


def _element_bits(counts: torch.Tensor, pair_bits: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(pair_bits.to(counts.device), counts)


def pack_codes(codes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Pack integer codes of per-element bit ``widths`` (1 to 8) into a little-endian bit stream.

    Code ``e`` occupies bits ``[o_e, o_e + w_e)`` of the stream, ``o_e = w_0 + ... + w_(e-1)``, least significant
    bit first; returns uint8 ``(ceil(sum(w) / 8),)`` with the unused high bits of the last byte zero. Integer
    operations only (the codes' bits are disjoint, so adding the shifted codes into bytes is an exact OR).
    """
    codes = codes.to(torch.int64)
    widths = widths.to(device=codes.device, dtype=torch.int64)
    if codes.shape != widths.shape or codes.dim() != 1:
        raise ValueError(
            f"codes {tuple(codes.shape)} and widths {tuple(widths.shape)} must be 1-D, same length"
        )
    if codes.numel() and (bool((codes < 0).any()) or bool((codes >> widths).any())):
        raise ValueError("a code does not fit its bit width")
    total_bits = int(widths.sum())
    num_bytes = (total_bits + 7) // 8
    offsets = torch.cumsum(widths, 0) - widths
    byte = offsets // 8
    shifted = codes << (offsets % 8)  # < 2^15: a code spans at most two bytes
    out = torch.zeros(num_bytes + 1, dtype=torch.int64, device=codes.device)
    out.index_add_(0, byte, shifted & 0xFF)
    out.index_add_(0, byte + 1, shifted >> 8)
    return out[:num_bytes].to(torch.uint8)


def unpack_codes(data: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes from uint8 ``data`` and the per-element ``widths``.

    Raises:
        ValueError: ``data`` is not exactly ``ceil(sum(widths) / 8)`` bytes.
    """
    widths = widths.to(device=data.device, dtype=torch.int64)
    total_bits = int(widths.sum())
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != (total_bits + 7) // 8:
        raise ValueError(
            f"packed codes hold {data.numel()} {data.dtype} values, expected {(total_bits + 7) // 8} uint8 bytes for "
            f"{total_bits} bits: the file is corrupt or was written with another seed or module name"
        )
    stream = torch.cat([data.to(torch.int64), data.new_zeros(1, dtype=torch.int64)])
    offsets = torch.cumsum(widths, 0) - widths
    byte = offsets // 8
    word = stream[byte] | (stream[byte + 1] << 8)
    return (word >> (offsets % 8)) & ((1 << widths) - 1)


# -------------------------------------------------------------------------------------------- a quantised delta
@dataclass
class QuantizedDelta(SparseFactors):
    """An ImPart-QT compressed delta of one matrix: ImPart's sparse factors with quantised values.

    Tensors (what :meth:`state_dict` returns and the adapter file holds):
        ``singular_values`` float32 ``(r,)``, ``keep_count`` int32 ``(2, r)`` (as in
        :class:`~impart_peft.delta.CompressedDelta`), ``u_codes`` / ``v_codes`` uint8 packed code streams,
        ``u_scales`` / ``v_scales`` float16 ``(groups,)``.
    ``pair_bits`` int64 ``(r,)`` and ``group_size`` describe the codes (kept in ``module_meta``, not in the file).
    """

    shape: tuple[int, int]
    singular_values: torch.Tensor
    keep_count: torch.Tensor
    u_codes: torch.Tensor
    v_codes: torch.Tensor
    u_scales: torch.Tensor
    v_scales: torch.Tensor
    pair_bits: torch.Tensor
    group_size: int
    seed: int = 0
    name: str = ""
    compression_ratio: float | None = None
    reference_dtype: torch.dtype = torch.float32

    @property
    def payload_bits(self) -> int:
        """Bits of the codes (as packed, with the last byte's padding) and the scales: what the budget counts."""
        code_bytes = self.u_codes.numel() + self.v_codes.numel()
        return 8 * code_bytes + _SCALE_BITS * (self.u_scales.numel() + self.v_scales.numel())

    @property
    def nominal_compression_ratio(self) -> float:
        """Dense delta bits in ``reference_dtype`` / payload bits (codes + scales)."""
        m, n = self.shape
        return m * n * dtype_bits(self.reference_dtype) / self.payload_bits if self.payload_bits else math.inf

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "singular_values": self.singular_values,
            "keep_count": self.keep_count,
            "u_codes": self.u_codes,
            "v_codes": self.v_codes,
            "u_scales": self.u_scales,
            "v_scales": self.v_scales,
        }

    def meta(self) -> dict[str, Any]:
        """The ``module_meta[name]["quantized"]`` entry: what creates the tensors with their shapes and decodes them."""
        return {
            "bits": bits_to_runs(self.pair_bits),
            "group_size": self.group_size,
            "u_bytes": int(self.u_codes.numel()),
            "v_bytes": int(self.v_codes.numel()),
            "u_groups": int(self.u_scales.numel()),
            "v_groups": int(self.v_scales.numel()),
        }

    @classmethod
    def from_state_dict(
        cls,
        tensors: Mapping[str, torch.Tensor],
        shape: tuple[int, int],
        quantized_meta: Mapping[str, Any],
        seed: int,
        name: str,
        compression_ratio: float | None = None,
        reference_dtype: torch.dtype = torch.float32,
    ) -> QuantizedDelta:
        """Rebuild from the tensors of :meth:`state_dict` and the module's ``quantized`` metadata.

        Raises:
            ValueError: a tensor is missing or has the wrong dtype or length, the counts do not fit the shape, or
                the bit widths do not cover the stored pairs. Whether the codes and scales hold exactly what the
                counts need is checked when decoding.
        """
        keys = ("singular_values", "keep_count", "u_codes", "v_codes", "u_scales", "v_scales")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"quantised delta {name!r} is missing tensors {missing}")
        for key in ("u_codes", "v_codes"):
            if tensors[key].dtype != torch.uint8 or tensors[key].dim() != 1:
                raise ValueError(
                    f"quantised delta {name!r}: {key} must be 1-D uint8, got {tensors[key].dtype} "
                    f"{tuple(tensors[key].shape)}"
                )
        for key in ("u_scales", "v_scales"):
            if not tensors[key].is_floating_point() or tensors[key].dim() != 1:
                raise ValueError(f"quantised delta {name!r}: {key} must be a 1-D float tensor")
        pair_bits = runs_to_bits(quantized_meta["bits"])
        group_size = quantized_meta.get("group_size")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(
                f"quantised delta {name!r}: group_size must be a positive integer, got {group_size!r}"
            )
        rank = tensors["singular_values"].numel()
        if pair_bits.numel() != rank:
            raise ValueError(
                f"quantised delta {name!r}: {rank} singular values and {pair_bits.numel()} bit widths"
            )
        if rank > min(shape):
            raise ValueError(f"quantised delta {name!r}: {rank} pairs for a {shape[0]} x {shape[1]} matrix")
        shape = (int(shape[0]), int(shape[1]))
        return cls(
            shape=shape,
            singular_values=tensors["singular_values"],
            keep_count=check_keep_count(tensors["keep_count"], shape, rank, name),
            u_codes=tensors["u_codes"],
            v_codes=tensors["v_codes"],
            u_scales=tensors["u_scales"],
            v_scales=tensors["v_scales"],
            pair_bits=pair_bits,
            group_size=group_size,
            seed=seed,
            name=name,
            compression_ratio=compression_ratio,
            reference_dtype=reference_dtype,
        )

    def _default_device(self) -> torch.device:
        return self.u_codes.device

    def _values(self, mask_u: torch.Tensor, mask_v: torch.Tensor, device: torch.device):
        """Dequantised float32 values of U and V on ``device`` (the counts come from ``keep_count``)."""
        out = []
        keep_count = self.keep_count.to(device=device, dtype=torch.int64)
        for codes, scales, counts, factor in (
            (self.u_codes, self.u_scales, keep_count[0], "U"),
            (self.v_codes, self.v_scales, keep_count[1], "V"),
        ):
            try:
                integer = unpack_codes(codes.to(device), _element_bits(counts, self.pair_bits))
                out.append(
                    dequantize_values(integer, scales.to(device), counts, self.pair_bits, self.group_size)
                )
            except ValueError as error:
                raise ValueError(f"quantised delta {self.name!r}, factor {factor}: {error}") from None
        return out

    def dequantized(self, device: torch.device | str | None = None) -> CompressedDelta:
        """The same delta as a :class:`~impart_peft.delta.CompressedDelta` with float32 values on ``device``."""
        device = torch.device(device) if device is not None else self.u_codes.device
        u_values, v_values = self._values(None, None, device)  # the masks are not needed to decode
        return CompressedDelta(
            shape=self.shape,
            singular_values=self.singular_values.to(device),
            keep_count=self.keep_count.to(device),
            u_values=u_values,
            v_values=v_values,
            seed=self.seed,
            name=self.name,
            compression_ratio=self.compression_ratio,
            reference_dtype=self.reference_dtype,
        )


def compress_delta_quantized(
    delta: torch.Tensor,
    compression_ratio: float | None = 16.0,
    quantization: QuantizationScheme | Mapping[str, Any] | Sequence[int] | None = None,
    pre_prune_ratio: float = 0.8,
    importance_exponent: float = 1.0,
    seed: int = 0,
    name: str = "",
    svd_dtype: torch.dtype = torch.float32,
    reference_dtype: torch.dtype | None = None,
    svd_method: str = "auto",
    allocation: str = "paper",
) -> QuantizedDelta:
    """Compress one dense delta with ImPart-QT.

    Args:
        delta: ``(m, n)`` floating tensor ``W_ft - W_base``; everything runs on its device.
        compression_ratio: dense delta bits (in ``reference_dtype``) / payload bits (codes and scales), ``> 1``;
            ``None`` keeps every element of every non-zero pair (quantised, so still ``bits(dtype) / b`` smaller).
        quantization: a :class:`QuantizationScheme` or what :meth:`QuantizationScheme.parse` reads (default
            ``QuantizationScheme()``: 8/4/3/2 bits, group size 128).
        pre_prune_ratio, importance_exponent, seed, name, svd_dtype, svd_method: as in
            :func:`~impart_peft.delta.compress_delta`.
        reference_dtype: the fine-tune's dtype, whose bits the ratio is counted against (default the delta's).
        allocation: the allocation rule, ``"paper"`` (default) or ``"rescaled"``.

    Returns:
        A :class:`QuantizedDelta` on the delta's device; same inputs and seed give the same tensors bit for bit.
    """
    check_delta(delta, name)
    check_compression_ratio(compression_ratio)
    check_pre_prune_ratio(pre_prune_ratio)
    check_importance_exponent(importance_exponent)
    if allocation not in ALLOCATION_RULES:
        raise ValueError(f"allocation must be one of {ALLOCATION_RULES}, got {allocation!r}")
    scheme = QuantizationScheme.parse(quantization) or QuantizationScheme()
    reference_dtype = reference_dtype or delta.dtype
    reference_bits = dtype_bits(reference_dtype)
    m, n = delta.shape
    needed = _pairs_for_budget((m, n), compression_ratio, pre_prune_ratio, scheme, reference_bits)
    u, sigma, v = svd_top(delta, num_pairs=needed, svd_dtype=svd_dtype, method=svd_method)
    planned = allocate_bit_budget(
        sigma,
        (m, n),
        compression_ratio,
        scheme,
        reference_bits,
        pre_prune_ratio,
        importance_exponent,
        allocation,
    )
    rank = planned.allocation.boundary
    if rank > u.shape[1]:
        raise RuntimeError(f"allocation kept {rank} pairs but only {u.shape[1]} were computed")
    keep_count = planned.allocation.keep_count.to(device=delta.device, dtype=torch.int32)
    pair_bits = planned.pair_bits[:rank].clone()
    stored = {}
    for key, factor, rows, counts in (("u", u, m, keep_count[0]), ("v", v, n, keep_count[1])):
        mask = keep_mask(seed, name, FACTOR_U if key == "u" else FACTOR_V, counts, rows)
        values = pack_columns(factor[:, :rank].to(torch.float32), mask)
        codes, scales = quantize_values(values, counts, pair_bits, scheme.group_size)
        stored[key] = (pack_codes(codes, _element_bits(counts, pair_bits)), scales.contiguous())
    return QuantizedDelta(
        shape=(m, n),
        singular_values=sigma[:rank].to(torch.float32).contiguous(),
        keep_count=keep_count,
        u_codes=stored["u"][0],
        v_codes=stored["v"][0],
        u_scales=stored["u"][1],
        v_scales=stored["v"][1],
        pair_bits=pair_bits,
        group_size=scheme.group_size,
        seed=seed,
        name=name,
        compression_ratio=compression_ratio,
        reference_dtype=reference_dtype,
    )
