"""Merging several fine-tunes of one base: Task Arithmetic and TIES, with ImPart, DARE or magnitude sparsification.

Every fine-tune ``i`` gives a task vector ``tau_i = W_i - W_base`` per parameter. Each matrix's task vector is
first sparsified (``sparsify``), then the task vectors are merged (``method``) and added to the base:

* ``sparsify="impart"``: ImPart at ``compression_ratio = 1 / density`` (what the paper puts in place of DARE's drop
  step), the rescaled estimate ``Ũ diag(σ) Ṽᵀ``; ``"dare"``: keep each element with probability ``density`` and
  rescale by ``1 / density`` (Yu et al. 2024); ``"magnitude"``: keep the ``density`` fraction of largest magnitude,
  unscaled (TIES' "trim" step); ``None``: the task vectors as they are. Only matrices (2-D parameters: linear,
  Conv1D and embedding weights) are sparsified; 1-D parameters (norms, biases) go into the merge whole.
* ``method="task_arithmetic"``: ``W = W_base + lambda * sum_i w_i tau_i`` (Ilharco et al. 2023).
* ``method="ties"``: TIES-Merging (Yadav et al. 2023) as mergekit computes it: elect, per element, the sign of
  ``sum_i w_i tau_i`` (``majority_sign="total"``; ``"frequency"``: the sign most task vectors have; a tie elects +),
  keep only the entries of the weighted task vectors ``w_i tau_i`` that are non-zero with the elected sign (the
  "disjoint" set), and average them over the weights of the models that contribute,
  ``sum_i w_i tau_i [agrees] / sum_i w_i [agrees]`` (``normalize=True``, the default for TIES; ``False`` sums).

:func:`merge_finetunes` does this for models in memory, or streams checkpoint folders one tensor at a time into a
standard transformers checkpoint (like ``impart apply``). :func:`add_weighted_adapter` (also reachable as
``peft_model.add_weighted_adapter(...)``) combines ImPart adapters already loaded on one model, as PEFT's LoRA method
of that name does, for the combination types that make sense on ImPart's factors.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_io import ADAPTER_FORMAT_VERSION
from .baselines import dare_delta, magnitude_delta
from .compressor import vector_delta_dtype
from .delta import compress_delta, svd_top

__all__ = [
    "COMBINATION_TYPES",
    "MERGE_METHODS",
    "SPARSIFIERS",
    "add_weighted_adapter",
    "merge_deltas",
    "merge_finetunes",
    "sparsify_delta",
]

MERGE_METHODS = ("task_arithmetic", "ties")
SPARSIFIERS = ("impart", "dare", "magnitude", None)
DEFAULT_DENSITY = 0.2  # TIES' k = 20%; ImPart at CR 5
COMBINATION_TYPES = ("cat", "svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd")


# ---------------------------------------------------------------------------------------------------- checks
def _check_method(method: str) -> None:
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}")


def _check_sparsify(sparsify: str | None) -> None:
    if sparsify not in SPARSIFIERS:
        raise ValueError(f"sparsify must be one of {SPARSIFIERS}, got {sparsify!r}")


def _check_density(density: float) -> None:
    if (
        isinstance(density, bool)
        or not isinstance(density, (int, float))
        or not math.isfinite(density)
        or not 0 < density <= 1
    ):
        raise ValueError(
            f"density must be in (0, 1], the fraction of each task vector kept (0.2 keeps 20%, i.e. ImPart / DARE "
            f"at compression ratio 5), got {density!r}"
        )


def _check_majority_sign(majority_sign: str) -> None:
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} fine-tunes: give one weight per fine-tune")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights must be finite numbers, got {weights!r}")
    return [float(w) for w in weights]


# -------------------------------------------------------------------------------------------- one tensor
def sparsify_delta(
    delta: torch.Tensor,
    sparsify: str | None,
    density: float = DEFAULT_DENSITY,
    *,
    seed: int = 0,
    name: str = "",
    pre_prune_ratio: float = 0.8,
    importance_exponent: float = 1.0,
    svd_dtype: torch.dtype = torch.float32,
    storage_dtype: torch.dtype | None = None,
    allocation: str = "paper",
) -> torch.Tensor:
    """One task vector, sparsified as ``sparsify`` says (see the module docstring).

    Args:
        delta: a task vector ``W_ft - W_base``, any shape; only 2-D ones are sparsified, others are returned as is.
        density: fraction kept, in ``(0, 1]``; ``1`` returns ``delta`` unchanged.
        seed / name: the mask stream of ``"impart"`` and ``"dare"`` (``name`` is the module's name, so that
            ImPart's masks are those of an adapter compressed with the same seed).
        pre_prune_ratio / importance_exponent / svd_dtype / allocation: ImPart's settings (the allocation rule of
            :func:`~impart_peft.allocation.allocate_keep_prob`, the same as an adapter's).
        storage_dtype: the dtype ImPart / DARE round their kept values to, as an adapter stores them (default the
            delta's dtype).

    Returns:
        A tensor of ``delta``'s shape and dtype on its device (float32 math for the sparsified ones).
    """
    _check_sparsify(sparsify)
    _check_density(density)
    if sparsify is None or density == 1 or delta.dim() != 2 or not delta.is_floating_point():
        return delta
    if not bool(delta.any()):
        return delta
    ratio = 1.0 / density
    storage_dtype = storage_dtype or delta.dtype
    if sparsify == "impart":
        compressed = compress_delta(
            delta.to(torch.float32),
            compression_ratio=ratio,
            pre_prune_ratio=pre_prune_ratio,
            importance_exponent=importance_exponent,
            seed=seed,
            name=name,
            svd_dtype=svd_dtype,
            storage_dtype=storage_dtype,
            allocation=allocation,
        )
    elif sparsify == "dare":
        compressed = dare_delta(delta, ratio, seed=seed, name=name, storage_dtype=storage_dtype)
    else:
        compressed = magnitude_delta(delta, ratio, storage_dtype=storage_dtype)
    return compressed.reconstruct(torch.float32, delta.device).to(delta.dtype)


def merge_deltas(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    method: str = "task_arithmetic",
    *,
    normalize: bool | None = None,
    majority_sign: str = "total",
) -> torch.Tensor:
    """Merge task vectors of one parameter (already sparsified, if at all).

    Args:
        deltas: ``k`` tensors of one shape and dtype.
        weights: one per task vector (default all 1).
        method: ``"task_arithmetic"`` (``sum_i w_i tau_i``) or ``"ties"`` (sign election and disjoint merge, see
            the module docstring).
        normalize: divide by the sum of the weights that contribute (TIES: per element, over the task vectors that
            agree with the elected sign). Default ``True`` for TIES, ``False`` for task arithmetic.
        majority_sign: TIES' sign election, ``"total"`` (sign of the weighted sum, as the TIES paper) or
            ``"frequency"`` (sign of the count of signs).

    Returns:
        The merged task vector, same shape and dtype (computed in that dtype).
    """
    _check_method(method)
    _check_majority_sign(majority_sign)
    if not deltas:
        raise ValueError("no task vector to merge")
    weights = _check_weights(weights, len(deltas))
    shape, dtype = deltas[0].shape, deltas[0].dtype
    for d in deltas:
        if d.shape != shape or d.dtype != dtype:
            raise ValueError(
                f"task vectors differ in shape or dtype: {tuple(d.shape)} {d.dtype} vs {tuple(shape)} {dtype}"
            )
    if normalize is None:
        normalize = method == "ties"
    w = torch.tensor(weights, dtype=dtype, device=deltas[0].device).view(-1, *([1] * len(shape)))
    weighted = torch.stack(list(deltas)) * w
    if method == "task_arithmetic":
        merged = weighted.sum(0)
        if normalize:
            merged = merged / sum(weights) if sum(weights) != 0 else merged
        return merged
    if majority_sign == "total":
        elected = torch.where(weighted.sum(0) >= 0, 1, -1)
    else:
        elected = torch.where(weighted.sign().sum(0) >= 0, 1, -1)
    agrees = weighted.sign() == elected
    merged = (weighted * agrees).sum(0)
    if normalize:
        divisor = (w * agrees).sum(0)
        merged = merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged


# ---------------------------------------------------------------------------------------------------- models
class _Settings:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


def _merge_one(
    name: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor], s: _Settings
) -> torch.Tensor:
    """The merged value of one parameter (``base``'s dtype, on the CPU)."""
    if not base.is_floating_point():
        return base
    work = vector_delta_dtype(base.dtype)  # the task vectors are exact in it
    device = s.device or base.device
    base_work = base.detach().to(device, work)
    module = name.rpartition(".")[0] if name.endswith(".weight") else name
    deltas = []
    for i, tensor in enumerate(finetuned):
        delta = tensor.detach().to(device, work) - base_work
        deltas.append(
            sparsify_delta(
                delta,
                s.sparsify,
                s.density,
                seed=s.seed + i,
                name=module,
                pre_prune_ratio=s.pre_prune_ratio,
                importance_exponent=s.importance_exponent,
                svd_dtype=s.svd_dtype,
                storage_dtype=tensor.dtype,
            )
        )
    merged = merge_deltas(deltas, s.weights, s.method, normalize=s.normalize, majority_sign=s.majority_sign)
    if s.scaling != 1:
        merged = merged * s.scaling
    return (base_work + merged).to(base.dtype).cpu()


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def merge_finetunes(
    base: nn.Module | str | os.PathLike,
    finetunes: Sequence[nn.Module | str | os.PathLike],
    method: str = "task_arithmetic",
    sparsify: str | None = "impart",
    weights: Sequence[float] | None = None,
    density: float = DEFAULT_DENSITY,
    *,
    scaling: float = 1.0,
    normalize: bool | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    pre_prune_ratio: float = 0.8,
    importance_exponent: float = 1.0,
    svd_dtype: torch.dtype | str = torch.float32,
    output_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    inplace: bool = False,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
) -> nn.Module | Path:
    """Merge fine-tunes of one base model: sparsify each task vector, merge them, add the result to the base.

    Args:
        base: the base model, in memory or as a checkpoint folder / Hub repo id.
        finetunes: fine-tunes of ``base`` (same architecture), all in memory or all folders / repo ids.
        method: ``"task_arithmetic"`` or ``"ties"`` (see the module docstring).
        sparsify: ``"impart"`` (default), ``"dare"``, ``"magnitude"`` or ``None``; applied to the matrices only.
        weights: one per fine-tune (default all 1).
        density: fraction of each task vector kept, in ``(0, 1]`` (default 0.2: ImPart / DARE at compression
            ratio 5, TIES' top 20%).
        scaling: lambda, multiplies the merged task vector (default 1).
        normalize: see :func:`merge_deltas` (default: ``True`` for TIES, ``False`` for task arithmetic).
        majority_sign: TIES' sign election, ``"total"`` or ``"frequency"``.
        seed: masks of fine-tune ``i`` use ``seed + i`` (ImPart's mask of fine-tune 0 is the one an adapter
            compressed with ``seed`` has).
        pre_prune_ratio, importance_exponent, svd_dtype: ImPart's settings (``sparsify="impart"``).
        output_dir: write the merged model there (atomically, a standard transformers folder). Required when the
            models are given as folders: they are then streamed one tensor at a time, never loaded whole.
        device: where the SVDs run (default where the tensors are: the CPU for folders).
        inplace: for models in memory, write the merged weights into ``base`` instead of a copy.
        max_shard_size / overwrite / progress: for ``output_dir``, as ``impart apply``.

    Returns:
        The merged model (in memory), or the output folder (for folders).

    Every parameter is merged in a dtype where the task vectors are exact (float64 for float32 models, float32 for
    16-bit ones) and rounded once to the base's dtype, so ``sparsify=None`` with task arithmetic and weight 1 gives
    ``base + sum_i (ft_i - base)`` to that one rounding (one fine-tune gives it back bit for bit).
    """
    _check_method(method)
    _check_sparsify(sparsify)
    _check_density(density)
    _check_majority_sign(majority_sign)
    if isinstance(finetunes, (str, os.PathLike, nn.Module)) or not isinstance(finetunes, Sequence):
        raise ValueError("finetunes must be a list of fine-tuned models (or of folders), even for one")
    if not finetunes:
        raise ValueError("no fine-tune to merge: pass at least one")
    weights = _check_weights(weights, len(finetunes))
    if isinstance(svd_dtype, str):
        if svd_dtype not in ("float32", "float64"):
            raise ValueError(f"svd_dtype must be 'float32' or 'float64', got {svd_dtype!r}")
        svd_dtype = getattr(torch, svd_dtype)
    from .checkpoint_io import check_device

    settings = _Settings(
        method=method,
        sparsify=sparsify,
        density=density,
        weights=weights,
        scaling=float(scaling),
        normalize=normalize,
        majority_sign=majority_sign,
        seed=int(seed),
        pre_prune_ratio=pre_prune_ratio,
        importance_exponent=importance_exponent,
        svd_dtype=svd_dtype,
        device=check_device(device),
    )
    paths = [_is_path(base), *(_is_path(f) for f in finetunes)]
    if all(paths):
        if output_dir is None:
            raise ValueError(
                "the models are given as folders: pass output_dir, where the merged checkpoint is written"
            )
        return _merge_checkpoints(base, finetunes, output_dir, settings, max_shard_size, overwrite, progress)
    if any(paths):
        raise ValueError("give the base and every fine-tune either all as models in memory or all as folders")
    merged = _merge_models(base, list(finetunes), settings, inplace)
    if output_dir is not None:
        from .checkpoint_io import atomic_folder

        with atomic_folder(output_dir, overwrite) as scratch:
            merged.save_pretrained(scratch)
    return merged


def _merge_models(base: nn.Module, finetunes: list[nn.Module], s: _Settings, inplace: bool) -> nn.Module:
    from .compressor import _check_same_architecture

    for ft in finetunes:
        _check_same_architecture(base, ft)
    ft_params = [dict(ft.named_parameters(remove_duplicate=False)) for ft in finetunes]
    base_params = dict(base.named_parameters(remove_duplicate=False))
    merged = base if inplace else copy.deepcopy(base)
    with torch.no_grad():
        for name, param in list(merged.named_parameters()):  # a tied weight once
            value = _merge_one(name, base_params[name], [p[name] for p in ft_params], s)
            param.data = value.to(param.device)
    return merged


def _merge_checkpoints(
    base: str | os.PathLike,
    finetunes: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    s: _Settings,
    max_shard_size: int | str,
    overwrite: bool,
    progress: bool,
) -> Path:
    from .checkpoint_io import (
        Checkpoint,
        check_output,
        meta_model,
        parse_size,
        resolve_folder,
        write_sharded_checkpoint,
    )

    check_output(output_dir, overwrite)
    shard_limit = parse_size(max_shard_size)
    base_checkpoint = Checkpoint(resolve_folder(base, "base"), "base")
    ft_checkpoints = [
        Checkpoint(resolve_folder(f, f"fine-tune {i + 1}"), f"fine-tune {i + 1}")
        for i, f in enumerate(finetunes)
    ]
    architecture = meta_model(base_checkpoint.config)
    prefix = getattr(architecture, "base_model_prefix", "") or ""
    model_names = set(architecture.state_dict())

    def model_name(key: str) -> str:
        # The parameter's name in the model (ImPart's masks are keyed on module names, as in from_finetuned).
        if key in model_names or not prefix:
            return key
        if f"{prefix}.{key}" in model_names:
            return f"{prefix}.{key}"
        return key

    keys = list(base_checkpoint.tensors)
    sources: dict[str, list[str]] = {}
    problems = []
    for key in keys:
        name = model_name(key)
        found = []
        for checkpoint in ft_checkpoints:
            ft_key = checkpoint.key_for(name, prefix) or checkpoint.key_for(key, prefix)
            if ft_key is None:
                problems.append(f"{key} is missing from the {checkpoint.role}")
            elif checkpoint.tensors[ft_key].shape != base_checkpoint.tensors[key].shape:
                problems.append(
                    f"{key} has shape {checkpoint.tensors[ft_key].shape} in the {checkpoint.role} but "
                    f"{base_checkpoint.tensors[key].shape} in the base"
                )
            found.append(ft_key)
        sources[key] = found
    if problems:
        raise ValueError(
            "the fine-tunes are not fine-tunes of this base (same architecture and shapes): "
            + "; ".join(problems[:3])
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        )

    def merged(key: str) -> torch.Tensor:
        tensors = [c.read(k) for c, k in zip(ft_checkpoints, sources[key], strict=True)]
        return _merge_one(model_name(key), base_checkpoint.read(key), tensors, s).contiguous()

    return write_sharded_checkpoint(
        output_dir,
        base_checkpoint,
        merged,
        side_file_sources=[c.folder for c in ft_checkpoints] + [base_checkpoint.folder],
        max_shard_size=shard_limit,
        overwrite=overwrite,
        progress=progress,
        desc="merge",
    )


# ---------------------------------------------------------------------------------------- loaded adapters
def _factor_columns(u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adapter tensors of factors stored whole (every q_k = 1): the masks keep every element, so the packed values
    are the columns themselves and the rebuilt factors are exactly ``u``, ``sigma``, ``v``."""
    rank = sigma.numel()
    return {
        "impart_u_values": u.t().contiguous().reshape(-1),
        "impart_v_values": v.t().contiguous().reshape(-1),
        "impart_singular_values": sigma.contiguous(),
        "impart_keep_count": torch.tensor([[u.shape[0]] * rank, [v.shape[0]] * rank], dtype=torch.int32),
    }


def _svd_factors(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    full = min(delta.shape)
    rank = full if rank is None else min(rank, full)
    u, s, v = svd_top(delta, num_pairs=rank, method="svd")
    keep = int((s[:rank] > 0).sum())
    return u[:, :keep], s[:keep], v[:, :keep]


def add_weighted_adapter(
    model: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "cat",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add adapter ``adapter_name`` combining ImPart adapters loaded on ``model``, like PEFT's
    ``LoraModel.add_weighted_adapter`` (``peft_model.add_weighted_adapter(...)`` calls this).

    Supported ``combination_type`` (each on the rebuilt deltas ``ΔW_i = Ũ_i diag(σ_i) Ṽ_iᵀ``):

    * ``"cat"`` (default): exactly ``sum_i w_i ΔW_i``, stored as the concatenated factors ``[w_1 Ũ_1, w_2 Ũ_2, ...]``,
      ``[σ_1, σ_2, ...]``, ``[Ṽ_1, Ṽ_2, ...]`` (rank = the sum of the ranks; when that exceeds ``min(m, n)``, the
      full SVD of the sum, which is as exact).
    * ``"svd"``: the top ``svd_rank`` singular pairs of ``sum_i w_i ΔW_i`` (default rank: the largest input rank).
    * ``"ties_svd"``, ``"dare_ties_svd"``, ``"dare_linear_svd"``, ``"magnitude_prune_svd"``: the dense deltas are
      sparsified (magnitude trim for ties and magnitude_prune, DARE for dare_*) at ``density``, merged (TIES sign
      election and disjoint mean for *ties*, weighted sum for the others), then truncated to ``svd_rank`` pairs.

    The new adapter stores its factors whole (float32, every ``q_k = 1``): it is exact, saves and loads like any
    ImPart adapter, and is not compressed further. 1-D deltas (norms, biases) are merged by the same rule, without
    sparsification. LoRA's ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` and ``"magnitude_prune"``
    combine the factor matrices themselves, which for ImPart live in unrelated singular bases (and are sparse): they
    are refused with a pointer to ``"cat"`` or the ``*_svd`` variant.

    Raises:
        ValueError: an unknown or unsupported combination type, an unknown or non-ImPart adapter, an existing
            ``adapter_name``, mismatched weights, or a missing ``density``.
    """
    from .compressor import load_module_tensors
    from .config import ImPartConfig
    from .layer import ImPartLayer
    from .validation import adapter_digest, module_digest

    if combination_type in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        hint = (
            "'cat' (the exact weighted sum)" if combination_type == "linear" else f"'{combination_type}_svd'"
        )
        raise ValueError(
            f"combination_type {combination_type!r} combines LoRA's factor matrices directly; ImPart's factors are "
            f"sparse and live in each adapter's own singular basis, so it has no meaning here: use {hint}"
        )
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("no adapter to combine")
    for adapter in adapters:
        if adapter not in model.peft_config:
            raise ValueError(f"adapter {adapter!r} does not exist (loaded: {sorted(model.peft_config)})")
        if not isinstance(model.peft_config[adapter], ImPartConfig):
            raise ValueError(f"adapter {adapter!r} is not an ImPart adapter")
    if adapter_name in model.peft_config:
        raise ValueError(
            f"an adapter named {adapter_name!r} already exists: choose another name or delete it first"
        )
    weights = _check_weights(weights, len(adapters))
    _check_majority_sign(majority_sign_method)
    sparsify = None
    if combination_type != "cat" and combination_type != "svd":
        if density is None:
            raise ValueError(
                f"combination_type {combination_type!r} needs density (the fraction kept, in (0, 1])"
            )
        _check_density(density)
        sparsify = "dare" if combination_type.startswith("dare") else "magnitude"
    method = "ties" if "ties" in combination_type else "task_arithmetic"

    module_meta: dict[str, dict[str, Any]] = {}
    tensors_by_module: dict[str, dict[str, torch.Tensor]] = {}
    fingerprints: dict[str, list[float]] = {}
    for name, layer in model.model.named_modules():
        if not isinstance(layer, ImPartLayer):
            continue
        present = [(i, a) for i, a in enumerate(adapters) if a in layer.impart_meta]
        if not present:
            continue
        metas = [layer.impart_meta[a] for _, a in present]
        for _, a in present:
            if name in model.peft_config[a].base_fingerprint:
                fingerprints[name] = model.peft_config[a].base_fingerprint[name]
        kind = metas[0]["kind"]
        if kind == "tied":
            module_meta[name] = {"kind": "tied", "tied_to": metas[0]["tied_to"], "shape": metas[0]["shape"]}
            continue
        meta: dict[str, Any] = {"kind": kind}
        tensors: dict[str, torch.Tensor] = {}
        factors = [(i, layer._factors(a, torch.device("cpu"), torch.float32)) for i, a in present]
        factors = [(i, f) for i, f in factors if f is not None]
        shape = next((tuple(m["shape"]) for m in metas if "shape" in m), None)
        if factors and shape is not None:
            meta["shape"] = list(shape)
            meta["dtype"] = "float32"
            m, n = shape
            ranks = [f[1].numel() for _, f in factors]
            if combination_type == "cat" and sum(ranks) <= min(m, n):
                u = torch.cat([f[0] * weights[i] for i, f in factors], dim=1)
                sigma = torch.cat([f[1] for _, f in factors])
                v = torch.cat([f[2] for _, f in factors], dim=1)
            else:
                dense = []
                for i, (fu, fs, fv) in factors:
                    delta = (fu * fs) @ fv.t()
                    dense.append(
                        sparsify_delta(
                            delta,
                            sparsify,
                            density or 1.0,
                            seed=model.peft_config[adapters[i]].seed + i,
                            name=name,
                        )
                    )
                merged = merge_deltas(
                    dense,
                    [weights[i] for i, _ in factors],
                    method,
                    majority_sign=majority_sign_method,
                    normalize=None if method == "ties" else False,
                )
                rank = None if combination_type == "cat" else (svd_rank or max(ranks))
                u, sigma, v = _svd_factors(merged, rank)
            if sigma.numel():
                meta["rank"] = int(sigma.numel())
                meta["u_count"] = m * meta["rank"]
                meta["v_count"] = n * meta["rank"]
                tensors.update(_factor_columns(u, sigma, v))
            else:
                meta["rank"] = 0
        vectors: dict[str, int] = {}
        for param_name, store in (("weight", layer.impart_delta_weight), ("bias", layer.impart_delta_bias)):
            parts = [(i, store[a].detach().cpu()) for i, a in present if a in store]
            if not parts:
                continue
            dtype = parts[0][1].dtype
            for _, t in parts:
                dtype = torch.promote_types(dtype, t.dtype)
            merged = merge_deltas(
                [t.to(dtype) for _, t in parts],
                [weights[i] for i, _ in parts],
                method,
                majority_sign=majority_sign_method,
                normalize=None if method == "ties" else False,
            )
            vectors[param_name] = int(merged.numel())
            tensors[f"impart_delta_{param_name}"] = merged
            meta["vector_dtype"] = str(dtype).removeprefix("torch.")
        if vectors:
            meta["vectors"] = vectors
        if tensors:
            module_meta[name] = meta
            tensors_by_module[name] = tensors
    module_meta = {n: m for n, m in module_meta.items() if m["kind"] != "tied" or m["tied_to"] in module_meta}
    if not module_meta:
        raise ValueError(f"the adapters {adapters} hold no delta to combine")
    first = model.peft_config[adapters[0]]
    # The combination is a new adapter: its own digests, as the compressor writes them (docs/security.md).
    for name, meta in module_meta.items():
        meta["digest"] = module_digest(
            name, meta, first.seed, ADAPTER_FORMAT_VERSION, tensors_by_module.get(name, {})
        )
    config = ImPartConfig(
        **{
            **first.to_dict(),
            "compression_ratio": None,  # the factors are stored whole
            "quantization": None,
            "integrity": adapter_digest(module_meta, first.seed, ADAPTER_FORMAT_VERSION),
            "module_meta": module_meta,
            "base_fingerprint": {n: fingerprints[n] for n in module_meta if n in fingerprints},
            "target_modules": None,
            "finetuned_model_name_or_path": None,  # a combination of several
        }
    )
    config.inference_mode = True
    model.peft_config[adapter_name] = config
    try:
        model.inject_adapter(model.model, adapter_name)
        load_module_tensors(model.model, tensors_by_module, adapter_name)
    except BaseException:
        model.peft_config.pop(adapter_name, None)
        raise
