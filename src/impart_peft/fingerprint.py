"""A cheap fingerprint of the base weights an adapter was compressed against.

For each compressed matrix, a few elements at fixed positions spread over the tensor (as Python floats). Loading
compares them to the model's with a tolerance loose enough for a base loaded in another dtype (bf16 vs fp32) and
tight enough that another model, or another checkpoint of the same architecture, fails.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FINGERPRINT_SAMPLES", "check_fingerprint", "weight_fingerprint"]

FINGERPRINT_SAMPLES = 8
_RTOL = 2e-2
_ATOL = 1e-6


def weight_fingerprint(weight: torch.Tensor) -> list[float]:
    """``FINGERPRINT_SAMPLES`` elements of ``weight`` at evenly spaced flat positions, as floats."""
    flat = weight.detach().reshape(-1)
    positions = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES).round().long()
    # float32 linspace rounds the last position up past the end for tensors over 2**24 elements (a 32000 x 4096
    # embedding); clamping keeps every other position, hence every fingerprint already saved, unchanged.
    positions = positions.clamp_(max=flat.numel() - 1).to(flat.device)
    return [float(x) for x in flat[positions].float().cpu()]


def _readable_weight(module: nn.Module) -> torch.Tensor | None:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = getattr(base, "weight", None)
    if weight is None:
        return None
    if weight.device.type != "meta":
        return weight
    # accelerate's offload keeps the real tensor in the hook's weights map (CPU memory or a memory-mapped file).
    weights_map = getattr(getattr(base, "_hf_hook", None), "weights_map", None)
    if weights_map is not None:
        try:
            return weights_map["weight"]
        except (KeyError, TypeError):
            return None
    return None


def check_fingerprint(model: nn.Module, fingerprint: dict[str, list[float]]) -> list[str]:
    """Names of the modules whose sampled weights differ from ``fingerprint`` (modules it cannot read are skipped)."""
    mismatched = []
    for name, expected in fingerprint.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            mismatched.append(name)
            continue
        weight = _readable_weight(module)
        if weight is None:
            continue
        actual = torch.tensor(weight_fingerprint(weight), dtype=torch.float64)
        if not torch.allclose(actual, torch.tensor(expected, dtype=torch.float64), rtol=_RTOL, atol=_ATOL):
            mismatched.append(name)
    return mismatched
