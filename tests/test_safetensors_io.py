"""The streaming safetensors reader and writer against the reference implementation (`safetensors`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.adapter_factory import llama_modules, write_adapter

from lorafuse.adapters.reader import LoraAdapter, sha256_file
from lorafuse.adapters.safetensors_io import PendingTensor, SafetensorsFile, save_safetensors
from lorafuse.errors import AdapterError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 3, generator=gen),
        "bf16": torch.randn(4, 7, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=gen).to(torch.float16),
        "f64": torch.randn(3, generator=gen, dtype=torch.float64),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=gen)[:, ::2],  # not contiguous: written as its values
    }


def test_written_file_loads_in_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    save_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    (length,) = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])
    assert length % 8 == 0


def test_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    fh = SafetensorsFile(tmp_path / "x.safetensors")
    assert fh.metadata == {"format": "pt"} and set(fh.keys()) == set(tensors)
    for key, value in tensors.items():
        got = fh.read(key)
        assert fh.shape(key) == tuple(value.shape) and fh.dtype(key) == value.dtype
        assert torch.equal(got, value), key


def test_cast_on_write(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(2)}
    save_safetensors(tmp_path / "x.safetensors", tensors, dtypes={"a": torch.bfloat16})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded["a"].dtype == torch.bfloat16 and torch.equal(loaded["a"], tensors["a"].to(torch.bfloat16))
    assert loaded["b"].dtype == torch.float32 and torch.equal(loaded["b"], tensors["b"])


def test_read_tensor_owns_its_memory(tmp_path: Path) -> None:
    save_file({"a": torch.ones(4)}, str(tmp_path / "x.safetensors"))
    fh = SafetensorsFile(tmp_path / "x.safetensors")
    first = fh.read("a")
    first.mul_(3)  # writable, and a later read is unaffected
    assert torch.equal(fh.read("a"), torch.ones(4))


@pytest.mark.parametrize("damage", ["short", "huge_header", "bad_json", "bad_offsets", "truncated_data", "dtype"])
def test_corrupt_files_name_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(2)}, str(path))
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    if damage == "short":
        raw = raw[:5]
    elif damage == "huge_header":
        raw = struct.pack("<Q", 1 << 40) + raw[8:]
    elif damage == "bad_json":
        raw = raw[:8] + b"{" * length + raw[8 + length:]
    elif damage == "truncated_data":
        raw = raw[:-4]
    else:
        if damage == "bad_offsets":
            header["a"]["data_offsets"] = [0, 12]
        else:
            header["a"]["dtype"] = "F8_E9M9"
        encoded = json.dumps(header).encode()
        raw = struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:]
    path.write_bytes(raw)
    with pytest.raises(AdapterError, match="x.safetensors"):
        SafetensorsFile(path)


def test_background_hash_equals_direct_hash(tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "a", llama_modules(layers=1), r=2, seed=0)
    adapter = LoraAdapter(path)
    adapter.start_hashing()
    assert adapter.sha256 == sha256_file(adapter.weights_path)


def test_pending_tensors_are_produced_one_at_a_time(tmp_path: Path) -> None:
    made: list[str] = []

    def make(key: str, value: float) -> torch.Tensor:
        made.append(key)
        return torch.full((2, 3), value)

    entries = {k: PendingTensor((2, 3), torch.float32, lambda k=k, v=v: make(k, v)) for k, v in (("b", 2.0), ("a", 1.0))}
    save_safetensors(tmp_path / "x.safetensors", {**entries, "c": torch.zeros(1)})
    assert made == ["a", "b"]  # in file order, only while writing
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(loaded["a"], torch.ones(2, 3)) and torch.equal(loaded["b"], torch.full((2, 3), 2.0))
    bad = {"a": PendingTensor((2, 2), torch.float32, lambda: torch.zeros(3))}
    with pytest.raises(ValueError, match="announced"):
        save_safetensors(tmp_path / "y.safetensors", bad)
