"""impart-peft: ship a full fine-tune as a small PEFT adapter (ImPart, Yang et al. 2025)."""

from .allocation import Allocation, allocate_keep_prob, target_keep_fraction
from .baselines import dare_delta, lowrank_delta, magnitude_delta
from .delta import CompressedDelta, compress_delta

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "CompressedDelta",
    "__version__",
    "allocate_keep_prob",
    "compress_delta",
    "dare_delta",
    "lowrank_delta",
    "magnitude_delta",
    "target_keep_fraction",
]
