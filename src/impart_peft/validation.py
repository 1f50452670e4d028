"""Validation of an ImPart adapter read from disk or the Hub: untrusted input, checked before anything is allocated.

:func:`validate_adapter` is the one check both load paths run (``PeftModel.from_pretrained`` and transformers'
``model.load_adapter``, see :func:`guarded_load`), and ``impart inspect`` / ``impart apply``. It reads
``adapter_config.json`` (as a dict or an :class:`~impart_peft.ImPartConfig`), the safetensors *header* of
``adapter_model.safetensors``, then the tensors one at a time, and the base model, in this order:

1. the config's own fields: ``format_version``, ``seed``, every ``module_meta`` entry (known keys only, kinds,
   shapes, ranks, value counts bounded by the factor sizes ``r*m`` and ``r*n``, dtypes, ImPart-QT sizes bounded
   by the value counts), ``base_fingerprint``;
2. the file's structure from its header alone: the header's length and JSON, every entry's dtype, shape and
   offsets (contiguous, in the file, the size its shape needs), and exactly the tensors the config announces,
   each of the dtype and shape it announces -- so that nothing later reads or allocates more than the file holds;
3. the contents: the keep counts (int32 ``(2, r)`` within ``[1, rows]``, summing to ``u_count`` / ``v_count``),
   ImPart-QT's code bytes and scale groups against the counts and bit widths, every float tensor finite, and
   the module's digest (see :func:`module_digest`);
4. the base model: each module exists, is of the kind's class, has the announced weight shape and vector lengths,
   a tied head shares the embedding's weight, and the base fingerprint matches.

Every failure raises :class:`InvalidAdapterError` (a ``ValueError``) naming the module, the field, what was found
and what was expected. None of it touches the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "InvalidAdapterError",
    "MAX_HEADER_BYTES",
    "adapter_digest",
    "module_digest",
    "read_adapter_json",
    "validate_adapter",
    "guarded_load",
    "resolve_adapter_files",
    "validate_adapter_config",
]

# A header larger than this is not one this library wrote (a 70B model's adapter header is a few hundred KB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# adapter_config.json: module_meta and fingerprints of a very large model stay far below this.
MAX_CONFIG_BYTES = 64 * 1024 * 1024
# A module's weight must fit an int64 element count with room to spare; real ones are < 2**32 elements.
_MAX_DIM = 1 << 31
_MAX_SEED = (1 << 64) - 1
_FINGERPRINT_MAX = 64

_KINDS = ("linear", "conv1d", "embedding", "tied", "vector")
_MATRIX_KINDS = ("linear", "conv1d", "embedding")
_META_KEYS = {
    "kind",
    "shape",
    "rank",
    "u_count",
    "v_count",
    "dtype",
    "vectors",
    "vector_dtype",
    "tied_to",
    "quantized",
    "digest",
    "compression_ratio",  # target_size / "auto" only: what the matrix was compressed with (informational)
    "pre_prune_ratio",
    "importance_exponent",
}
_QUANTIZED_KEYS = {"bits", "group_size", "u_bytes", "v_bytes", "u_groups", "v_groups"}
_VALUE_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_VECTOR_DTYPES = {"float32": "F32", "float64": "F64"}
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ITEMSIZE.update({"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1})
_PREFIX = "base_model.model."
_DIGEST_TAG = b"impart-digest-v1\0"


class InvalidAdapterError(ValueError):
    """An ImPart adapter that this library refuses to load: one field of one module is not what it must be.

    Attributes:
        module: the module name (``None`` for a field of the whole adapter or of the file).
        field: the field or tensor (``"seed"``, ``"keep_count"``, ``"impart_u_values"``, ...).
        found / expected: what was read and what was required, as text.
    """

    def __init__(
        self,
        module: str | None,
        field: str,
        found: Any,
        expected: Any,
        source: str = "",
        summary: str = "invalid ImPart adapter",
    ) -> None:
        self.module = module
        self.field = field
        self.found = found
        self.expected = expected
        where = f"module {module!r}, " if module is not None else ""
        origin = f" ({source})" if source else ""
        super().__init__(
            f"{summary}{origin}: {where}{field}: found {found}, expected {expected}. The adapter was refused before "
            "anything was loaded; the model is unchanged"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------- the digest
def module_digest(
    name: str,
    meta: Mapping[str, Any],
    seed: int,
    format_version: int,
    tensors: Mapping[str, Any],
) -> str:
    """Hex BLAKE2b-128 binding what rebuilds a module: its name, the seed, the format version, its ``module_meta``
    entry (without ``digest``) and the bytes of its tensors (``impart_*`` name -> tensor or raw little-endian bytes).

    The masks are a pure function of ``(seed, name, counts)``: a changed seed or name regenerates masks of the same
    sizes, which no size check can see; a changed bit in a tensor can keep it finite and in range. This digest,
    stored in ``module_meta[name]["digest"]``, makes both a clear refusal. It is an integrity check, not a
    signature: whoever writes an adapter can write a matching digest.
    """
    digest = hashlib.blake2b(_DIGEST_TAG, digest_size=16)
    fields = {k: v for k, v in meta.items() if k != "digest"}
    head = json.dumps([name, int(seed), int(format_version), fields], sort_keys=True, separators=(",", ":"))
    digest.update(struct.pack("<Q", len(head)) + head.encode())
    for key in sorted(tensors):
        data = _tensor_bytes(tensors[key])
        label = key.encode()
        digest.update(struct.pack("<QQ", len(label), len(data)) + label)
        digest.update(data)
    return digest.hexdigest()


def _tensor_bytes(tensor: Any) -> bytes | memoryview:
    if isinstance(tensor, (bytes, bytearray, memoryview)):
        return tensor
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------------------------------------- reading
def read_adapter_json(path: str, source: str = "") -> dict[str, Any]:
    """``adapter_config.json`` as a dict, refusing an oversized, unreadable, too deeply nested or non-object file."""
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise InvalidAdapterError(
            None, "adapter_config.json", f"unreadable ({error})", "a file", source
        ) from None
    if size > MAX_CONFIG_BYTES:
        raise InvalidAdapterError(
            None, "adapter_config.json", f"{size} bytes", f"<= {MAX_CONFIG_BYTES}", source
        )
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InvalidAdapterError(
            None,
            "adapter_config.json",
            f"not readable JSON ({type(error).__name__})",
            "a JSON object",
            source,
        ) from None
    if not isinstance(data, dict):
        raise InvalidAdapterError(None, "adapter_config.json", type(data).__name__, "a JSON object", source)
    return data


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    return {
        "peft_type": getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)),
        "format_version": getattr(config, "format_version", None),
        "seed": getattr(config, "seed", None),
        "module_meta": getattr(config, "module_meta", None),
        "base_fingerprint": getattr(config, "base_fingerprint", None),
        "quantization": getattr(config, "quantization", None),
        "integrity": getattr(config, "integrity", None),
    }


# ---------------------------------------------------------------------------------------------------- 1. config
def validate_adapter_config(config: Any, source: str = "") -> dict[str, Any]:
    """Step 1: the config's own fields (no file, no model). Returns the config as a dict."""
    from .adapter_io import ADAPTER_FORMAT_VERSION

    data = _config_dict(config)

    def fail(module: str | None, field: str, found: Any, expected: Any) -> InvalidAdapterError:
        return InvalidAdapterError(module, field, found, expected, source)

    peft_type = data.get("peft_type")
    if str(peft_type or "").upper() != "IMPART":
        raise fail(None, "peft_type", _short(peft_type), "'IMPART'")
    version = data.get("format_version")
    if not _is_int(version) or version != ADAPTER_FORMAT_VERSION:
        found = (
            "no format version (written before impart-peft recorded one, with Bernoulli masks)"
            if version is None
            else f"format version {_short(version)}"
        )
        raise fail(
            None,
            "format_version",
            f"{found}, but this impart-peft reads format version {ADAPTER_FORMAT_VERSION}",
            f"{ADAPTER_FORMAT_VERSION} (compress the fine-tune again with this version, or load it with the "
            "impart-peft release that wrote it)",
        )
    _check_settings(data, config, fail)
    seed = data.get("seed")
    if not _is_int(seed) or not 0 <= seed <= _MAX_SEED:
        raise fail(None, "seed", _short(seed), "an integer in [0, 2**64 - 1]")
    module_meta = data.get("module_meta")
    if not isinstance(module_meta, Mapping) or not module_meta:
        raise fail(None, "module_meta", _short(module_meta), "a non-empty object: module name -> its entry")
    for name, meta in module_meta.items():
        _check_meta(name, meta, module_meta, fail)
    integrity = data.get("integrity")
    if integrity is not None:
        actual = adapter_digest(module_meta, seed, version)
        if actual != integrity:
            raise fail(
                None,
                "integrity",
                f"{actual} for module_meta's names and digests as they are",
                f"{_short(integrity)} (recorded by the compressor: the seed, or the modules, their names or their digests were edited)",
            )
    fingerprint = data.get("base_fingerprint")
    if fingerprint is None:
        fingerprint = {}
    if not isinstance(fingerprint, Mapping):
        raise fail(None, "base_fingerprint", _short(fingerprint), "an object: module name -> sampled weights")
    for name, samples in fingerprint.items():
        if name not in module_meta:
            raise fail(
                name, "base_fingerprint", "an entry for a module not in module_meta", "module_meta's names"
            )
        if (
            not isinstance(samples, list)
            or not 1 <= len(samples) <= _FINGERPRINT_MAX
            or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in samples
            )
        ):
            raise fail(name, "base_fingerprint", _short(samples), f"1 to {_FINGERPRINT_MAX} finite numbers")
    return data


