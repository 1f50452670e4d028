"""Deterministic, device-independent keep masks and the packing of kept factor values (ALGORITHM.md section 5).

A mask is never stored. The keep decision for element ``i`` of column ``k`` of factor ``U`` or ``V`` of a
module is::

    keep  <=>  hash32(seed, module_name, factor, k, i) < keep_threshold[k]
    hash32 = fmix32(column_key[k] ^ row_key[i]),
    column_key[k] = fmix32((k+1)*G ^ key_column),  row_key[i] = fmix32((i+1)*G ^ key_row)

where (key_column, key_row) are 32 bits each of BLAKE2b(seed, module_name, factor) and G = 0x9E3779B9.
``hash32`` is a counter-based hash built from 32-bit integer multiply / xor / shift steps (MurmurHash3's
finaliser), evaluated with int64 tensor ops so that no intermediate ever overflows: the same bits on CPU and
CUDA, on every torch version, in any order of evaluation. ``keep_threshold[k]`` is an integer in
``[0, 2**32]`` stored on disk, so loading never recomputes the allocation in floating point; the keep
probability the estimator rescales by is exactly ``keep_threshold[k] / 2**32``.

Speed (the definition above is fixed; only its evaluation is tuned): a multiply mod 2**32 is one int64
multiply by the constant's signed representative in ``[-2**31, 2**31)`` and one ``and`` (the product stays
inside int64); fmix32's first xor-shift is applied to the column and row keys, not to the grid; the grid is
hashed in blocks of whole rows with in-place ops into two reused buffers, and compared with the thresholds
straight into the bool mask. Both factors of a 4096 x 4096 matrix at q = 0.5 take about 0.1 s on two CPU cores.

Pure torch: no PEFT, no model.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = [
    "FACTOR_U",
    "FACTOR_V",
    "THRESHOLD_ONE",
    "element_hash",
    "hash32_reference",
    "bernoulli_mask",
    "keep_mask",
    "kept_rows_reference",
    "keep_prob_from_threshold",
    "keep_threshold_from_prob",
    "pack_columns",
    "stream_key",
    "unpack_columns",
]

FACTOR_U = "U"
FACTOR_V = "V"
THRESHOLD_ONE = 1 << 32  # keep_threshold meaning "always keep" (q = 1)

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: a Weyl-sequence step
_MIX_1 = 0x85EBCA6B
_MIX_2 = 0xC2B2AE35
# The grid is hashed in blocks of whole rows of about this many elements: two int64 blocks (2 MiB each) stay
# in cache, every op runs in place, and each block is still large enough for torch to split over threads.
_CPU_BLOCK_ELEMENTS = 1 << 18
_DEVICE_BLOCK_ELEMENTS = 1 << 22  # on an accelerator fewer, larger launches win


def _signed32(constant: int) -> int:
    """The representative of ``constant mod 2**32`` in ``[-2**31, 2**31)``.

    For ``x`` in ``[0, 2**32)``, ``x * _signed32(c)`` lies strictly inside the int64 range and is congruent to
    ``x * c`` modulo ``2**32``; masking it with ``0xFFFFFFFF`` (two's complement) gives ``(x * c) mod 2**32``
    with one multiply and one ``and``, and no intermediate ever overflows.
    """
    constant &= _MASK32
    return constant - (1 << 32) if constant >= 1 << 31 else constant


_GOLDEN_S = _signed32(_GOLDEN)
_MIX_1_S = _signed32(_MIX_1)
_MIX_2_S = _signed32(_MIX_2)


def keep_threshold_from_prob(keep_prob: torch.Tensor) -> torch.Tensor:
    """Integer keep thresholds ``round(q * 2**32)`` (int64, same shape) from keep probabilities in [0, 1]."""
    scaled = keep_prob.detach().to("cpu", torch.float64).clamp(0.0, 1.0) * float(THRESHOLD_ONE)
    return torch.round(scaled).to(torch.int64)


def keep_prob_from_threshold(keep_threshold: torch.Tensor) -> torch.Tensor:
    """Exact keep probabilities ``keep_threshold / 2**32`` as float64 (same device and shape)."""
    return keep_threshold.to(torch.float64) / float(THRESHOLD_ONE)


def stream_key(seed: int, module_name: str, factor: str) -> tuple[int, int]:
    """Two 32-bit keys for the mask stream of one (seed, module, factor).

    BLAKE2b of the UTF-8 text: stable across Python versions and processes (unlike ``hash()``).
    """
    if factor not in (FACTOR_U, FACTOR_V):
        raise ValueError(f"factor must be {FACTOR_U!r} or {FACTOR_V!r}, got {factor!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    digest = hashlib.blake2b(f"impart-mask\0{seed}\0{module_name}\0{factor}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for any int64 ``x``, without int64 overflow."""
    return ((x & _MASK32) * _signed32(constant)) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 ``x`` in ``[0, 2**32)`` (a new tensor)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_1)
    x = x ^ (x >> 13)
    x = _mul32(x, _MIX_2)
    return x ^ (x >> 16)


