"""ImPart adapter layers (modelled on ``peft/tuners/lora/layer.py``).

Every adapter of a layer holds the tensors of one :class:`~impart_peft.delta.CompressedDelta` as frozen
parameters, created with their final shapes from ``config.module_meta`` at injection time:

* ``impart_u_values[adapter]`` ``(u_count,)`` and ``impart_v_values[adapter]`` ``(v_count,)``: kept factor values,
* ``impart_singular_values[adapter]`` float32 ``(r,)``, ``impart_keep_count[adapter]`` int32 ``(2, r)`` (kept rows
  per column of U and of V),
* ``impart_delta_weight[adapter]`` / ``impart_delta_bias[adapter]``: dense deltas of 1-D parameters.

An ImPart-QT adapter (``meta["quantized"]``) holds, instead of the two value vectors, the packed uint8 codes
``impart_u_codes`` / ``impart_v_codes`` and the float16 scales ``impart_u_scales`` / ``impart_v_scales`` (buffers),
decoded on the layer's device when the factors are rebuilt (:mod:`impart_peft.quantization`).

The sparse factors ``Ũ (m, r)``, ``σ (r,)``, ``Ṽ (n, r)`` are rebuilt from the seed on first use and cached per
device and dtype (the cache is keyed on the parameters' identity and version, so loading new weights invalidates
it). The unmerged forward adds the low-rank product without materialising ``ΔW``; merged, the layer costs nothing.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .delta import CompressedDelta
from .quantization import QuantizedDelta

__all__ = ["ImPartEmbedding", "ImPartLayer", "ImPartLinear", "ImPartVector"]

_FACTOR_PARAMS = ("impart_u_values", "impart_v_values", "impart_singular_values", "impart_keep_count")
_QUANTIZED_PARAMS = (
    "impart_u_codes",
    "impart_v_codes",
    "impart_u_scales",
    "impart_v_scales",
    "impart_singular_values",
    "impart_keep_count",
)
# Integer (and ImPart-QT) tensors kept in BufferDicts: PEFT toggles requires_grad on everything in
# adapter_layer_names, which integer tensors do not allow.
IMPART_BUFFER_NAMES = (
    "impart_keep_count",
    "impart_u_codes",
    "impart_v_codes",
    "impart_u_scales",
    "impart_v_scales",
)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class ImPartLayer(BaseTunerLayer):
    """State and logic shared by every ImPart layer type."""

    adapter_layer_names = (
        "impart_u_values",
        "impart_v_values",
        "impart_singular_values",
        "impart_delta_weight",
        "impart_delta_bias",
    )
    # The integer keep counts live in a BufferDict: PEFT toggles requires_grad on everything in adapter_layer_names.
    other_param_names = (*IMPART_BUFFER_NAMES, "impart_meta", "impart_seed", "impart_module_name")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        # Integer keep counts cannot be Parameters (PEFT toggles requires_grad on adapter parameters).
        for name in IMPART_BUFFER_NAMES:
            setattr(self, name, BufferDict({}, persistent=True))
        self.impart_meta: dict[str, dict[str, Any]] = {}
        self.impart_seed: dict[str, int] = {}
        self.impart_module_name: dict[str, str] = {}
        # (adapter, device, dtype) -> (version key, (U_tilde, sigma, V_tilde)); plain dict, never saved
        self._impart_cache: dict[tuple, tuple] = {}
        # adapter -> (flat indices, original values) of the elements that float rounding would not restore
        self._impart_merge_patch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

    # ------------------------------------------------------------------ creation
    def update_layer(self, adapter_name: str, module_name: str, meta: dict[str, Any], seed: int) -> None:
        """Create the (zero) parameters of ``adapter_name`` with the shapes recorded in ``meta``."""
        dtype = getattr(torch, meta.get("dtype", "float32"))
        device = self._base_device()
        rank = int(meta.get("rank", 0))
        if meta.get("kind") in ("linear", "conv1d", "embedding") and rank > 0:
            weight_shape = tuple(self.get_base_layer().weight.shape)
            if tuple(meta["shape"]) != weight_shape:
                raise ValueError(
                    f"ImPart adapter for {module_name!r} was made for a weight of shape {tuple(meta['shape'])}, but "
                    f"this model's weight has shape {weight_shape}: load it on the base model it was compressed from"
                )
            quantized = meta.get("quantized")
            if quantized is not None:
                for factor in ("u", "v"):
                    getattr(self, f"impart_{factor}_codes")[adapter_name] = torch.zeros(
                        int(quantized[f"{factor}_bytes"]), dtype=torch.uint8, device=device
                    )
                    getattr(self, f"impart_{factor}_scales")[adapter_name] = torch.zeros(
                        int(quantized[f"{factor}_groups"]), dtype=torch.float16, device=device
                    )
            else:
                self.impart_u_values[adapter_name] = _frozen(
                    torch.zeros(meta["u_count"], dtype=dtype, device=device)
                )
                self.impart_v_values[adapter_name] = _frozen(
                    torch.zeros(meta["v_count"], dtype=dtype, device=device)
                )
            self.impart_singular_values[adapter_name] = _frozen(torch.zeros(rank, device=device))
            self.impart_keep_count[adapter_name] = torch.zeros((2, rank), dtype=torch.int32, device=device)
        for param_name, length in meta.get("vectors", {}).items():
            base_param = getattr(self.get_base_layer(), param_name, None)
            if base_param is None or base_param.shape != (length,):
                raise ValueError(
                    f"ImPart adapter for {module_name!r} holds a delta of {param_name!r} of length {length}, but "
                    f"this model's module has {None if base_param is None else tuple(base_param.shape)}"
                )
            store = self.impart_delta_weight if param_name == "weight" else self.impart_delta_bias
            vector_dtype = getattr(torch, meta.get("vector_dtype", "float32"))
            store[adapter_name] = _frozen(torch.zeros(length, dtype=vector_dtype, device=device))
        self.impart_meta[adapter_name] = meta
        self.impart_seed[adapter_name] = seed
        self.impart_module_name[adapter_name] = module_name
        self.set_adapter(self.active_adapters)

    def _base_device(self) -> torch.device:
        weight = getattr(self.get_base_layer(), "weight", None)
        if weight is None or weight.device.type == "meta":
            # accelerate's disk/CPU offload leaves the weight on "meta" and moves it in at forward time; the
            # execution device is what the adapter must follow.
            hook = getattr(self.get_base_layer(), "_hf_hook", None)
            execution_device = getattr(hook, "execution_device", None)
            if execution_device is not None:
                return torch.device(execution_device)
            return torch.device("cpu")
        return weight.device

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        # Unlike PEFT's default, never cast: the stored values keep their dtype (sigma stays float32), so the
        # rebuilt delta is the same whatever dtype the base model was loaded in.
        target = device if device is not None else self._base_device()
        for name in (*self.adapter_layer_names, *IMPART_BUFFER_NAMES):
            store = getattr(self, name)
            if adapter_name in store and store[adapter_name].device != target:
                if store[adapter_name].device.type == "meta":
                    continue
                moved = store[adapter_name].data.to(target)
                store[adapter_name] = moved if isinstance(store, BufferDict) else _frozen(moved)

    # ------------------------------------------------------------------ the delta
    def _kind(self, adapter: str) -> str:
        return self.impart_meta[adapter]["kind"]

    def _factor_source(self, adapter: str) -> ImPartLayer:
        return self

    def _has_matrix(self, adapter: str) -> bool:
        return adapter in self.impart_u_values or adapter in self.impart_u_codes

    def compressed_delta(self, adapter: str) -> CompressedDelta | QuantizedDelta | None:
        """The adapter's :class:`CompressedDelta` (views of the parameters), or ``None`` if it has no matrix.

        For an ImPart-QT adapter, a :class:`~impart_peft.quantization.QuantizedDelta` (same ``factors`` and
        ``reconstruct``; ``.dequantized()`` gives the :class:`CompressedDelta`).
        """
        source = self._factor_source(adapter)
        if not source._has_matrix(adapter):
            return None
        meta = source.impart_meta[adapter]
        if adapter in source.impart_u_codes:
            return QuantizedDelta.from_state_dict(
                {name.removeprefix("impart_"): getattr(source, name)[adapter] for name in _QUANTIZED_PARAMS},
                shape=tuple(meta["shape"]),
                quantized_meta=meta["quantized"],
                seed=source.impart_seed[adapter],
                name=source.impart_module_name[adapter],
            )
        return CompressedDelta(
            shape=tuple(meta["shape"]),
            singular_values=source.impart_singular_values[adapter].data,
            keep_count=source.impart_keep_count[adapter],
            u_values=source.impart_u_values[adapter].data,
            v_values=source.impart_v_values[adapter].data,
            seed=source.impart_seed[adapter],
            name=source.impart_module_name[adapter],
        )

    def _factors(self, adapter: str, device: torch.device, dtype: torch.dtype):
        """Cached ``(U_tilde (m, r), sigma (r,), V_tilde (n, r))`` in ``dtype`` on ``device``, or ``None``."""
        source = self._factor_source(adapter)
        if not source._has_matrix(adapter):
            return None
        names = _QUANTIZED_PARAMS if adapter in source.impart_u_codes else _FACTOR_PARAMS
        params = [getattr(source, name)[adapter] for name in names]  # parameters and buffers
        version = tuple((id(p), p._version, p.data_ptr()) for p in params)
        key = (adapter, device, dtype)
        cached = source._impart_cache.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        # Rebuild in float32 then cast once: the same factors whatever the compute dtype.
        u, sigma, v = source.compressed_delta(adapter).factors(torch.float32, device)
        factors = (u.to(dtype), sigma.to(dtype), v.to(dtype))
        source._impart_cache[key] = (version, factors)
        return factors

    def clear_cache(self, adapter: str | None = None) -> None:
        """Drop the rebuilt factors (of one adapter, or all)."""
        for key in list(self._impart_cache):
            if adapter is None or key[0] == adapter:
                del self._impart_cache[key]

    def get_delta_weight(self, adapter: str) -> torch.Tensor | None:
        """Dense ``ΔW_c`` in float32, shaped like the base layer's weight (``None`` if only vectors changed)."""
        weight = self.get_base_layer().weight
        device = weight.device if weight.device.type != "meta" else self._base_device()
        factors = self._factors(adapter, device, torch.float32)
        if factors is None:
            return None
        u, sigma, v = factors
        return (u * sigma) @ v.t()

    def _vector_deltas(self, adapter: str) -> dict[str, torch.Tensor]:
        out = {}
        if adapter in self.impart_delta_weight:
            out["weight"] = self.impart_delta_weight[adapter]
        if adapter in self.impart_delta_bias:
            out["bias"] = self.impart_delta_bias[adapter]
        return out

    # ------------------------------------------------------------------ merging
    def _merges_weight(self, adapter: str) -> bool:
        return True

    def _merge_updates(self, adapter: str) -> dict[str, torch.Tensor]:
        """Base parameter name -> the delta that merging ``adapter`` adds to it."""
        updates = dict(self._vector_deltas(adapter))
        if self._merges_weight(adapter):
            delta = self.get_delta_weight(adapter)
            if delta is not None:
                updates["weight"] = delta
        return updates

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas to the base weights in place.

        Float rounding means ``(W + ΔW) - ΔW`` is not always ``W``; the few elements where it is not are remembered
        (indices and original values, ~2% of a layer) so that :meth:`unmerge` restores the base bit for bit.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.impart_meta:
                continue
            updates = self._merge_updates(adapter)
            patches = {}
            new_values = {}
            for param_name, delta in updates.items():
                param = getattr(base, param_name)
                original = param.data
                work = torch.promote_types(torch.float32, delta.dtype)
                delta = delta.to(device=original.device, dtype=work)
                merged = (original.to(work) + delta).to(original.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights of adapter {adapter!r}: it is broken"
                    )
                restored = (merged.to(work) - delta).to(original.dtype)
                wrong = (restored != original).flatten().nonzero().flatten()
                patches[param_name] = (wrong, original.flatten()[wrong].clone())
                new_values[param_name] = merged
            for param_name, merged in new_values.items():
                getattr(base, param_name).data = merged
            self._impart_merge_patch[adapter] = patches
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters' deltas, restoring the base weights exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.impart_meta:
                continue
            updates = self._merge_updates(adapter)
            patches = self._impart_merge_patch.pop(adapter, {})
            for param_name, delta in updates.items():
                param = getattr(base, param_name)
                current = param.data
                work = torch.promote_types(torch.float32, delta.dtype)
                restored = (current.to(work) - delta.to(current.device, work)).to(current.dtype)
                if param_name in patches:
                    indices, values = patches[param_name]
                    restored.view(-1)[indices] = values
                param.data = restored

    # ------------------------------------------------------------------ PEFT bookkeeping
    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.clear_cache(adapter_name)
        self._impart_merge_patch.pop(adapter_name, None)

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.impart_meta]

    def _plain_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """Base forward when no unmerged adapter applies (unmerging first if adapters are disabled)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return None

    def __repr__(self) -> str:
        return "impart." + super().__repr__()


class _ImPartModule(nn.Module, ImPartLayer):
    """The constructor every ImPart layer type shares: wrap ``base_layer`` and create ``adapter_name``'s tensors."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, module_name: str, meta: dict, seed: int, **kwargs
    ) -> None:
        super().__init__()
        ImPartLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self._init_state()
        self.update_layer(adapter_name, module_name, meta, seed)

    def _init_state(self) -> None:
        """State a layer type needs before its first adapter is created (none by default)."""


