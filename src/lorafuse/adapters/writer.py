"""Writing a fused adapter in PEFT's own format: the keys and config PEFT itself would write.

The stored factors carry the whole update (scaling 1): r = lora_alpha for every module, with rank_pattern and
alpha_pattern for modules whose rank differs from the most common one, and rsLoRA off. Loading it back with
PEFT, transformers or vLLM therefore gives exactly the computed ΔW.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorafuse.adapters.reader import CONFIG_NAME, PREFIX, SAFETENSORS_NAME
from lorafuse.adapters.safetensors_io import save_safetensors
from lorafuse.algebra.lowrank import LowRank
from lorafuse.atomic import atomic_output_dir
from lorafuse.validate import child_path

PROVENANCE_NAME = "lorafuse_merge.json"
HEADS_DIR = "task_heads"
# Settings that describe the base model and must survive the merge unchanged.
_TASKS_WITH_HEADS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
_CARRIED = ("base_model_name_or_path", "revision", "task_type", "fan_in_fan_out", "layers_pattern")


def fused_config(
    template: Mapping[str, Any],
    ranks: Mapping[str, int],
    target_modules: list[str],
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """A PEFT LoraConfig dict whose factors mean exactly what is stored: scaling 1 in every module."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    cfg: dict[str, Any] = {k: template[k] for k in _CARRIED if k in template}
    if not modules_to_save and cfg.get("task_type") in _TASKS_WITH_HEADS:
        # PEFT wraps a SEQ_CLS/TOKEN_CLS model's head as modules_to_save and then requires its weights in the
        # file; a fused adapter without one is a plain LoRA on the backbone (heads live in task_heads/).
        cfg["task_type"] = None
    cfg.update(
        peft_type="LORA",
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        bias="none",
        lora_dropout=0.0,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        init_lora_weights=True,
        inference_mode=True,
    )
    return cfg


def adapter_state_dict(
    modules: Mapping[str, LowRank], embeddings: set[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """PEFT-format tensors: `base_model.model.<module>.lora_A.weight` (r×in) and `.lora_B.weight` (out×r),
    cast to `dtype` (None: as computed, for a writer that casts one tensor at a time)."""
    state: dict[str, torch.Tensor] = {}
    for module, update in modules.items():
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if module in embeddings else ("lora_A", "lora_B")
        suffix = "" if module in embeddings else ".weight"
        state[f"{PREFIX}{module}.{a_name}{suffix}"] = update.A if dtype is None else update.A.to(dtype).contiguous()
        state[f"{PREFIX}{module}.{b_name}{suffix}"] = update.B if dtype is None else update.B.to(dtype).contiguous()
    return state


def write_adapter_dir(
    out: str | Path,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
    heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    overwrite: bool = False,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> Path:
    """Write adapter_config.json, adapter_model.safetensors, the provenance and per-task heads, atomically.
    `dtypes` casts tensors of `state` as they are written (one at a time, never the whole state at once)."""
    with atomic_output_dir(out, overwrite, kind="adapter") as tmp:
        write_adapter_files(tmp, state, config, provenance, heads, dtypes)
    return Path(out)


def write_adapter_files(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    provenance: Mapping[str, Any],
    heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> None:
    """The files of `write_adapter_dir`, into an existing (temporary) directory."""
    save_safetensors(directory / SAFETENSORS_NAME, state, metadata={"format": "pt"}, dtypes=dtypes)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    (directory / "README.md").write_text(model_card(config, provenance))
    for name, tensors in (heads or {}).items():
        (directory / HEADS_DIR).mkdir(exist_ok=True)  # names never act as paths (lorafuse.validate)
        save_safetensors(child_path(directory / HEADS_DIR, f"{name}.safetensors", "task head name"), tensors)


def model_card(config: Mapping[str, Any], provenance: Mapping[str, Any]) -> str:
    """A short Hub-style card: what was fused, how, and how to load it."""
    method = provenance.get("method", {})
    inputs = provenance.get("inputs", [])
    rows = "\n".join(f"| {i['name']} | `{i['source']}` | {i.get('weight', '')} | `{i['sha256'][:12]}` |" for i in inputs)
    base = config.get("base_model_name_or_path") or "the adapters' base model"
    return f"""---
library_name: peft
base_model: {config.get("base_model_name_or_path") or ""}
tags: [lora, lorafuse, {method.get("name", "merge")}]
---
# Fused LoRA adapter ({method.get("name", "")})

Made by lorafuse from {len(inputs)} adapters of {base} with `{method.get("name", "")}` ({method.get("paper", "")}).
Parameters: `{json.dumps(provenance.get("parameters", {}))}`; options: `{json.dumps(provenance.get("options", {}))}`.

| adapter | source | weight | sha256 |
|---|---|---|---|
{rows}

Load it with `PeftModel.from_pretrained(base_model, "<this directory>")`; rank r={config.get("r")}
(`rank_pattern` lists modules of other ranks). Full provenance: `{PROVENANCE_NAME}`.
"""
