"""Compression of a whole (base, fine-tune) pair into an ImPart adapter.

``plan_modules`` decides, from the base model's structure alone, which modules an adapter covers and how
(``kind``); ``compress_module`` turns one module's (base, fine-tune) parameters into the module's metadata and
adapter tensors. Both are shared by :func:`from_finetuned` (models in memory) and the streaming checkpoint
compressor, so the two write the same adapter for the same inputs and seed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapter_io import ADAPTER_FORMAT_VERSION
from .config import ImPartConfig
from .delta import all_finite, compress_delta, singular_values
from .fingerprint import weight_fingerprint
from .planning import ModuleMeasure, ModuleSettings, plan_settings
from .quantization import compress_delta_quantized
from .validation import adapter_digest, module_digest

__all__ = [
    "ModulePlan",
    "compress_module",
    "finish_planned_config",
    "from_finetuned",
    "measure_module",
    "plan_modules",
    "vector_delta_dtype",
]

_MATRIX_KINDS = {nn.Linear: "linear", Conv1D: "conv1d", nn.Embedding: "embedding"}


@dataclass(frozen=True)
class ModulePlan:
    """How one module of the base model is covered: ``kind`` and, for a tied head, the embedding it shares."""

    name: str
    kind: str  # "linear" | "conv1d" | "embedding" | "tied" | "vector"
    tied_to: str | None = None


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def plan_modules(model: nn.Module, config: ImPartConfig) -> dict[str, ModulePlan]:
    """Every module of ``model`` an adapter with ``config`` may cover, by name, in ``named_modules`` order.

    Matrices (``nn.Linear``, ``Conv1D``, ``nn.Embedding``) are compressed; other modules with their own 1-D
    parameters (norms) get dense deltas. An output head whose weight *is* an embedding's weight (tied) becomes
    ``kind="tied"``. ``config.target_modules`` / ``exclude_modules`` / ``include_embeddings`` filter the list.
    """
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_names_by_weight: dict[int, str] = {}
    plans: dict[str, ModulePlan] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        kind = next((k for cls, k in _MATRIX_KINDS.items() if isinstance(module, cls)), None)
        is_embedding = kind == "embedding" or module is output_embeddings
        if is_embedding and not config.include_embeddings:
            continue
        if config.target_modules is not None and not _matches(name, config.target_modules):
            continue
        if _matches(name, config.exclude_modules):
            continue
        if kind is not None:
            weight = module.weight
            tied_to = embedding_names_by_weight.get(id(weight))
            if kind == "embedding":
                embedding_names_by_weight[id(weight)] = name
            elif tied_to is not None:
                plans[name] = ModulePlan(name, "tied", tied_to)
                continue
            plans[name] = ModulePlan(name, kind)
        elif any(p.dim() == 1 for p in module.parameters(recurse=False)):
            plans[name] = ModulePlan(name, "vector")
    return plans


def vector_delta_dtype(dtype: torch.dtype) -> torch.dtype:
    """A dtype in which ``ft - base`` of two ``dtype`` tensors is exact, so ``base + delta`` gives ``ft`` back."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _check_params(
    plan: ModulePlan, base_params: Mapping[str, torch.Tensor], finetuned_params: Mapping[str, torch.Tensor]
) -> list[str]:
    """The module's parameter names after checking both sides have them, with equal shapes and finite values."""
    names = sorted(set(base_params) | set(finetuned_params))
    for param_name in names:
        if param_name not in base_params or param_name not in finetuned_params:
            raise ValueError(f"{plan.name}.{param_name} exists in only one of the base and the fine-tune")
        b, f = base_params[param_name], finetuned_params[param_name]
        if b.shape != f.shape:
            raise ValueError(
                f"{plan.name}.{param_name} has shape {tuple(b.shape)} in the base but {tuple(f.shape)} in the "
                "fine-tune: they are not the same architecture (a fine-tune that added tokens must be compressed "
                "against a base with the same resized embeddings)"
            )
        if not all_finite(f):  # in chunks: no temporaries the size of the tensor
            raise ValueError(f"{plan.name}.{param_name} of the fine-tune contains NaN or inf")
        if not all_finite(b):
            raise ValueError(f"{plan.name}.{param_name} of the base contains NaN or inf")
    return names


