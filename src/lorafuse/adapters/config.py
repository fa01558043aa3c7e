"""PEFT LoRA adapter configs: validation of what lorafuse can fuse, and each module's scale."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorafuse.errors import AdapterError


def match_pattern_key(patterns: list[str], module: str) -> str | None:
    """The first rank/alpha pattern key that matches `module`, by PEFT's own rule `(.*\\.)?(key)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class LoraSettings:
    """The fields of adapter_config.json that decide what the stored factors mean."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    task_type: str | None = None
    modules_to_save: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def rank_of(self, module: str) -> int:
        key = match_pattern_key(list(self.rank_pattern), module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_of(self, module: str) -> float:
        key = match_pattern_key(list(self.alpha_pattern), module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling(self, module: str, stored_rank: int | None = None) -> float:
        """PEFT's scaling for `module`: alpha/r, or alpha/√r with rsLoRA (rank/alpha patterns override)."""
        r = self.rank_of(module)
        if stored_rank is not None and stored_rank != r:
            raise AdapterError(
                f"module '{module}': stored rank {stored_rank} but the config says r={r} "
                "(check r and rank_pattern in adapter_config.json)"
            )
        alpha = self.alpha_of(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _unsupported(cfg: dict[str, Any], source: str) -> str | None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        return f"peft_type {peft_type} (only LoRA adapters can be fused)"
    if cfg.get("use_dora"):
        return "DoRA (use_dora=true): its magnitude vector is not a low-rank update and cannot be fused exactly"
    if cfg.get("lora_bias"):
        return "LoRA bias (lora_bias=true): the bias term is not part of B·A"
    if cfg.get("bias", "none") not in ("none", None):
        return f"bias='{cfg['bias']}' (trained base biases are not part of B·A)"
    return None


def parse_settings(cfg: dict[str, Any], source: str) -> LoraSettings:
    """Validate a PEFT config dict; `source` names the file in errors."""
    problem = _unsupported(cfg, source)
    if problem:
        raise AdapterError(f"{source}: unsupported adapter feature: {problem}")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise AdapterError(f"{source}: missing field '{key}'")
    try:
        return LoraSettings(
            r=int(cfg["r"]),
            lora_alpha=float(cfg["lora_alpha"]),
            use_rslora=bool(cfg.get("use_rslora", False)),
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
            rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
            base_model=cfg.get("base_model_name_or_path"),
            task_type=cfg.get("task_type"),
            modules_to_save=tuple(cfg.get("modules_to_save") or ()),
            raw=dict(cfg),
        )
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{source}: invalid field value: {exc}") from exc
