"""Writing a fused adapter in PEFT's own format: the keys and config PEFT itself would write.

The stored factors carry the whole update (scaling 1): r = lora_alpha and rsLoRA off. By default every module is
stored at the one rank r: modules of lower rank get zero columns in lora_B and zero rows in lora_A (B·A is
unchanged), so rank_pattern and alpha_pattern are empty and r is every tensor's rank. vLLM, SGLang, LoRAX, TGI and
llama.cpp's converter size or scale every module by the config's one r (see `lorafuse.adapters.engines`); PEFT
alone honours patterns, which `rank_patterns=True` keeps for users who want the smaller files. A module's rank is
first brought to at most min(m, n) exactly (its update has no more independent directions than that).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorafuse.adapters.reader import CONFIG_NAME, PREFIX, SAFETENSORS_NAME
from lorafuse.adapters.safetensors_io import save_safetensors
from lorafuse.atomic import atomic_output_dir
from lorafuse.merging.algebra.lowrank import LowRank, factor_svd
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
    rank_patterns: bool = False,
) -> dict[str, Any]:
    """A PEFT LoraConfig dict whose factors mean exactly what is stored: scaling 1 in every module.
    `ranks` are the modules' own ranks; without `rank_patterns` r is the largest (the writer pads the others to
    it), with it r is the most common and the others are listed in rank_pattern/alpha_pattern."""
    if rank_patterns:
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    else:
        r, pattern = max(ranks.values()), {}
    cfg: dict[str, Any] = {k: template[k] for k in _CARRIED if k in template}
    if isinstance(cfg.get("base_model_name_or_path"), str):  # never an absolute path of the machine that wrote it
        from lorafuse.model.models import portable_name

        cfg["base_model_name_or_path"] = portable_name(cfg["base_model_name_or_path"])
    if not modules_to_save and cfg.get("task_type") in _TASKS_WITH_HEADS:
        # PEFT wraps a SEQ_CLS/TOKEN_CLS model's head as modules_to_save and then requires its weights in the
        # file (a KeyError otherwise): an adapter with no head at all is a plain LoRA on the backbone.
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


def stored_rank(config: Mapping[str, Any]) -> int | None:
    """The one rank every module is stored at, or None when the config lists per-module ranks."""
    return None if config.get("rank_pattern") else int(config["r"])


def padded(update: LowRank, rank: int) -> LowRank:
    """The same update B·A stored at `rank` ≥ its own: zero columns appended to B and zero rows to A."""
    extra = rank - update.rank
    if extra < 0:
        raise ValueError(f"cannot pad a rank-{update.rank} update down to rank {rank}")
    if extra == 0:
        return update
    B = torch.cat([update.B, update.B.new_zeros(update.B.shape[0], extra)], dim=1)
    A = torch.cat([update.A, update.A.new_zeros(extra, update.A.shape[1])], dim=0)
    return LowRank(B, A)


def within_shape_rank(update: LowRank) -> LowRank:
    """The update at rank ≤ min(m, n): an m×n matrix has no more directions, so a wider factorisation (a `cat` of
    many adapters on a small module) is rewritten exactly, by the factors' SVD, at min(m, n)."""
    limit = min(update.shape)
    if update.rank <= limit:
        return update
    return factor_svd(update.B, update.A).lowrank(limit)


def at_least_rank_one(update: LowRank) -> LowRank:
    """A zero update of rank 0 (every weight 0, a sum that cancels, a module no task has) stored at rank 1 with
    zero factors: PEFT refuses r = 0 (LoraConfig raises) and engines divide by r, while rank-1 zero factors load
    everywhere and compute ΔW = 0 exactly."""
    if update.rank:
        return update
    return LowRank(update.B.new_zeros(update.shape[0], 1), update.A.new_zeros(1, update.shape[1]))


