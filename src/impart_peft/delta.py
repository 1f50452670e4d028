"""The ImPart estimator for one matrix: SVD, allocation, deterministic sparsification, packing.

``compress_delta`` turns a dense delta ``(m, n)`` into a :class:`CompressedDelta` that holds only

* ``singular_values`` float32 ``(r,)``: the kept sigma_k (r = pairs with q_k > 0),
* ``keep_count`` int32 ``(2, r)``: how many rows column k of U (row 0) and of V (row 1) keeps, ``c_k = round(q_k
  * rows)`` (exact counts, ALGORITHM.md section 5),
* ``u_values`` / ``v_values`` 1-D, storage dtype: the kept elements of U[:, :r] and V[:, :r], packed column by
  column (``keep_count[0].sum()`` and ``keep_count[1].sum()`` values). No indices, no mask: the mask is
  regenerated from (seed, name, factor, column, row).

``reconstruct`` gives ``ΔW_c = Ũ diag(sigma) Ṽᵀ`` with ``Ũ = U ⊙ mask · m / c`` (the unbiased estimator of
ALGORITHM.md section 2 with ``q_k = c_k / m``). Pure torch: no PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .allocation import (
    ALLOCATION_RULES,
    Allocation,
    allocate_keep_prob,
    check_compression_ratio,
    check_importance_exponent,
    check_pre_prune_ratio,
    pre_prune_boundary,
    target_keep_fraction,
)
from .masks import (
    FACTOR_U,
    FACTOR_V,
    keep_mask,
    pack_columns,
    stream_key,
    unpack_columns,
)

__all__ = [
    "SVD_METHODS",
    "CompressedDelta",
    "SparseFactors",
    "check_keep_count",
    "check_delta",
    "compress_delta",
    "dtype_bits",
    "pairs_needed",
    "singular_values",
    "svd_top",
]

_SVD_DTYPES = (torch.float32, torch.float64)
SVD_METHODS = ("auto", "gram", "svd")


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size() * 8


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether every element of ``tensor`` is finite, checked ``chunk`` elements at a time.

    ``torch.isfinite`` of a whole tensor allocates temporaries the size of the tensor (its absolute value and
    boolean masks: 0.9 GB for a float32 32000 x 4096 delta); in chunks they stay a few MB.
    """
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


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
    if not all_finite(delta):
        bad = int((~torch.isfinite(delta)).sum())
        raise ValueError(
            f"delta{where} contains {bad} NaN or inf value(s): check the base and fine-tuned checkpoints "
            "(a diverged fine-tune or a corrupt file)"
        )


def _check_svd_method(method: str) -> None:
    if method not in SVD_METHODS:
        raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {method!r}")


def _canonical_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair ``(u_k, v_k)`` so that the largest-magnitude entry of ``u_k`` is positive.

    An SVD fixes each pair only up to a common sign; this makes the stored factors the same whichever solver
    (or method) produced them, for pairs the solvers agree on. ``u_k v_kᵀ`` is unchanged.
    """
    if u.shape[1] == 0:
        return u, v
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, rows.unsqueeze(0))).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, v * signs


def _gram_top(work: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``num_pairs`` singular triplets of ``work`` from the eigendecomposition of its smaller Gram matrix.

    ``G = AᵀA`` (or ``AAᵀ``, whichever is ``R x R``), ``G = W Λ Wᵀ``; the top eigenvectors are one factor and
    ``X = A W_k`` gives the other: ``σ_k = ‖X_k‖`` and the other factor is ``X_k / σ_k``, so the kept part
    ``Σ_k u_k σ_k v_kᵀ = A W_k W_kᵀ`` is an exact orthogonal projection of ``A`` onto the found subspace, and
    every stored vector has unit norm (what the estimator's variance assumes). ``σ_k`` from the norm is
    accurate to second order in the eigenvector error, unlike ``sqrt(λ_k)``. Beyond ``num_pairs`` the
    singular values are ``sqrt(λ)``, capped at the last computed one so that the sequence stays descending
    (they only feed the allocation's count of non-zero pairs). Pairs are ordered by ``σ`` (stable).
    """
    m, n = work.shape
    tall = m >= n
    rank = min(m, n)
    gram = work.t() @ work if tall else work @ work.t()
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    del gram
    evals = evals.flip(0).clamp_min(0)
    near = evecs[:, rank - num_pairs :].flip(1)  # (R, k), descending eigenvalue
    del evecs
    far = work @ near if tall else work.t() @ near  # (max(m, n), k) = the other factor times sigma
    sigma_top = torch.linalg.vector_norm(far, dim=0)
    order = torch.argsort(sigma_top, descending=True, stable=True)
    sigma_top, near, far = sigma_top[order], near[:, order], far[:, order]
    far = far / torch.where(sigma_top > 0, sigma_top, torch.ones_like(sigma_top))  # a zero column stays zero
    tail = evals[num_pairs:].sqrt()
    if num_pairs:
        tail = tail.clamp(max=float(sigma_top[-1]))
    sigma = torch.cat([sigma_top, tail])
    return (far, sigma, near) if tall else (near, sigma, far)


