"""The model card (``README.md``) of an ImPart adapter, built from its config and file sizes.

:func:`build_model_card` is a pure function of the adapter's ``adapter_config.json`` (as a dict or an
:class:`~impart_peft.ImPartConfig`), the size of ``adapter_model.safetensors`` and what the user tells
(repo id, task tags, license, the command that made it): no network, no model, so it is tested exactly.
:func:`write_model_card` reads those from a saved adapter folder and writes ``README.md`` atomically.

The card follows the Hub's conventions for adapters: YAML metadata with ``base_model`` (only when it is a Hub
id, not a local path), ``library_name: peft``, ``tags`` (``impart``, ``delta-compression``,
``base_model:adapter:<base>`` as PEFT writes it, then the user's), ``license`` and ``pipeline_tag`` when known.

What the user passed (tags, license, command, size of the fine-tune) is also kept in a hidden HTML comment at
the end of the card, so that a later ``impart push`` (which knows the repo id) regenerates the card without
losing it (:func:`read_card_inputs`).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = [
    "CARD_MARKER",
    "CompressionStats",
    "build_model_card",
    "compression_stats",
    "current_versions",
    "is_hub_repo_id",
    "is_local_path",
    "read_card_inputs",
    "write_model_card",
]

CARD_MARKER = "impart-peft-card"
_INPUTS_RE = re.compile(r"<!-- " + CARD_MARKER + r" (\{.*?\}) -->", re.DOTALL)
_MATRIX_KINDS = ("linear", "conv1d", "embedding")
_ITEM_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1}
# (suffix of the transformers class in auto_mapping, or PEFT task_type) -> (Auto class, pipeline tag)
_TASKS = {
    "CAUSAL_LM": ("AutoModelForCausalLM", "text-generation"),
    "SEQ_CLS": ("AutoModelForSequenceClassification", "text-classification"),
    "TOKEN_CLS": ("AutoModelForTokenClassification", "token-classification"),
    "QUESTION_ANS": ("AutoModelForQuestionAnswering", "question-answering"),
    "SEQ_2_SEQ_LM": ("AutoModelForSeq2SeqLM", "text2text-generation"),
    "FEATURE_EXTRACTION": ("AutoModel", "feature-extraction"),
}
_CLASS_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w\-.]{0,95}/[A-Za-z0-9][\w\-.]{0,95}")


def is_hub_repo_id(value: str | None) -> bool:
    """Whether ``value`` reads as a Hub repo id ``namespace/name`` (not a local path such as ``/x/y`` or ``./y``).

    A relative path ``a/b`` reads as a repo id too: callers that can, check the file system first.
    """
    if not value or value.startswith((".", "/", "~")) or "\\" in value:
        return False
    return _REPO_ID_RE.fullmatch(value) is not None and "--" not in value and ".." not in value


def is_local_path(value: str | None) -> bool:
    """Whether ``value`` names an existing local folder (so it is not a Hub id even if it reads like one)."""
    return bool(value) and os.path.isdir(os.path.expanduser(value))


def current_versions() -> dict[str, str]:
    """Versions of impart-peft and of the libraries an adapter depends on, as recorded in the card."""
    import huggingface_hub
    import peft
    import torch
    import transformers

    from ._version import __version__

    return {
        "impart-peft": __version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "huggingface_hub": huggingface_hub.__version__,
    }


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(
        f"config must be an ImPartConfig or the dict of an adapter_config.json, got {type(config)}"
    )


@dataclass(frozen=True)
class CompressionStats:
    """What an ImPart adapter stores compared to the dense delta it stands for.

    Counts are numbers of values; bytes are in ``reference_dtype``, the dtype of the fine-tune's matrices (the
    dtype a dense delta would be shipped in).
    """

    nominal_ratio: float | None  # the compression_ratio asked for; None = lossless
    matrices: int  # compressed matrices with a non-zero delta
    tied: int  # output heads sharing an embedding's delta (stored once)
    vectors: int  # 1-D deltas (norms, biases) stored densely
    kept_pairs: int  # singular pairs stored, over all matrices
    dense_matrix_values: int  # sum of m * n over the compressed matrices
    dense_vector_values: int
    stored_factor_values: int  # kept elements of U and V
    reference_dtype: str
    adapter_bytes: int  # size of adapter_model.safetensors
    finetuned_num_parameters: int | None = None

    @property
    def dense_values(self) -> int:
        return self.dense_matrix_values + self.dense_vector_values

    @property
    def dense_bytes(self) -> int:
        return self.dense_values * _ITEM_BYTES.get(self.reference_dtype, 4)

    @property
    def finetuned_bytes(self) -> int | None:
        if self.finetuned_num_parameters is None:
            return None
        return self.finetuned_num_parameters * _ITEM_BYTES.get(self.reference_dtype, 4)

    @property
    def values_ratio(self) -> float | None:
        """Dense matrix values / stored factor values: the compression ratio the allocation achieved."""
        return self.dense_matrix_values / self.stored_factor_values if self.stored_factor_values else None

    @property
    def disk_ratio(self) -> float | None:
        """Dense delta bytes / adapter file bytes: what the file on disk achieves, everything counted."""
        return self.dense_bytes / self.adapter_bytes if self.adapter_bytes else None

    @property
    def finetune_ratio(self) -> float | None:
        """Fine-tune bytes / adapter file bytes: how much less there is to download than the fine-tune."""
        ft = self.finetuned_bytes
        return ft / self.adapter_bytes if ft and self.adapter_bytes else None


def compression_stats(
    config: Any, adapter_bytes: int, finetuned_num_parameters: int | None = None
) -> CompressionStats:
    """Count what the adapter of ``config`` (its ``module_meta``) stores, beside the dense delta.

    Args:
        config: an :class:`~impart_peft.ImPartConfig` or the dict of ``adapter_config.json``.
        adapter_bytes: size of ``adapter_model.safetensors`` in bytes.
        finetuned_num_parameters: parameters of the whole fine-tuned model, when known.
    """
    data = _config_dict(config)
    meta: Mapping[str, Mapping[str, Any]] = data.get("module_meta") or {}
    if not meta:
        raise ValueError(
            "this config has no module_meta: it is not the config of a compressed ImPart adapter"
        )
    matrices = tied = vectors = pairs = dense_m = dense_v = factors = 0
    dtypes: Counter[str] = Counter()
    for entry in meta.values():
        kind = entry.get("kind")
        if kind == "tied":
            tied += 1
        elif kind in _MATRIX_KINDS and int(entry.get("rank", 0)) > 0:
            rows, cols = (int(x) for x in entry["shape"])
            matrices += 1
            pairs += int(entry["rank"])
            dense_m += rows * cols
            factors += int(entry.get("u_count", 0)) + int(entry.get("v_count", 0))
            dtypes[str(entry.get("dtype", "float32"))] += rows * cols
        for length in (entry.get("vectors") or {}).values():
            vectors += 1
            dense_v += int(length)
    reference = dtypes.most_common(1)[0][0] if dtypes else "float32"
    ratio = data.get("compression_ratio")
    return CompressionStats(
        nominal_ratio=None if ratio is None else float(ratio),
        matrices=matrices,
        tied=tied,
        vectors=vectors,
        kept_pairs=pairs,
        dense_matrix_values=dense_m,
        dense_vector_values=dense_v,
        stored_factor_values=factors,
        reference_dtype=reference,
        adapter_bytes=int(adapter_bytes),
        finetuned_num_parameters=None if finetuned_num_parameters is None else int(finetuned_num_parameters),
    )


# ---------------------------------------------------------------------------------------------------- formatting
def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit} ({num_bytes:,} bytes)"
    return f"{num_bytes:,} bytes"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _number(value: Any) -> str:
    """A number of the config as the card shows it; ``"auto"`` (chosen per matrix) and other text as they are."""
    return (
        f"{float(value):g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
    )


def _literal(value: Any) -> str:
    """A config value as Python source: a number as :func:`_number` writes it, text (``'auto'``, ``'30MB'``) quoted."""
    return repr(value) if isinstance(value, str) else _number(value)


# What module_meta records per matrix of a planned compression (planning.ModuleSettings.meta()).
SETTINGS_KEYS = ("compression_ratio", "pre_prune_ratio", "importance_exponent")


def _recorded(meta: Mapping[str, Mapping[str, Any]], key: str) -> list[Any]:
    """The per-matrix settings a planned compression (``target_size`` / ``"auto"``) recorded in ``module_meta``."""
    return [
        entry[key] for entry in meta.values() if isinstance(entry, Mapping) and entry.get(key) is not None
    ]


def per_matrix_settings(module_meta: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The spread of what a planned compression recorded per matrix (``None`` if nothing was): ``matrices`` (how
    many record settings), ``ratio_min`` / ``ratio_median`` / ``ratio_max`` (``None`` if lossless), and
    ``pre_prune_ratio_counts`` / ``importance_exponent_counts`` (``{"0.8": 5, ...}``, ascending). The model card and
    ``impart inspect`` both show it."""
    matrices = sum(
        1
        for entry in module_meta.values()
        if isinstance(entry, Mapping) and any(key in entry for key in SETTINGS_KEYS)
    )
    if not matrices:
        return None
    ratios = sorted(_recorded(module_meta, "compression_ratio"))

    def counts(key: str) -> dict[str, int]:
        values = sorted(_recorded(module_meta, key))
        return {_number(v): values.count(v) for v in dict.fromkeys(values)}

    return {
        "matrices": matrices,
        "ratio_min": ratios[0] if ratios else None,
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_max": ratios[-1] if ratios else None,
        "pre_prune_ratio_counts": counts("pre_prune_ratio"),
        "importance_exponent_counts": counts("importance_exponent"),
    }


