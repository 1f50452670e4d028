"""Compress and apply ImPart adapters straight from (sharded) safetensors checkpoints, in bounded memory.

:func:`compress_checkpoints` is :func:`impart_peft.from_finetuned` + ``PeftModel.save_pretrained`` for models that do
not fit in memory: it plans the modules from the architecture alone (the model is built from ``config.json`` on the
``meta`` device, which allocates nothing), then reads one (base, fine-tune) tensor pair at a time with safetensors'
lazy ``safe_open``, compresses it with the same :func:`~impart_peft.compressor.compress_module`, and spills the
result to disk at once. Peak memory is a few tensors (the largest matrix, its SVD and workspace), whatever the
number of layers. The adapter written has the same ``adapter_model.safetensors`` bytes as ``from_finetuned`` +
``save_pretrained`` for the same inputs, config and device.

:func:`apply_adapter` is the reverse, ``merge_and_unload`` + ``save_pretrained`` streamed one tensor at a time: it
writes base + adapter as a standard transformers checkpoint. :func:`inspect_adapter` and :func:`evaluate_adapter`
back ``impart inspect`` and ``impart eval``.

Every folder is written atomically: into a hidden temporary folder beside the output, renamed into place only when
complete, so an interrupted run leaves nothing that looks like a finished adapter or model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .compressor import ModulePlan, _check_same_architecture, compress_module, plan_modules
from .config import ImPartConfig
from .delta import CompressedDelta
from .fingerprint import check_fingerprint
from .quantization import QuantizedDelta

__all__ = [
    "ADAPTER_PREFIX",
    "AdapterSummary",
    "Checkpoint",
    "EvalResult",
    "ModuleSummary",
    "apply_adapter",
    "compress_checkpoints",
    "evaluate_adapter",
    "inspect_adapter",
    "resolve_folder",
    "write_safetensors",
]

ADAPTER_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names adapter tensors
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_SAFETENSORS_METADATA = {"format": "pt"}

# Files besides the weights that make a model folder usable: tokenizer, chat template, generation defaults.
SIDE_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_TOKENIZER_FILES = tuple(p for p in SIDE_FILE_PATTERNS if p not in ("generation_config.json",))
_MODEL_DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", *SIDE_FILE_PATTERNS]
_ADAPTER_DOWNLOAD_PATTERNS = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "*.md", *SIDE_FILE_PATTERNS]

# safetensors dtype names, and the order in which safetensors.torch.save_file lays tensors out (by dtype, from
# this list's first entry to its last, then by name). Reproducing it lets a file streamed from disk have the
# exact bytes of one written by save_file from memory.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_NAMES = {name: dtype for dtype, name in _ST_DTYPES.items()}
_ST_RANK = {dtype: rank for rank, dtype in enumerate(_ST_DTYPES)}
_COPY_CHUNK = 16 << 20


# ---------------------------------------------------------------------------------------------------------- paths
def _looks_like_repo_id(text: str) -> bool:
    return (
        re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text) is not None
        and ".." not in text
        and not text.endswith((".json", ".safetensors"))
    )


def resolve_folder(path_or_repo_id: str | os.PathLike, role: str = "model", adapter: bool = False) -> Path:
    """A local folder for ``path_or_repo_id``: the folder itself, or a Hub snapshot of that repo id.

    A Hub id is fetched with :func:`impart_peft.hub.resolve_checkpoint` (model: safetensors weights, JSON configs,
    tokenizer files) or :func:`impart_peft.hub.resolve_adapter` (``adapter=True``), which explain each way a
    download fails. ``role`` names the argument in error messages ("base", "fine-tune", "adapter").

    Raises:
        FileNotFoundError: the path does not exist and is not a repo id that could be downloaded.
        NotADirectoryError: the path is a file.
    """
    text = os.fspath(path_or_repo_id)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"the {role} {text!r} is a file: pass the folder that holds it")
        return path
    if not _looks_like_repo_id(text):
        raise FileNotFoundError(f"the {role} folder {text!r} does not exist")
    try:
        from .hub import resolve_adapter, resolve_checkpoint
    except ImportError:  # an installation without the Hub module: a plain snapshot download
        from huggingface_hub import snapshot_download

        patterns = _ADAPTER_DOWNLOAD_PATTERNS if adapter else _MODEL_DOWNLOAD_PATTERNS
        try:
            return Path(snapshot_download(text, allow_patterns=patterns))
        except (
            Exception
        ) as error:  # network, auth, missing repo: all mean "cannot get it"; say why in one line
            reason = " ".join(str(error).split()) or type(error).__name__
            raise FileNotFoundError(
                f"the {role} {text!r} is not a local folder, and downloading it as a Hub repo id failed: {reason}"
            ) from error
    return Path(resolve_adapter(text) if adapter else resolve_checkpoint(text))


# ---------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives and what it is (read from the safetensors header alone)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # start of the data within the file's data section

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_header(file: Path) -> dict[str, Any]:
    with open(file, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 << 20:
            raise ValueError(f"{file} is not a safetensors file (header length {length})")
        try:
            return json.loads(handle.read(length))
        except ValueError as error:
            raise ValueError(f"{file} is not a safetensors file (unreadable header: {error})") from error


class Checkpoint:
    """A model folder of safetensors weights (one ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``), read lazily: the headers up front, one tensor at a time on demand.

    Args:
        folder: the local folder.
        role: what it is, for error messages ("base", "fine-tune").
    """

    def __init__(self, folder: str | os.PathLike, role: str = "model") -> None:
        self.folder = Path(folder)
        self.role = role
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            found = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                p.name for p in self.folder.glob("*.safetensors")
            )
            hint = (
                f" It has {', '.join(found[:3])}: convert it with AutoModelForCausalLM.from_pretrained(folder)"
                ".save_pretrained(new_folder), which writes safetensors."
                if found
                else ""
            )
            raise FileNotFoundError(
                f"the {role} folder {os.fspath(self.folder)!r} has no model.safetensors or "
                f"model.safetensors.index.json.{hint}"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = self.folder / name
            if not file.is_file():
                raise FileNotFoundError(
                    f"the {role} checkpoint lists shard {name}, which is missing from {self.folder}"
                )
            header = _read_header(file)
            entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
            for key, entry in sorted(entries, key=lambda kv: kv[1]["data_offsets"][0]):
                dtype = _ST_NAMES.get(entry["dtype"])
                if dtype is None:
                    raise ValueError(
                        f"{file.name}: tensor {key} has dtype {entry['dtype']}, which is not supported"
                    )
                self.tensors[key] = TensorInfo(file, dtype, tuple(entry["shape"]), entry["data_offsets"][0])
        self._config: Any = None

    @property
    def config(self):
        """The ``transformers`` config of the folder (``config.json``)."""
        if self._config is None:
            if not (self.folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"the {self.role} folder {os.fspath(self.folder)!r} has no config.json: it is not a transformers "
                    "model folder"
                )
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.folder)
        return self._config

    def key_for(self, param_name: str, prefix: str = "") -> str | None:
        """The checkpoint key of the model parameter ``param_name``, allowing for a missing or extra base-model
        prefix (``"transformer."`` in old GPT-2 files); ``None`` if the checkpoint does not hold it."""
        if param_name in self.tensors:
            return param_name
        if prefix:
            if param_name.startswith(prefix + ".") and param_name[len(prefix) + 1 :] in self.tensors:
                return param_name[len(prefix) + 1 :]
            if f"{prefix}.{param_name}" in self.tensors:
                return f"{prefix}.{param_name}"
        return None

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, memory-mapped (its pages are read when used and released when it is dropped)."""
        from safetensors import safe_open

        info = self.tensors[key]
        with safe_open(info.file, framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)


