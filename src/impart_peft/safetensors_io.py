"""The safetensors format, written as a stream: a file whose tensors are known up front is written one tensor at
a time (peak memory: one tensor), with the exact bytes ``safetensors.torch.save_file`` writes from memory.

Only torch and the standard library: the layer under :mod:`impart_peft.checkpoint_io`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "SAFETENSORS_METADATA",
    "SafetensorsStream",
    "Spill",
    "dtype_from_name",
    "itemsize",
    "read_header",
    "save_file_order",
    "write_safetensors",
]

SAFETENSORS_METADATA = {"format": "pt"}

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


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (``"BF16"``), or ``None`` if torch has none."""
    return _ST_NAMES.get(name)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(file: Path) -> dict[str, Any]:
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
        nbytes = math.prod(shape) * itemsize(dtype)
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


class SafetensorsStream:
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
        if len(data) != math.prod(shape) * itemsize(dtype):
            raise RuntimeError(f"{name}: {len(data)} bytes for a declared {dtype} {tuple(shape)}")
        self._handle.write(data)
        self._next += 1

    def write_from(self, name: str, source: BinaryIO, offset: int, nbytes: int) -> None:
        """Copy the tensor's bytes from ``source`` (a spill file) in chunks."""
        expected, dtype, shape = self._entries[self._next]
        if name != expected or nbytes != math.prod(shape) * itemsize(dtype):
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


def save_file_order(entries):
    return sorted(entries, key=lambda e: (_ST_RANK[e[1]], e[0]))


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` like ``safetensors.torch.save_file`` (same bytes), streaming each tensor to the file."""
    entries = save_file_order([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
    stream = SafetensorsStream(Path(path), entries, metadata)
    try:
        for name, _, _ in entries:
            stream.write(name, tensors[name])
    except BaseException:
        stream.abort()
        raise
    stream.close()


class Spill:
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
        entries = save_file_order([(n, r[0], r[1]) for n, r in self._records.items()])
        stream = SafetensorsStream(path, entries, metadata)
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
