"""Compress a fine-tune against its base straight from their (sharded) safetensors checkpoints, in bounded memory.

:func:`compress_checkpoints` is :func:`impart_peft.from_finetuned` + ``PeftModel.save_pretrained`` for models that do
not fit in memory: it plans the modules from the architecture alone (the model is built from ``config.json`` on the
``meta`` device, which allocates nothing), then reads one (base, fine-tune) tensor pair at a time with safetensors'
lazy ``safe_open``, compresses it with the same :func:`~impart_peft.compressor.compress_module`, and spills the
result to disk at once. Peak memory is a few tensors (the largest matrix, its SVD and workspace), whatever the
number of layers. The adapter written has the same ``adapter_model.safetensors`` bytes as ``from_finetuned`` +
``save_pretrained`` for the same inputs, config and device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_io import ADAPTER_FORMAT_VERSION
from .checkpoint_io import (
    Checkpoint,
    atomic_folder,
    check_device,
    check_output,
    copy_side_files,
    meta_model,
    progress_bar,
    resolve_folder,
)
from .compressor import (
    ModulePlan,
    _check_same_architecture,
    compress_module,
    finish_planned_config,
    measure_module,
    plan_modules,
)
from .config import ImPartConfig
from .filenames import ADAPTER_PREFIX, ADAPTER_WEIGHTS
from .modelcard import write_model_card
from .planning import ModuleSettings, plan_settings
from .safetensors_io import SAFETENSORS_METADATA, Spill
from .validation import adapter_digest

__all__ = ["compress_checkpoints"]


@dataclass
class _PlannedModule:
    plan: ModulePlan
    params: dict[str, tuple[str, str]]  # short param name -> (base key, fine-tune key)


def _embedding_rows(model: nn.Module, checkpoint: Checkpoint, prefix: str) -> tuple[str, int] | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return None
    for name, module in model.named_modules():
        if module is embeddings:
            key = checkpoint.key_for(f"{name}.weight", prefix)
            if key is not None:
                return name, checkpoint.tensors[key].shape[0]
    return None


def _plan_checkpoint_pair(
    base: Checkpoint, finetuned: Checkpoint, config: ImPartConfig
) -> tuple[nn.Module, dict[str, _PlannedModule]]:
    """Plan the modules from the architecture and map each planned parameter to both checkpoints' keys, checking
    that the two checkpoints are the same architecture before anything is compressed."""
    base_type = getattr(base.config, "model_type", None)
    ft_type = getattr(finetuned.config, "model_type", None)
    if base_type != ft_type:
        raise ValueError(
            f"the base is a {base_type!r} model and the fine-tune a {ft_type!r} model: they are not the same "
            "architecture. Pass the base model the fine-tune was trained from."
        )
    base_model = meta_model(base.config)
    ft_model = meta_model(finetuned.config)
    prefix = getattr(base_model, "base_model_prefix", "") or ""

    base_rows = _embedding_rows(base_model, base, prefix)
    ft_rows = _embedding_rows(ft_model, finetuned, prefix)
    if base_rows and ft_rows and base_rows[1] != ft_rows[1]:
        raise ValueError(
            f"the fine-tune's vocabulary has {ft_rows[1]} tokens and the base's {base_rows[1]}: the fine-tune "
            "added tokens (resized its embeddings), and an adapter can only hold deltas of same-shaped weights. "
            f"Resize the base's embeddings to {ft_rows[1]} rows (model.resize_token_embeddings), save that base, "
            "compress against it, and publish it with the adapter."
        )

    # Every parameter and buffer of the two architectures, by name and shape (one layer more, a value head...).
    _check_same_architecture(base_model, ft_model)

    plans = plan_modules(base_model, config)
    ft_tied = {n for n, p in plan_modules(ft_model, config).items() if p.kind == "tied"}
    base_tied = {n for n, p in plans.items() if p.kind == "tied"}
    if base_tied != ft_tied:
        raise ValueError(
            f"the base ties {sorted(base_tied) or 'no'} output head(s) to the input embeddings but the fine-tune "
            f"ties {sorted(ft_tied) or 'none'} (tie_word_embeddings in config.json): they are not the same "
            "architecture"
        )
    planned: dict[str, _PlannedModule] = {}
    problems: list[str] = []
    for name, plan in plans.items():
        module = base_model.get_submodule(name)
        params: dict[str, tuple[str, str]] = {}
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{name}.{param_name}"
            if plan.kind == "tied":
                params[param_name] = (full, full)  # shares the embedding: nothing is read
                continue
            base_key = base.key_for(full, prefix)
            ft_key = finetuned.key_for(full, prefix)
            if base_key is None or ft_key is None:
                missing = "base" if base_key is None else "fine-tune"
                problems.append(f"{full} is missing from the {missing} checkpoint")
                continue
            base_shape = base.tensors[base_key].shape
            ft_shape = finetuned.tensors[ft_key].shape
            if base_shape != tuple(param.shape):
                problems.append(
                    f"{full} has shape {base_shape} in the base checkpoint, its config says {tuple(param.shape)}"
                )
            elif ft_shape != base_shape:
                problems.append(f"{full} has shape {base_shape} in the base but {ft_shape} in the fine-tune")
            params[param_name] = (base_key, ft_key)
        planned[name] = _PlannedModule(plan, params)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            "the base and the fine-tune checkpoints are not the same architecture: "
            + "; ".join(problems[:3])
            + more
            + ". Pass the base model the fine-tune was trained from."
        )
    return base_model, planned


def compress_checkpoints(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: ImPartConfig | None = None,
    device: str | torch.device | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Compress a fine-tune against its base, from their checkpoints, into an ImPart adapter folder.

    Args:
        base / finetuned: local folders or Hub repo ids holding ``config.json`` and safetensors weights
            (``model.safetensors`` or shards listed in ``model.safetensors.index.json``), fp32, fp16 or bf16.
        output_dir: the adapter folder to write (``adapter_config.json``, ``adapter_model.safetensors``, and the
            fine-tune's tokenizer and generation files when it has them). Written atomically.
        config: an :class:`ImPartConfig` (default ``ImPartConfig()``).
        device: where to run each SVD (``"cuda"`` is much faster); default the CPU. The masks are the same on
            every device, but the SVD's float rounding is not: byte-identical output needs the same device.
        overwrite: replace ``output_dir`` if it exists and is not empty.
        progress: show a tqdm progress bar (tensors done, elapsed, ETA) on stderr.
        command: the command line that made the adapter, recorded in its model card (``README.md``).

    Returns:
        The output folder. Its ``adapter_model.safetensors`` has the bytes ``from_finetuned(base, finetuned,
        config).save_pretrained(...)`` writes for the same inputs on the same device.

    Memory: one (base, fine-tune) tensor pair and its SVD at a time; compressed tensors go to a scratch file at
    once, so the peak does not grow with the number of layers.
    """
    device = check_device(device)
    check_output(output_dir, overwrite)  # before any download or planning
    config = ImPartConfig(
        **{**(config or ImPartConfig()).to_dict(), "module_meta": {}, "base_fingerprint": {}}
    )
    base_checkpoint = Checkpoint(resolve_folder(base, "base"), "base")
    ft_checkpoint = Checkpoint(resolve_folder(finetuned, "fine-tune"), "fine-tune")
    meta_model, planned = _plan_checkpoint_pair(base_checkpoint, ft_checkpoint, config)
    total = sum(len(p.params) for p in planned.values() if p.plan.kind != "tied")

    module_meta: dict[str, dict[str, Any]] = {}
    fingerprints: dict[str, list[float]] = {}
    settings: dict[str, ModuleSettings] = {}
    if config.planned:
        # First pass (target_size / "auto"): each tensor pair read once more, only its spectrum and the sizes of
        # its vectors kept, so memory stays flat in model size (docs/algorithm.md section 12).
        measures = {}
        with progress_bar(total, "measure", "tensor", progress) as bar, torch.no_grad():
            for name, item in planned.items():
                if item.plan.kind == "tied":
                    continue
                base_params = {p: base_checkpoint.read(keys[0]) for p, keys in item.params.items()}
                ft_params = {p: ft_checkpoint.read(keys[1]) for p, keys in item.params.items()}
                measure = measure_module(item.plan, base_params, ft_params, config, device=device)
                del base_params, ft_params
                if measure is not None:
                    measures[name] = measure
                bar.update(len(item.params))
        settings = plan_settings(measures, config)
        del measures
    with atomic_folder(output_dir, overwrite) as scratch:
        spill = Spill(scratch / ".tensors.spill")
        try:
            with progress_bar(total, "compress", "tensor", progress) as bar, torch.no_grad():
                for name, item in planned.items():
                    if item.plan.kind == "tied":
                        weight = meta_model.get_submodule(name).weight
                        meta, tensors, fingerprint = compress_module(
                            item.plan, {"weight": weight}, {"weight": weight}, config
                        )
                    else:
                        base_params = {p: base_checkpoint.read(keys[0]) for p, keys in item.params.items()}
                        ft_params = {p: ft_checkpoint.read(keys[1]) for p, keys in item.params.items()}
                        meta, tensors, fingerprint = compress_module(
                            item.plan,
                            base_params,
                            ft_params,
                            config,
                            device=device,
                            settings=settings.get(name),
                        )
                        del base_params, ft_params
                        bar.update(len(item.params))
                    if fingerprint is not None and item.plan.kind != "tied":
                        fingerprints[name] = fingerprint
                    if meta is not None:
                        module_meta[name] = meta
                        for param_name, tensor in tensors.items():
                            spill.add(f"{ADAPTER_PREFIX}{name}.{param_name}", tensor)
                    del tensors
            # A tied head without its embedding's delta carries nothing (as in from_finetuned).
            module_meta = {
                n: m for n, m in module_meta.items() if m["kind"] != "tied" or m["tied_to"] in module_meta
            }
            if not module_meta:
                raise ValueError(
                    "the fine-tune is identical to the base in every targeted module: nothing to compress"
                )
            spill.finish(scratch / ADAPTER_WEIGHTS, SAFETENSORS_METADATA)
        finally:
            spill.close()

        config.module_meta = module_meta
        finish_planned_config(config, module_meta)
        config.integrity = adapter_digest(module_meta, config.seed, ADAPTER_FORMAT_VERSION)
        config.base_fingerprint = {n: fingerprints[n] for n in module_meta if n in fingerprints}
        config.base_model_name_or_path = os.fspath(base)
        config.finetuned_model_name_or_path = os.fspath(finetuned)
        config.inference_mode = True
        # As ImPartModel leaves it after injection: module_meta lists the targets. (A list naming the embeddings
        # would make PeftModel.save_pretrained store the base's embedding matrices if this adapter is re-saved.)
        config.target_modules = None
        model_cls = type(meta_model)
        # What PeftModel.save_pretrained records for a model without a task type.
        config.save_pretrained(
            os.fspath(scratch),
            auto_mapping_dict={
                "base_model_class": model_cls.__name__,
                "parent_library": model_cls.__module__,
            },
        )
        copy_side_files([ft_checkpoint.folder], scratch)
        _write_model_card(scratch, ft_checkpoint, command)
    return Path(output_dir).expanduser()


def _write_model_card(folder: Path, finetuned: Checkpoint, command: str | None) -> None:
    """The README.md that PeftModel.save_pretrained writes for an ImPart adapter."""
    seen: set[tuple[Path, int]] = set()
    parameters = 0
    for info in finetuned.tensors.values():
        if (info.file, info.offset) not in seen:  # a tensor stored once counts once
            seen.add((info.file, info.offset))
            parameters += math.prod(info.shape)
    write_model_card(os.fspath(folder), finetuned_num_parameters=parameters, command=command)