def _setting_cell(data: Mapping[str, Any], key: str) -> str:
    """The table cell of beta or C: the value, or ``auto`` with what was chosen per matrix (``0.6 x3, 0.8 x5``)."""
    value = data.get(key)
    if value != "auto":
        return _number(value)
    per_matrix = per_matrix_settings(data.get("module_meta") or {})
    chosen = per_matrix[f"{key}_counts"] if per_matrix else {}
    if not chosen:
        return "auto"
    counts = ", ".join(f"{v} x{n}" for v, n in chosen.items())
    return f"auto, chosen per matrix from its spectrum: {counts}"


def _task(data: Mapping[str, Any]) -> str | None:
    task_type = data.get("task_type")
    if task_type in _TASKS:
        return task_type
    class_name = (data.get("auto_mapping") or {}).get("base_model_class") or ""
    return next((task for suffix, task in _CLASS_SUFFIXES if class_name.endswith(suffix)), None)


def _unique(items: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        item = str(item).strip()
        if item:
            seen.setdefault(item, None)
    return list(seen)


def _config_call(data: Mapping[str, Any]) -> str:
    if data.get("target_size") is not None:
        # The size budget, not the ratio it achieved (which is what compression_ratio then records).
        args = [
            f"target_size={_literal(data['target_size'])}",
            f"size_rule={_literal(data.get('size_rule', 'uniform'))}",
        ]
    else:
        ratio = data.get("compression_ratio")
        args = [f"compression_ratio={_literal(ratio) if ratio is not None else None}"]
    args += [
        f"pre_prune_ratio={_literal(data.get('pre_prune_ratio', 0.8))}",
        f"importance_exponent={_literal(data.get('importance_exponent', 1.0))}",
        f"seed={data.get('seed', 0)}",
    ]
    if data.get("svd_dtype", "float32") != "float32":
        args.append(f"svd_dtype={data['svd_dtype']!r}")
    if data.get("include_embeddings", True) is False:
        args.append("include_embeddings=False")
    if data.get("quantization"):  # ImPart-QT: the bit schedule is part of how the adapter was made
        args.append(f"quantization={dict(data['quantization'])!r}")
    return "ImPartConfig(" + ", ".join(args) + ")"


def build_model_card(
    config: Any,
    *,
    adapter_bytes: int,
    repo_id: str | None = None,
    finetuned_num_parameters: int | None = None,
    tags: Sequence[str] = (),
    license: str | None = None,
    command: str | None = None,
    versions: Mapping[str, str] | None = None,
    base_is_local: bool = False,
) -> str:
    """The ``README.md`` of an ImPart adapter, as text.

    Args:
        config: the adapter's :class:`~impart_peft.ImPartConfig`, or the dict read from its ``adapter_config.json``
            (which also has PEFT's ``auto_mapping``, used to pick the Auto class and ``pipeline_tag``).
        adapter_bytes: size of ``adapter_model.safetensors`` in bytes.
        repo_id: the Hub repo the adapter is pushed to (used in the load snippets); ``None`` before a push.
        finetuned_num_parameters: parameters of the fine-tuned model, for its size in the table (unknown if None).
        tags: the user's task tags (``["math", "reasoning"]``), after ``impart`` and ``delta-compression``.
        license: an SPDX-like license id of the fine-tune (``"apache-2.0"``), when known.
        command: the command line that made the adapter (``impart compress ...``), when known.
        versions: library name -> version; default :func:`current_versions` (pass it for a reproducible card).
        base_is_local: the config's ``base_model_name_or_path`` is a local folder, not a Hub id (then it is not
            written as ``base_model`` in the metadata).

    Returns:
        The card: YAML front matter, then Markdown.
    """
    data = _config_dict(config)
    if str(data.get("peft_type", "IMPART")).upper() != "IMPART":
        raise ValueError(
            f"build_model_card describes ImPart adapters, got peft_type={data.get('peft_type')!r}"
        )
    stats = compression_stats(data, adapter_bytes, finetuned_num_parameters)
    versions = dict(current_versions() if versions is None else versions)
    base = data.get("base_model_name_or_path") or None
    finetuned = data.get("finetuned_model_name_or_path") or None
    base_is_hub = is_hub_repo_id(base) and not base_is_local
    task = _task(data)
    auto_class, pipeline_tag = _TASKS.get(task, ("AutoModel", None)) if task else ("AutoModel", None)
    user_tags = _unique(list(tags))

    metadata: dict[str, Any] = {}
    if base_is_hub:
        metadata["base_model"] = base
    metadata["library_name"] = "peft"
    if license:
        metadata["license"] = str(license)
    if pipeline_tag:
        metadata["pipeline_tag"] = pipeline_tag
    metadata["tags"] = _unique(
        ["impart", "delta-compression"] + ([f"base_model:adapter:{base}"] if base_is_hub else []) + user_tags
    )
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, default_flow_style=False)

    name = repo_id.split("/")[-1] if repo_id else "ImPart adapter"
    load_id = repo_id or "path/to/this/adapter"
    base_ref = base or "<base model>"
    base_text = f"`{base}`" if base else "its base model"
    if finetuned:
        source = f"the full fine-tune `{finetuned}` of {base_text}"
    else:
        source = f"a full fine-tune of {base_text}"
    lossless = stats.nominal_ratio is None
    exact = (
        "Loaded on the base, it gives the fine-tune back to float rounding (a lossless adapter: no element dropped)."
        if lossless
        else "Loaded on the base, it gives back an unbiased estimate of the fine-tune's weights, at a fraction of "
        "the download."
    )

    lines: list[str] = ["---", front.rstrip("\n"), "---", "", f"# {name}", ""]
    lines += [
        f"This repository holds {source}, compressed into a small PEFT "
        "adapter with **ImPart** (importance-aware delta sparsification, Yang et al. 2025, arXiv 2504.13237). "
        "For each weight matrix, the delta W_ft - W_base is decomposed by SVD; each element of a singular vector "
        "is kept with a probability that grows with its singular value and rescaled by its inverse, the long "
        "tail of small singular values is dropped, and the masks are regenerated from a seed at load time "
        "(never stored). Norms and biases are stored densely. " + exact,
        "",
        "Load it on the exact base model it was compressed from: the adapter carries a fingerprint of the base "
        "weights and refuses another base.",
        "",
        "## Use",
        "",
        "Needs `pip install impart-peft`: importing `impart_peft` registers the ImPart adapter type with PEFT.",
        "",
        "With transformers:",
        "",
        "```python",
        "import impart_peft  # noqa: F401  (registers the ImPart adapter type)",
        f"from transformers import {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("{base_ref}")',
        f'model.load_adapter("{load_id}")',
        "```",
        "",
        "With PEFT:",
        "",
        "```python",
        "import impart_peft  # noqa: F401",
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f'base = {auto_class}.from_pretrained("{base_ref}")',
        f'model = PeftModel.from_pretrained(base, "{load_id}")',
        "merged = model.merge_and_unload()  # optional: a plain transformers model with the fine-tune's weights",
        "```",
        "",
        "## Compression",
        "",
        "| | |",
        "|---|---|",
    ]
    target_size = data.get("target_size")
    if target_size is not None:
        lines.append(
            f"| Size budget (target_size; size rule) | {_number(target_size)} "
            f"({data.get('size_rule', 'uniform')}) |"
        )
    nominal = "none (lossless)" if lossless else _number(stats.nominal_ratio)
    if target_size is not None and not lossless:
        nominal += " (achieved under the size budget)"
    lines += [
        f"| Compression ratio, nominal | {nominal} |",
        f"| Compression ratio, values (dense delta values / stored U, V values) | {_ratio(stats.values_ratio)} |",
        f"| Compression ratio, on disk (dense delta bytes / adapter file bytes) | {_ratio(stats.disk_ratio)} |",
    ]
    per_matrix = per_matrix_settings(data.get("module_meta") or {})
    if per_matrix and per_matrix["ratio_min"] is not None:
        lines.append(
            "| Compression ratio per matrix, min / median / max | "
            + " / ".join(f"{float(per_matrix[k]):.2f}" for k in ("ratio_min", "ratio_median", "ratio_max"))
            + " |"
        )
    lines += [
        f"| Pre-prune ratio (beta) | {_setting_cell(data, 'pre_prune_ratio')} |",
        f"| Importance exponent (C) | {_setting_cell(data, 'importance_exponent')} |",
        f"| Mask seed | {data.get('seed')} |",
        f"| Compressed matrices | {stats.matrices} ({stats.kept_pairs:,} singular pairs kept) |",
        f"| Dense 1-D deltas (norms, biases) | {stats.vectors} |",
    ]
    if stats.tied:
        lines.append(f"| Tied output heads (share the embedding's delta) | {stats.tied} |")
    finetuned_size = _size(stats.finetuned_bytes)
    if stats.finetuned_num_parameters is not None:
        finetuned_size += f", {_count(stats.finetuned_num_parameters)} parameters"
    lines += [
        f"| Size of the fine-tune ({stats.reference_dtype}) | {finetuned_size} |",
        f"| Size of the dense delta ({stats.reference_dtype}) | {_size(stats.dense_bytes)} |",
        f"| Size of the adapter (adapter_model.safetensors) | {_size(stats.adapter_bytes)} |",
        f"| Fine-tune size / adapter size | {_ratio(stats.finetune_ratio)} |",
        "",
        "## How it was made",
        "",
        "With "
        + ", ".join(f"{lib} {version}" for lib, version in versions.items())
        + (" (SVD in float64)." if data.get("svd_dtype") == "float64" else "."),
        "",
    ]
    if command:
        lines += ["```bash", command, "```"]
    else:
        lines += [
            "```python",
            "import impart_peft",
            "from impart_peft import ImPartConfig",
            "",
            f"config = {_config_call(data)}",
            "model = impart_peft.from_finetuned(base, finetuned, config)",
            f'model.push_to_hub("{repo_id}")' if repo_id else 'model.save_pretrained("path/to/this/adapter")',
            "```",
        ]
    inputs = {
        "command": command,
        "finetuned_num_parameters": stats.finetuned_num_parameters,
        "license": license or None,
        "tags": user_tags,
    }
    lines += ["", f"<!-- {CARD_MARKER} {json.dumps(inputs, sort_keys=True)} -->", ""]
    return "\n".join(lines)


