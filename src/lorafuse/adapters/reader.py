"""Reading PEFT LoRA adapters lazily, one module at a time, from a directory or a Hugging Face Hub id."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lorafuse.adapters.config import LoraSettings, parse_settings, targeted
from lorafuse.adapters.safetensors_io import SafetensorsFile
from lorafuse.errors import AdapterError
from lorafuse.merging.algebra.lowrank import LowRank
from lorafuse.validate import (
    check_name,
    check_regex,
    is_safe_name,
    load_json,
    looks_like_hub_id,
    read_text,
    safe_name,
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
TRAIN_RECORD = "lorafuse_train.json"
PREFIX = "base_model.model."
# `<module>.lora_A[.<adapter name>].weight`, or lora_embedding_A for embeddings (stored without `.weight`)
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.(?P<adapter>[^.]+))?(?P<w>\.weight)?$")


@dataclass(frozen=True)
class ModuleEntry:
    """Where one module's factors live in the weights file."""

    a_key: str
    b_key: str
    embedding: bool


def resolve_adapter_dir(source: str | Path, allow_bin: bool = False) -> Path:
    """A local adapter directory, downloading a Hub id (`org/name`) when no such directory exists."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AdapterError(f"{path}: not a directory (an adapter is a directory with {CONFIG_NAME})")
        return path
    if not looks_like_hub_id(str(source)):
        raise AdapterError(f"{source}: no such adapter directory")
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_NAME, SAFETENSORS_NAME, TRAIN_RECORD] + ([BIN_NAME] if allow_bin else [])
    try:
        return Path(snapshot_download(str(source), allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all reported the same way
        raise AdapterError(f"{source}: not a local directory and could not be fetched from the Hub: {exc}") from exc


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafuse-sha256")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LoraAdapter:
    """A PEFT LoRA adapter whose tensors are read on demand (memory stays near one module's size)."""

    def __init__(self, source: str | Path, name: str | None = None, allow_bin: bool = False) -> None:
        self.source = str(source)
        self.path = resolve_adapter_dir(source, allow_bin)
        self.settings: LoraSettings = parse_settings(self._read_config(), str(self.path / CONFIG_NAME))
        self.weights_path = self._find_weights(allow_bin)
        self._handle: SafetensorsFile | None = None
        self._hashing: Future[str] | None = None
        self._bin: dict[str, torch.Tensor] | None = None
        self.name = self._name(name)

    # -- files -------------------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        path = self.path / CONFIG_NAME
        if not path.is_file():
            raise AdapterError(f"{self.path}: missing {CONFIG_NAME} (not a PEFT adapter directory)")
        cfg = load_json(read_text(path, AdapterError), str(path), AdapterError)
        if not isinstance(cfg, dict):
            raise AdapterError(f"{path}: expected a JSON object")
        return cfg

    def _find_weights(self, allow_bin: bool) -> Path:
        st, binf = self.path / SAFETENSORS_NAME, self.path / BIN_NAME
        if st.is_file():
            return st
        if binf.is_file():
            if not allow_bin:
                raise AdapterError(
                    f"{binf}: pickled .bin weights are only read with an explicit opt-in "
                    "(--allow-bin / allow_bin=True); prefer safetensors"
                )
            return binf
        raise AdapterError(f"{self.path}: missing {SAFETENSORS_NAME}")

    def _name(self, given: str | None) -> str:
        """The label of this adapter, which names its head file in task_heads/: a name given by the user must be
        a plain name; the training record's task is untrusted (it comes with downloaded adapters) and is used
        only when it is one, else the directory's name."""
        if given is not None:
            return check_name(given, f"{self.source}: name")
        task = self.train_record.get("task")
        if task is not None and is_safe_name(task):
            return task
        if task is not None:
            print(f"warning: {self.path / TRAIN_RECORD}: task {task!r} is not a plain name; the adapter is "
                  f"named after its directory instead", file=sys.stderr)
        return safe_name(self.path.name)

    @cached_property
    def train_record(self) -> dict[str, Any]:
        path = self.path / TRAIN_RECORD
        try:
            record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (ValueError, RecursionError):  # not JSON, not UTF-8, past the int digit limit, nested too deeply
            return {}
        return record if isinstance(record, dict) else {}

    @cached_property
    def sha256(self) -> str:
        return self._hashing.result() if self._hashing is not None else sha256_file(self.weights_path)

    def start_hashing(self) -> None:
        """Hash the weights file on a background thread (hashlib releases the GIL): on two cores the
        provenance's sha256 then costs no wall time beside the merge."""
        if self._hashing is None and "sha256" not in self.__dict__:
            self._hashing = _HASHER.submit(sha256_file, self.weights_path)

    def _keys(self) -> list[str]:
        if self.weights_path.suffix == ".bin":
            return list(self._load_bin())
        return self._open().keys()

    def _open(self) -> SafetensorsFile:
        if self._handle is None:
            self._handle = SafetensorsFile(self.weights_path)
        return self._handle

    def _load_bin(self) -> dict[str, torch.Tensor]:
        if self._bin is None:
            try:
                self._bin = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise AdapterError(f"{self.weights_path}: unreadable .bin weights ({exc})") from exc
        return self._bin

    def tensor(self, key: str) -> torch.Tensor:
        try:
            if self.weights_path.suffix == ".bin":
                return self._load_bin()[key]
            return self._open().read(key)
        except AdapterError:
            raise
        except Exception as exc:
            raise AdapterError(f"{self.weights_path}: cannot read tensor '{key}' ({exc})") from exc

    # -- structure ---------------------------------------------------------------------------------
    @cached_property
    def _layout(self) -> tuple[dict[str, ModuleEntry], list[str]]:
        halves: dict[str, dict[str, str]] = {}
        extra: list[str] = []
        names: set[str] = set()
        for key in self._keys():
            match = _LORA_KEY.match(key)
            if match is None:
                extra.append(key)
                continue
            names.add(_adapter_name(match))
            module = match["module"].removeprefix(PREFIX)
            halves.setdefault(module, {})[match["kind"][-1]] = key
            halves[module]["embedding"] = "embedding" in match["kind"]
        modules = {}
        for module, h in sorted(halves.items()):
            if "A" not in h or "B" not in h:
                missing = "lora_B" if "B" not in h else "lora_A"
                raise AdapterError(f"{self.weights_path}: module '{module}' has no {missing} tensor")
            modules[module] = ModuleEntry(h["A"], h["B"], bool(h["embedding"]))
        if not modules:
            raise AdapterError(f"{self.weights_path}: no LoRA tensors (lora_A/lora_B) found")
        if len(names) > 1:  # one module's halves of two adapters would be read as one adapter's
            raise AdapterError(f"{self.weights_path}: holds the factors of several adapters "
                               f"({', '.join(sorted(names))}); save each adapter to its own directory")
        self._check_extra(extra)
        self._check_targets(modules)
        return modules, extra

    def _check_targets(self, modules: dict[str, ModuleEntry]) -> None:
        """Every stored module must be one the config's target_modules names: PEFT loads only those and drops the
        others' factors, so the adapter PEFT serves is not the one its file holds (and a merge keeping the short
        list would drop them from every adapter)."""
        targets = self.settings.raw.get("target_modules")
        if isinstance(targets, str):  # a regex PEFT matches against every module name: bounded as ours are
            check_regex(targets, f"{self.path / CONFIG_NAME}: target_modules", AdapterError)
        for module in modules:
            if not targeted(targets, module):
                raise AdapterError(f"{self.path / CONFIG_NAME}: target_modules {targets!r} does not cover the stored "
                                   f"module '{module}' (PEFT would drop its factors); list every stored module")

    def _check_extra(self, extra: list[str]) -> None:
        if extra and not self.settings.modules_to_save:
            raise AdapterError(
                f"{self.weights_path}: tensors that are not LoRA factors ({', '.join(extra[:3])}"
                f"{'…' if len(extra) > 3 else ''}) and no modules_to_save in the config"
            )

    @property
    def modules(self) -> dict[str, ModuleEntry]:
        return self._layout[0]

    @property
    def extra_keys(self) -> list[str]:
        """Keys of `modules_to_save` tensors (e.g. a classification head)."""
        return self._layout[1]

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of the update B·A, read from the file header without loading the tensors."""
        entry = self.modules[module]
        if self.weights_path.suffix == ".bin":
            return (self.tensor(entry.b_key).shape[0], self.tensor(entry.a_key).shape[1])
        h = self._open()
        return (h.shape(entry.b_key)[0], h.shape(entry.a_key)[1])

    def module_rank(self, module: str) -> int:
        entry = self.modules[module]
        if self.weights_path.suffix == ".bin":
            return self.tensor(entry.a_key).shape[0]
        return self._open().shape(entry.a_key)[0]

    def check_dtypes(self) -> None:
        """Refuse LoRA factors that are not floating point (read from the header, before any work): integer
        factors would make the fused output integer, and all zero."""
        for module, entry in self.modules.items():
            for key in (entry.a_key, entry.b_key):
                dtype = self.tensor(key).dtype if self.weights_path.suffix == ".bin" else self._open().dtype(key)
                if not dtype.is_floating_point:
                    raise AdapterError(f"{self.weights_path}: module '{module}': tensor '{key}' is {dtype}; LoRA "
                                       "factors must be floating point")

    def update(self, module: str) -> LowRank:
        """The module's update with its scale folded into B: ΔW = (s·B)·A, as (out×r)·(r×in)."""
        entry = self.modules[module]
        A, B = self.tensor(entry.a_key), self.tensor(entry.b_key)
        if A.ndim != 2 or B.ndim != 2:
            raise AdapterError(f"{self.weights_path}: module '{module}': only linear/embedding LoRA is supported "
                               f"(got lora_A of shape {tuple(A.shape)})")
        if B.shape[1] != A.shape[0]:
            raise AdapterError(f"{self.weights_path}: module '{module}': lora_B {tuple(B.shape)} and lora_A "
                               f"{tuple(A.shape)} do not multiply")
        if not (_all_finite(A) and _all_finite(B)):
            raise AdapterError(f"{self.weights_path}: module '{module}': NaN or Inf in its LoRA factors")
        scale = self.settings.scaling(module, stored_rank=A.shape[0])
        owned = self.weights_path.suffix != ".bin" and B.dtype == torch.float32  # a fresh buffer: scale in place
        return LowRank(B.mul_(scale) if owned else B.float() * scale, A.float())

    def dtype(self) -> torch.dtype:
        first = next(iter(self.modules.values()))
        if self.weights_path.suffix == ".bin":
            return self.tensor(first.a_key).dtype
        return self._open().dtype(first.a_key)

    def __repr__(self) -> str:
        return f"LoraAdapter({self.name!r}, {len(self.modules)} modules, r={self.settings.r})"


def _adapter_name(match: re.Match[str]) -> str:
    """The adapter name a LoRA key carries (`lora_A.<name>.weight`; PEFT's saved files drop it): "(none)" when
    it carries none (`lora_A.weight`, where the regex reads `weight` as the name)."""
    name = match["adapter"]
    if name is None or (name == "weight" and match["w"] is None):
        return "(none)"
    return name


def _all_finite(t: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf. A sum carries any NaN or Inf through without allocating a mask as
    large as the tensor; only a non-finite sum (or an overflowing one) needs the entry-by-entry check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
