"""What an ImPart adapter folder holds, per module: shapes, kept pairs, stored values, compression ratios. Read from
its config and the safetensors header alone: no tensor is loaded. Backs ``impart inspect``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_io import AdapterTensors, load_adapter_config, resolve_folder
from .config import ImPartConfig
from .filenames import ADAPTER_PREFIX
from .modelcard import SETTINGS_KEYS
from .safetensors_io import itemsize

__all__ = ["AdapterSummary", "ModuleSummary", "inspect_adapter"]


@dataclass
class ModuleSummary:
    """One row of ``impart inspect``."""

    name: str
    kind: str  # "linear" | "conv1d" | "embedding" | "tied" | "vector"
    shape: tuple[int, ...]  # the compressed matrix (m, n), or the vector's (length,)
    dtype: str  # the fine-tune's dtype (reference of the on-disk ratio)
    rank: int  # kept singular pairs r
    full_rank: int  # min(m, n) (0 for vectors and tied heads)
    matrix_values: int  # m * n of the dense matrix delta (0 if none)
    factor_values: int  # kept U and V values (what the compression ratio budgets)
    stored_values: int  # every stored value: factors, singular values, dense vector deltas
    dense_bytes: int  # the dense deltas this module replaces, in the fine-tune's dtype
    stored_bytes: int  # bytes of this module's tensors in the file
    tied_to: str | None = None
    factor_bits: int | None = None  # ImPart-QT only: bits of the packed codes and their scales
    # target_size / "auto" only: the compression_ratio, pre_prune_ratio and importance_exponent this matrix was
    # compressed with, as module_meta records them (None: the config's, for every matrix)
    settings: dict[str, float | None] | None = None

    @property
    def nominal_ratio(self) -> float | None:
        """Dense matrix values / kept factor values: the quantity ``compression_ratio`` sets (``None`` if no matrix).
        For ImPart-QT, in bits: dense matrix bits in the fine-tune's dtype / bits of the codes and scales."""
        if self.factor_bits:
            return self.matrix_values * itemsize(getattr(torch, self.dtype)) * 8 / self.factor_bits
        return self.matrix_values / self.factor_values if self.factor_values else None

    @property
    def disk_ratio(self) -> float | None:
        """Dense bytes / bytes on disk (``None`` when nothing is stored)."""
        return self.dense_bytes / self.stored_bytes if self.stored_bytes else None


@dataclass
class AdapterSummary:
    """What ``impart inspect`` reports about an adapter folder."""

    folder: Path
    config: ImPartConfig
    modules: list[ModuleSummary] = field(default_factory=list)
    file_bytes: int = 0  # size of adapter_model.safetensors, header included
    other_tensors: dict[str, int] = field(default_factory=dict)  # non-ImPart tensors in the file -> bytes

    @property
    def matrix_values(self) -> int:
        return sum(m.matrix_values for m in self.modules)

    @property
    def factor_values(self) -> int:
        return sum(m.factor_values for m in self.modules)

    @property
    def stored_values(self) -> int:
        return sum(m.stored_values for m in self.modules)

    @property
    def dense_bytes(self) -> int:
        return sum(m.dense_bytes for m in self.modules)

    @property
    def nominal_ratio(self) -> float | None:
        """Dense matrix values / kept factor values over every compressed matrix (in bits for ImPart-QT)."""
        if any(m.factor_bits for m in self.modules):
            dense = sum(m.matrix_values * itemsize(getattr(torch, m.dtype)) * 8 for m in self.modules)
            stored = sum(
                m.factor_bits or m.factor_values * itemsize(getattr(torch, m.dtype)) * 8 for m in self.modules
            )
            return dense / stored if stored else None
        return self.matrix_values / self.factor_values if self.factor_values else None

    @property
    def disk_ratio(self) -> float | None:
        """Dense deltas of every covered parameter, in the fine-tune's dtype / the adapter file's size."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else None


def _recorded_settings(meta: dict) -> dict[str, float | None] | None:
    return (
        {key: meta.get(key) for key in SETTINGS_KEYS} if any(key in meta for key in SETTINGS_KEYS) else None
    )


def inspect_adapter(adapter: str | os.PathLike) -> AdapterSummary:
    """Per-module shapes, kept pairs, stored values and ratios of an ImPart adapter (read from its config and the
    safetensors header: no tensor is loaded)."""
    folder = resolve_folder(adapter, "adapter", adapter=True)
    config = load_adapter_config(folder)
    tensors = AdapterTensors(folder)
    bytes_by_module: dict[str, int] = {}
    values_by_module: dict[str, int] = {}
    other: dict[str, int] = {}
    for key, entry in tensors.header.items():
        start, end = entry["data_offsets"]
        module, _, param = key.removeprefix(ADAPTER_PREFIX).rpartition(".")
        if module not in config.module_meta or not param.startswith("impart_"):
            other[key] = end - start
            continue
        bytes_by_module[module] = bytes_by_module.get(module, 0) + end - start
        # Keep counts are bookkeeping, not values; ImPart-QT's codes are counted from u_count / v_count below.
        if param not in (
            "impart_keep_count",
            "impart_u_codes",
            "impart_v_codes",
            "impart_u_scales",
            "impart_v_scales",
        ):
            values_by_module[module] = values_by_module.get(module, 0) + math.prod(entry["shape"])
    matrix_dtypes = [m["dtype"] for m in config.module_meta.values() if "dtype" in m]
    default_dtype = max(sorted(set(matrix_dtypes)), key=matrix_dtypes.count) if matrix_dtypes else "float32"
    summary = AdapterSummary(folder, config, file_bytes=tensors.file.stat().st_size, other_tensors=other)
    for name, meta in config.module_meta.items():
        kind = meta["kind"]
        vectors = meta.get("vectors", {})
        dtype = meta.get("dtype", default_dtype)
        matrix_values = full_rank = 0
        if kind in ("linear", "conv1d", "embedding", "tied"):
            shape = tuple(meta["shape"])
            if kind != "tied":
                matrix_values, full_rank = math.prod(shape), min(shape)
        else:
            shape = tuple(vectors.values())[:1]
        dense_values = matrix_values + sum(vectors.values())
        quantized = meta.get("quantized")
        factor_bits = None
        if quantized is not None:
            factor_bits = 8 * (quantized["u_bytes"] + quantized["v_bytes"]) + 16 * (
                quantized["u_groups"] + quantized["v_groups"]
            )
            values_by_module[name] = values_by_module.get(name, 0) + meta["u_count"] + meta["v_count"]
        summary.modules.append(
            ModuleSummary(
                name=name,
                kind=kind,
                shape=shape,
                dtype=dtype,
                rank=int(meta.get("rank", 0)),
                full_rank=full_rank,
                matrix_values=matrix_values,
                factor_values=int(meta.get("u_count", 0)) + int(meta.get("v_count", 0)),
                stored_values=values_by_module.get(name, 0),
                dense_bytes=dense_values * itemsize(getattr(torch, dtype)),
                stored_bytes=bytes_by_module.get(name, 0),
                tied_to=meta.get("tied_to"),
                factor_bits=factor_bits,
                settings=_recorded_settings(meta),
            )
        )
    return summary