def _check_settings(data: Mapping[str, Any], config: Any, fail: Callable[..., Exception]) -> None:
    """The compression settings ``ImPartConfig`` checks itself, checked here on the raw dict too, so that a bad
    value is this module's error whichever library builds the config."""
    if not isinstance(config, Mapping):
        return  # an ImPartConfig: its __post_init__ has checked them
    from .allocation import (
        ALLOCATION_RULES,
        check_compression_ratio,
        check_importance_exponent,
        check_pre_prune_ratio,
    )
    from .budget import AUTO, SIZE_RULES, parse_target_size
    from .quantization import QuantizationScheme

    def auto_or(check: Callable[[Any], None]) -> Callable[[Any], None]:
        return lambda value: None if value == AUTO else check(value)

    checks = {
        "compression_ratio": check_compression_ratio,
        "pre_prune_ratio": auto_or(check_pre_prune_ratio),
        "importance_exponent": auto_or(check_importance_exponent),
        "quantization": QuantizationScheme.parse,
        "target_size": lambda value: None if value is None else parse_target_size(value),
    }
    for field, check in checks.items():
        if field in data:
            try:
                check(data[field])
            except (TypeError, ValueError) as error:
                raise fail(None, field, _short(data[field]), f"a valid value ({error})") from None
    choices = {
        "allocation": ALLOCATION_RULES,
        "svd_dtype": ("float32", "float64"),
        "base_check": ("error", "warn", "ignore"),
        "size_rule": SIZE_RULES,
    }
    for field, allowed in choices.items():
        if field in data and (not isinstance(data[field], str) or data[field] not in allowed):
            raise fail(None, field, _short(data[field]), f"one of {allowed}")
    integrity = data.get("integrity")
    if integrity is not None and not isinstance(integrity, str):
        raise fail(None, "integrity", _short(integrity), "32 hex digits")


