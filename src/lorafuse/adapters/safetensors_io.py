"""The safetensors format read one tensor at a time and written as a stream.

`safe_open` memory-maps the file, so every page a merge touches stays in the process's resident set until the
file is closed: a 32-layer merge then holds all its inputs at once. Reading each tensor with one positioned read
into memory the caller owns frees it with the tensor. `safetensors.torch.save_file` copies every tensor into a
Python `bytes` before writing, doubling the output's memory; here the header is computed from shapes and dtypes
first and each tensor's own buffer is written after it.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
(`{key: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`, padded with spaces to a
multiple of 8 bytes), then the tensors' bytes back to back, offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafuse.errors import AdapterError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
        raise RuntimeError("safetensors stores little-endian data; this machine is big-endian")


class SafetensorsFile:
    """The header of a safetensors file, and its tensors read on demand (memory owned by each tensor)."""

    def __init__(self, path: str | Path) -> None:
        _require_little_endian()
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                self.entries, self.metadata, self._data_start = _parse_header(fh, self.path.stat().st_size)
        except OSError as exc:
            raise AdapterError(f"{self.path}: cannot read ({exc})") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"{self.path}: corrupt or unreadable safetensors file ({exc})") from exc

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def read(self, key: str) -> torch.Tensor:
        """The tensor stored under `key`, read with one seek and one read into a fresh buffer."""
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        view = out.reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self._data_start + begin)
            got = fh.readinto(view) if end > begin else 0
            while got < end - begin:  # raw reads may come back short (pipes, some network filesystems)
                more = fh.readinto(view[got:])
                if not more:
                    raise AdapterError(f"{self.path}: tensor '{key}' is truncated ({got} of {end - begin} bytes)")
                got += more
        return out


def _parse_header(fh: Any, size: int) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    prefix = fh.read(8)
    if len(prefix) < 8:
        raise ValueError("shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(_MAX_HEADER, size - 8):
        raise ValueError(f"header length {length} exceeds the file")
    try:
        header = json.loads(fh.read(length))
    except RecursionError:
        raise ValueError("the header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - length
    for key, entry in header.items():
        _check_entry(key, entry, data_size)
    return header, metadata, 8 + length


def _check_entry(key: str, entry: dict[str, Any], data_size: int) -> None:
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"tensor '{key}': unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    expected = math.prod(int(dim) for dim in entry["shape"]) * DTYPES[entry["dtype"]].itemsize
    if not 0 <= begin <= end <= data_size or end - begin != expected:
        raise ValueError(f"tensor '{key}': data offsets {begin}..{end} do not hold {entry['dtype']}"
                         f"{list(entry['shape'])} within {data_size} bytes of data")


@dataclass(frozen=True)
class PendingTensor:
    """A tensor the writer produces only when its turn comes (e.g. read from another file and updated), so a
    whole file is written holding one tensor at a time; shape and dtype must be known before."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    def numel(self) -> int:
        return math.prod(self.shape)


def save_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor | PendingTensor],
    metadata: Mapping[str, str] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> None:
    """Write `tensors` (each cast to `dtypes[key]` where given, one at a time) without copying them first."""
    _require_little_endian()
    dtypes = dtypes or {}
    keys = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in keys:
        dtype = dtypes.get(key, tensors[key].dtype)
        nbytes = tensors[key].numel() * dtype.itemsize
        header[key] = {"dtype": NAMES[dtype], "shape": list(tensors[key].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the reference writer aligns the data to 8 bytes the same way
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for key in keys:
            value = tensors[key]
            tensor = value.load() if isinstance(value, PendingTensor) else value
            if tuple(tensor.shape) != tuple(value.shape):
                raise ValueError(f"{path}: tensor '{key}' came out {tuple(tensor.shape)}, announced {tuple(value.shape)}")
            tensor = tensor.detach().to("cpu", dtypes.get(key, value.dtype)).contiguous()
            if tensor.numel():
                fh.write(tensor.reshape(-1).view(torch.uint8).numpy())
