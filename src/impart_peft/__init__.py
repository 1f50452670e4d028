"""impart-peft: ship a full fine-tune as a small PEFT adapter (ImPart, Yang et al. 2025).

Importing the package registers the ``IMPART`` adapter type with PEFT, so ``PeftModel.from_pretrained`` and
transformers' ``model.load_adapter`` read ImPart adapters like any other. It does so without importing PEFT or
transformers itself: the registration runs when PEFT is imported (at once if it already is; see
:mod:`impart_peft._autoload`), and the names below are imported on first use, so that the pure math
(:mod:`impart_peft.delta`, allocation, masks, baselines) imports without them. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _autoload
from ._version import __version__

# public name -> the module that defines it, imported on first access
_EXPORTS = {
    "Allocation": "allocation",
    "allocate_keep_prob": "allocation",
    "target_keep_fraction": "allocation",
    "dare_delta": "baselines",
    "lowrank_delta": "baselines",
    "magnitude_delta": "baselines",
    "CompressedDelta": "delta",
    "compress_delta": "delta",
    "QuantizationScheme": "quantization",
    "QuantizedDelta": "quantization",
    "compress_delta_quantized": "quantization",
    "IMPART_PEFT_TYPE": "registration",
    "register": "registration",
    "ImPartConfig": "config",
    "ImPartEmbedding": "layer",
    "ImPartLayer": "layer",
    "ImPartLinear": "layer",
    "ImPartVector": "layer",
    "ImPartModel": "model",
    "from_finetuned": "compressor",
    "merge_deltas": "merging",
    "merge_finetunes": "merging",
    "sparsify_delta": "merging",
    "apply_adapter": "checkpoint_apply",
    "compress_checkpoints": "checkpoint_compress",
    "download_adapter": "hub",
    "push_adapter": "hub",
    "resolve_adapter": "hub",
}

__all__ = [
    "Allocation",
    "CompressedDelta",
    "IMPART_PEFT_TYPE",
    "ImPartConfig",
    "ImPartEmbedding",
    "ImPartLayer",
    "ImPartLinear",
    "ImPartModel",
    "ImPartVector",
    "QuantizationScheme",
    "QuantizedDelta",
    "__version__",
    "allocate_keep_prob",
    "apply_adapter",
    "compress_checkpoints",
    "compress_delta",
    "compress_delta_quantized",
    "dare_delta",
    "download_adapter",
    "from_finetuned",
    "lowrank_delta",
    "magnitude_delta",
    "merge_deltas",
    "merge_finetunes",
    "push_adapter",
    "resolve_adapter",
    "sparsify_delta",
    "target_keep_fraction",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


_autoload.install()