def _check_recorded_settings(name: str, meta: Mapping[str, Any], fail: Callable[..., Exception]) -> None:
    """A planned matrix's recorded ratio, beta and C (``module_meta``): informational, but well-formed."""
    from .allocation import check_compression_ratio, check_importance_exponent, check_pre_prune_ratio

    checks = {
        "compression_ratio": check_compression_ratio,
        "pre_prune_ratio": check_pre_prune_ratio,
        "importance_exponent": check_importance_exponent,
    }
    for field, check in checks.items():
        if field in meta:
            try:
                check(meta[field])
            except (TypeError, ValueError) as error:
                raise fail(name, field, _short(meta[field]), f"a valid value ({error})") from None


def adapter_digest(module_meta: Mapping[str, Any], seed: int, format_version: int) -> str:
    """Hex BLAKE2b-128 over the adapter's module names and their digests (``ImPartConfig.integrity``): a module
    added, removed or renamed in ``module_meta`` -- a tied head has no tensors for the file to miss -- is refused."""
    pairs = sorted(
        [name, meta.get("digest") if isinstance(meta, Mapping) else None]
        for name, meta in module_meta.items()
    )
    head = json.dumps([int(seed), int(format_version), pairs], separators=(",", ":"))
    return hashlib.blake2b(_DIGEST_TAG + b"adapter\0" + head.encode(), digest_size=16).hexdigest()