def _matrix_delta(base_weight: torch.Tensor, ft_weight: torch.Tensor, device) -> torch.Tensor:
    """float32 ``ft - base`` on ``device`` (default: the base weight's)."""
    work_device = torch.device(device) if device is not None else base_weight.device
    # ft.float() - base.float(), bit for bit, with one float32 matrix alive instead of three (a 32000 x 4096
    # head is 0.5 GB each): in place, a block of rows at a time. copy=True: never the caller's tensor.
    delta = ft_weight.to(work_device, torch.float32, copy=True)
    rows = max(1, (1 << 22) // max(1, delta[0].numel()))
    for delta_rows, base_rows in zip(delta.split(rows), base_weight.split(rows), strict=True):
        delta_rows -= base_rows.to(work_device, torch.float32)
    return delta


def _vector_deltas(
    plan: ModulePlan,
    names: list[str],
    base_params: Mapping[str, torch.Tensor],
    finetuned_params: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The changed 1-D parameters' exact deltas (:func:`vector_delta_dtype`), by parameter name."""
    matrix_param = "weight" if plan.kind != "vector" else None
    vectors = {}
    for param_name in names:
        if param_name == matrix_param:
            continue
        b, f = base_params[param_name], finetuned_params[param_name]
        if b.dim() != 1:
            raise ValueError(
                f"{plan.name}.{param_name} is a {b.dim()}-D parameter of a {plan.kind} module: ImPart compresses "
                "matrices of Linear, Conv1D and Embedding layers and stores 1-D parameters densely"
            )
        if param_name not in ("weight", "bias"):
            raise ValueError(f"{plan.name}.{param_name}: only 'weight' and 'bias' vectors are supported")
        work = vector_delta_dtype(f.dtype)
        delta = f.detach().to("cpu", work) - b.detach().to("cpu", work)
        if bool(delta.any()):
            vectors[param_name] = delta
    return vectors


def measure_module(
    plan: ModulePlan,
    base_params: Mapping[str, torch.Tensor],
    finetuned_params: Mapping[str, torch.Tensor],
    config: ImPartConfig,
    device: torch.device | str | None = None,
) -> ModuleMeasure | None:
    """The first pass of a planned compression (:mod:`impart_peft.planning`) over one module: the singular values
    of its weight delta (:func:`~impart_peft.delta.singular_values`, no vectors) and the sizes of its changed
    vectors. ``None`` for a tied head (it stores nothing)."""
    if plan.kind == "tied":
        return None
    names = _check_params(plan, base_params, finetuned_params)
    shape = sigma = dtype = None
    if plan.kind != "vector":
        delta = _matrix_delta(base_params["weight"], finetuned_params["weight"], device)
        shape, dtype = (int(delta.shape[0]), int(delta.shape[1])), finetuned_params["weight"].dtype
        if bool(delta.any()):
            sigma = singular_values(delta, getattr(torch, config.svd_dtype)).cpu().numpy()
        del delta
    vectors = [
        (param_name, delta.dtype, int(delta.numel()))
        for param_name, delta in _vector_deltas(plan, names, base_params, finetuned_params).items()
    ]
    return ModuleMeasure(plan.name, shape, sigma, dtype, vectors)


def compress_module(
    plan: ModulePlan,
    base_params: Mapping[str, torch.Tensor],
    finetuned_params: Mapping[str, torch.Tensor],
    config: ImPartConfig,
    device: torch.device | str | None = None,
    settings: ModuleSettings | None = None,
) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor], list[float] | None]:
    """Compress one module.

    Args:
        plan: the module's :class:`ModulePlan`.
        base_params / finetuned_params: the module's own parameters by short name (``"weight"``, ``"bias"``).
        device: where to run the SVD (default: where the weight is).
        settings: the matrix's ratio, beta, C and allocation from :func:`impart_peft.planning.plan_settings`
            (recorded in its ``module_meta``); ``None``: the config's own, allocated from this SVD.

    Returns:
        ``(meta, tensors, fingerprint)``: the module's ``module_meta`` entry (``None`` when nothing changed), its
        adapter tensors by parameter name (``"impart_u_values"``, ..., ``"impart_delta_bias"``) on the CPU, and the
        base fingerprint of its weight (matrices only).
    """
    if plan.kind == "tied":
        base_weight = base_params["weight"]
        meta = {"kind": "tied", "tied_to": plan.tied_to, "shape": list(base_weight.shape)}
        meta["digest"] = module_digest(plan.name, meta, config.seed, ADAPTER_FORMAT_VERSION, {})
        return meta, {}, None
    names = _check_params(plan, base_params, finetuned_params)

    meta: dict[str, Any] = {"kind": plan.kind}
    tensors: dict[str, torch.Tensor] = {}
    fingerprint = None
    if plan.kind != "vector":
        base_weight = base_params["weight"]
        ft_weight = finetuned_params["weight"]
        fingerprint = weight_fingerprint(base_weight)
        delta = _matrix_delta(base_weight, ft_weight, device)
        meta["shape"] = list(delta.shape)
        meta["dtype"] = str(ft_weight.dtype).removeprefix("torch.")
        if bool(delta.any()):
            settings_kwargs = dict(
                compression_ratio=config.compression_ratio,
                pre_prune_ratio=config.pre_prune_ratio,
                importance_exponent=config.importance_exponent,
                seed=config.seed,
                name=plan.name,
                svd_dtype=getattr(torch, config.svd_dtype),
                allocation=config.allocation,
            )
            if settings is not None:
                settings_kwargs.update(settings.meta(), planned=settings.allocation)
                meta.update(settings.meta())
            elif config.planned:
                raise ValueError(
                    f"{plan.name}: this config has target_size or 'auto' settings, which need the first pass "
                    "(impart_peft.planning.plan_settings); compress with from_finetuned or compress_checkpoints"
                )
            if config.quantization is not None:
                # ImPart-QT: the same masks, the values as packed integer codes, the ratio counted in bits.
                compressed = compress_delta_quantized(
                    delta,
                    quantization=config.quantization,
                    reference_dtype=ft_weight.dtype,
                    **settings_kwargs,
                )
                meta["quantized"] = compressed.meta()
            else:
                compressed = compress_delta(delta, storage_dtype=ft_weight.dtype, **settings_kwargs)
            meta["rank"] = compressed.rank
            meta["u_count"] = compressed.u_count
            meta["v_count"] = compressed.v_count
            for key, tensor in compressed.state_dict().items():
                tensors[f"impart_{key}"] = tensor.cpu()
        else:
            meta["rank"] = 0
        del delta
    vectors = _vector_deltas(plan, names, base_params, finetuned_params)
    for param_name, delta in vectors.items():
        tensors[f"impart_delta_{param_name}"] = delta
        meta["vector_dtype"] = str(delta.dtype).removeprefix("torch.")
    if vectors:
        meta["vectors"] = {param_name: int(delta.numel()) for param_name, delta in vectors.items()}
    if not tensors:
        return None, {}, fingerprint
    # Ties the seed, the name and the tensors together: a loader refuses an edited seed or a flipped bit
    # (impart_peft.validation), which no size check can see.
    meta["digest"] = module_digest(plan.name, meta, config.seed, ADAPTER_FORMAT_VERSION, tensors)
    return meta, tensors, fingerprint


