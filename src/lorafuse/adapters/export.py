"""`--output-model`: the base model with the fused update added, for users who want no truncation and no PEFT
at inference. Streams one base shard at a time and keeps its sharding."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorafuse.adapters.safetensors_io import PendingTensor, SafetensorsFile, save_safetensors
from lorafuse.atomic import atomic_output_dir, check_writable
from lorafuse.errors import AdapterError
from lorafuse.validate import looks_like_hub_id

if TYPE_CHECKING:
    from lorafuse.merging.engine import MergeResult

_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.txt", "merges.txt", "vocab.json", "tokenizer.model", "chat_template.jinja")


def resolve_model_dir(base: str | Path) -> Path:
    """A base model's local directory: a path, an embedded model (`minilm`, `smollm2` or their Hub ids), or a
    Hub id fetched."""
    from lorafuse.model.models import embedded_name, resolve_model

    path = Path(base).expanduser()
    if path.is_dir():
        return path
    if embedded_name(str(base)) is not None:
        return Path(resolve_model(str(base)).path)
    if path.exists() or not looks_like_hub_id(str(base), bare=True):
        raise AdapterError(f"{base}: no such base model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(base), allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model",
                                                                   "*.jinja"]))
    except Exception as exc:
        raise AdapterError(f"{base}: base model is not a local directory and could not be fetched ({exc})") from exc


def _shards(model_dir: Path) -> list[Path]:
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise AdapterError(f"{model_dir}: no *.safetensors weights (export needs a safetensors base model)")
    return shards


def _weight_key(module: str, keys: set[str]) -> str | None:
    """The base weight of an adapter module; adapter paths may carry a task wrapper prefix (e.g. `bert.`)."""
    parts = module.split(".")
    for start in range(len(parts)):
        key = ".".join(parts[start:]) + ".weight"
        if key in keys:
            return key
    return None


def _fused_weights(result: MergeResult, source: SafetensorsFile, pending: set[str]) -> dict[str, str]:
    """{weight key in this shard: fused module}, with every shape checked before anything is written."""
    keys = set(source.keys())
    transpose = bool(result.config.get("fan_in_fan_out"))
    fused = {}
    for module in sorted(pending):
        key = _weight_key(module, keys)
        if key is None:
            continue
        shape = result.modules[module].shape
        shape = shape[::-1] if transpose else shape
        if tuple(shape) != source.shape(key):
            raise AdapterError(f"{source.path}: '{key}' has shape {source.shape(key)}, the fused update of "
                               f"'{module}' {tuple(shape)}")
        fused[key] = module
    return fused


def _updated(result: MergeResult, source: SafetensorsFile, key: str, module: str | None) -> torch.Tensor:
    weight = source.read(key)
    if module is None:
        return weight
    delta = result.delta(module)
    delta = delta.T if result.config.get("fan_in_fan_out") else delta
    return (weight.float() + delta).to(weight.dtype)


@dataclass(frozen=True)
class ExportPlan:
    """What `--output-model` will write, checked before anything is: each base shard with {weight key: fused
    module}, and the bytes it takes."""

    model_dir: Path
    shards: list[tuple[SafetensorsFile, dict[str, str]]]
    nbytes: int


def check_base_model(base: str | Path) -> Path:
    """The base model's directory, refused early (before the merge) when missing or without safetensors."""
    model_dir = resolve_model_dir(base)
    _shards(model_dir)
    return model_dir


def plan_merged_model(result: MergeResult, base: str | Path) -> ExportPlan:
    """Every fused module matched to a base weight of its shape, from the shards' headers only."""
    model_dir = resolve_model_dir(base)
    pending = set(result.modules)
    shards = []
    for shard in _shards(model_dir):
        source = SafetensorsFile(shard)
        fused = _fused_weights(result, source, pending)
        pending -= set(fused.values())
        shards.append((source, fused))
    if pending:
        raise AdapterError(f"{model_dir}: no base weight for modules {sorted(pending)[:3]}")
    return ExportPlan(model_dir, shards, sum(source.path.stat().st_size for source, _ in shards))


def write_merged_model_files(result: MergeResult, plan: ExportPlan, directory: Path) -> None:
    """The files of `write_merged_model`, into an existing (temporary) directory."""
    for source, fused in plan.shards:
        entries = {key: PendingTensor(source.shape(key), source.dtype(key),
                                      functools.partial(_updated, result, source, key, fused.get(key)))
                   for key in source.keys()}
        save_safetensors(directory / source.path.name, entries, metadata=source.metadata or {"format": "pt"})
    for name in _COPIED + ("model.safetensors.index.json",):
        if (plan.model_dir / name).is_file():
            shutil.copy2(plan.model_dir / name, directory / name)
    (directory / "lorafuse_merge.json").write_text(json.dumps(result.provenance, indent=2, default=str) + "\n")


def write_merged_model(result: MergeResult, base: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write W + ΔW for every fused module, every other tensor unchanged, same shard layout and file names.
    Each shard is written holding one of its tensors at a time (read, updated where fused, written)."""
    plan = plan_merged_model(result, base)
    check_writable(out, plan.nbytes)
    with atomic_output_dir(out, overwrite, kind="merged-model") as tmp:
        write_merged_model_files(result, plan, tmp)
    return Path(out)
