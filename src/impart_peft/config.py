"""``ImPartConfig``: the PEFT config of an ImPart-compressed fine-tune."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from .adapter_io import ADAPTER_FORMAT_VERSION
from .allocation import (
    ALLOCATION_RULES,
    check_compression_ratio,
    check_importance_exponent,
    check_pre_prune_ratio,
)
from .budget import AUTO, SIZE_RULES, parse_target_size
from .quantization import QuantizationScheme
from .registration import IMPART_PEFT_TYPE

__all__ = ["ImPartConfig"]


@dataclass
class ImPartConfig(PeftConfig):
    """Configuration of an ImPart adapter: a full fine-tune stored as sparse SVD factors of its deltas.

    The compression knobs (read by :func:`impart_peft.from_finetuned` and ``impart compress``):

    Args:
        compression_ratio: dense delta values / stored factor values, ``> 1`` (the paper's CR; 16 keeps ~96% of a
            7B fine-tune's quality in the paper). ``None`` keeps every element of every non-zero singular pair:
            the merged model is the fine-tune to float error (for checks, not for shipping).
        pre_prune_ratio: beta in ``[0, 1)``: the fraction of the smallest singular pairs dropped whole, or
            ``"auto"``: chosen per matrix from its spectrum (no data; docs/algorithm.md section 12).
        importance_exponent: C ``> 0`` in ``p_k = gamma * (1 - (sigma_k / sigma_1) ** C)``, or ``"auto"``.
        target_size: a cap on the whole adapter instead of one ratio for every matrix: bytes (``30_000_000``), a
            size (``"30MB"``, ``"1.5GiB"``) or a global ratio (``"16x"``: the file at most 1/16 of the dense deltas
            of the compressed matrices). ``adapter_model.safetensors`` never exceeds it; the budget is spread over
            the matrices by their spectra, and each matrix's ratio (and beta, C) is recorded in ``module_meta``.
            ``compression_ratio`` is then ignored for the allocation and overwritten with the model-wide ratio
            achieved. ``None`` (default): every matrix at ``compression_ratio``.
        size_rule: how ``target_size`` is spread over the matrices: ``"uniform"`` (default: the one ratio, the
            smallest whose file fits) or ``"spectral"`` (each matrix's ratio from its spectrum, by the expected
            damage of docs/algorithm.md section 12, within a factor 2 of the uniform ratio).
        allocation: the allocation rule: ``"paper"`` (default: the authors' code, gamma fixed, whole pairs dropped
            from the end, every kept pair at ``q_k >= 1 - gamma``) or ``"rescaled"`` (this project's first reading:
            gamma re-solved so the mean is exact; it can keep pairs at tiny ``q_k``). See docs/algorithm.md.
        seed: non-negative integer; the masks are a pure function of (seed, module name, factor, column, row).
        target_modules: module names to compress, or ``None`` for every module a full fine-tune changes: each
            ``nn.Linear`` / ``Conv1D``, the input embeddings and the output head, and the 1-D parameters of the
            other modules (norms), which are stored densely. Once compressed, ``module_meta`` lists the targets and
            this field is cleared (PEFT would otherwise save the whole base embedding matrices with the adapter).
        include_embeddings: ``False`` leaves the input embeddings and the output head out (they stay the base's).
        svd_dtype: ``"float32"`` (default) or ``"float64"``: the precision of the SVD.
        base_check: what to do when the base model does not match ``base_fingerprint`` at load time: ``"error"``
            (default), ``"warn"`` or ``"ignore"``. The environment variable ``IMPART_BASE_CHECK`` overrides it.
        quantization: ``None`` (default: values stored in the fine-tune's dtype) or ImPart-QT's scheme, e.g.
            ``{"bits": [8, 4, 3, 2], "fractions": [...], "group_size": 128}`` (see
            :class:`~impart_peft.quantization.QuantizationScheme` and docs/quantization.md): the kept factor values
            are stored as packed integers, more bits for the pairs with larger singular values, and
            ``compression_ratio`` counts bits (dense delta bits in the fine-tune's dtype / bits of codes and scales).

    Filled in by the compressor (not by hand):

    Args:
        module_meta: per module name, what lets every adapter parameter be created with its final shape at
            injection time, before any weight is read (the role of LoRA's ``rank_pattern``)::

                {"kind": "linear" | "conv1d" | "embedding" | "vector" | "tied",
                 "shape": [m, n],        # shape of the compressed weight tensor
                 "rank": r,              # stored singular pairs
                 "u_count": int, "v_count": int,  # stored factor values
                 "dtype": "bfloat16",    # dtype of the stored values (and of the fine-tune)
                 "compression_ratio": 21.3, "pre_prune_ratio": 0.6, "importance_exponent": 0.5,
                                         # target_size or "auto" only: what this matrix was compressed with
                 "vectors": {"bias": n}, # 1-D parameters stored densely, with their length
                 "tied_to": "model.embed_tokens",  # "tied" only: the module whose delta this one shares
                 "quantized": {"bits": [[8, 1], [2, 5]], "group_size": 128,  # ImPart-QT only: bits per pair
                               "u_bytes": int, "v_bytes": int, "u_groups": int, "v_groups": int}}
        base_fingerprint: per module name, a few sampled base weights (the base check).
        format_version: the on-disk format of the adapter's tensors (:data:`~impart_peft.adapter_io.ADAPTER_FORMAT_VERSION`),
            recorded by the compressor; a loader refuses a compressed adapter of another version.
        finetuned_model_name_or_path: where the fine-tune came from (for the model card).
        integrity: :func:`impart_peft.validation.adapter_digest` of ``module_meta``'s names and per-module digests,
            recorded by the compressor and checked on load (a module added, removed or renamed is refused; see
            docs/security.md). ``None`` (merged adapters, older files): not checked.
    """

    compression_ratio: float | None = field(default=16.0, metadata={"help": "dense values / stored values"})
    pre_prune_ratio: float | str = field(
        default=0.8, metadata={"help": "beta: fraction of pairs dropped whole, or 'auto'"}
    )
    importance_exponent: float | str = field(
        default=1.0, metadata={"help": "C: exponent of sigma_k / sigma_1, or 'auto'"}
    )
    target_size: int | str | None = field(
        default=None, metadata={"help": "cap on the adapter file: bytes, '30MB', or a global ratio '16x'"}
    )
    size_rule: Literal["uniform", "spectral"] = field(
        default="uniform", metadata={"help": "how target_size is spread over the matrices"}
    )
    allocation: Literal["paper", "rescaled"] = field(default="paper", metadata={"help": "allocation rule"})
    seed: int = field(default=0, metadata={"help": "seed of the deterministic masks"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to compress"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to leave out"})
    include_embeddings: bool = field(default=True, metadata={"help": "compress embeddings and output head"})
    svd_dtype: Literal["float32", "float64"] = field(default="float32", metadata={"help": "SVD precision"})
    base_check: Literal["error", "warn", "ignore"] = field(
        default="error", metadata={"help": "base mismatch"}
    )
    quantization: dict[str, Any] | None = field(default=None, metadata={"help": "ImPart-QT bit schedule"})
    module_meta: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "per-module shapes"}
    )
    base_fingerprint: dict[str, list[float]] = field(default_factory=dict, metadata={"help": "base samples"})
    finetuned_model_name_or_path: str | None = field(default=None, metadata={"help": "source fine-tune"})
    format_version: int | None = field(default=None, metadata={"help": "on-disk format of the tensors"})
    integrity: str | None = field(
        default=None, metadata={"help": "digest of module_meta's names and digests"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = IMPART_PEFT_TYPE
        check_compression_ratio(self.compression_ratio)
        if self.pre_prune_ratio != AUTO:
            check_pre_prune_ratio(self.pre_prune_ratio)
        if self.importance_exponent != AUTO:
            check_importance_exponent(self.importance_exponent)
        if self.target_size is not None:
            parse_target_size(self.target_size)
        if self.size_rule not in SIZE_RULES:
            raise ValueError(f"size_rule must be one of {SIZE_RULES}, got {self.size_rule!r}")
        if self.quantization is not None and self.planned and not self.module_meta:
            raise ValueError(
                "target_size and 'auto' pre_prune_ratio / importance_exponent are not supported with quantization "
                "(ImPart-QT) yet: give ImPart-QT a compression_ratio and fixed beta and C"
            )
        if self.allocation not in ALLOCATION_RULES:
            raise ValueError(f"allocation must be one of {ALLOCATION_RULES}, got {self.allocation!r}")
        if not self.module_meta:  # a config to compress with: what it will write is this version
            self.format_version = ADAPTER_FORMAT_VERSION
        elif self.format_version != ADAPTER_FORMAT_VERSION:
            found = (
                "no format version (written before impart-peft recorded one, with Bernoulli masks)"
                if self.format_version is None
                else f"format version {self.format_version!r}"
            )
            raise ValueError(
                f"this ImPart adapter has {found}, but this impart-peft reads format version "
                f"{ADAPTER_FORMAT_VERSION} (exact-count masks, keep counts on disk): its masks cannot be regenerated. "
                "Compress the fine-tune again with this version (from_finetuned or `impart compress`), or load it with "
                "the impart-peft release that wrote it"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.svd_dtype not in ("float32", "float64"):
            raise ValueError(f"svd_dtype must be 'float32' or 'float64', got {self.svd_dtype!r}")
        if self.base_check not in ("error", "warn", "ignore"):
            raise ValueError(f"base_check must be 'error', 'warn' or 'ignore', got {self.base_check!r}")
        scheme = QuantizationScheme.parse(self.quantization)
        self.quantization = scheme.to_dict() if scheme is not None else None
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules)

    @property
    def planned(self) -> bool:
        """``True`` when compression needs the first pass over the spectra: ``target_size`` or an ``"auto"``."""
        return self.target_size is not None or AUTO in (self.pre_prune_ratio, self.importance_exponent)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load ``adapter_config.json`` after checking it and its weights file (a Hub repo's files are fetched
        first) with :func:`impart_peft.validation.validate_adapter`, before anything is injected anywhere.

        Raises:
            ValueError: the folder holds another PEFT method's adapter.
            InvalidAdapterError: (a ``ValueError``) the config or the weights are not a valid ImPart adapter.
        """
        from .validation import (
            InvalidAdapterError,
            resolve_adapter_files,
            validate_adapter,
            validate_adapter_config,
        )

        resolved = resolve_adapter_files(pretrained_model_name_or_path, subfolder, **kwargs)
        source = os.fspath(pretrained_model_name_or_path)
        if resolved is not None:
            validate_adapter_config(resolved[0], source)  # before PEFT builds anything from it
            kwargs = {**kwargs, **resolved[3]}  # the commit the checked files came from
        try:
            config = PeftConfig.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (TypeError, KeyError) as error:
            if resolved is None:
                raise
            raise InvalidAdapterError(
                None,
                "adapter_config.json",
                f"{type(error).__name__}: {error}",
                "a valid ImPartConfig",
                source,
            ) from None
        except ValueError as error:
            if resolved is None or isinstance(error, InvalidAdapterError):
                raise
            raise InvalidAdapterError(
                None, "adapter_config.json", str(error), "a valid ImPartConfig", source
            ) from None
        if not isinstance(config, ImPartConfig):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {getattr(config.peft_type, 'value', config.peft_type)} "
                "adapter, not an ImPart (IMPART) one: load it with its own PEFT method"
            )
        if resolved is not None:
            validate_adapter(config, resolved[2], source=source)
        return config