def finish_planned_config(config: ImPartConfig, module_meta: dict[str, dict[str, Any]]) -> None:
    """After a ``target_size`` compression, ``compression_ratio`` records the model-wide ratio achieved: dense
    values of the compressed matrices / their stored factor values."""
    if config.target_size is None:
        return
    dense = stored = 0
    for meta in module_meta.values():
        if meta.get("rank"):
            dense += meta["shape"][0] * meta["shape"][1]
            stored += meta["u_count"] + meta["v_count"]
    if stored:
        config.compression_ratio = dense / stored


def _check_same_architecture(base_model: nn.Module, finetuned_model: nn.Module) -> None:
    base_shapes = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    ft_shapes = {k: tuple(v.shape) for k, v in finetuned_model.state_dict().items()}
    only_base = sorted(set(base_shapes) - set(ft_shapes))
    only_ft = sorted(set(ft_shapes) - set(base_shapes))
    differ = sorted(k for k in set(base_shapes) & set(ft_shapes) if base_shapes[k] != ft_shapes[k])
    if only_base or only_ft or differ:
        details = []
        if only_base:
            details.append(f"only in the base: {only_base[:3]}")
        if only_ft:
            details.append(f"only in the fine-tune: {only_ft[:3]}")
        if differ:
            k = differ[0]
            details.append(f"{len(differ)} shape(s) differ, e.g. {k}: {base_shapes[k]} vs {ft_shapes[k]}")
        raise ValueError(
            "The base and the fine-tune are not the same architecture ("
            + "; ".join(details)
            + "). Pass the base model the fine-tune was trained from."
        )