def read_card_inputs(text: str) -> dict[str, Any]:
    """The user inputs a card made by :func:`build_model_card` recorded (``{}`` for any other card)."""
    match = _INPUTS_RE.search(text or "")
    if match is None:
        return {}
    try:
        data = json.loads(match.group(1))
    except json.JSONDecodeError:
        return {}
    keys = ("command", "finetuned_num_parameters", "license", "tags")
    return {k: data[k] for k in keys if data.get(k) not in (None, [], "")}


def folder_card(
    folder: str,
    data: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    finetuned_num_parameters: int | None = None,
    tags: Sequence[str] | None = None,
    license: str | None = None,
    command: str | None = None,
    versions: Mapping[str, str] | None = None,
) -> str:
    """The card of the adapter saved in ``folder`` (``data``: its ``adapter_config.json``): the inputs not given are
    taken from a card written there before (see :func:`read_card_inputs`), the tags given are added to those."""
    previous: dict[str, Any] = {}
    readme = os.path.join(folder, "README.md")
    if os.path.isfile(readme):
        with open(readme, encoding="utf-8", errors="replace") as handle:
            previous = read_card_inputs(handle.read())
    return build_model_card(
        data,
        adapter_bytes=os.path.getsize(os.path.join(folder, "adapter_model.safetensors")),
        repo_id=repo_id,
        finetuned_num_parameters=(
            finetuned_num_parameters
            if finetuned_num_parameters is not None
            else previous.get("finetuned_num_parameters")
        ),
        tags=list(previous.get("tags", [])) + list(tags or []),
        license=license if license is not None else previous.get("license"),
        command=command if command is not None else previous.get("command"),
        versions=versions,
        base_is_local=is_local_path(data.get("base_model_name_or_path")),
    )


def write_model_card(
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    finetuned_num_parameters: int | None = None,
    tags: Sequence[str] | None = None,
    license: str | None = None,
    command: str | None = None,
    versions: Mapping[str, str] | None = None,
) -> str:
    """Write the card of the ImPart adapter saved in ``folder`` to ``folder/README.md`` (atomically).

    Inputs not given are taken from a card this function wrote there before (see :func:`read_card_inputs`);
    tags given are added to those. Returns the card's text.
    """
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist: {folder!r} is not a saved adapter (save it with "
                "PeftModel.save_pretrained or `impart compress` first)"
            )
    with open(config_path, encoding="utf-8") as handle:
        data = json.load(handle)
    text = folder_card(
        folder,
        data,
        repo_id=repo_id,
        finetuned_num_parameters=finetuned_num_parameters,
        tags=tags,
        license=license,
        command=command,
        versions=versions,
    )
    readme = os.path.join(folder, "README.md")
    write_text_atomic(readme, text)
    return text


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
