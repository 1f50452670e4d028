"""Checks of a saved ImPart adapter's files, run before anything is injected into a model."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

__all__ = [
    "ADAPTER_FORMAT_VERSION",
    "ADAPTER_WEIGHTS_NAME",
    "expected_adapter_tensors",
    "read_safetensors_header",
    "validate_adapter_folder",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Version 2: exact-count masks, ``impart_keep_count (2, r)`` on disk (version 1, never released, stored Bernoulli
# keep thresholds). Bump it whenever the tensors on disk, or how masks are regenerated from them, change.
ADAPTER_FORMAT_VERSION = 2
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64"}


def read_safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that the file holds every byte it announces.

    Raises:
        ValueError: the file is truncated or is not a safetensors file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is truncated or corrupt: {size} bytes, not a safetensors file")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise ValueError(f"{path} is truncated or corrupt: its header announces {header_length} bytes")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is truncated or corrupt: unreadable header ({error})") from None
    data_end = max(
        (entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"), default=0
    )
    if 8 + header_length + data_end > size:
        raise ValueError(
            f"{path} is truncated or corrupt: it holds {size} bytes but its tensors need {8 + header_length + data_end}"
            " (an interrupted download or copy: fetch it again)"
        )
    return header


def expected_adapter_tensors(module_meta: dict[str, dict[str, Any]]) -> dict[str, tuple[str, list[int]]]:
    """Saved key -> (safetensors dtype, shape) of every tensor an adapter with ``module_meta`` must hold."""
    expected = {}
    for name, meta in module_meta.items():
        prefix = f"base_model.model.{name}."
        rank = int(meta.get("rank", 0))
        if meta.get("kind") in ("linear", "conv1d", "embedding") and rank > 0:
            quantized = meta.get("quantized")
            if quantized is not None:  # ImPart-QT: packed uint8 codes and float16 scales instead of values
                for factor in ("u", "v"):
                    expected[prefix + f"impart_{factor}_codes"] = ("U8", [int(quantized[f"{factor}_bytes"])])
                    expected[prefix + f"impart_{factor}_scales"] = (
                        "F16",
                        [int(quantized[f"{factor}_groups"])],
                    )
            else:
                value_dtype = _DTYPE_NAMES.get(meta.get("dtype", "float32"), meta.get("dtype"))
                expected[prefix + "impart_u_values"] = (value_dtype, [int(meta["u_count"])])
                expected[prefix + "impart_v_values"] = (value_dtype, [int(meta["v_count"])])
            expected[prefix + "impart_singular_values"] = ("F32", [rank])
            expected[prefix + "impart_keep_count"] = ("I32", [2, rank])
        vector_dtype = _DTYPE_NAMES.get(meta.get("vector_dtype", "float32"))
        for param_name, length in meta.get("vectors", {}).items():
            expected[prefix + f"impart_delta_{param_name}"] = (vector_dtype, [int(length)])
    return expected


def validate_adapter_folder(folder: str, module_meta: dict[str, dict[str, Any]]) -> None:
    """Check that ``folder``'s adapter weights exist, are complete, and hold what ``module_meta`` announces.

    Raises:
        ValueError: naming the missing file, the truncation, or the first missing / mismatched tensor.
    """
    path = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder} has adapter_config.json but no {ADAPTER_WEIGHTS_NAME} (the adapter weights): the copy or "
            "upload is incomplete"
        )
    header = read_safetensors_header(path)
    for key, (dtype, shape) in expected_adapter_tensors(module_meta).items():
        entry = header.get(key)
        if entry is None:
            raise ValueError(f"{path} is truncated or corrupt: tensor {key!r} is missing")
        if entry["dtype"] != dtype or list(entry["shape"]) != shape:
            raise ValueError(
                f"{path} is truncated or corrupt: {key!r} is {entry['dtype']} {entry['shape']}, adapter_config.json "
                f"announces {dtype} {shape}"
            )