def adapter_state_dict(
    modules: Mapping[str, LowRank], embeddings: set[str], dtype: torch.dtype | None = None, rank: int | None = None
) -> dict[str, torch.Tensor]:
    """PEFT-format tensors: `base_model.model.<module>.lora_A.weight` (r×in) and `.lora_B.weight` (out×r),
    cast to `dtype` (None: as computed, for a writer that casts one tensor at a time), each module zero-padded
    to `rank` when given (see `stored_rank`)."""
    state: dict[str, torch.Tensor] = {}
    for module, update in modules.items():
        if rank is not None:
            update = padded(update, rank)
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
    (directory / "README.md").write_text(model_card(config, provenance, heads))
    for name, tensors in (heads or {}).items():
        (directory / HEADS_DIR).mkdir(exist_ok=True)  # names never act as paths (lorafuse.validate)
        save_safetensors(child_path(directory / HEADS_DIR, name, "task head name", ".safetensors"),
                         head_state_dict(tensors), metadata={"format": "pt"})


def head_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task head under the plain transformers model's own keys (`classifier.weight`, not PEFT's
    `base_model.model.classifier.weight`), so `model.load_state_dict(head, strict=False)` loads it."""
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def model_card(config: Mapping[str, Any], provenance: Mapping[str, Any],
               heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> str:
    """A short Hub-style card: what was fused, how, and how to load it (with each task's head, if any)."""
    method = provenance.get("method", {})
    inputs = provenance.get("inputs", [])
    rows = "\n".join(f"| {i['name']} | `{i['source']}` | {i.get('weight', '')} | `{i['sha256'][:12]}` |" for i in inputs)
    base = config.get("base_model_name_or_path") or "the adapters' base model"
    ranks = ("`rank_pattern` lists modules of other ranks" if config.get("rank_pattern") else
             "every module is stored at this rank, lower-rank ones zero-padded, so engines that read only `r` "
             "(vLLM, SGLang, LoRAX, TGI, llama.cpp) load it; check one with `lorafuse check DIR --engine vllm`")
    if int(config.get("r") or 0) > 16:  # vLLM's default max_lora_rank
        ranks += f"; vLLM serves it with `--max-lora-rank {_next_vllm_rank(int(config['r']))}` or more"
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

Load it with `PeftModel.from_pretrained(base_model, "<this directory>")`; rank r={config.get("r")} ({ranks}).
Full provenance: `{PROVENANCE_NAME}`.
{heads_section(config, heads or {}, provenance)}"""


def heads_section(config: Mapping[str, Any], heads: Mapping[str, Mapping[str, torch.Tensor]],
                  provenance: Mapping[str, Any] | None = None) -> str:
    """The card's part on per-task heads: which files, and a plain transformers + PEFT snippet that loads the
    fused adapter with one of them, with the task's label mask and the inputs' pooling (tests run it as
    written)."""
    from lorafuse.adapters.cards import classify_snippet, slot_labels

    if not heads:
        return ""
    first = next(iter(heads))
    trained = {i.get("name"): i for i in (provenance or {}).get("inputs", [])}
    labels = {name: slot_labels(trained.get(name, {}).get("labels")) for name in heads}
    pooling = next((i["pooling"] for i in trained.values() if i.get("pooling")), None)
    listing = "\n".join(f"- `{HEADS_DIR}/{name}.safetensors` ({_num_labels(tensors)} labels)"
                        for name, tensors in heads.items())
    stored = (f"\nThe adapter itself carries `{first}`'s head as its `modules_to_save` (PEFT's {config['task_type']} "
              "format needs one): `PeftModel.from_pretrained` alone, or `AutoPeftModelForSequenceClassification"
              f".from_pretrained(\".\", num_labels=3)`, gives that task's head.\n"
              if config.get("modules_to_save") else "")
    base = config.get("base_model_name_or_path") or "<base model>"
    return f"""
## Task heads

Each task keeps its own classification head (never merged), under the plain transformers model's keys:

{listing}
{stored}
With transformers and PEFT alone (the same predictions as `lorafuse eval`):

{classify_snippet(base, labels, first, pooling, heads_dir=HEADS_DIR)}"""


def _next_vllm_rank(r: int) -> int:
    """The smallest of vLLM's max_lora_rank choices that holds rank r."""
    from lorafuse.adapters.engines import VLLM_MAX_LORA_RANKS

    return next((k for k in VLLM_MAX_LORA_RANKS if k >= r), r)


def _num_labels(tensors: Mapping[str, torch.Tensor]) -> int:
    """Rows of the head's last weight matrix (the output layer: `classifier.weight`, `score.weight`, ...)."""
    weights = [t for k, t in sorted(tensors.items()) if k.endswith("weight") and t.ndim == 2]
    return int(weights[-1].shape[0]) if weights else 0
