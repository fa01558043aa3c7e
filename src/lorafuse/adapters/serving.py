"""Fitting a fused adapter to a serving engine (`lorafuse merge --target vllm --max-lora-rank 16`): the rank the
engine allows, zeros where a layer type is absent from some layers (LoRAX/TGI), and a refusal, naming the rule,
of anything the engine cannot load (modules_to_save, rank patterns, ...). The rules are `lorafuse.adapters.engines`.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafuse.adapters.engines import (
    HEADS_FIX,
    SERVING_ENGINES,
    VLLM_DEFAULT_MAX_LORA_RANK,
    Verdict,
    check_layout,
    layout_of,
)
from lorafuse.adapters.writer import stored_rank
from lorafuse.errors import ConfigError
from lorafuse.merging.algebra.lowrank import LowRank, truncate


def engine_rank_limit(engine: str, max_lora_rank: int | None) -> int | None:
    """The largest rank `engine` serves: vLLM's default max_lora_rank is 16; the others have none unless given."""
    if max_lora_rank is None and engine == "vllm":
        return VLLM_DEFAULT_MAX_LORA_RANK
    return max_lora_rank


def check_merge_options(engine: str, max_lora_rank: int | None, kwargs: dict[str, Any]) -> None:
    """Refuse, before any work, merge settings whose output `engine` cannot load."""
    limit = engine_rank_limit(engine, max_lora_rank)
    rank = kwargs.get("rank")
    if limit is not None and rank is not None and rank > limit:
        raise ConfigError(f"--target {engine}: --rank {rank} is above max_lora_rank {limit} (lower --rank, or raise "
                          "--max-lora-rank to what the server is started with)")
    if engine in SERVING_ENGINES and kwargs.get("modules_to_save") in ("per_task", "average"):
        raise ConfigError(f"--target {engine}: modules_to_save '{kwargs['modules_to_save']}' keeps classification "
                          f"heads, which {engine} does not load; {HEADS_FIX}")
    if engine != "peft" and kwargs.get("rank_patterns"):
        raise ConfigError(f"--target {engine}: {engine} does not read rank_pattern/alpha_pattern; drop --rank-patterns")


def fit_for_engine(result: Any, engine: str, max_lora_rank: int | None = None) -> Verdict:
    """Bring a MergeResult within `engine`'s rules in place and return the verdict on what will be written;
    raises ConfigError naming the failed rules when it still does not pass."""
    limit = engine_rank_limit(engine, max_lora_rank)
    if limit is not None and max(u.rank for u in result.modules.values()) > limit:
        _truncate_all(result, limit)
    if engine == "lorax":
        _fill_missing_layers(result)
    verdict = check_layout(_layout(result), engine, max_lora_rank)
    if not verdict.ok:
        failed = "; ".join(f"{f.rule}: {f.detail} (fix: {f.fix})" for f in verdict.failures)
        raise ConfigError(f"--target {engine}: the fused adapter would not load: {failed}")
    result.provenance["target"] = {"engine": engine, "max_lora_rank": limit}
    return verdict


def _layout(result: Any) -> Any:
    return layout_of(result.config, result.modules, result.embeddings, list(result.extra_state),
                     stored_rank(result.config), source="the fused adapter")


def _truncate_all(result: Any, limit: int) -> None:
    """Every module at rank ≤ limit, by the factors' SVD; the retained energy compounds with the merge's own."""
    energy = result.provenance["retained_energy"]["per_module"]
    for module, update in list(result.modules.items()):
        if update.rank > limit:
            result.modules[module], kept = truncate(update, limit)
            energy[module] = energy.get(module, 1.0) * kept
    values = list(energy.values())
    result.provenance["retained_energy"].update(min=min(values), mean=sum(values) / len(values))
    result.provenance["options"]["rank"] = limit
    _set_rank(result)


def _fill_missing_layers(result: Any) -> None:
    """LoRAX/TGI drop a layer type absent from any layer: write an exact zero update there (shape from another
    layer), so every layer has every type and ΔW is unchanged."""
    from lorafuse.adapters.engines import LAYERED_NAME

    shapes: dict[tuple[str, str], tuple[int, int]] = {}
    present: set[tuple[str, int, str]] = set()
    layers: dict[str, set[int]] = {}
    for module, update in result.modules.items():
        m = LAYERED_NAME.match(module)
        if m is not None:
            shapes[(m["stem"], m["type"])] = update.shape
            present.add((m["stem"], int(m["index"]), m["type"]))
            layers.setdefault(m["stem"], set()).add(int(m["index"]))
    for (stem, kind), (rows, cols) in shapes.items():
        for index in sorted(layers[stem]):
            if (stem, index, kind) not in present:
                result.modules[f"{stem}.{index}.{kind}"] = LowRank(torch.zeros(rows, 1), torch.zeros(1, cols))
    result.modules = dict(sorted(result.modules.items(), key=lambda kv: _natural(kv[0])))
    targets = result.config.get("target_modules")
    if isinstance(targets, list):
        result.config["target_modules"] = sorted(set(targets) | set(result.modules), key=_natural)
    _set_rank(result)


def _set_rank(result: Any) -> None:
    """r = lora_alpha = the largest module rank (scaling 1; the writer zero-pads the rest)."""
    if not result.config.get("rank_pattern"):
        r = max(u.rank for u in result.modules.values())
        result.config.update(r=r, lora_alpha=r)
    result.provenance["output"]["ranks"] = sorted({u.rank for u in result.modules.values()})


def _natural(name: str) -> list[Any]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]
