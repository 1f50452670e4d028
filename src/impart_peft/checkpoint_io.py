"""Checkpoint and adapter folders on disk: found (locally or as a Hub snapshot), read lazily one tensor at a time,
and written atomically.

* :class:`Checkpoint` reads a model folder of (sharded) safetensors weights: the headers up front, a tensor on
  demand; :func:`meta_model` builds its architecture on the ``meta`` device (no memory for weights).
* :func:`load_adapter_config` / :class:`AdapterTensors` read an ImPart adapter folder, a module at a time.
* :func:`write_sharded_checkpoint` writes a standard transformers checkpoint (shards, index, ``config.json``,
  tokenizer files) one tensor at a time; ``impart apply`` and ``impart merge`` both write through it.
* :func:`atomic_folder`: every folder is written into a hidden temporary folder beside the output and renamed into
  place only when complete, so an interrupted run leaves nothing that looks like a finished adapter or model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ImPartConfig
from .filenames import ADAPTER_CONFIG, ADAPTER_PREFIX, ADAPTER_WEIGHTS, SIDE_FILE_PATTERNS
from .safetensors_io import SAFETENSORS_METADATA, SafetensorsStream, dtype_from_name, itemsize, read_header

__all__ = [
    "AdapterTensors",
    "Checkpoint",
    "TensorInfo",
    "atomic_folder",
    "check_device",
    "check_output",
    "copy_side_files",
    "load_adapter_config",
    "meta_model",
    "parse_size",
    "progress_bar",
    "resolve_folder",
    "write_sharded_checkpoint",
]


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
    from .hub import resolve_adapter, resolve_checkpoint

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
        return math.prod(self.shape) * itemsize(self.dtype)


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
            header = read_header(file)
            entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
            for key, entry in sorted(entries, key=lambda kv: kv[1]["data_offsets"][0]):
                dtype = dtype_from_name(entry["dtype"])
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


def meta_model(config) -> nn.Module:
    """The model class of ``config`` built on the meta device: its structure without any memory for weights."""
    import transformers

    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        return transformers.AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------------------------------------------- writing
def check_output(output: str | os.PathLike, overwrite: bool) -> None:
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
def atomic_folder(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden scratch folder beside ``output``; on success it replaces ``output``, on error it is removed."""
    check_output(output, overwrite)
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


def copy_side_files(sources: list[Path], destination: Path) -> list[str]:
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


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def check_device(device: str | torch.device | None) -> torch.device | None:
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


# ----------------------------------------------------------------------------------------------------- adapter
def load_adapter_config(folder: Path) -> ImPartConfig:
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"the adapter folder {os.fspath(folder)!r} has no {ADAPTER_CONFIG}")
    from .validation import read_adapter_json

    raw = read_adapter_json(os.fspath(file), source=os.fspath(folder))  # untrusted: bounded, a JSON object
    if raw.get("peft_type") != "IMPART":
        raise ValueError(
            f"{os.fspath(file)!r} is a {raw.get('peft_type')!r} adapter, not an ImPart one: use PEFT's own tools for it"
        )
    # ImPartConfig.from_pretrained runs the whole file check (impart_peft.validation) before anything is read.
    return ImPartConfig.from_pretrained(os.fspath(folder))


class AdapterTensors:
    """The tensors of an adapter file, read per module on demand."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / ADAPTER_WEIGHTS
        if not self.file.is_file():
            raise FileNotFoundError(f"the adapter folder {os.fspath(folder)!r} has no {ADAPTER_WEIGHTS}")
        header = read_header(self.file)
        self.header = {k: v for k, v in header.items() if k != "__metadata__"}

    def module(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        prefix = f"{ADAPTER_PREFIX}{name}."
        keys = [k for k in self.header if k.startswith(prefix) and "." not in k[len(prefix) :]]
        with safe_open(self.file, framework="pt", device="cpu") as handle:
            return {k[len(prefix) :]: handle.get_tensor(k).clone() for k in keys}


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if match is None:
        raise ValueError(f"cannot read the size {size!r}: write e.g. '5GB', '500MB' or a number of bytes")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    scale = (1024 if binary else 1000) ** "_KMGT".index(unit or "_")
    return int(number * scale)


def _shards(checkpoint: Checkpoint, keys: list[str], limit: int) -> tuple[list[str], list[list[str]]]:
    """``keys`` cut, in order, into shards of at most ``limit`` bytes (a larger tensor alone), and their file names."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = checkpoint.tensors[key].nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    return names, shards


def write_sharded_checkpoint(
    output_dir: str | os.PathLike,
    like: Checkpoint,
    tensor_for: Callable[[str], torch.Tensor],
    *,
    side_file_sources: Sequence[Path] = (),
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "write",
) -> Path:
    """Write a standard transformers checkpoint folder with the tensors of ``like`` (names, order, dtypes, shapes)
    and the values ``tensor_for(key)`` gives, one tensor at a time, atomically (:func:`atomic_folder`).

    The folder gets the safetensors weights, sharded at ``max_shard_size`` (with ``model.safetensors.index.json``
    when there is more than one shard), ``like``'s ``config.json``, and the tokenizer and generation files of
    ``side_file_sources`` (the first source that has a file wins). ``tensor_for`` runs under ``torch.no_grad()``
    and must return a tensor of the declared dtype and shape. Memory: one tensor at a time.
    """
    limit = parse_size(max_shard_size)
    keys = list(like.tensors)
    names, shards = _shards(like, keys, limit)
    with atomic_folder(output_dir, overwrite) as scratch, torch.no_grad():
        with progress_bar(len(keys), desc, "tensor", progress) as bar:
            for shard_name, shard_keys in zip(names, shards, strict=True):
                entries = [(k, like.tensors[k].dtype, like.tensors[k].shape) for k in shard_keys]
                stream = SafetensorsStream(scratch / shard_name, entries, SAFETENSORS_METADATA)
                try:
                    for key in shard_keys:
                        stream.write(key, tensor_for(key))
                        bar.update(1)
                except BaseException:
                    stream.abort()
                    raise
                stream.close()
        if len(shards) > 1:
            index = {
                "metadata": {
                    "total_parameters": sum(math.prod(like.tensors[k].shape) for k in keys),
                    "total_size": sum(like.tensors[k].nbytes for k in keys),
                },
                "weight_map": {k: n for n, ks in zip(names, shards, strict=True) for k in ks},
            }
            (scratch / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
        shutil.copyfile(like.folder / "config.json", scratch / "config.json")
        copy_side_files(list(side_file_sources), scratch)
    return Path(output_dir).expanduser()
