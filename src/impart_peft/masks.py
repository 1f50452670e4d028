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
    "keep_mask",
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
# Rows are hashed in chunks so the int64 temporaries stay in cache and memory stays small.
_CHUNK_ELEMENTS = 1 << 20


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
    """``(x * constant) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow (16-bit halves)."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
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
        int64 tensor ``(num_rows, K)`` with values in ``[0, 2**32)`` on ``device``.
    """
    key_column, key_row = stream_key(seed, module_name, factor)
    columns = columns.to(device=device, dtype=torch.int64)
    column_key = _fmix32(_mul32(columns + 1, _GOLDEN) ^ key_column)  # (K,)
    rows = torch.arange(1, num_rows + 1, dtype=torch.int64, device=columns.device)
    row_key = _fmix32(_mul32(rows, _GOLDEN) ^ key_row).unsqueeze(1)  # (num_rows, 1)
    out = torch.empty((num_rows, columns.numel()), dtype=torch.int64, device=columns.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, num_rows))
    for start in range(0, columns.numel(), step):
        out[:, start : start + step] = _fmix32(row_key ^ column_key[start : start + step].unsqueeze(0))
    return out


def keep_mask(
    seed: int,
    module_name: str,
    factor: str,
    keep_threshold: torch.Tensor,
    num_rows: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Keep mask of the first ``len(keep_threshold)`` columns of one factor.

    Args:
        keep_threshold: int64 ``(r,)``, values in ``[0, 2**32]``; column ``k`` keeps an element when its hash is
            below ``keep_threshold[k]``.
        num_rows: rows of the factor.

    Returns:
        bool tensor ``(num_rows, r)`` on ``device``. Columns with threshold ``2**32`` are all True and are not
        hashed; columns with threshold 0 are all False.
    """
    if device is None:
        device = keep_threshold.device
    keep_threshold = keep_threshold.to(device=device, dtype=torch.int64)
    num_columns = keep_threshold.numel()
    mask = torch.ones((num_rows, num_columns), dtype=torch.bool, device=device)
    partial = ((keep_threshold < THRESHOLD_ONE) & (keep_threshold > 0)).nonzero().flatten()
    mask[:, keep_threshold <= 0] = False
    if partial.numel():
        hashes = element_hash(seed, module_name, factor, partial, num_rows, device=device)
        mask[:, partial] = hashes < keep_threshold[partial].unsqueeze(0)
    return mask


def pack_columns(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kept values of a ``(rows, r)`` factor, column by column (column 0 first, rows in order), as 1-D."""
    return values.t()[mask.t()]


def unpack_columns(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: a ``(rows, r)`` tensor with zeros where ``mask`` is False."""
    expected = int(mask.sum())
    if packed.numel() != expected:
        raise ValueError(
            f"packed factor holds {packed.numel()} values but the mask regenerated from the seed keeps "
            f"{expected}: the file is corrupt or was written with another seed or module name"
        )
    out = torch.zeros((mask.shape[1], mask.shape[0]), dtype=packed.dtype, device=packed.device)
    out[mask.t().to(packed.device)] = packed
    return out.t()