def _fmix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * _MIX_1) & _MASK32
    x ^= x >> 13
    x = (x * _MIX_2) & _MASK32
    return x ^ (x >> 16)


def hash32_reference(seed: int, module_name: str, factor: str, column: int, row: int) -> int:
    """Plain-Python statement of the mask hash of one element (for reading and for tests)."""
    key_column, key_row = stream_key(seed, module_name, factor)
    column_key = _fmix32_int(((column + 1) * _GOLDEN & _MASK32) ^ key_column)
    row_key = _fmix32_int(((row + 1) * _GOLDEN & _MASK32) ^ key_row)
    return _fmix32_int(column_key ^ row_key)


def _stream_keys(
    seed: int, module_name: str, factor: str, columns: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column ``(1, K)`` and per-row ``(num_rows, 1)`` keys with the finaliser's first step applied.

    ``fmix32`` starts with ``x ^= x >> 16``, and a logical shift distributes over xor, so for
    ``x = column_key ^ row_key`` that step is ``pre(column_key) ^ pre(row_key)``: it is applied here, once per
    column and once per row, instead of once per element of the grid.
    """
    key_column, key_row = stream_key(seed, module_name, factor)
    column_key = _fmix32(_mul32(columns + 1, _GOLDEN) ^ key_column)
    rows = torch.arange(1, num_rows + 1, dtype=torch.int64, device=columns.device)
    row_key = _fmix32(_mul32(rows, _GOLDEN) ^ key_row)
    column_key ^= column_key >> 16
    row_key ^= row_key >> 16
    return column_key.unsqueeze(0), row_key.unsqueeze(1)


def _finish_hash_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The rest of ``fmix32`` on ``x`` in place (after its first xor-shift); ``scratch`` has ``x``'s shape."""
    x.mul_(_MIX_1_S).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 13, out=scratch)
    x.bitwise_xor_(scratch)
    x.mul_(_MIX_2_S).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 16, out=scratch)
    return x.bitwise_xor_(scratch)