class ImPartLinear(_ImPartModule):
    """ImPart on ``nn.Linear`` (``kind="linear"``, weight ``(out, in)``), transformers' ``Conv1D``
    (``kind="conv1d"``, weight ``(in, out)``) or an output head tied to an ImPart embedding (``kind="tied"``)."""

    def _init_state(self) -> None:
        self._tied_sources: dict[str, Any] = {}

    def set_tied_source(self, adapter: str, source: Any) -> None:
        """Borrow the factors of ``source()`` (a callable returning the embedding's ImPart layer) for ``adapter``:
        an output head that shares the input embedding matrix. Resolved lazily, so injection order does not matter."""
        self._tied_sources[adapter] = source

    def _factor_source(self, adapter: str) -> ImPartLayer:
        if self.impart_meta[adapter]["kind"] == "tied":
            source = self._tied_sources.get(adapter)
            source = source() if source is not None else None
            if source is None:
                raise RuntimeError(
                    f"ImPart adapter {adapter!r}: the output head is tied to "
                    f"{self.impart_meta[adapter]['tied_to']!r}, which is not an ImPart layer of this model"
                )
            return source
        return self

    def _merges_weight(self, adapter: str) -> bool:
        # A tied head shares its weight tensor with the embedding, whose layer merges it once for both.
        return self.impart_meta[adapter]["kind"] != "tied"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._plain_forward(x, *args, **kwargs)
        if result is not None:
            return result
        result = self.base_layer(x, *args, **kwargs)
        previous_dtype = result.dtype
        for adapter in self._active():
            factors = self._factors(adapter, x.device, x.dtype if x.is_floating_point() else torch.float32)
            if factors is not None:
                u, sigma, v = factors
                if self._kind(adapter) == "conv1d":
                    result = result + ((x @ u) * sigma) @ v.t()
                else:  # weight (out, in) = U diag(sigma) Vᵀ, so x @ Wᵀ gains x @ V diag(sigma) Uᵀ
                    result = result + ((x @ v) * sigma) @ u.t()
            if adapter in self.impart_delta_bias:
                result = result + self.impart_delta_bias[adapter].to(result.dtype)
        return result.to(previous_dtype)


