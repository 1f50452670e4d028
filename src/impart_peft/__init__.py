"""impart-peft: ship a full fine-tune as a small PEFT adapter (ImPart, Yang et al. 2025).

Importing the package registers the ``IMPART`` adapter type with PEFT, so ``PeftModel.from_pretrained`` and
transformers' ``model.load_adapter`` read ImPart adapters like any other.
"""

from .allocation import Allocation, allocate_keep_prob, target_keep_fraction
from .baselines import dare_delta, lowrank_delta, magnitude_delta
from .checkpoints import apply_adapter, compress_checkpoints
from .compressor import from_finetuned
from .config import ImPartConfig
from .delta import CompressedDelta, compress_delta
from .hub import download_adapter, push_adapter, resolve_adapter
from .layer import ImPartEmbedding, ImPartLayer, ImPartLinear, ImPartVector
from .merging import merge_deltas, merge_finetunes, sparsify_delta
from .model import ImPartModel
from .quantization import QuantizationScheme, QuantizedDelta, compress_delta_quantized
from .registration import IMPART_PEFT_TYPE, register

register(ImPartConfig, ImPartModel)

__version__ = "0.1.0"

__all__ = [
    "IMPART_PEFT_TYPE",
    "Allocation",
    "CompressedDelta",
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