def _meta_model(config) -> nn.Module:
    """The model class of ``config`` built on the meta device: its structure without any memory for weights."""
    import transformers

    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        return transformers.AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------------------------------------------- writing
def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).cpu().numpy()).cast("B")


def _safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * _itemsize(dtype)
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    # safetensors pads the header with spaces so that the data starts 8-byte aligned.
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _SafetensorsStream:
    """Writes a safetensors file whose tensors (names, dtypes, shapes, order) are known up front, one tensor at a
    time: the header first, then each tensor's bytes as it is produced. Peak memory is one tensor."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata) -> None:
        for name, dtype, _ in entries:
            if dtype not in _ST_DTYPES:
                raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        self.path = path
        self._entries = entries
        self._next = 0
        self._handle: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._handle.write(_safetensors_header(entries, metadata))

    def write(self, name: str, data: torch.Tensor | bytes | memoryview) -> None:
        expected, dtype, shape = self._entries[self._next]
        if name != expected:
            raise RuntimeError(f"safetensors stream: expected tensor {expected}, got {name}")
        if isinstance(data, torch.Tensor):
            if data.dtype != dtype or tuple(data.shape) != tuple(shape):
                raise RuntimeError(
                    f"{name}: got {data.dtype} {tuple(data.shape)}, declared {dtype} {tuple(shape)}"
                )
            data = _tensor_bytes(data)
        if len(data) != math.prod(shape) * _itemsize(dtype):
            raise RuntimeError(f"{name}: {len(data)} bytes for a declared {dtype} {tuple(shape)}")
        self._handle.write(data)
        self._next += 1

    def write_from(self, name: str, source: BinaryIO, offset: int, nbytes: int) -> None:
        """Copy the tensor's bytes from ``source`` (a spill file) in chunks."""
        expected, dtype, shape = self._entries[self._next]
        if name != expected or nbytes != math.prod(shape) * _itemsize(dtype):
            raise RuntimeError(f"safetensors stream: expected tensor {expected}, got {name} ({nbytes} bytes)")
        source.seek(offset)
        left = nbytes
        while left:
            chunk = source.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise RuntimeError(f"{name}: spill file ended early")
            self._handle.write(chunk)
            left -= len(chunk)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._entries):
            self._handle.close()
            raise RuntimeError(f"{self.path.name}: {len(self._entries) - self._next} tensor(s) never written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def abort(self) -> None:
        self._handle.close()


def _save_file_order(entries):
    return sorted(entries, key=lambda e: (_ST_RANK[e[1]], e[0]))


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` like ``safetensors.torch.save_file`` (same bytes), streaming each tensor to the file."""
    entries = _save_file_order([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
    stream = _SafetensorsStream(Path(path), entries, metadata)
    try:
        for name, _, _ in entries:
            stream.write(name, tensors[name])
    except BaseException:
        stream.abort()
        raise
    stream.close()


class _Spill:
    """Adapter tensors as they are produced, appended to a scratch file so none stays in memory; ``finish``
    lays them out in a safetensors file exactly as ``save_file`` would have from a dict of all of them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: BinaryIO = open(path, "w+b")  # noqa: SIM115 (closed in finish/close)
        self._records: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._records:
            raise RuntimeError(f"adapter tensor {name} written twice")
        data = _tensor_bytes(tensor)
        self._handle.write(data)
        self._records[name] = (tensor.dtype, tuple(tensor.shape), self._offset, len(data))
        self._offset += len(data)

    @property
    def nbytes(self) -> int:
        return self._offset

    def finish(self, path: Path, metadata) -> None:
        self._handle.flush()
        entries = _save_file_order([(n, r[0], r[1]) for n, r in self._records.items()])
        stream = _SafetensorsStream(path, entries, metadata)
        try:
            for name, _, _ in entries:
                _, _, offset, nbytes = self._records[name]
                stream.write_from(name, self._handle, offset, nbytes)
        except BaseException:
            stream.abort()
            raise
        stream.close()

    def close(self) -> None:
        self._handle.close()
        self.path.unlink(missing_ok=True)


def _check_output(output: str | os.PathLike, overwrite: bool) -> None:
    output = Path(output).expanduser()
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"the output {os.fspath(output)!r} is a file")
        if any(output.iterdir()) and not overwrite:
            raise FileExistsError(
                f"the output folder {os.fspath(output)!r} already exists and is not empty: choose another folder "
                "or pass overwrite=True (--overwrite on the command line)"
            )


@contextlib.contextmanager
def _atomic_folder(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden scratch folder beside ``output``; on success it replaces ``output``, on error it is removed."""
    _check_output(output, overwrite)
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield scratch
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.rename(output, old / "replaced")
            os.rename(scratch, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(scratch, output)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _copy_side_files(sources: list[Path], destination: Path) -> list[str]:
    """Copy tokenizer / generation files, the first source that has a file winning; returns the names copied."""
    copied: dict[str, Path] = {}
    for source in sources:
        for pattern in SIDE_FILE_PATTERNS:
            for file in sorted(source.glob(pattern)):
                if file.is_file() and file.name not in copied:
                    copied[file.name] = file
    for name, file in copied.items():
        shutil.copyfile(file, destination / name)
    return sorted(copied)


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def _check_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {str(device)!r}: use 'cpu', 'cuda' or 'cuda:N'") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was asked for but CUDA is not available here: use 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} does not exist: {torch.cuda.device_count()} GPU(s) here"
            )
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"unsupported device {str(device)!r}: use 'cpu' or 'cuda'")
    return device


# -------------------------------------------------------------------------------------------------- compress
@dataclass
class _PlannedModule:
    plan: ModulePlan
    params: dict[str, tuple[str, str]]  # short param name -> (base key, fine-tune key)


def _embedding_rows(model: nn.Module, checkpoint: Checkpoint, prefix: str) -> tuple[str, int] | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return None
    for name, module in model.named_modules():
        if module is embeddings:
            key = checkpoint.key_for(f"{name}.weight", prefix)
            if key is not None:
                return name, checkpoint.tensors[key].shape[0]
    return None


def _plan_checkpoint_pair(
    base: Checkpoint, finetuned: Checkpoint, config: ImPartConfig
) -> tuple[nn.Module, dict[str, _PlannedModule]]:
    """Plan the modules from the architecture and map each planned parameter to both checkpoints' keys, checking
    that the two checkpoints are the same architecture before anything is compressed."""
    base_type = getattr(base.config, "model_type", None)
    ft_type = getattr(finetuned.config, "model_type", None)
    if base_type != ft_type:
        raise ValueError(
            f"the base is a {base_type!r} model and the fine-tune a {ft_type!r} model: they are not the same "
            "architecture. Pass the base model the fine-tune was trained from."
        )
    base_model = _meta_model(base.config)
    ft_model = _meta_model(finetuned.config)
    prefix = getattr(base_model, "base_model_prefix", "") or ""

    base_rows = _embedding_rows(base_model, base, prefix)
    ft_rows = _embedding_rows(ft_model, finetuned, prefix)
    if base_rows and ft_rows and base_rows[1] != ft_rows[1]:
        raise ValueError(
            f"the fine-tune's vocabulary has {ft_rows[1]} tokens and the base's {base_rows[1]}: the fine-tune "
            "added tokens (resized its embeddings), and an adapter can only hold deltas of same-shaped weights. "
            f"Resize the base's embeddings to {ft_rows[1]} rows (model.resize_token_embeddings), save that base, "
            "compress against it, and publish it with the adapter."
        )

    # Every parameter and buffer of the two architectures, by name and shape (one layer more, a value head...).
    _check_same_architecture(base_model, ft_model)

    plans = plan_modules(base_model, config)
    ft_tied = {n for n, p in plan_modules(ft_model, config).items() if p.kind == "tied"}
    base_tied = {n for n, p in plans.items() if p.kind == "tied"}
    if base_tied != ft_tied:
        raise ValueError(
            f"the base ties {sorted(base_tied) or 'no'} output head(s) to the input embeddings but the fine-tune "
            f"ties {sorted(ft_tied) or 'none'} (tie_word_embeddings in config.json): they are not the same "
            "architecture"
        )
    planned: dict[str, _PlannedModule] = {}
    problems: list[str] = []
    for name, plan in plans.items():
        module = base_model.get_submodule(name)
        params: dict[str, tuple[str, str]] = {}
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{name}.{param_name}"
            if plan.kind == "tied":
                params[param_name] = (full, full)  # shares the embedding: nothing is read
                continue
            base_key = base.key_for(full, prefix)
            ft_key = finetuned.key_for(full, prefix)
            if base_key is None or ft_key is None:
                missing = "base" if base_key is None else "fine-tune"
                problems.append(f"{full} is missing from the {missing} checkpoint")
                continue
            base_shape = base.tensors[base_key].shape
            ft_shape = finetuned.tensors[ft_key].shape
            if base_shape != tuple(param.shape):
                problems.append(
                    f"{full} has shape {base_shape} in the base checkpoint, its config says {tuple(param.shape)}"
                )
            elif ft_shape != base_shape:
                problems.append(f"{full} has shape {base_shape} in the base but {ft_shape} in the fine-tune")
            params[param_name] = (base_key, ft_key)
        planned[name] = _PlannedModule(plan, params)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            "the base and the fine-tune checkpoints are not the same architecture: "
            + "; ".join(problems[:3])
            + more
            + ". Pass the base model the fine-tune was trained from."
        )
    return base_model, planned


def compress_checkpoints(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: ImPartConfig | None = None,
    device: str | torch.device | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Compress a fine-tune against its base, from their checkpoints, into an ImPart adapter folder.

    Args:
        base / finetuned: local folders or Hub repo ids holding ``config.json`` and safetensors weights
            (``model.safetensors`` or shards listed in ``model.safetensors.index.json``), fp32, fp16 or bf16.
        output_dir: the adapter folder to write (``adapter_config.json``, ``adapter_model.safetensors``, and the
            fine-tune's tokenizer and generation files when it has them). Written atomically.
        config: an :class:`ImPartConfig` (default ``ImPartConfig()``).
        device: where to run each SVD (``"cuda"`` is much faster); default the CPU. The masks are the same on
            every device, but the SVD's float rounding is not: byte-identical output needs the same device.
        overwrite: replace ``output_dir`` if it exists and is not empty.
        progress: show a tqdm progress bar (tensors done, elapsed, ETA) on stderr.
        command: the command line that made the adapter, recorded in its model card (``README.md``).

    Returns:
        The output folder. Its ``adapter_model.safetensors`` has the bytes ``from_finetuned(base, finetuned,
        config).save_pretrained(...)`` writes for the same inputs on the same device.

    Memory: one (base, fine-tune) tensor pair and its SVD at a time; compressed tensors go to a scratch file at
    once, so the peak does not grow with the number of layers.
    """
    device = _check_device(device)
    _check_output(output_dir, overwrite)  # before any download or planning
    config = ImPartConfig(
        **{**(config or ImPartConfig()).to_dict(), "module_meta": {}, "base_fingerprint": {}}
    )
    base_checkpoint = Checkpoint(resolve_folder(base, "base"), "base")
    ft_checkpoint = Checkpoint(resolve_folder(finetuned, "fine-tune"), "fine-tune")
    meta_model, planned = _plan_checkpoint_pair(base_checkpoint, ft_checkpoint, config)
    total = sum(len(p.params) for p in planned.values() if p.plan.kind != "tied")

    module_meta: dict[str, dict[str, Any]] = {}
    fingerprints: dict[str, list[float]] = {}
    with _atomic_folder(output_dir, overwrite) as scratch:
        spill = _Spill(scratch / ".tensors.spill")
        try:
            with _progress(total, "compress", "tensor", progress) as bar, torch.no_grad():
                for name, item in planned.items():
                    if item.plan.kind == "tied":
                        weight = meta_model.get_submodule(name).weight
                        meta, tensors, fingerprint = compress_module(
                            item.plan, {"weight": weight}, {"weight": weight}, config
                        )
                    else:
                        base_params = {p: base_checkpoint.read(keys[0]) for p, keys in item.params.items()}
                        ft_params = {p: ft_checkpoint.read(keys[1]) for p, keys in item.params.items()}
                        meta, tensors, fingerprint = compress_module(
                            item.plan, base_params, ft_params, config, device=device
                        )
                        del base_params, ft_params
                        bar.update(len(item.params))
                    if fingerprint is not None and item.plan.kind != "tied":
                        fingerprints[name] = fingerprint
                    if meta is not None:
                        module_meta[name] = meta
                        for param_name, tensor in tensors.items():
                            spill.add(f"{ADAPTER_PREFIX}{name}.{param_name}", tensor)
                    del tensors
            # A tied head without its embedding's delta carries nothing (as in from_finetuned).
            module_meta = {
                n: m for n, m in module_meta.items() if m["kind"] != "tied" or m["tied_to"] in module_meta
            }
            if not module_meta:
                raise ValueError(
                    "the fine-tune is identical to the base in every targeted module: nothing to compress"
                )
            spill.finish(scratch / ADAPTER_WEIGHTS, _SAFETENSORS_METADATA)
        finally:
            spill.close()

        config.module_meta = module_meta
        config.base_fingerprint = {n: fingerprints[n] for n in module_meta if n in fingerprints}
        config.base_model_name_or_path = os.fspath(base)
        config.finetuned_model_name_or_path = os.fspath(finetuned)
        config.inference_mode = True
        # As ImPartModel leaves it after injection: module_meta lists the targets. (A list naming the embeddings
        # would make PeftModel.save_pretrained store the base's embedding matrices if this adapter is re-saved.)
        config.target_modules = None
        model_cls = type(meta_model)
        # What PeftModel.save_pretrained records for a model without a task type.
        config.save_pretrained(
            os.fspath(scratch),
            auto_mapping_dict={
                "base_model_class": model_cls.__name__,
                "parent_library": model_cls.__module__,
            },
        )
        _copy_side_files([ft_checkpoint.folder], scratch)
        _write_model_card(scratch, ft_checkpoint, command)
    return Path(output_dir).expanduser()


def _write_model_card(folder: Path, finetuned: Checkpoint, command: str | None) -> None:
    """The README.md that PeftModel.save_pretrained writes for an ImPart adapter (when impart_peft.modelcard exists)."""
    try:
        from .modelcard import write_model_card
    except ImportError:
        return
    seen: set[tuple[Path, int]] = set()
    parameters = 0
    for info in finetuned.tensors.values():
        if (info.file, info.offset) not in seen:  # a tensor stored once counts once
            seen.add((info.file, info.offset))
            parameters += math.prod(info.shape)
    write_model_card(os.fspath(folder), finetuned_num_parameters=parameters, command=command)


# ----------------------------------------------------------------------------------------------------- adapter
def _load_adapter_config(folder: Path) -> ImPartConfig:
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"the adapter folder {os.fspath(folder)!r} has no {ADAPTER_CONFIG}")
    raw = json.loads(file.read_text())
    if raw.get("peft_type") != "IMPART":
        raise ValueError(
            f"{os.fspath(file)!r} is a {raw.get('peft_type')!r} adapter, not an ImPart one: use PEFT's own tools for it"
        )
    return ImPartConfig.from_pretrained(os.fspath(folder))


class _AdapterTensors:
    """The tensors of an adapter file, read per module on demand."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / ADAPTER_WEIGHTS
        if not self.file.is_file():
            raise FileNotFoundError(f"the adapter folder {os.fspath(folder)!r} has no {ADAPTER_WEIGHTS}")
        header = _read_header(self.file)
        self.header = {k: v for k, v in header.items() if k != "__metadata__"}

    def module(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        prefix = f"{ADAPTER_PREFIX}{name}."
        keys = [k for k in self.header if k.startswith(prefix) and "." not in k[len(prefix) :]]
        with safe_open(self.file, framework="pt", device="cpu") as handle:
            return {k[len(prefix) :]: handle.get_tensor(k).clone() for k in keys}


def _module_deltas(
    name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor], seed: int, device: torch.device | None
) -> dict[str, torch.Tensor]:
    """Dense deltas of one module's parameters, computed as ImPartLayer.merge computes them."""
    deltas: dict[str, torch.Tensor] = {}
    if (
        meta["kind"] in ("linear", "conv1d", "embedding")
        and int(meta.get("rank", 0)) > 0
        and "quantized" in meta
    ):
        quantized = QuantizedDelta.from_state_dict(
            {k.removeprefix("impart_"): v for k, v in tensors.items() if not k.startswith("impart_delta_")},
            shape=tuple(meta["shape"]),
            quantized_meta=meta["quantized"],
            seed=seed,
            name=name,
        )
        u, sigma, v = quantized.factors(torch.float32, device)
        deltas["weight"] = (u * sigma) @ v.t()  # the product ImPartLayer.get_delta_weight forms
    elif meta["kind"] in ("linear", "conv1d", "embedding") and int(meta.get("rank", 0)) > 0:
        compressed = CompressedDelta.from_state_dict(
            {k.removeprefix("impart_"): v for k, v in tensors.items() if not k.startswith("impart_delta_")},
            shape=tuple(meta["shape"]),
            seed=seed,
            name=name,
        )
        u, sigma, v = compressed.factors(torch.float32, device)
        deltas["weight"] = (u * sigma) @ v.t()  # the product ImPartLayer.get_delta_weight forms
    for param_name in meta.get("vectors", {}):
        deltas[param_name] = tensors[f"impart_delta_{param_name}"]
    return deltas


def _merge(original: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    # Exactly ImPartLayer.merge: add in float32 (or the delta's wider dtype), cast back to the weight's dtype.
    work = torch.promote_types(torch.float32, delta.dtype)
    return (original.to(delta.device, work) + delta.to(work)).to(original.dtype).cpu()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if match is None:
        raise ValueError(f"cannot read the size {size!r}: write e.g. '5GB', '500MB' or a number of bytes")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    scale = (1024 if binary else 1000) ** "_KMGT".index(unit or "_")
    return int(number * scale)


def apply_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write base + adapter as a standard transformers checkpoint (the merged fine-tune), streaming.

    Args:
        base: folder or Hub repo id of the base model the adapter was compressed against.
        adapter: folder or Hub repo id of an ImPart adapter.
        output_dir: the model folder to write, atomically: ``config.json`` (the base's), safetensors weights in the
            base's dtypes, sharded at ``max_shard_size`` (with ``model.safetensors.index.json``), and the tokenizer
            and generation files, the adapter's when it has them (the fine-tune's), else the base's.
        device: where to rebuild each delta (default the CPU).

    Each tensor is ``(W_base.float() + ΔW_c).to(W_base.dtype)`` computed as ``ImPartLayer.merge`` does, so the
    result equals ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` on the same device. Memory: one
    tensor and its delta at a time. The base fingerprint is checked as loading checks it (``base_check``,
    ``IMPART_BASE_CHECK``).
    """
    import warnings

    device = _check_device(device)
    _check_output(output_dir, overwrite)
    shard_limit = _parse_size(max_shard_size)
    adapter_folder = resolve_folder(adapter, "adapter", adapter=True)
    config = _load_adapter_config(adapter_folder)
    adapter_tensors = _AdapterTensors(adapter_folder)
    checkpoint = Checkpoint(resolve_folder(base, "base"), "base")
    meta_model = _meta_model(checkpoint.config)
    prefix = getattr(meta_model, "base_model_prefix", "") or ""
    check_mode = os.environ.get("IMPART_BASE_CHECK", config.base_check)

    # checkpoint key -> (module name, param name, the module whose delta applies)
    targets: dict[str, tuple[str, str, str]] = {}
    problems = []
    for name, meta in config.module_meta.items():
        params = ["weight"] if meta["kind"] in ("linear", "conv1d", "embedding", "tied") else []
        params += [p for p in meta.get("vectors", {}) if p not in params]
        source = meta.get("tied_to", name) if meta["kind"] == "tied" else name
        for param_name in params:
            key = checkpoint.key_for(f"{name}.{param_name}", prefix)
            if key is None:
                if meta["kind"] == "tied":
                    continue  # the checkpoint omits the tied head: the embedding carries it
                problems.append(f"{name}.{param_name} is not in the base checkpoint")
                continue
            if (
                param_name == "weight"
                and "shape" in meta
                and checkpoint.tensors[key].shape != tuple(meta["shape"])
            ):
                problems.append(
                    f"{name}.weight has shape {checkpoint.tensors[key].shape}, the adapter expects {tuple(meta['shape'])}"
                )
            targets[key] = (name, param_name, source)
    if problems:
        raise ValueError(
            f"this ImPart adapter does not fit the base ({'; '.join(problems[:3])}): apply it to the base model "
            f"it was compressed from ({config.base_model_name_or_path or 'see adapter_config.json'})"
        )

    keys = list(checkpoint.tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = checkpoint.tensors[key].nbytes
        if shards[-1] and size + nbytes > shard_limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    # Rebuilt deltas are dropped after their last use (a tied head's comes after its embedding's).
    last_use = {source: key for key in keys if key in targets for source in [targets[key][2]]}
    deltas_cache: dict[str, dict[str, torch.Tensor]] = {}
    with _atomic_folder(output_dir, overwrite) as scratch, torch.no_grad():
        with _progress(len(keys), "apply", "tensor", progress) as bar:
            for shard_name, shard_keys in zip(names, shards, strict=True):
                entries = [(k, checkpoint.tensors[k].dtype, checkpoint.tensors[k].shape) for k in shard_keys]
                stream = _SafetensorsStream(scratch / shard_name, entries, _SAFETENSORS_METADATA)
                try:
                    for key in shard_keys:
                        tensor = checkpoint.read(key)
                        if key in targets:
                            name, param_name, source = targets[key]
                            meta = config.module_meta[name]
                            if (
                                param_name == "weight"
                                and meta["kind"] != "tied"
                                and name in config.base_fingerprint
                            ):
                                holder = nn.Module()
                                holder.weight = tensor
                                if (
                                    check_fingerprint(holder, {"": config.base_fingerprint[name]})
                                    and check_mode != "ignore"
                                ):
                                    message = (
                                        f"the base's {name}.weight differs from the one the adapter was compressed "
                                        f"against: apply it to {config.base_model_name_or_path or 'its own base'}, or "
                                        "set IMPART_BASE_CHECK=warn to proceed anyway"
                                    )
                                    if check_mode == "error":
                                        raise ValueError(message)
                                    warnings.warn(message, stacklevel=2)
                            if source not in deltas_cache:
                                deltas_cache[source] = _module_deltas(
                                    source,
                                    config.module_meta[source],
                                    adapter_tensors.module(source),
                                    config.seed,
                                    device,
                                )
                            delta = deltas_cache[source].get(param_name)
                            if delta is not None:
                                tensor = _merge(tensor, delta)
                            if last_use[source] == key:
                                deltas_cache.pop(source, None)
                        stream.write(key, tensor)
                        del tensor
                        bar.update(1)
                except BaseException:
                    stream.abort()
                    raise
                stream.close()
        if len(shards) > 1:
            index = {
                "metadata": {
                    "total_parameters": sum(math.prod(checkpoint.tensors[k].shape) for k in keys),
                    "total_size": sum(checkpoint.tensors[k].nbytes for k in keys),
                },
                "weight_map": {k: n for n, ks in zip(names, shards, strict=True) for k in ks},
            }
            (scratch / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
        shutil.copyfile(checkpoint.folder / "config.json", scratch / "config.json")
        _copy_side_files([adapter_folder, checkpoint.folder], scratch)
    return Path(output_dir).expanduser()


# ------------------------------------------------------------------------------------------------------ inspect
@dataclass
class ModuleSummary:
    """One row of ``impart inspect``."""

    name: str
    kind: str  # "linear" | "conv1d" | "embedding" | "tied" | "vector"
    shape: tuple[int, ...]  # the compressed matrix (m, n), or the vector's (length,)
    dtype: str  # the fine-tune's dtype (reference of the on-disk ratio)
    rank: int  # kept singular pairs r
    full_rank: int  # min(m, n) (0 for vectors and tied heads)
    matrix_values: int  # m * n of the dense matrix delta (0 if none)
    factor_values: int  # kept U and V values (what the compression ratio budgets)
    stored_values: int  # every stored value: factors, singular values, dense vector deltas
    dense_bytes: int  # the dense deltas this module replaces, in the fine-tune's dtype
    stored_bytes: int  # bytes of this module's tensors in the file
    tied_to: str | None = None
    factor_bits: int | None = None  # ImPart-QT only: bits of the packed codes and their scales

    @property
    def nominal_ratio(self) -> float | None:
        """Dense matrix values / kept factor values: the quantity ``compression_ratio`` sets (``None`` if no matrix).
        For ImPart-QT, in bits: dense matrix bits in the fine-tune's dtype / bits of the codes and scales."""
        if self.factor_bits:
            return self.matrix_values * _itemsize(getattr(torch, self.dtype)) * 8 / self.factor_bits
        return self.matrix_values / self.factor_values if self.factor_values else None

    @property
    def disk_ratio(self) -> float | None:
        """Dense bytes / bytes on disk (``None`` when nothing is stored)."""
        return self.dense_bytes / self.stored_bytes if self.stored_bytes else None


@dataclass
class AdapterSummary:
    """What ``impart inspect`` reports about an adapter folder."""

    folder: Path
    config: ImPartConfig
    modules: list[ModuleSummary] = field(default_factory=list)
    file_bytes: int = 0  # size of adapter_model.safetensors, header included
    other_tensors: dict[str, int] = field(default_factory=dict)  # non-ImPart tensors in the file -> bytes

    @property
    def matrix_values(self) -> int:
        return sum(m.matrix_values for m in self.modules)

    @property
    def factor_values(self) -> int:
        return sum(m.factor_values for m in self.modules)

    @property
    def stored_values(self) -> int:
        return sum(m.stored_values for m in self.modules)

    @property
    def dense_bytes(self) -> int:
        return sum(m.dense_bytes for m in self.modules)

    @property
    def nominal_ratio(self) -> float | None:
        """Dense matrix values / kept factor values over every compressed matrix (in bits for ImPart-QT)."""
        if any(m.factor_bits for m in self.modules):
            dense = sum(m.matrix_values * _itemsize(getattr(torch, m.dtype)) * 8 for m in self.modules)
            stored = sum(
                m.factor_bits or m.factor_values * _itemsize(getattr(torch, m.dtype)) * 8
                for m in self.modules
            )
            return dense / stored if stored else None
        return self.matrix_values / self.factor_values if self.factor_values else None

    @property
    def disk_ratio(self) -> float | None:
        """Dense deltas of every covered parameter, in the fine-tune's dtype / the adapter file's size."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else None


def inspect_adapter(adapter: str | os.PathLike) -> AdapterSummary:
    """Per-module shapes, kept pairs, stored values and ratios of an ImPart adapter (read from its config and the
    safetensors header: no tensor is loaded)."""
    folder = resolve_folder(adapter, "adapter", adapter=True)
    config = _load_adapter_config(folder)
    tensors = _AdapterTensors(folder)
    bytes_by_module: dict[str, int] = {}
    values_by_module: dict[str, int] = {}
    other: dict[str, int] = {}
    for key, entry in tensors.header.items():
        start, end = entry["data_offsets"]
        module, _, param = key.removeprefix(ADAPTER_PREFIX).rpartition(".")
        if module not in config.module_meta or not param.startswith("impart_"):
            other[key] = end - start
            continue
        bytes_by_module[module] = bytes_by_module.get(module, 0) + end - start
        # Keep counts are bookkeeping, not values; ImPart-QT's codes are counted from u_count / v_count below.
        if param not in (
            "impart_keep_count",
            "impart_u_codes",
            "impart_v_codes",
            "impart_u_scales",
            "impart_v_scales",
        ):
            values_by_module[module] = values_by_module.get(module, 0) + math.prod(entry["shape"])
    matrix_dtypes = [m["dtype"] for m in config.module_meta.values() if "dtype" in m]
    default_dtype = max(sorted(set(matrix_dtypes)), key=matrix_dtypes.count) if matrix_dtypes else "float32"
    summary = AdapterSummary(folder, config, file_bytes=tensors.file.stat().st_size, other_tensors=other)
    for name, meta in config.module_meta.items():
        kind = meta["kind"]
        vectors = meta.get("vectors", {})
        dtype = meta.get("dtype", default_dtype)
        matrix_values = full_rank = 0
        if kind in ("linear", "conv1d", "embedding", "tied"):
            shape = tuple(meta["shape"])
            if kind != "tied":
                matrix_values, full_rank = math.prod(shape), min(shape)
        else:
            shape = tuple(vectors.values())[:1]
        dense_values = matrix_values + sum(vectors.values())
        quantized = meta.get("quantized")
        factor_bits = None
        if quantized is not None:
            factor_bits = 8 * (quantized["u_bytes"] + quantized["v_bytes"]) + 16 * (
                quantized["u_groups"] + quantized["v_groups"]
            )
            values_by_module[name] = values_by_module.get(name, 0) + meta["u_count"] + meta["v_count"]
        summary.modules.append(
            ModuleSummary(
                name=name,
                kind=kind,
                shape=shape,
                dtype=dtype,
                rank=int(meta.get("rank", 0)),
                full_rank=full_rank,
                matrix_values=matrix_values,
                factor_values=int(meta.get("u_count", 0)) + int(meta.get("v_count", 0)),
                stored_values=values_by_module.get(name, 0),
                dense_bytes=dense_values * _itemsize(getattr(torch, dtype)),
                stored_bytes=bytes_by_module.get(name, 0),
                tied_to=meta.get("tied_to"),
                factor_bits=factor_bits,
            )
        )
    return summary


# --------------------------------------------------------------------------------------------------------- eval
DEFAULT_EVAL_TEXT = """\
The lighthouse keeper kept two notebooks. In the first he wrote the weather every hour: the direction of the wind,
the height of the swell, the colour of the sky at dawn and at dusk. In the second he wrote everything else. He
noted which ships passed and how late they were, the birds that rested on the gallery rail, the letters he meant
to send and the ones he had received. Over thirty years the first notebook filled eleven volumes and the second
only three, because most days, he said, nothing else happened that was worth more than a line.

When the station was automated, an engineer came to install the new lamp and the sensors that would report the
weather by radio. She read the notebooks while the concrete dried. The weather volumes were precise and a little
dull; the other three were full of small surprises. A seal had slept on the landing stage for a week in 1987. A
yacht had once asked for directions to a harbour that had closed before the war. The keeper had learned to bake
bread in a storm, because the oven was the only warm place when the generator failed.

The engineer asked whether he minded that a machine would now do his work. He said the machine would do the first
notebook better than he had, and that nobody had ever asked anyone to keep the second one. Then he packed both
into a crate, left the kettle for whoever came next, and took the supply boat to the mainland. The lamp has turned
every night since, and the radio reports the wind to the minute, but nobody writes down the seals any more.
"""


@dataclass
class EvalResult:
    """What ``impart eval`` measures on one text, in nats; ``kl_*`` are mean per-token KL(fine-tune || model)."""

    tokens: int
    tokenizer: (
        str  # where the token ids came from: "base tokenizer", "fine-tune tokenizer" or "UTF-8 bytes: ..."
    )
    kl_adapter: float
    kl_base: float
    perplexity_finetuned: float
    perplexity_adapter: float
    perplexity_base: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _has_tokenizer(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in _TOKENIZER_FILES)


def _token_ids(
    text: str, folders: list[tuple[str, Path]], vocab_size: int, max_tokens: int
) -> tuple[torch.Tensor, str]:
    for role, folder in folders:
        if _has_tokenizer(folder):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
            return ids, f"{role} tokenizer"
    # No tokenizer anywhere (e.g. a model built from a config for tests): UTF-8 bytes as ids, folded into the
    # vocabulary. Meaningless as language, but the same ids go to every model, so the KL still compares them.
    data = list(text.encode("utf-8"))[:max_tokens]
    return torch.tensor(
        [[b % vocab_size for b in data]]
    ), "UTF-8 bytes: no tokenizer in the base or the fine-tune"


def _next_token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def evaluate_adapter(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    adapter: str | os.PathLike,
    text: str | None = None,
    *,
    max_tokens: int = 1024,
    device: str | torch.device | None = None,
    dtype: str = "auto",
) -> EvalResult:
    """Next-token KL(fine-tune || base + adapter), KL(fine-tune || base) and the three perplexities on ``text``.

    Args:
        text: the text (default :data:`DEFAULT_EVAL_TEXT`), tokenised with the base's tokenizer, else the
            fine-tune's, else as UTF-8 bytes; at most ``max_tokens`` tokens.
        device: where the models run (default the CPU).
        dtype: ``"auto"`` (the checkpoints' dtype), ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    One model is in memory at a time (the fine-tune, then the base, then the base with the adapter), plus the
    fine-tune's log-probabilities ``(tokens, vocab)`` in float32.
    """
    import gc

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = _check_device(device) or torch.device("cpu")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    base_folder = resolve_folder(base, "base")
    ft_folder = resolve_folder(finetuned, "fine-tune")
    adapter_folder = resolve_folder(adapter, "adapter", adapter=True)
    _load_adapter_config(adapter_folder)
    for role, folder in (("base", base_folder), ("fine-tune", ft_folder)):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the {role} folder {os.fspath(folder)!r} has no config.json")

    def load(folder: Path) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()

    finetuned_model = load(ft_folder)
    vocab_size = finetuned_model.get_output_embeddings().weight.shape[0]
    ids, source = _token_ids(
        text if text is not None else DEFAULT_EVAL_TEXT,
        [("base", base_folder), ("fine-tune", ft_folder)],
        vocab_size,
        max_tokens,
    )
    if ids.shape[1] < 2:
        raise ValueError("the text gives fewer than 2 tokens: nothing to predict")
    targets = ids[0, 1:]
    ft_logp = _next_token_logprobs(finetuned_model, ids)
    del finetuned_model
    gc.collect()

    def kl_and_ppl(logp: torch.Tensor) -> tuple[float, float]:
        kl = (ft_logp.exp() * (ft_logp - logp)).sum(-1).mean()
        nll = -logp.gather(-1, targets[:, None]).mean()
        return float(kl), float(torch.exp(nll))

    base_model = load(base_folder)
    kl_base, ppl_base = kl_and_ppl(_next_token_logprobs(base_model, ids))
    adapted = PeftModel.from_pretrained(base_model, os.fspath(adapter_folder)).eval()
    kl_adapter, ppl_adapter = kl_and_ppl(_next_token_logprobs(adapted, ids))
    _, ppl_ft = kl_and_ppl(ft_logp)
    return EvalResult(
        tokens=int(ids.shape[1]),
        tokenizer=source,
        kl_adapter=kl_adapter,
        kl_base=kl_base,
        perplexity_finetuned=ppl_ft,
        perplexity_adapter=ppl_adapter,
        perplexity_base=ppl_base,
    )