class ImPartEmbedding(_ImPartModule):
    """ImPart on ``nn.Embedding``: adds rows of the rebuilt delta, ``(Ũ[ids] * σ) @ Ṽᵀ``."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._plain_forward(x, *args, **kwargs)
        if result is not None:
            return result
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self._active():
            factors = self._factors(adapter, result.device, result.dtype)
            if factors is not None:
                u, sigma, v = factors
                result = result + (F.embedding(x, u) * sigma) @ v.t()
        return result


class ImPartVector(_ImPartModule):
    """ImPart on a module whose changed parameters are 1-D (a norm): dense deltas of ``weight`` / ``bias``."""

    def _merges_weight(self, adapter: str) -> bool:
        return False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._plain_forward(x, *args, **kwargs)
        if result is not None:
            return result
        deltas: dict[str, list[torch.Tensor]] = {}
        for adapter in self._active():
            for param_name, delta in self._vector_deltas(adapter).items():
                deltas.setdefault(param_name, []).append(delta)
        if not deltas:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        hook = getattr(base, "_hf_hook", None)
        offloaded = hook is not None and getattr(hook, "offload", False)
        if offloaded:
            # accelerate offload: the weights only exist between the hook's pre_forward and post_forward, so run
            # those steps here around the swapped parameters (the hook would otherwise overwrite them).
            args, kwargs = hook.pre_forward(base, x, *args, **kwargs)
            x, args = args[0], args[1:]
            forward = base._old_forward
        else:
            forward = base.forward
        originals = {name: base._parameters[name] for name in deltas}
        try:
            for name, param_deltas in deltas.items():
                current = originals[name]
                # Sum in the delta's (exact) precision so the result is the fine-tune's parameter bit for bit.
                work = torch.promote_types(current.dtype, param_deltas[0].dtype)
                value = current.to(work)
                for delta in param_deltas:
                    value = value + delta.to(current.device, work)
                base._parameters[name] = nn.Parameter(value.to(current.dtype), requires_grad=False)
            output = forward(x, *args, **kwargs)
        finally:
            base._parameters.update(originals)
        return hook.post_forward(base, output) if offloaded else output


def layer_class_for(base_layer: nn.Module, kind: str) -> type[ImPartLayer]:
    """The ImPart layer class for a base module of ``kind`` (checking that the module really is of that kind)."""
    expected = {
        "linear": nn.Linear,
        "tied": nn.Linear,
        "conv1d": Conv1D,
        "embedding": nn.Embedding,
    }.get(kind)
    if kind == "vector":
        return ImPartVector
    if expected is None:
        raise ValueError(f"unknown ImPart module kind {kind!r}")
    if not isinstance(base_layer, expected):
        raise TypeError(
            f"ImPart module kind {kind!r} needs a {expected.__name__}, got {type(base_layer).__name__}: "
            "the adapter was made for another architecture"
        )
    return ImPartEmbedding if kind == "embedding" else ImPartLinear
