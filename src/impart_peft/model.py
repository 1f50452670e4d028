"""``ImPartModel``: the PEFT tuner that injects ImPart layers (modelled on ``peft/tuners/lora/model.py``)."""

from __future__ import annotations

import weakref

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import ImPartConfig
from .layer import IMPART_BUFFER_NAMES, ImPartLayer, layer_class_for
from .validation import validate_adapter

__all__ = ["ImPartModel"]


class ImPartModel(BaseTuner):
    """Injects ImPart layers into a base model, one per module listed in ``config.module_meta``.

    Normally created by PEFT (``PeftModel.from_pretrained``, ``get_peft_model``) or transformers
    (``model.load_adapter``); :func:`impart_peft.from_finetuned` builds the config.
    """

    prefix: str = "impart_"
    tuner_layer_cls = ImPartLayer
    target_module_mapping: dict = {}

    # ------------------------------------------------------------------ checks before anything is injected
    def _prepare_adapter_config(self, peft_config: ImPartConfig, model_config: dict) -> ImPartConfig:
        if not isinstance(peft_config, ImPartConfig):
            raise TypeError(
                f"ImPartModel needs an ImPartConfig, got {type(peft_config).__name__}: load that adapter with its "
                "own PEFT method"
            )
        if not peft_config.module_meta:
            raise ValueError(
                "This ImPartConfig has no module_meta: an ImPart adapter is made from a fine-tune, with "
                "impart_peft.from_finetuned(base, finetuned, config) or `impart compress`, not trained from scratch"
            )
        # The config's own fields and the base (module names, kinds, shapes, fingerprint): the part of
        # validate_adapter that needs no file, here because every path that injects an adapter comes through here
        # (the file itself was checked before, by ImPartConfig.from_pretrained or the load_adapter guard).
        validate_adapter(peft_config, None, self.model)
        # module_meta is the list of targets; target_modules stays None so that PEFT's save does not mistake the
        # compressed embeddings / head for trainable embeddings and write the full base matrices into the adapter.
        peft_config.target_modules = None
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: ImPartConfig, key: str) -> bool:
        return key in peft_config.module_meta

    # ------------------------------------------------------------------ injection
    def _create_and_replace(
        self,
        peft_config: ImPartConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        meta = peft_config.module_meta[current_key]
        if isinstance(target, ImPartLayer):
            target.update_layer(adapter_name, current_key, meta, peft_config.seed)
            new_module = target
        else:
            layer_cls = layer_class_for(target, meta["kind"])
            new_module = layer_cls(target, adapter_name, current_key, meta, peft_config.seed)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            setattr(parent, target_name, new_module)
        if meta["kind"] == "tied":
            new_module.set_tied_source(adapter_name, _TiedSource(self.model, meta["tied_to"]))
        new_module._move_adapter_to_device_of_base_layer(adapter_name)
        self._keep_adapter_off_disk(new_module, current_key)

    def _keep_adapter_off_disk(self, layer: ImPartLayer, module_name: str) -> None:
        """Map this layer's adapter tensors to its execution device in ``hf_device_map``.

        transformers' ``load_adapter`` places every loaded tensor by the base model's ``hf_device_map``; for a
        module mapped to ``"disk"`` it would write the adapter tensors to the offload folder, where nothing ever
        reads them back (accelerate's hooks only know the base weights). They are small, so they stay in memory on
        the device the layer computes on.
        """
        device_map = getattr(self.model, "hf_device_map", None)
        if not isinstance(device_map, dict) or "disk" not in device_map.values():
            return
        device = layer._base_device()
        target = device.index if device.type == "cuda" and device.index is not None else str(device)
        for name in (*layer.adapter_layer_names, *IMPART_BUFFER_NAMES):
            device_map[f"{module_name}.{name}"] = target

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # A compressed fine-tune is for inference: nothing is trainable (the base stays frozen too).
        for param in model.parameters():
            param.requires_grad = False

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Keep the stored dtypes: the factors are rebuilt in float32 whatever they are stored in.
        return

    def _check_merge_allowed(self) -> None:
        # Tied embeddings are handled: the head borrows the embedding's delta and the shared weight is merged once.
        return

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(enabled=False)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(enabled=True)

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, ImPartLayer):
                module.enable_adapters(enabled)

    def clear_cache(self) -> None:
        """Drop every rebuilt factor cache (they are rebuilt on the next forward)."""
        for module in self.model.modules():
            if isinstance(module, ImPartLayer):
                module.clear_cache()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "cat",
        svd_rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of loaded ImPart adapters (as PEFT's LoRA method of that name):
        ``"cat"`` (exact), ``"svd"`` and the ``*_svd`` TIES / DARE / magnitude variants. See
        :func:`impart_peft.merging.add_weighted_adapter`."""
        from .merging import add_weighted_adapter

        add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, svd_rank, density, majority_sign_method
        )

    def _unload_and_optionally_merge(self, *args, **kwargs):
        self.clear_cache()
        return super()._unload_and_optionally_merge(*args, **kwargs)


class _TiedSource:
    """Finds, when needed, the ImPart layer of the embedding a tied output head shares its delta with."""

    def __init__(self, root: nn.Module, name: str) -> None:
        self._root = weakref.ref(root)
        self.name = name

    def __call__(self) -> ImPartLayer | None:
        root = self._root()
        if root is None:
            return None
        try:
            module = root.get_submodule(self.name)
        except AttributeError:
            return None
        return module if isinstance(module, ImPartLayer) else None
