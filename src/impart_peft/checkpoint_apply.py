"""Apply an ImPart adapter to its base's checkpoint: base + adapter written as a standard transformers checkpoint
(the merged fine-tune), one tensor at a time. Backs ``impart apply``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_io import (
    AdapterTensors,
    Checkpoint,
    check_device,
    check_output,
    load_adapter_config,
    meta_model,
    parse_size,
    resolve_folder,
    write_sharded_checkpoint,
)
from .delta import CompressedDelta
from .fingerprint import check_fingerprint
from .quantization import QuantizedDelta

__all__ = ["apply_adapter"]


def _module_deltas(
    name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor], seed: int, device: torch.device | None
) -> dict[str, torch.Tensor]:
    """Dense deltas of one module's parameters, computed as ImPartLayer.merge computes them."""
    deltas: dict[str, torch.Tensor] = {}
    if (
        meta["kind"] in ("linear", "conv1d", "embedding")
        and int(meta.get("rank", 0)) > 0
        and "quantized" in meta
    ):
        quantized = QuantizedDelta.from_state_dict(
            {k.removeprefix("impart_"): v for k, v in tensors.items() if not k.startswith("impart_delta_")},
            shape=tuple(meta["shape"]),
            quantized_meta=meta["quantized"],
            seed=seed,
            name=name,
        )
        u, sigma, v = quantized.factors(torch.float32, device)
        deltas["weight"] = (u * sigma) @ v.t()  # the product ImPartLayer.get_delta_weight forms
    elif meta["kind"] in ("linear", "conv1d", "embedding") and int(meta.get("rank", 0)) > 0:
        compressed = CompressedDelta.from_state_dict(
            {k.removeprefix("impart_"): v for k, v in tensors.items() if not k.startswith("impart_delta_")},
            shape=tuple(meta["shape"]),
            seed=seed,
            name=name,
        )
        u, sigma, v = compressed.factors(torch.float32, device)
        deltas["weight"] = (u * sigma) @ v.t()  # the product ImPartLayer.get_delta_weight forms
    for param_name in meta.get("vectors", {}):
        deltas[param_name] = tensors[f"impart_delta_{param_name}"]
    return deltas


def _merge(original: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    # Exactly ImPartLayer.merge: add in float32 (or the delta's wider dtype), cast back to the weight's dtype.
    work = torch.promote_types(torch.float32, delta.dtype)
    return (original.to(delta.device, work) + delta.to(work)).to(original.dtype).cpu()


def apply_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write base + adapter as a standard transformers checkpoint (the merged fine-tune), streaming.

    Args:
        base: folder or Hub repo id of the base model the adapter was compressed against.
        adapter: folder or Hub repo id of an ImPart adapter.
        output_dir: the model folder to write, atomically: ``config.json`` (the base's), safetensors weights in the
            base's dtypes, sharded at ``max_shard_size`` (with ``model.safetensors.index.json``), and the tokenizer
            and generation files, the adapter's when it has them (the fine-tune's), else the base's.
        device: where to rebuild each delta (default the CPU).

    Each tensor is ``(W_base.float() + ΔW_c).to(W_base.dtype)`` computed as ``ImPartLayer.merge`` does, so the
    result equals ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` on the same device. Memory: one
    tensor and its delta at a time. The base fingerprint is checked as loading checks it (``base_check``,
    ``IMPART_BASE_CHECK``).
    """
    device = check_device(device)
    check_output(output_dir, overwrite)
    shard_limit = parse_size(max_shard_size)
    adapter_folder = resolve_folder(adapter, "adapter", adapter=True)
    config = load_adapter_config(adapter_folder)
    adapter_tensors = AdapterTensors(adapter_folder)
    checkpoint = Checkpoint(resolve_folder(base, "base"), "base")
    prefix = getattr(meta_model(checkpoint.config), "base_model_prefix", "") or ""
    check_mode = os.environ.get("IMPART_BASE_CHECK", config.base_check)

    # checkpoint key -> (module name, param name, the module whose delta applies)
    targets: dict[str, tuple[str, str, str]] = {}
    problems = []
    for name, meta in config.module_meta.items():
        params = ["weight"] if meta["kind"] in ("linear", "conv1d", "embedding", "tied") else []
        params += [p for p in meta.get("vectors", {}) if p not in params]
        source = meta.get("tied_to", name) if meta["kind"] == "tied" else name
        for param_name in params:
            key = checkpoint.key_for(f"{name}.{param_name}", prefix)
            if key is None:
                if meta["kind"] == "tied":
                    continue  # the checkpoint omits the tied head: the embedding carries it
                problems.append(f"{name}.{param_name} is not in the base checkpoint")
                continue
            if (
                param_name == "weight"
                and "shape" in meta
                and checkpoint.tensors[key].shape != tuple(meta["shape"])
            ):
                problems.append(
                    f"{name}.weight has shape {checkpoint.tensors[key].shape}, the adapter expects {tuple(meta['shape'])}"
                )
            targets[key] = (name, param_name, source)
    if problems:
        raise ValueError(
            f"this ImPart adapter does not fit the base ({'; '.join(problems[:3])}): apply it to the base model "
            f"it was compressed from ({config.base_model_name_or_path or 'see adapter_config.json'})"
        )

    keys = list(checkpoint.tensors)
    # Rebuilt deltas are dropped after their last use (a tied head's comes after its embedding's).
    last_use = {source: key for key in keys if key in targets for source in [targets[key][2]]}
    deltas_cache: dict[str, dict[str, torch.Tensor]] = {}

    def merged(key: str) -> torch.Tensor:
        tensor = checkpoint.read(key)
        if key not in targets:
            return tensor
        name, param_name, source = targets[key]
        meta = config.module_meta[name]
        if param_name == "weight" and meta["kind"] != "tied" and name in config.base_fingerprint:
            holder = nn.Module()
            holder.weight = tensor
            if check_fingerprint(holder, {"": config.base_fingerprint[name]}) and check_mode != "ignore":
                message = (
                    f"the base's {name}.weight differs from the one the adapter was compressed "
                    f"against: apply it to {config.base_model_name_or_path or 'its own base'}, or "
                    "set IMPART_BASE_CHECK=warn to proceed anyway"
                )
                if check_mode == "error":
                    raise ValueError(message)
                warnings.warn(message, stacklevel=4)
        if source not in deltas_cache:
            deltas_cache[source] = _module_deltas(
                source, config.module_meta[source], adapter_tensors.module(source), config.seed, device
            )
        delta = deltas_cache[source].get(param_name)
        if delta is not None:
            tensor = _merge(tensor, delta)
        if last_use[source] == key:
            deltas_cache.pop(source, None)
        return tensor

    return write_sharded_checkpoint(
        output_dir,
        checkpoint,
        merged,
        side_file_sources=[adapter_folder, checkpoint.folder],
        max_shard_size=shard_limit,
        overwrite=overwrite,
        progress=progress,
        desc="apply",
    )