def _rows_per_block(num_columns: int, device: torch.device) -> int:
    elements = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(1, elements // max(1, num_columns))


def element_hash(
    seed: int,
    module_name: str,
    factor: str,
    columns: torch.Tensor,
    num_rows: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """32-bit hashes of a block of factor elements.

    Args:
        columns: int64 tensor ``(K,)`` of global column (singular pair) indices, 0-based.
        num_rows: rows of the factor (``m`` for U, ``n`` for V).

    Returns:
        int64 tensor ``(num_rows, K)`` with values in ``[0, 2**32)`` on ``device``; element ``[i, j]`` is
        :func:`hash32_reference` ``(seed, module_name, factor, columns[j], i)``.
    """
    columns = columns.to(device=device, dtype=torch.int64).reshape(-1)
    column_key, row_key = _stream_keys(seed, module_name, factor, columns, num_rows)
    out = torch.empty((num_rows, columns.numel()), dtype=torch.int64, device=columns.device)
    if out.numel() == 0:
        return out
    step = _rows_per_block(columns.numel(), columns.device)
    scratch = torch.empty((min(step, num_rows), columns.numel()), dtype=torch.int64, device=columns.device)
    for start in range(0, num_rows, step):
        block = out[start : start + step]  # whole rows: contiguous
        torch.bitwise_xor(row_key[start : start + step], column_key, out=block)
        _finish_hash_(block, scratch[: block.shape[0]])
    return out


def bernoulli_mask(
    seed: int,
    module_name: str,
    factor: str,
    keep_threshold: torch.Tensor,
    num_rows: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Independent (Bernoulli) keep decisions for the first ``len(keep_threshold)`` columns of a grid.

    Not ImPart's mask (that is :func:`keep_mask`, an exact count per column): DARE's baseline drops each element
    independently, and this is its deterministic form.

    Args:
        keep_threshold: int64 ``(r,)``, values in ``[0, 2**32]``; column ``k`` keeps an element when its hash is
            below ``keep_threshold[k]``.
        num_rows: rows of the factor.

    Returns:
        bool tensor ``(num_rows, r)`` on ``device``, contiguous. Columns with threshold ``2**32`` are all True
        and are not hashed; columns with threshold 0 are all False. Equal to
        ``element_hash(...) < keep_threshold`` bit for bit, computed block by block without the int64 grid.
    """
    if device is None:
        device = keep_threshold.device
    device = torch.device(device)
    keep_threshold = keep_threshold.to(device=device, dtype=torch.int64).reshape(-1)
    num_columns = keep_threshold.numel()
    mask = torch.ones((num_rows, num_columns), dtype=torch.bool, device=device)
    mask[:, keep_threshold <= 0] = False
    partial = ((keep_threshold < THRESHOLD_ONE) & (keep_threshold > 0)).nonzero().flatten()
    num_partial = partial.numel()
    if num_partial == 0 or num_rows == 0:
        return mask
    first = int(partial[0])
    contiguous = int(partial[-1]) - first + 1 == num_partial  # the usual case: q_k < 1 for k >= 2
    column_key, row_key = _stream_keys(seed, module_name, factor, partial, num_rows)
    threshold = keep_threshold[partial].unsqueeze(0)
    step = _rows_per_block(num_partial, device)
    rows_in_block = min(step, num_rows)
    work = torch.empty((rows_in_block, num_partial), dtype=torch.int64, device=device)
    scratch = torch.empty_like(work)
    keep = None if contiguous else torch.empty((rows_in_block, num_partial), dtype=torch.bool, device=device)
    for start in range(0, num_rows, step):
        rows = min(step, num_rows - start)
        x = work[:rows]
        torch.bitwise_xor(row_key[start : start + rows], column_key, out=x)
        _finish_hash_(x, scratch[:rows])
        if contiguous:
            torch.lt(x, threshold, out=mask[start : start + rows, first : first + num_partial])
        else:
            torch.lt(x, threshold, out=keep[:rows])
            mask[start : start + rows, partial] = keep[:rows]
    return mask


def kept_rows_reference(
    seed: int, module_name: str, factor: str, column: int, num_rows: int, keep_count: int
) -> list[int]:
    """Plain-Python statement of the exact-count mask of one column: the ``keep_count`` rows with the smallest
    hash, ties broken by row index, in row order."""
    ranked = sorted(
        range(num_rows), key=lambda row: (hash32_reference(seed, module_name, factor, column, row), row)
    )
    return sorted(ranked[:keep_count])


def _count_true(flags: torch.Tensor) -> torch.Tensor:
    """Number of True per row of a bool ``(K, rows)`` tensor, int64 ``(K,)``.

    Summed as bytes into the narrowest integer that cannot overflow: int16 sums vectorise about 15 times faster
    than the int64 a plain ``sum`` of bools accumulates in.
    """
    narrow = torch.int16 if flags.shape[1] < 1 << 15 else torch.int32
    return flags.view(torch.uint8).sum(dim=1, dtype=narrow).to(torch.int64)


def _kth_smallest(keys: torch.Tensor, rank: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The ``rank[k]``-th smallest (1-based) of each row of ``keys (K, num_rows)``, all distinct, ``(K,)``.

    The keys are uniform 32-bit hashes, so the answer lies within a few standard deviations of
    ``rank / num_rows * 2**32``: a band of ±(8 sd + 2 rows) around it is counted, and only the keys
    inside the band (a few hundred per row, not ``num_rows``) are sorted. A row whose answer falls outside its
    band (never seen; about 1e-15 per row) is redone with the whole row as its band, so the result is exact
    whatever the hashes are; only the speed depends on their being uniform.
    """
    fraction = rank.to(torch.float64) / num_rows
    spread = torch.sqrt(fraction * (1 - fraction) / num_rows) * 8 + 2.0 / num_rows
    scale = float(1 << 32)
    low = torch.floor((fraction - spread).clamp(0.0, 1.0) * scale).to(torch.int64).unsqueeze(1)
    high = torch.ceil((fraction + spread).clamp(0.0, 1.0) * scale).to(torch.int64).unsqueeze(1)
    under_low = keys < low
    in_band = keys < high
    below_low = _count_true(under_low)
    below_high = _count_true(in_band)
    missed = (below_low >= rank) | (below_high < rank)
    if bool(missed.any()):
        under_low[missed] = False
        in_band[missed] = True
        below_low = torch.where(missed, torch.zeros_like(below_low), below_low)
        below_high = torch.where(missed, torch.full_like(below_high, num_rows), below_high)
    in_band ^= under_low  # low <= key < high
    band_sizes = below_high - below_low
    # Each row's band, padded to the widest one, sorted along the row: one small sort instead of a ragged one.
    width = int(band_sizes.max())
    padded = torch.full(
        (keys.shape[0], width), torch.iinfo(torch.int64).max, dtype=torch.int64, device=keys.device
    )
    slot = torch.arange(width, device=keys.device).unsqueeze(0) < band_sizes.unsqueeze(1)
    padded[slot] = keys[in_band]  # both row-major: row k's band keys, in row order, fill row k's first slots
    padded = torch.sort(padded, dim=1).values
    return padded.gather(1, (rank - below_low - 1).unsqueeze(1)).squeeze(1)


def keep_mask(
    seed: int,
    module_name: str,
    factor: str,
    keep_count: torch.Tensor,
    num_rows: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """ImPart's keep mask of the first ``len(keep_count)`` columns of one factor (ALGORITHM.md section 5).

    Column ``k`` keeps exactly ``keep_count[k]`` rows: those with the smallest
    :func:`hash32_reference` ``(seed, module_name, factor, k, row)``, ties broken by row index. (Within a column the
    hash is a bijection of the row index for fewer than ``2**32`` rows: an odd multiple of ``row + 1``, a xor and
    ``fmix32`` are each invertible mod ``2**32``; so there are no ties and the order is the hashes' alone.) Over seeds each row
    is kept with probability ``keep_count[k] / num_rows``, so rescaling by ``num_rows / keep_count[k]`` is exactly
    unbiased (sampling without replacement), and the number of stored values is known before any hash is computed.

    Args:
        keep_count: int64 ``(r,)``, values in ``[0, num_rows]``.
        num_rows: rows of the factor (``m`` for U, ``n`` for V).

    Returns:
        bool ``(num_rows, r)`` on ``device`` (the transpose of a contiguous ``(r, num_rows)`` tensor: each column
        contiguous, the order :func:`pack_columns` reads). Equal to :func:`kept_rows_reference` bit for bit;
        columns with ``keep_count`` 0 or ``num_rows`` are not hashed.
    """
    if device is None:
        device = keep_count.device
    device = torch.device(device)
    keep_count = keep_count.to(device=device, dtype=torch.int64).reshape(-1)
    if num_rows >= 1 << 32:
        raise ValueError(f"factors of {num_rows} rows are not supported (fewer than 2**32)")
    mask = torch.zeros((keep_count.numel(), num_rows), dtype=torch.bool, device=device)
    mask[keep_count >= num_rows] = True
    partial = ((keep_count > 0) & (keep_count < num_rows)).nonzero().flatten()
    if partial.numel() == 0:
        return mask.t()
    # Hashes of whole columns are needed at once (the k-th smallest of each); blocks of columns bound memory.
    elements = _CPU_BLOCK_ELEMENTS * 4 if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS * 4
    step = max(1, elements // num_rows)
    for start in range(0, partial.numel(), step):
        columns = partial[start : start + step]
        column_key, row_key = _stream_keys(seed, module_name, factor, columns, num_rows)
        keys = torch.bitwise_xor(column_key.t(), row_key.t())  # (K, num_rows): column k's hashes contiguous
        _finish_hash_(keys, torch.empty_like(keys))  # distinct within each column (see above)
        kth = _kth_smallest(keys, keep_count[columns], num_rows)
        mask[columns] = keys <= kth.unsqueeze(1)
    return mask.t()


def pack_columns(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kept values of a ``(rows, r)`` factor, column by column (column 0 first, rows in order), as 1-D."""
    if values.shape != mask.shape:
        raise ValueError(
            f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape"
        )
    # masked_select reads in row-major order of the (r, rows) transposes: column by column of the factor.
    return torch.masked_select(values.t().contiguous(), mask.t().to(values.device).contiguous())


def unpack_columns(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: a ``(rows, r)`` tensor with zeros where ``mask`` is False.

    The result is the transpose of a contiguous ``(r, rows)`` tensor (each column of the factor contiguous), a
    fresh tensor the caller may modify in place.
    """
    expected = int(mask.sum())
    if packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"packed factor holds {packed.numel()} values but the mask regenerated from the seed keeps "
            f"{expected}: the file is corrupt or was written with another seed or module name"
        )
    out = torch.zeros((mask.shape[1], mask.shape[0]), dtype=packed.dtype, device=packed.device)
    out.masked_scatter_(mask.t().to(packed.device), packed)  # fills in row-major order of (r, rows)
    return out.t()
