"""`--output-model`: the base model with the fused update added, for users who want no truncation and no PEFT
at inference. Streams one base shard at a time and keeps its sharding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from lorafuse.atomic import atomic_output_dir
from lorafuse.errors import AdapterError

if TYPE_CHECKING:
    from lorafuse.engine import MergeResult

_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.txt", "merges.txt", "vocab.json", "tokenizer.model", "chat_template.jinja")


def resolve_model_dir(base: str | Path) -> Path:
    path = Path(base).expanduser()
    if path.is_dir():
        return path
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


def write_merged_model(result: MergeResult, base: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write W + ΔW for every fused module, every other tensor unchanged, same shard layout and file names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir = resolve_model_dir(base)
    transpose = bool(result.config.get("fan_in_fan_out"))
    pending = set(result.modules)
    with atomic_output_dir(out, overwrite) as tmp:
        for shard in _shards(model_dir):
            with safe_open(str(shard), framework="pt") as fh:
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            for module in list(pending):
                key = _weight_key(module, set(tensors))
                if key is None:
                    continue
                delta = result.delta(module)
                weight = tensors[key]
                delta = delta.T if transpose else delta
                if tuple(delta.shape) != tuple(weight.shape):
                    raise AdapterError(f"{shard}: '{key}' has shape {tuple(weight.shape)}, the fused update of "
                                       f"'{module}' {tuple(delta.shape)}")
                tensors[key] = (weight.float() + delta).to(weight.dtype)
                pending.discard(module)
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
        if pending:
            raise AdapterError(f"{model_dir}: no base weight for modules {sorted(pending)[:3]}")
        for name in _COPIED + ("model.safetensors.index.json",):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        (tmp / "lorafuse_merge.json").write_text(json.dumps(result.provenance, indent=2, default=str) + "\n")
    return Path(out)
