"""Baselines at equal stored size (ALGORITHM.md section 6), with the interface of ``CompressedDelta``.

* DARE: keep each element of ΔW with probability ``1/CR`` (mask from the same counter-based hash), rescale.
* LowRank: the top ``k = round(m*n / (CR*(m+n)))`` singular pairs, whole (Eckart-Young optimal in Frobenius).
* Magnitude: the ``m*n/CR`` largest-magnitude elements of ΔW, unscaled. Its values are counted like the
  others' (the paper's accounting); its ``nbytes`` also counts the int32 indices it cannot do without.

All three take the delta's dtype for their stored values unless ``storage_dtype`` says otherwise. DARE's mask
is the counter-based hash of :mod:`impart_peft.masks` (element ``(i, j)`` of ΔW is hashed as row ``j`` of
column ``i`` of the ``"U"`` stream of ``(seed, name)``), so it is stored as a threshold, not as indices.

Each has ``reconstruct(dtype=None, device=None)``, ``num_stored_values``, ``nbytes``, ``compression_ratio``
(nominal) and ``disk_compression_ratio``. Pure torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .allocation import check_compression_ratio
from .delta import check_delta, dtype_bits, svd_top
from .masks import FACTOR_U, bernoulli_mask, stream_key

__all__ = ["DareDelta", "LowRankDelta", "MagnitudeDelta", "dare_delta", "lowrank_delta", "magnitude_delta"]


def _require_ratio(compression_ratio: float) -> None:
    if compression_ratio is None:
        raise ValueError("compression_ratio must be a number > 1 for a baseline, got None")
    check_compression_ratio(compression_ratio)


class _Ratios:
    shape: tuple[int, int]
    reference_dtype: torch.dtype

    @property
    def dense_nbytes(self) -> int:
        m, n = self.shape
        return m * n * dtype_bits(self.reference_dtype) // 8

    @property
    def disk_compression_ratio(self) -> float:
        return self.dense_nbytes / self.nbytes if self.nbytes else math.inf

    @property
    def value_compression_ratio(self) -> float:
        m, n = self.shape
        return m * n / self.num_stored_values if self.num_stored_values else math.inf


@dataclass
class DareDelta(_Ratios):
    """DARE: Bernoulli(1/CR) element mask regenerated from (seed, name), kept values scaled by CR."""

    shape: tuple[int, int]
    values: torch.Tensor  # kept elements of ΔW, row-major order, storage dtype
    keep_threshold: int
    seed: int
    name: str
    compression_ratio: float
    reference_dtype: torch.dtype

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``(m, n)`` keep mask: element ``(i, j)`` is kept when ``hash32(seed, name, "U", i, j)`` is below
        the threshold (rows of ΔW play the role of the hash's columns, so each row is its own stream)."""
        m, n = self.shape
        device = torch.device(device) if device is not None else torch.device("cpu")
        threshold = torch.full((m,), self.keep_threshold, dtype=torch.int64, device=device)
        return bernoulli_mask(self.seed, self.name, FACTOR_U, threshold, n, device=device).t()

    @property
    def num_stored_values(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def reconstruct(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        device = device if device is not None else self.values.device
        mask = self.mask(device)
        if int(mask.sum()) != self.values.numel():
            raise ValueError(
                f"DARE delta {self.name!r} holds {self.values.numel()} values but its mask keeps {int(mask.sum())}"
            )
        out = torch.zeros(self.shape, dtype=torch.float32, device=device)
        scale = float(1 << 32) / self.keep_threshold
        out[mask] = self.values.to(device=device, dtype=torch.float32) * scale
        return out.to(dtype) if dtype is not None else out


def dare_delta(
    delta: torch.Tensor, compression_ratio: float, seed: int = 0, name: str = "", storage_dtype=None
) -> DareDelta:
    """DARE at ``compression_ratio``: drop each element with probability ``1 - 1/CR``, rescale by CR."""
    check_delta(delta, name)
    _require_ratio(compression_ratio)
    if not isinstance(name, str):
        raise ValueError(f"name must be the module name as a str, got {type(name).__name__}")
    stream_key(seed, name, FACTOR_U)  # checks the seed
    keep_threshold = round((1 << 32) / compression_ratio)
    out = DareDelta(
        tuple(delta.shape), torch.empty(0), keep_threshold, seed, name, compression_ratio, delta.dtype
    )
    out.values = delta[out.mask(delta.device)].to(storage_dtype or delta.dtype).contiguous()
    return out


@dataclass
class LowRankDelta(_Ratios):
    """Truncated SVD: ``ΔW_c = U_k diag(S_k) V_kᵀ``."""

    shape: tuple[int, int]
    u: torch.Tensor  # (m, k)
    singular_values: torch.Tensor  # (k,)
    v: torch.Tensor  # (n, k)
    compression_ratio: float
    reference_dtype: torch.dtype

    @property
    def rank(self) -> int:
        return int(self.singular_values.numel())

    @property
    def num_stored_values(self) -> int:
        return int(self.u.numel() + self.v.numel() + self.singular_values.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.v, self.singular_values))

    def reconstruct(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        device = device if device is not None else self.u.device
        u, s, v = (t.to(device=device, dtype=torch.float32) for t in (self.u, self.singular_values, self.v))
        out = (u * s) @ v.t()
        return out.to(dtype) if dtype is not None else out


def lowrank_delta(
    delta: torch.Tensor,
    compression_ratio: float,
    svd_dtype=torch.float32,
    storage_dtype=None,
    svd_method: str = "auto",
) -> LowRankDelta:
    """The top ``round(m*n / (CR*(m+n)))`` singular pairs of ``delta`` (at least 1), kept whole.

    ``svd_method`` as in :func:`~impart_peft.delta.svd_top` (``"auto"``: the Gram route when fewer than
    ``min(m, n)`` pairs are kept).
    """
    check_delta(delta)
    _require_ratio(compression_ratio)
    m, n = delta.shape
    rank = max(1, min(min(m, n), round(m * n / (compression_ratio * (m + n)))))
    u, s, v = svd_top(delta, num_pairs=rank, svd_dtype=svd_dtype, method=svd_method)
    storage_dtype = storage_dtype or delta.dtype
    return LowRankDelta(
        (m, n),
        u[:, :rank].to(storage_dtype).contiguous(),
        s[:rank].to(torch.float32).contiguous(),
        v[:, :rank].to(storage_dtype).contiguous(),
        compression_ratio,
        delta.dtype,
    )


@dataclass
class MagnitudeDelta(_Ratios):
    """Magnitude pruning: the largest ``m*n/CR`` elements of ΔW with their flat indices."""

    shape: tuple[int, int]
    indices: torch.Tensor  # int32 (k,) flat indices (int64 when m * n >= 2**31)
    values: torch.Tensor  # (k,)
    compression_ratio: float
    reference_dtype: torch.dtype

    @property
    def num_stored_values(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.values))

    def reconstruct(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        device = device if device is not None else self.values.device
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.float32, device=device)
        out[self.indices.to(device=device, dtype=torch.int64)] = self.values.to(device, torch.float32)
        out = out.view(self.shape)
        return out.to(dtype) if dtype is not None else out


def magnitude_delta(delta: torch.Tensor, compression_ratio: float, storage_dtype=None) -> MagnitudeDelta:
    """Keep the ``round(m*n/CR)`` largest-magnitude elements of ``delta``."""
    check_delta(delta)
    _require_ratio(compression_ratio)
    m, n = delta.shape
    count = max(1, round(m * n / compression_ratio))
    flat = delta.reshape(-1)
    indices = torch.topk(flat.abs().float(), count, sorted=False).indices.sort().values
    index_dtype = torch.int32 if m * n <= torch.iinfo(torch.int32).max else torch.int64
    return MagnitudeDelta(
        (m, n),
        indices.to(index_dtype),
        flat[indices].to(storage_dtype or delta.dtype).contiguous(),
        compression_ratio,
        delta.dtype,
    )
