"""The ImPart estimator for one matrix: SVD, allocation, deterministic sparsification, packing.

``compress_delta`` turns a dense delta ``(m, n)`` into a :class:`CompressedDelta` that holds only

* ``singular_values`` float32 ``(r,)``: the kept sigma_k (r = pairs with q_k > 0),
* ``keep_threshold`` int64 ``(r,)``: q_k as an integer threshold (``q_k = keep_threshold / 2**32``),
* ``u_values`` / ``v_values`` 1-D, storage dtype: the kept elements of U[:, :r] and V[:, :r], packed column by
  column. No indices, no mask: the mask is regenerated from (seed, name, factor, column, row).

``reconstruct`` gives ``ΔW_c = Ũ diag(sigma) Ṽᵀ`` with ``Ũ = U ⊙ mask / q`` (the unbiased estimator of
ALGORITHM.md section 2). Pure torch: no PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .allocation import (
    allocate_keep_prob,
    check_compression_ratio,
    check_importance_exponent,
    check_pre_prune_ratio,
)
from .masks import (
    FACTOR_U,
    FACTOR_V,
    keep_mask,
    keep_prob_from_threshold,
    keep_threshold_from_prob,
    pack_columns,
    unpack_columns,
)

__all__ = ["CompressedDelta", "check_delta", "compress_delta", "dtype_bits", "svd_top"]

_SVD_DTYPES = (torch.float32, torch.float64)


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size() * 8


def check_delta(delta: torch.Tensor, name: str = "") -> None:
    """Raise ``ValueError`` unless ``delta`` is a finite 2-D floating tensor."""
    where = f" of {name!r}" if name else ""
    if not isinstance(delta, torch.Tensor):
        raise ValueError(f"delta{where} must be a torch.Tensor, got {type(delta).__name__}")
    if delta.dim() != 2:
        raise ValueError(
            f"delta{where} must be a 2-D matrix, got shape {tuple(delta.shape)}; "
            "vectors (norms, biases) are stored densely, not compressed"
        )
    if not delta.is_floating_point():
        raise ValueError(f"delta{where} must be a floating-point tensor, got {delta.dtype}")
    if delta.numel() == 0:
        raise ValueError(f"delta{where} is empty (shape {tuple(delta.shape)})")
    if not torch.isfinite(delta).all():
        bad = int((~torch.isfinite(delta)).sum())
        raise ValueError(
            f"delta{where} contains {bad} NaN or inf value(s): check the base and fine-tuned checkpoints "
            "(a diverged fine-tune or a corrupt file)"
        )


def svd_top(
    delta: torch.Tensor, num_pairs: int | None = None, svd_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``delta = U diag(S) Vᵀ`` in ``svd_dtype`` on the delta's device.

    Returns ``U (m, R)``, ``S (R,)`` descending, ``V (n, R)``, ``R = min(m, n)``; with ``num_pairs`` only the
    first ``num_pairs`` columns of U and V are guaranteed meaningful (the rest may be returned truncated).
    """
    if svd_dtype not in _SVD_DTYPES:
        raise ValueError(f"svd_dtype must be torch.float32 or torch.float64, got {svd_dtype}")
    work = delta.to(svd_dtype)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    if num_pairs is not None:
        u, vh = u[:, :num_pairs], vh[:num_pairs]
    return u, s, vh.t()