def _check_meta(name: Any, meta: Any, module_meta: Mapping[str, Any], fail: Callable[..., Exception]) -> None:
    if not isinstance(name, str) or not name or len(name) > 1000 or any(c in name for c in "\0\n"):
        raise fail(None, "module_meta", f"module name {_short(name)}", "a module name of the base model")
    if not isinstance(meta, Mapping):
        raise fail(name, "module_meta entry", _short(meta), "an object")
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:
        raise fail(name, "module_meta entry", f"unknown field(s) {unknown}", f"only {sorted(_META_KEYS)}")
    kind = meta.get("kind")
    if kind not in _KINDS:
        raise fail(name, "kind", _short(kind), f"one of {_KINDS}")
    _check_recorded_settings(name, meta, fail)
    if "digest" in meta and (
        not isinstance(meta["digest"], str)
        or len(meta["digest"]) != 32
        or any(c not in "0123456789abcdef" for c in meta["digest"])
    ):
        raise fail(name, "digest", _short(meta["digest"]), "32 lower-case hex digits")
    if kind != "vector":
        shape = meta.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(_is_int(s) and 1 <= s <= _MAX_DIM for s in shape)
        ):
            raise fail(name, "shape", _short(shape), f"[rows, columns], two integers in [1, {_MAX_DIM}]")
    elif "shape" in meta:
        raise fail(name, "shape", _short(meta["shape"]), "no shape for kind 'vector'")
    if kind == "tied":
        extra = sorted(set(meta) - {"kind", "shape", "tied_to", "digest"})
        if extra:
            raise fail(name, "module_meta entry", f"field(s) {extra} on a tied head", "kind, shape, tied_to")
        source = meta.get("tied_to")
        target = module_meta.get(source) if isinstance(source, str) else None
        if not isinstance(target, Mapping) or target.get("kind") != "embedding":
            raise fail(name, "tied_to", _short(source), "the name of an 'embedding' module of module_meta")
        if target.get("shape") != meta["shape"]:
            raise fail(
                name, "shape", meta["shape"], f"the shape of {source!r}, {_short(target.get('shape'))}"
            )
        return
    if "tied_to" in meta:
        raise fail(name, "tied_to", _short(meta["tied_to"]), f"no tied_to for kind {kind!r}")
    rank = meta.get("rank", 0)
    if kind in _MATRIX_KINDS:
        m, n = meta["shape"]
        if not _is_int(rank) or not 0 <= rank <= min(m, n):
            raise fail(name, "rank", _short(rank), f"an integer in [0, min({m}, {n}) = {min(m, n)}]")
        if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in _VALUE_DTYPES:
            raise fail(name, "dtype", _short(meta.get("dtype")), f"one of {sorted(_VALUE_DTYPES)}")
        if rank:
            # The value counts are bounded by the factor sizes r*m and r*n (at most twice the dense m*n delta),
            # checked here so that no tensor is ever sized by an unbounded number.
            for field, rows in (("u_count", m), ("v_count", n)):
                count = meta.get(field)
                if not _is_int(count) or not rank <= count <= rank * rows:
                    raise fail(
                        name,
                        field,
                        _short(count),
                        f"an integer in [rank, rank x {rows}] = [{rank}, {rank * rows}]",
                    )
            if "quantized" in meta:
                _check_quantized(name, meta, fail)
        else:
            for field in ("u_count", "v_count", "quantized"):
                if field in meta:
                    raise fail(name, field, _short(meta[field]), "absent for a module with rank 0")
    elif any(k in meta for k in ("rank", "u_count", "v_count", "quantized", "dtype")):
        present = sorted(k for k in ("rank", "u_count", "v_count", "quantized", "dtype") if k in meta)
        raise fail(name, "module_meta entry", f"factor field(s) {present}", "none for kind 'vector'")
    vectors = meta.get("vectors")
    if vectors is not None:
        if not isinstance(vectors, Mapping) or not vectors or set(vectors) - {"weight", "bias"}:
            raise fail(name, "vectors", _short(vectors), "an object with 'weight' and/or 'bias' -> length")
        for param_name, length in vectors.items():
            if not _is_int(length) or not 1 <= length <= _MAX_DIM:
                raise fail(name, f"vectors.{param_name}", _short(length), f"an integer in [1, {_MAX_DIM}]")
        if not isinstance(meta.get("vector_dtype"), str) or meta["vector_dtype"] not in _VECTOR_DTYPES:
            raise fail(
                name, "vector_dtype", _short(meta.get("vector_dtype")), f"one of {sorted(_VECTOR_DTYPES)}"
            )
    elif "vector_dtype" in meta:
        raise fail(name, "vector_dtype", _short(meta["vector_dtype"]), "absent without vectors")
    if not rank and not vectors:
        raise fail(name, "module_meta entry", "no factors (rank 0) and no vectors", "something to load")


def _check_quantized(name: str, meta: Mapping[str, Any], fail: Callable[..., Exception]) -> None:
    quantized = meta["quantized"]
    if not isinstance(quantized, Mapping) or set(quantized) != _QUANTIZED_KEYS:
        raise fail(name, "quantized", _short(quantized), f"an object with exactly {sorted(_QUANTIZED_KEYS)}")
    runs = quantized["bits"]
    if not isinstance(runs, list) or not all(
        isinstance(r, list)
        and len(r) == 2
        and _is_int(r[0])
        and 1 <= r[0] <= 8
        and _is_int(r[1])
        and r[1] >= 0
        for r in runs
    ):
        raise fail(name, "quantized.bits", _short(runs), "runs [[bits 1..8, pairs >= 0], ...]")
    pairs = sum(r[1] for r in runs)
    if pairs != meta["rank"]:
        raise fail(name, "quantized.bits", f"runs covering {pairs} pairs", f"{meta['rank']} (the rank)")
    group_size = quantized["group_size"]
    if not _is_int(group_size) or not 1 <= group_size <= _MAX_DIM:
        raise fail(name, "quantized.group_size", _short(group_size), "a positive integer")
    for factor in ("u", "v"):
        count = meta[f"{factor}_count"]
        # At most 8 bits per kept value and one scale per kept value: bounded by the value count.
        for field, high in ((f"{factor}_bytes", count), (f"{factor}_groups", count)):
            value = quantized[field]
            if not _is_int(value) or not 1 <= value <= high:
                raise fail(name, f"quantized.{field}", _short(value), f"an integer in [1, {high}]")