def from_finetuned(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    config: ImPartConfig | None = None,
    adapter_name: str = "default",
):
    """Compress ``finetuned_model - base_model`` into an ImPart adapter on ``base_model``.

    Args:
        base_model: the model the fine-tune started from (it becomes the PeftModel's base; it is not modified
            beyond wrapping its layers, as with any PEFT adapter).
        finetuned_model: the fully fine-tuned model, same architecture.
        config: an :class:`ImPartConfig` (default: ``ImPartConfig()``); a copy is filled in and attached.
        adapter_name: name of the adapter.

    Returns:
        A ``peft.PeftModel`` in eval mode whose adapter reproduces the fine-tune approximately at the asked
        compression ratio (exactly, to float error, with ``compression_ratio=None``).
    """
    from peft import PeftModel

    config = ImPartConfig(
        **{**(config or ImPartConfig()).to_dict(), "module_meta": {}, "base_fingerprint": {}}
    )
    _check_same_architecture(base_model, finetuned_model)
    ft_tied = {
        name: plan
        for name, plan in plan_modules(finetuned_model, config).items()
        if plan.kind == "tied"  # the fine-tune must tie the same modules the base ties
    }
    plans = plan_modules(base_model, config)
    base_tied = {name for name, plan in plans.items() if plan.kind == "tied"}
    if base_tied != set(ft_tied):
        raise ValueError(
            f"The base ties {sorted(base_tied) or 'no'} output head(s) to the input embeddings but the fine-tune "
            f"ties {sorted(ft_tied) or 'none'}: load both with the same tie_word_embeddings setting"
        )
    finetuned_modules = dict(finetuned_model.named_modules())
    module_meta: dict[str, dict[str, Any]] = {}
    fingerprints: dict[str, list[float]] = {}
    tensors_by_module: dict[str, dict[str, torch.Tensor]] = {}

    def module_params(name: str) -> tuple[dict, dict]:
        base_params = dict(base_model.get_submodule(name).named_parameters(recurse=False))
        return base_params, dict(finetuned_modules[name].named_parameters(recurse=False))

    settings: dict[str, ModuleSettings] = {}
    with torch.no_grad():
        if config.planned:  # first pass: spectra and vector sizes only (docs/algorithm.md section 12)
            measures = {}
            for name, plan in plans.items():
                measure = measure_module(plan, *module_params(name), config)
                if measure is not None:
                    measures[name] = measure
            settings = plan_settings(measures, config)
            del measures
        for name, plan in plans.items():
            base_params, ft_params = module_params(name)
            meta, tensors, fingerprint = compress_module(
                plan, base_params, ft_params, config, settings=settings.get(name)
            )
            if fingerprint is not None and plan.kind != "tied":
                fingerprints[name] = fingerprint
            if meta is not None:
                module_meta[name] = meta
                tensors_by_module[name] = tensors
    # A tied head without its embedding's delta carries nothing.
    module_meta = {n: m for n, m in module_meta.items() if m["kind"] != "tied" or m["tied_to"] in module_meta}
    if not module_meta:
        raise ValueError(
            "The fine-tune is identical to the base in every targeted module: nothing to compress"
        )
    config.module_meta = module_meta
    finish_planned_config(config, module_meta)
    config.integrity = adapter_digest(module_meta, config.seed, ADAPTER_FORMAT_VERSION)
    # The targets are module_meta's keys from now on (see ImPartModel._prepare_adapter_config).
    config.target_modules = None
    config.base_fingerprint = {n: fingerprints[n] for n in module_meta if n in fingerprints}
    config.base_model_name_or_path = getattr(base_model, "name_or_path", None) or None
    config.finetuned_model_name_or_path = getattr(finetuned_model, "name_or_path", None) or None
    config.inference_mode = True
    peft_model = PeftModel(base_model, config, adapter_name=adapter_name)
    load_module_tensors(peft_model.base_model.model, tensors_by_module, adapter_name)
    peft_model.eval()
    return peft_model


def load_module_tensors(
    model: nn.Module, tensors_by_module: Mapping[str, Mapping[str, torch.Tensor]], adapter_name: str
) -> None:
    """Copy adapter tensors (by module name, then ``impart_*`` parameter name) into the injected layers."""
    for name, tensors in tensors_by_module.items():
        layer = model.get_submodule(name)
        for param_name, tensor in tensors.items():
            store = getattr(layer, param_name)
            target = store[adapter_name]
            if target.shape != tensor.shape or target.dtype != tensor.dtype:
                raise ValueError(
                    f"{name}.{param_name}: adapter tensor {tuple(tensor.shape)} {tensor.dtype} does not fit the "
                    f"layer's {tuple(target.shape)} {target.dtype}"
                )
            with torch.no_grad():
                target.copy_(tensor)