@dataclass
class CompressedDelta:
    """An ImPart-compressed delta of one matrix. See the module docstring for the tensors it holds."""

    shape: tuple[int, int]
    singular_values: torch.Tensor  # float32 (r,)
    keep_threshold: torch.Tensor  # int64 (r,)
    u_values: torch.Tensor  # (num kept U elements,) storage dtype
    v_values: torch.Tensor  # (num kept V elements,) storage dtype
    seed: int = 0
    name: str = ""
    compression_ratio: float | None = None  # nominal, as asked
    reference_dtype: torch.dtype = torch.float32  # dtype of the dense delta this replaces (for byte ratios)

    @property
    def rank(self) -> int:
        """Number of stored singular pairs ``r``."""
        return int(self.singular_values.numel())

    @property
    def keep_prob(self) -> torch.Tensor:
        """float64 ``(r,)`` keep probabilities, exactly those the masks and the rescale use."""
        return keep_prob_from_threshold(self.keep_threshold)

    @property
    def num_stored_values(self) -> int:
        """Kept factor elements plus the singular values."""
        return int(self.u_values.numel() + self.v_values.numel() + self.singular_values.numel())

    @property
    def num_factor_values(self) -> int:
        """Kept factor elements only (what the nominal budget counts)."""
        return int(self.u_values.numel() + self.v_values.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (values, singular values, thresholds)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense delta in ``reference_dtype``."""
        m, n = self.shape
        return m * n * dtype_bits(self.reference_dtype) // 8

    @property
    def disk_compression_ratio(self) -> float:
        """Dense delta bytes / stored bytes: the ratio the file actually achieves."""
        return self.dense_nbytes / self.nbytes if self.nbytes else math.inf

    @property
    def value_compression_ratio(self) -> float:
        """Dense values / stored values (factor elements + singular values)."""
        m, n = self.shape
        return m * n / self.num_stored_values if self.num_stored_values else math.inf

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The four tensors that go on disk, keyed by role."""
        return {
            "singular_values": self.singular_values,
            "keep_threshold": self.keep_threshold,
            "u_values": self.u_values,
            "v_values": self.v_values,
        }

    @classmethod
    def from_state_dict(
        cls,
        tensors: dict[str, torch.Tensor],
        shape: tuple[int, int],
        seed: int,
        name: str,
        compression_ratio: float | None = None,
        reference_dtype: torch.dtype = torch.float32,
    ) -> CompressedDelta:
        """Rebuild from the tensors of :meth:`state_dict`; checks their counts against the regenerated masks."""
        missing = {"singular_values", "keep_threshold", "u_values", "v_values"} - set(tensors)
        if missing:
            raise ValueError(f"compressed delta {name!r} is missing tensors {sorted(missing)}")
        out = cls(
            shape=(int(shape[0]), int(shape[1])),
            singular_values=tensors["singular_values"],
            keep_threshold=tensors["keep_threshold"],
            u_values=tensors["u_values"],
            v_values=tensors["v_values"],
            seed=seed,
            name=name,
            compression_ratio=compression_ratio,
            reference_dtype=reference_dtype,
        )
        if out.keep_threshold.shape != out.singular_values.shape:
            raise ValueError(
                f"compressed delta {name!r}: {out.keep_threshold.numel()} keep thresholds for "
                f"{out.singular_values.numel()} singular values"
            )
        return out

    def masks(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool keep masks ``(m, r)`` of U and ``(n, r)`` of V, regenerated from the seed."""
        m, n = self.shape
        threshold = self.keep_threshold.to(device) if device is not None else self.keep_threshold
        return (
            keep_mask(self.seed, self.name, FACTOR_U, threshold, m),
            keep_mask(self.seed, self.name, FACTOR_V, threshold, n),
        )

    def factors(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rescaled sparse factors.

        Returns:
            ``U_tilde (m, r)``, ``sigma (r,)``, ``V_tilde (n, r)`` in ``dtype`` on ``device`` (default: where the
            values are), with ``ΔW_c = U_tilde @ diag(sigma) @ V_tildeᵀ``. Kept elements are divided by q_k.
        """
        device = torch.device(device) if device is not None else self.u_values.device
        mask_u, mask_v = self.masks(device)
        # float64 reciprocal of the exact q, then cast: the rescale is the same wherever it is computed.
        inv_keep = (1.0 / self.keep_prob.to(device)).to(dtype)
        u = unpack_columns(self.u_values.to(device=device, dtype=dtype), mask_u) * inv_keep
        v = unpack_columns(self.v_values.to(device=device, dtype=dtype), mask_v) * inv_keep
        return u, self.singular_values.to(device=device, dtype=dtype), v

    def reconstruct(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``ΔW_c`` as a dense ``(m, n)`` tensor (float32 math, then cast to ``dtype``, default float32)."""
        u, sigma, v = self.factors(torch.float32, device)
        out = (u * sigma) @ v.t()
        return out.to(dtype) if dtype is not None else out


def compress_delta(
    delta: torch.Tensor,
    compression_ratio: float | None = 16.0,
    pre_prune_ratio: float = 0.8,
    importance_exponent: float = 1.0,
    seed: int = 0,
    name: str = "",
    svd_dtype: torch.dtype = torch.float32,
    storage_dtype: torch.dtype | None = None,
) -> CompressedDelta:
    """Compress one dense delta with ImPart.

    Args:
        delta: ``(m, n)`` floating tensor ``W_ft - W_base``; the SVD runs on its device.
        compression_ratio: dense values / stored factor values (``> 1``), or ``None`` to keep every element of
            every non-zero pair (lossless up to float error: for checks, not for shipping).
        pre_prune_ratio: beta in ``[0, 1)``.
        importance_exponent: C ``> 0``.
        seed: non-negative integer; with ``name`` it determines the masks.
        name: the module name (e.g. ``"model.layers.0.mlp.up_proj"``); part of the mask stream, so two modules
            with the same seed get independent masks.
        svd_dtype: ``torch.float32`` (default) or ``torch.float64``.
        storage_dtype: dtype of the stored factor values; default the delta's own dtype.

    Returns:
        A :class:`CompressedDelta` whose tensors live on the delta's device.
    """
    check_delta(delta, name)
    check_compression_ratio(compression_ratio)
    check_pre_prune_ratio(pre_prune_ratio)
    check_importance_exponent(importance_exponent)
    storage_dtype = storage_dtype or delta.dtype
    m, n = delta.shape
    u, sigma, v = svd_top(delta, svd_dtype=svd_dtype)
    allocation = allocate_keep_prob(sigma, (m, n), compression_ratio, pre_prune_ratio, importance_exponent)
    rank = allocation.boundary
    keep_threshold = keep_threshold_from_prob(allocation.keep_prob[:rank]).to(delta.device)
    # A q so small that it rounds to threshold 0 keeps nothing: trim it so every stored pair has q_k > 0.
    rank = int((keep_threshold > 0).sum())
    keep_threshold = keep_threshold[:rank]
    mask_u = keep_mask(seed, name, FACTOR_U, keep_threshold, m)
    mask_v = keep_mask(seed, name, FACTOR_V, keep_threshold, n)
    return CompressedDelta(
        shape=(m, n),
        singular_values=sigma[:rank].to(torch.float32).contiguous(),
        keep_threshold=keep_threshold,
        u_values=pack_columns(u[:, :rank].to(storage_dtype), mask_u).contiguous(),
        v_values=pack_columns(v[:, :rank].to(storage_dtype), mask_v).contiguous(),
        seed=seed,
        name=name,
        compression_ratio=compression_ratio,
        reference_dtype=delta.dtype,
    )