# ---------------------------------------------------------------------------------------------------- 2. header
def expected_tensors(
    module_meta: Mapping[str, Mapping[str, Any]],
) -> dict[str, tuple[str, str, str, list[int]]]:
    """Saved key -> (module, field, safetensors dtype, shape) of every tensor a checked config announces."""
    out: dict[str, tuple[str, str, str, list[int]]] = {}
    for name, meta in module_meta.items():
        prefix = f"{_PREFIX}{name}."
        rank = meta.get("rank", 0)
        if meta["kind"] in _MATRIX_KINDS and rank:
            quantized = meta.get("quantized")
            if quantized is not None:
                for factor in ("u", "v"):
                    out[prefix + f"impart_{factor}_codes"] = (
                        name,
                        f"impart_{factor}_codes",
                        "U8",
                        [quantized[f"{factor}_bytes"]],
                    )
                    out[prefix + f"impart_{factor}_scales"] = (
                        name,
                        f"impart_{factor}_scales",
                        "F16",
                        [quantized[f"{factor}_groups"]],
                    )
            else:
                dtype = _VALUE_DTYPES[meta["dtype"]]
                out[prefix + "impart_u_values"] = (name, "impart_u_values", dtype, [meta["u_count"]])
                out[prefix + "impart_v_values"] = (name, "impart_v_values", dtype, [meta["v_count"]])
            out[prefix + "impart_singular_values"] = (name, "impart_singular_values", "F32", [rank])
            out[prefix + "impart_keep_count"] = (name, "impart_keep_count", "I32", [2, rank])
        for param_name, length in (meta.get("vectors") or {}).items():
            field = f"impart_delta_{param_name}"
            out[prefix + field] = (name, field, _VECTOR_DTYPES[meta["vector_dtype"]], [length])
    return out