def singular_values(delta: torch.Tensor, svd_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All ``R = min(m, n)`` singular values of ``delta (m, n)``, descending, float64, on the delta's device.

    From the eigenvalues of the smaller Gram matrix (formed in ``svd_dtype``, then ``eigvalsh`` in float64):
    ``sigma = sqrt(max(lambda, 0))``. Planning (``impart_peft.planning``) needs only ``sigma**2`` to an absolute
    ``eps(svd_dtype) * sigma_1**2``, and this is 1.3 to 3.5 times faster than ``torch.linalg.svdvals`` on the CPU
    (most on wide matrices). Deterministic for the same input, device and thread count.
    """
    if svd_dtype not in _SVD_DTYPES:
        raise ValueError(f"svd_dtype must be torch.float32 or torch.float64, got {svd_dtype}")
    work = delta.to(svd_dtype)
    gram = work.t() @ work if work.shape[0] >= work.shape[1] else work @ work.t()
    del work
    return torch.linalg.eigvalsh(gram.to(torch.float64)).flip(0).clamp_min(0).sqrt()


def svd_top(
    delta: torch.Tensor,
    num_pairs: int | None = None,
    svd_dtype: torch.dtype = torch.float32,
    method: str = "svd",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``delta = U diag(S) Vᵀ`` in ``svd_dtype`` on the delta's device.

    Returns ``U (m, R)``, ``S (R,)`` descending, ``V (n, R)``, ``R = min(m, n)``; with ``num_pairs`` only the
    first ``num_pairs`` columns of U and V are returned. ``S`` always has all ``R`` values.

    Args:
        method: ``"svd"`` (``torch.linalg.svd``, exact to working precision) or ``"gram"`` (eigendecomposition
            of the smaller Gram matrix, then one product for the other factor: several times faster on the CPU
            for large matrices, and as accurate for the pairs whose ``σ_k / σ_1`` is well above
            ``sqrt(eps(svd_dtype))``; the singular values of the tail past ``num_pairs`` are only approximate).
            ``"auto"`` means ``"gram"`` when ``num_pairs < R`` and ``"svd"`` otherwise.

    Each pair's sign is fixed (the largest-magnitude entry of ``u_k`` is positive); the result is deterministic
    for the same input, device and thread count.
    """
    if svd_dtype not in _SVD_DTYPES:
        raise ValueError(f"svd_dtype must be torch.float32 or torch.float64, got {svd_dtype}")
    _check_svd_method(method)
    rank = min(delta.shape)
    if num_pairs is None:
        num_pairs = rank
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 0:
        raise ValueError(f"num_pairs must be a non-negative integer or None, got {num_pairs!r}")
    num_pairs = min(num_pairs, rank)
    if method == "auto":
        method = "gram" if num_pairs < rank else "svd"
    work = delta.detach().to(svd_dtype)
    if method == "gram":
        u, s, v = _gram_top(work, num_pairs)
    else:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        u, v = u[:, :num_pairs], vh[:num_pairs].t()
    u, v = _canonical_signs(u, v)
    return u, s, v


def pairs_needed(shape: tuple[int, int], compression_ratio: float | None, pre_prune_ratio: float) -> int:
    """Most singular pairs :func:`allocate_keep_prob` can keep: ``max(floor(R(1-beta)), ceil(q̄ R))``, or R.

    Only these (and ``sigma_1``) have to be computed exactly; the rest of the spectrum only has to be known
    well enough to count the pairs above the noise floor.
    """
    rank = min(shape)
    if compression_ratio is None:
        return rank
    budget = target_keep_fraction(shape, compression_ratio) * rank
    return min(rank, max(pre_prune_boundary(rank, pre_prune_ratio), math.ceil(budget - 1e-9)))


def check_keep_count(keep_count: torch.Tensor, shape: tuple[int, int], rank: int, name: str) -> torch.Tensor:
    """``keep_count`` as int32 ``(2, rank)`` (the on-disk dtype) after checking it against the matrix: raises
    ``ValueError`` naming the module, what was found and what was expected."""
    m, n = shape
    if keep_count.is_floating_point() or keep_count.is_complex() or keep_count.dtype == torch.bool:
        raise ValueError(
            f"compressed delta {name!r}: keep_count must be an integer tensor, got {keep_count.dtype}"
        )
    if tuple(keep_count.shape) != (2, rank):
        raise ValueError(
            f"compressed delta {name!r}: keep_count has shape {tuple(keep_count.shape)}, expected (2, {rank}) "
            "(kept rows per column of U and of V for each stored singular pair)"
        )
    keep_count = keep_count.to(torch.int64)
    if rank:
        for row, (factor, rows) in enumerate((("U", m), ("V", n))):
            low, high = int(keep_count[row].min()), int(keep_count[row].max())
            if low < 1 or high > rows:
                raise ValueError(
                    f"compressed delta {name!r}: keep counts of {factor} lie in [{low}, {high}], expected "
                    f"[1, {rows}] (every stored column keeps at least one of its {rows} rows)"
                )
    return keep_count.to(torch.int32)


class SparseFactors:
    """What every ImPart-compressed matrix shares: the masks, the rescale and the reconstruction.

    A subclass holds ``shape``, ``seed``, ``name``, ``singular_values (r,)`` and ``keep_count (2, r)`` and says how
    its kept values are obtained (:meth:`_values`: stored as they are, or decoded from quantised codes).
    """

    shape: tuple[int, int]
    singular_values: torch.Tensor
    keep_count: torch.Tensor
    seed: int
    name: str
    reference_dtype: torch.dtype

    @property
    def rank(self) -> int:
        """Number of stored singular pairs ``r``."""
        return int(self.singular_values.numel())

    @property
    def keep_prob(self) -> torch.Tensor:
        """float64 ``(2, r)``: ``c_k / m`` for U (row 0) and ``c_k / n`` for V (row 1), the keep probabilities the
        masks realise and the rescale divides by."""
        rows = torch.tensor(
            [[self.shape[0]], [self.shape[1]]], dtype=torch.float64, device=self.keep_count.device
        )
        return self.keep_count.to(torch.float64) / rows

    @property
    def u_count(self) -> int:
        """Kept elements of U (known from the counts, before any mask is made)."""
        return int(self.keep_count[0].sum(dtype=torch.int64))

    @property
    def v_count(self) -> int:
        """Kept elements of V."""
        return int(self.keep_count[1].sum(dtype=torch.int64))

    @property
    def num_factor_values(self) -> int:
        """Kept factor elements (what the nominal budget counts)."""
        return self.u_count + self.v_count

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that go on disk, keyed by role."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (values or codes and scales, singular values, counts)."""
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

    def masks(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool keep masks ``(m, r)`` of U and ``(n, r)`` of V, regenerated from the seed."""
        m, n = self.shape
        count = self.keep_count.to(device) if device is not None else self.keep_count
        return (
            keep_mask(self.seed, self.name, FACTOR_U, count[0], m),
            keep_mask(self.seed, self.name, FACTOR_V, count[1], n),
        )

    def _values(
        self, mask_u: torch.Tensor, mask_v: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed kept values of U and V on ``device`` (1-D, in :func:`pack_columns` order)."""
        raise NotImplementedError

    def _default_device(self) -> torch.device:
        return self.singular_values.device

    def factors(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rescaled sparse factors.

        Returns:
            ``U_tilde (m, r)``, ``sigma (r,)``, ``V_tilde (n, r)`` in ``dtype`` on ``device`` (default: where the
            values are), with ``ΔW_c = U_tilde @ diag(sigma) @ V_tildeᵀ``. Kept elements of column k are
            multiplied by ``rows / c_k``.
        """
        device = torch.device(device) if device is not None else self._default_device()
        mask_u, mask_v = self.masks(device)
        u_values, v_values = self._values(mask_u, mask_v, device)
        # float64 reciprocal of the exact q, then cast: the rescale is the same wherever it is computed.
        inv_keep = (1.0 / self.keep_prob.to(device)).to(dtype)
        # unpack_columns returns a fresh tensor: rescale it in place.
        u = unpack_columns(u_values.to(device=device, dtype=dtype), mask_u).mul_(inv_keep[0])
        v = unpack_columns(v_values.to(device=device, dtype=dtype), mask_v).mul_(inv_keep[1])
        return u, self.singular_values.to(device=device, dtype=dtype), v

    def reconstruct(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``ΔW_c`` as a dense ``(m, n)`` tensor (float32 math, then cast to ``dtype``, default float32)."""
        u, sigma, v = self.factors(torch.float32, device)
        out = (u * sigma) @ v.t()
        return out.to(dtype) if dtype is not None else out


@dataclass
class CompressedDelta(SparseFactors):
    """An ImPart-compressed delta of one matrix. See the module docstring for the tensors it holds."""

    shape: tuple[int, int]
    singular_values: torch.Tensor  # float32 (r,)
    keep_count: torch.Tensor  # int32 (2, r)
    u_values: torch.Tensor  # (keep_count[0].sum(),) storage dtype
    v_values: torch.Tensor  # (keep_count[1].sum(),) storage dtype
    seed: int = 0
    name: str = ""
    compression_ratio: float | None = None  # nominal, as asked
    reference_dtype: torch.dtype = torch.float32  # dtype of the dense delta this replaces (for byte ratios)

    @property
    def num_stored_values(self) -> int:
        """Kept factor elements plus the singular values."""
        return int(self.u_values.numel() + self.v_values.numel() + self.singular_values.numel())

    @property
    def value_compression_ratio(self) -> float:
        """Dense values / stored values (factor elements + singular values)."""
        m, n = self.shape
        return m * n / self.num_stored_values if self.num_stored_values else math.inf

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The four tensors that go on disk, keyed by role."""
        return {
            "singular_values": self.singular_values,
            "keep_count": self.keep_count,
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
        """Rebuild from the tensors of :meth:`state_dict`, checking everything without making a mask.

        Raises ``ValueError`` naming the problem when a tensor is missing, has the wrong number of dimensions
        or dtype, the counts disagree with the singular values or the shape (more pairs than ``min(shape)``, a
        count outside ``[1, rows]``), or a packed factor does not hold exactly the values its counts keep.
        """
        keys = ("singular_values", "keep_count", "u_values", "v_values")
        missing = set(keys) - set(tensors)
        if missing:
            raise ValueError(f"compressed delta {name!r} is missing tensors {sorted(missing)}")
        if len(shape) != 2 or int(shape[0]) < 1 or int(shape[1]) < 1:
            raise ValueError(
                f"compressed delta {name!r}: shape must be two positive sizes, got {tuple(shape)}"
            )
        m, n = int(shape[0]), int(shape[1])
        for key in ("singular_values", "u_values", "v_values"):
            if tensors[key].dim() != 1:
                raise ValueError(
                    f"compressed delta {name!r}: {key} must be 1-D, got shape {tuple(tensors[key].shape)}"
                )
        rank = tensors["singular_values"].numel()
        if rank > min(m, n):
            raise ValueError(f"compressed delta {name!r}: {rank} singular pairs for a {m} x {n} matrix")
        keep_count = check_keep_count(tensors["keep_count"], (m, n), rank, name)
        out = cls(
            shape=(m, n),
            singular_values=tensors["singular_values"],
            keep_count=keep_count,
            u_values=tensors["u_values"],
            v_values=tensors["v_values"],
            seed=seed,
            name=name,
            compression_ratio=compression_ratio,
            reference_dtype=reference_dtype,
        )
        for key, expected in (("u_values", out.u_count), ("v_values", out.v_count)):
            if tensors[key].numel() != expected:
                raise ValueError(
                    f"compressed delta {name!r}: {key} holds {tensors[key].numel()} values but keep_count says "
                    f"{expected}: the file is corrupt"
                )
        return out

    def _values(self, mask_u, mask_v, device):
        for key, values, mask in (("u_values", self.u_values, mask_u), ("v_values", self.v_values, mask_v)):
            if values.numel() != int(mask.sum()):  # only a hand-made object can get here: counts define masks
                raise ValueError(
                    f"compressed delta {self.name!r}: {key} holds {values.numel()} values but the mask keeps "
                    f"{int(mask.sum())}"
                )
        return self.u_values.to(device), self.v_values.to(device)

    def _default_device(self) -> torch.device:
        return self.u_values.device


def compress_delta(
    delta: torch.Tensor,
    compression_ratio: float | None = 16.0,
    pre_prune_ratio: float = 0.8,
    importance_exponent: float = 1.0,
    seed: int = 0,
    name: str = "",
    svd_dtype: torch.dtype = torch.float32,
    storage_dtype: torch.dtype | None = None,
    svd_method: str = "auto",
    allocation: str = "paper",
    planned: Allocation | None = None,
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
        svd_method: how the singular pairs are computed (see :func:`svd_top`). Only the top
            :func:`pairs_needed` pairs can get ``q_k > 0``; ``"auto"`` (default) computes just those from the
            Gram matrix's eigendecomposition when they are fewer than ``R`` (on one CPU thread about 6 times
            faster than a full SVD for a 4096 x 11008 delta, 1.7 times for 4096 x 4096), and runs the exact full SVD when every pair may be
            kept (``compression_ratio=None``, or a budget / ``beta`` that reaches ``R``). ``"svd"`` forces the
            full SVD, ``"gram"`` the Gram route.
        allocation: the allocation rule, ``"paper"`` (default, the authors' code) or ``"rescaled"`` (see
            :func:`~impart_peft.allocation.allocate_keep_prob`).
        planned: an allocation already made for this delta's shape (the model-wide planner makes it from the
            spectrum of a first pass, :mod:`impart_peft.planning`); it is used as it is, and only its
            ``boundary`` pairs are computed. ``None`` (default): allocated here from the SVD's singular values.

    Returns:
        A :class:`CompressedDelta` whose tensors live on the delta's device.
    """
    check_delta(delta, name)
    check_compression_ratio(compression_ratio)
    check_pre_prune_ratio(pre_prune_ratio)
    check_importance_exponent(importance_exponent)
    _check_svd_method(svd_method)
    if allocation not in ALLOCATION_RULES:
        raise ValueError(f"allocation must be one of {ALLOCATION_RULES}, got {allocation!r}")
    if not isinstance(name, str):
        raise ValueError(f"name must be the module name as a str, got {type(name).__name__}")
    stream_key(seed, name, FACTOR_U)  # checks the seed before the SVD, not after it
    if svd_dtype not in _SVD_DTYPES:
        raise ValueError(f"svd_dtype must be torch.float32 or torch.float64, got {svd_dtype}")
    storage_dtype = storage_dtype or delta.dtype
    m, n = delta.shape
    if planned is not None:
        check_keep_count(planned.keep_count, (m, n), planned.boundary, name)
        needed = planned.boundary
    else:
        needed = pairs_needed((m, n), compression_ratio, pre_prune_ratio)
    u, sigma, v = svd_top(delta, num_pairs=needed, svd_dtype=svd_dtype, method=svd_method)
    if planned is None:
        planned = allocate_keep_prob(
            sigma, (m, n), compression_ratio, pre_prune_ratio, importance_exponent, rule=allocation
        )
    rank = planned.boundary
    # pairs_needed bounds the allocation's boundary; this guards the two staying in step.
    if rank > u.shape[1]:
        raise RuntimeError(f"allocation kept {rank} pairs but only {u.shape[1]} were computed")
    keep_count = planned.keep_count.to(device=delta.device, dtype=torch.int32)  # rows < 2**31: int32 on disk
    mask_u = keep_mask(seed, name, FACTOR_U, keep_count[0], m)
    mask_v = keep_mask(seed, name, FACTOR_V, keep_count[1], n)
    return CompressedDelta(
        shape=(m, n),
        singular_values=sigma[:rank].to(torch.float32).contiguous(),
        keep_count=keep_count,
        u_values=pack_columns(u[:, :rank].to(storage_dtype), mask_u).contiguous(),
        v_values=pack_columns(v[:, :rank].to(storage_dtype), mask_v).contiguous(),
        seed=seed,
        name=name,
        compression_ratio=compression_ratio,
        reference_dtype=delta.dtype,
    )