def _read_header(path: str, source: str) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``path`` and where its data starts, after checking the file's structure."""

    def fail(field: str, found: Any, expected: Any) -> InvalidAdapterError:
        return InvalidAdapterError(
            None,
            f"adapter_model.safetensors {field}",
            found,
            expected,
            source,
            summary="invalid ImPart adapter, its weights file is truncated or corrupt",
        )

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise fail("size", f"{size} bytes", "at least 8 (a safetensors file; truncated?)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise fail(
                    "header length",
                    f"{length} bytes in a {size}-byte file",
                    f"<= {min(size - 8, MAX_HEADER_BYTES)} (truncated or corrupt)",
                )
            raw = handle.read(length)
    except OSError as error:
        raise fail("file", f"unreadable ({error})", "a readable file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise fail(
            "header", f"not readable JSON ({type(error).__name__})", "a JSON object (truncated or corrupt)"
        ) from None
    if not isinstance(header, dict):
        raise fail("header", type(header).__name__, "a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("__metadata__", _short(metadata), "an object of strings")
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"entry {key!r}", _short(entry), "{dtype, shape, data_offsets}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise fail(f"dtype of {key!r}", _short(dtype), f"one of {sorted(_ITEMSIZE)}")
        if (
            not isinstance(shape, list)
            or not all(_is_int(s) and 0 <= s <= _MAX_DIM for s in shape)
            or len(shape) > 8
        ):
            raise fail(f"shape of {key!r}", _short(shape), "a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
        ):
            raise fail(f"data_offsets of {key!r}", _short(offsets), "[start, end], non-negative integers")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise fail(f"data_offsets of {key!r}", offsets, f"a span of {nbytes} bytes ({dtype} {shape})")
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    position = 0
    for start, end, key in spans:
        if start != position:
            raise fail(f"data_offsets of {key!r}", f"start {start}", f"{position} (tensors back to back)")
        position = end
    data_start = 8 + length
    if data_start + position != size:
        raise fail(
            "size",
            f"{size} bytes",
            f"{data_start + position} (its header and tensors; an interrupted download or copy: fetch it again)",
        )
    return header, data_start


# ---------------------------------------------------------------------------------------------------- 3. contents
def _tensor_reader(path: str, header: Mapping[str, Any], data_start: int) -> Callable[[str], bytes]:
    def read(key: str) -> bytes:
        start, end = header[key]["data_offsets"]
        with open(path, "rb") as handle:
            handle.seek(data_start + start)
            data = handle.read(end - start)
        if len(data) != end - start:  # the file shrank since its size was checked
            raise InvalidAdapterError(None, f"tensor {key!r}", f"{len(data)} bytes", f"{end - start}")
        return data

    return read


def _check_contents(
    module_meta: Mapping[str, Mapping[str, Any]],
    seed: int,
    format_version: int,
    read: Callable[[str], bytes],
    source: str,
) -> None:
    import torch

    torch_dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def fail(module: str, field: str, found: Any, expected: Any) -> InvalidAdapterError:
        return InvalidAdapterError(module, field, found, expected, source)

    by_module: dict[str, list[tuple[str, str, str]]] = {}
    for key, (module, field, dtype, _) in expected_tensors(module_meta).items():
        by_module.setdefault(module, []).append((key, field, dtype))
    for name, meta in module_meta.items():
        raw: dict[str, bytes] = {}
        for key, field, dtype in by_module.get(name, []):
            data = read(key)
            raw[field] = data
            if dtype in torch_dtypes and data:
                values = torch.frombuffer(bytearray(data), dtype=torch_dtypes[dtype])
                bad = int((~torch.isfinite(values)).sum())
                if bad:
                    raise fail(name, field, f"{bad} NaN or infinite value(s)", "finite values")
        if "impart_keep_count" in raw:
            _check_counts(name, meta, raw["impart_keep_count"], fail)
        digest = meta.get("digest")
        if digest is not None:
            actual = module_digest(name, meta, seed, format_version, raw)
            if actual != digest:
                raise fail(
                    name,
                    "digest",
                    f"{actual} for the seed, module name, module_meta entry and tensors as they are",
                    f"{digest} (recorded by the compressor: the file or the config was edited or corrupted)",
                )


def _check_counts(name: str, meta: Mapping[str, Any], data: bytes, fail: Callable[..., Exception]) -> None:
    import torch

    rank = meta["rank"]
    m, n = meta["shape"]
    counts = torch.frombuffer(bytearray(data), dtype=torch.int32).to(torch.int64).view(2, rank)
    for row, (factor, rows, field) in enumerate((("U", m, "u_count"), ("V", n, "v_count"))):
        low, high = int(counts[row].min()), int(counts[row].max())
        if low < 1 or high > rows:
            raise fail(
                name, f"impart_keep_count (row {row}, {factor})", f"counts in [{low}, {high}]", f"[1, {rows}]"
            )
        total = int(counts[row].sum())
        if total != meta[field]:
            raise fail(
                name,
                f"impart_keep_count (row {row}, {factor})",
                f"a sum of {total}",
                f"{field} = {meta[field]}",
            )
    quantized = meta.get("quantized")
    if quantized is not None:
        bits = torch.tensor([b for b, c in quantized["bits"] for _ in range(c)], dtype=torch.int64)
        group_size = quantized["group_size"]
        for row, factor in enumerate(("u", "v")):
            code_bytes = (int((counts[row] * bits).sum()) + 7) // 8
            groups = int(((counts[row] + group_size - 1) // group_size).sum())
            for field, expected in ((f"{factor}_bytes", code_bytes), (f"{factor}_groups", groups)):
                if quantized[field] != expected:
                    raise fail(
                        name,
                        f"quantized.{field}",
                        quantized[field],
                        f"{expected} (from the keep counts and bits)",
                    )


# ---------------------------------------------------------------------------------------------------- 4. base
def _check_base(
    module_meta: Mapping[str, Mapping[str, Any]],
    fingerprint: Mapping[str, Any],
    model: Any,
    source: str,
    base_check: str,
) -> None:
    import warnings

    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from .fingerprint import check_fingerprint

    classes = {"linear": nn.Linear, "tied": nn.Linear, "conv1d": Conv1D, "embedding": nn.Embedding}
    modules = dict(model.named_modules())

    def base_of(module: Any) -> Any:
        return module.get_base_layer() if hasattr(module, "get_base_layer") else module

    def fail(module: str, field: str, found: Any, expected: Any) -> InvalidAdapterError:
        return InvalidAdapterError(
            module,
            field,
            found,
            expected,
            source,
            summary="This ImPart adapter does not fit this model (load it on the base model it was compressed from)",
        )

    for name, meta in module_meta.items():
        module = modules.get(name)
        if module is None:
            raise fail(
                name,
                "module name",
                "no such module in this model",
                "a module of the base model the adapter was compressed from",
            )
        base = base_of(module)
        kind = meta["kind"]
        if kind in classes and not isinstance(base, classes[kind]):
            raise fail(name, "kind", f"{kind!r} on a {type(base).__name__}", f"a {classes[kind].__name__}")
        if kind != "vector":
            weight = getattr(base, "weight", None)
            found = None if weight is None else list(weight.shape)
            if found != meta["shape"]:
                raise fail(name, "shape", meta["shape"], f"this model's weight shape {found}")
        if kind == "tied":
            source_weight = (
                getattr(base_of(modules[meta["tied_to"]]), "weight", None)
                if meta["tied_to"] in modules
                else None
            )
            if source_weight is None or source_weight is not base.weight:
                raise fail(
                    name,
                    "tied_to",
                    meta["tied_to"],
                    "a module whose weight this head shares (tie_word_embeddings)",
                )
        for param_name, length in (meta.get("vectors") or {}).items():
            param = getattr(base, param_name, None)
            found = None if param is None else list(param.shape)
            if found != [length]:
                raise fail(
                    name,
                    f"vectors.{param_name}",
                    f"length {length}",
                    f"this model's parameter of shape {found}",
                )
    mode = os.environ.get("IMPART_BASE_CHECK", base_check)
    if mode != "ignore" and fingerprint:
        mismatched = check_fingerprint(model, dict(fingerprint))
        if mismatched:
            message = (
                f"The base model's weights differ from those the ImPart adapter was compressed against (first "
                f"mismatches: {', '.join(mismatched[:3])}). Adding the delta to another base does not give the "
                "fine-tune. Load it on its own base model, or pass base_check='warn' / set IMPART_BASE_CHECK=warn to "
                "proceed anyway."
            )
            if mode == "error":
                error = InvalidAdapterError(
                    mismatched[0],
                    "base_fingerprint",
                    "other base weights",
                    "the base the adapter was made from",
                    source,
                )
                error.args = (message,)
                raise error
            warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------------------------------------- the step
def validate_adapter(
    config: Any,
    weights_path: str | os.PathLike | None = None,
    base_model: Any = None,
    *,
    source: str = "",
) -> None:
    """Check an ImPart adapter before any of its tensors is allocated (see the module docstring for the order).

    Args:
        config: ``adapter_config.json`` as a dict (as read) or an :class:`~impart_peft.ImPartConfig`.
        weights_path: its ``adapter_model.safetensors``; ``None`` skips steps 2 and 3 (already done).
        base_model: the model it is to be loaded into (``None`` skips step 4).
        source: where the adapter comes from, for the messages.

    Raises:
        InvalidAdapterError: the first problem found, naming the module, the field, what was found and expected.
    """
    data = validate_adapter_config(config, source)
    module_meta = data["module_meta"]
    if weights_path is not None:
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise InvalidAdapterError(
                None,
                "adapter_model.safetensors",
                "no such file",
                "the adapter weights next to adapter_config.json (the copy or upload is incomplete)",
                source,
            )
        header, data_start = _read_header(path, source)
        expected = expected_tensors(module_meta)
        for key, (module, field, dtype, shape) in expected.items():
            entry = header.get(key)
            if entry is None:
                raise InvalidAdapterError(
                    module, field, "missing from adapter_model.safetensors", f"{dtype} {shape}", source
                )
            if entry["dtype"] != dtype or entry["shape"] != shape:
                raise InvalidAdapterError(
                    module,
                    field,
                    f"{entry['dtype']} {entry['shape']}",
                    f"{dtype} {shape} (as module_meta announces)",
                    source,
                )
        extra = sorted(set(header) - set(expected))
        if extra:
            raise InvalidAdapterError(
                None,
                "adapter_model.safetensors",
                f"unexpected tensor(s) {extra[:3]}",
                "only the tensors module_meta announces",
                source,
            )
        _check_contents(
            module_meta,
            data["seed"],
            data["format_version"],
            _tensor_reader(path, header, data_start),
            source,
        )
    if base_model is not None:
        base_check = (
            data.get("base_check") if isinstance(config, Mapping) else getattr(config, "base_check", None)
        ) or "error"
        _check_base(module_meta, data.get("base_fingerprint") or {}, base_model, source, base_check)


# ---------------------------------------------------------------------------------------------------- load paths
_HUB_KEYS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "endpoint")


def _has_impart_tensors(path: str) -> bool:
    """Whether ``path`` looks like an ImPart adapter's weights (for a config too damaged to say so itself)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            raw = handle.read(min(length, MAX_HEADER_BYTES))
    except (OSError, struct.error):
        return False
    return b".impart_" in raw


def resolve_adapter_files(
    model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any
) -> tuple[dict[str, Any], str, str, dict[str, Any]] | None:
    """``(config dict, config path, weights path, hub kwargs pinned to the commit)`` when ``model_id`` (a folder or a
    Hub repo id) holds an ImPart adapter; ``None`` for anything else (another PEFT method's adapter, no adapter, a
    download error), which the library's own loader then reports as it always did.

    Raises:
        InvalidAdapterError: the folder holds ImPart weights but an unreadable ``adapter_config.json``.
    """
    from .adapter_io import ADAPTER_WEIGHTS_NAME

    model_id = os.fspath(model_id)
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KEYS and v is not None}
    folder = os.path.join(model_id, subfolder or "")
    config_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        if os.path.isdir(model_id):
            return None
        try:  # a Hub repo id: the files are fetched (into the cache) before anything is read
            from huggingface_hub import hf_hub_download

            config_path = hf_hub_download(model_id, "adapter_config.json", subfolder=subfolder, **hub_kwargs)
        except Exception:  # the library's own call reports it (its errors are the documented ones)
            return None
        commit = os.path.basename(
            os.path.dirname(config_path if not subfolder else os.path.dirname(config_path))
        )
    else:
        commit = None
    try:
        data = read_adapter_json(config_path, source=model_id)
    except InvalidAdapterError:
        if os.path.isfile(weights_path) and _has_impart_tensors(weights_path):
            raise
        return None
    if str(data.get("peft_type") or "").upper() != "IMPART":
        return None
    if commit is not None:
        try:
            from huggingface_hub import hf_hub_download

            # The weights of the very commit the config came from; the library then loads that commit too.
            hub_kwargs = {**hub_kwargs, "revision": commit}
            weights_path = hf_hub_download(model_id, ADAPTER_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
        except Exception:
            return None
    return data, config_path, weights_path, hub_kwargs


class _ModelState:
    """What a failed load could leave behind in a model, recorded before it: the module tree, the adapter
    attributes transformers and PEFT set, parameter flags, training mode, and the adapters of existing ImPart
    layers. :meth:`restore` puts it all back (the base tensors themselves are never written by a load)."""

    _ATTRIBUTES = ("peft_config", "_hf_peft_config_loaded", "hf_device_map", "_peft_config_loaded")

    def __init__(self, model: Any, adapter_name: str) -> None:
        from .layer import ImPartLayer

        self.model = model
        self.adapter_name = adapter_name
        self.children = [(module, dict(module._modules)) for module in model.modules()]
        self.attributes = {}
        for name in self._ATTRIBUTES:
            if name in model.__dict__:
                value = model.__dict__[name]
                self.attributes[name] = (value, dict(value) if isinstance(value, dict) else None)
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]
        self.layers = [
            (m, m._active_adapter, adapter_name in m.impart_meta)
            for m in model.modules()
            if isinstance(m, ImPartLayer)
        ]

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for name in self._ATTRIBUTES:
            if name in self.attributes:
                value, contents = self.attributes[name]
                if contents is not None:
                    value.clear()
                    value.update(contents)
                self.model.__dict__[name] = value
            else:
                self.model.__dict__.pop(name, None)
        for param, flag in self.flags:
            param.requires_grad_(flag)
        for module, training in self.training:
            module.training = training
        for layer, active, had in self.layers:
            if not had:  # the failed load added this adapter to a layer that already held others
                for store_name in (*layer.adapter_layer_names, *layer.other_param_names):
                    store = getattr(layer, store_name, None)
                    if store is not None and self.adapter_name in store:
                        del store[self.adapter_name]
                layer.clear_cache(self.adapter_name)
                layer._impart_merge_patch.pop(self.adapter_name, None)
            layer._active_adapter = active


def guarded_load(
    load: Callable[[dict[str, Any]], Any],
    model: Any,
    model_id: Any,
    adapter_name: str,
    subfolder: str | None,
    hub_kwargs: Mapping[str, Any],
    config: Any = None,
) -> Any:
    """Run a library's adapter loader (``load(pinned hub kwargs)``) behind :func:`validate_adapter`.

    For an ImPart adapter (a folder or a Hub repo, fetched first), the whole validation -- config, file, base --
    runs before the loader is called, and should the loader still fail (a file changed under it), the model is
    put back as it was before the call. Anything else goes to the loader untouched.
    """
    resolved = resolve_adapter_files(model_id, subfolder, **hub_kwargs) if model_id is not None else None
    if resolved is None:
        return load({})
    data, _, weights_path, pinned = resolved
    checked = config if config is not None else data
    validate_adapter(checked, weights_path, model, source=os.fspath(model_id))
    state = _ModelState(model, adapter_name)
    try:
        return load(pinned)
    except BaseException:
        state.restore()
        raise
