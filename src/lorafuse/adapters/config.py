"""PEFT LoRA adapter configs: validation of what lorafuse can fuse, and each module's scale."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorafuse.errors import AdapterError
from lorafuse.validate import check_regex, finite_number, strict_bool, strict_int


def match_pattern_key(patterns: list[str], module: str) -> str | None:
    """The first rank/alpha pattern key that matches `module`, by PEFT's own rule `(.*\\.)?(key)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def targeted(targets: object, module: str) -> bool:
    """Whether PEFT wraps `module` for a config's `target_modules`, by PEFT's own rule: a string is a regex
    matched against the whole name, a list matches a name or its last dotted parts; none (or `all-linear`,
    expanded by PEFT before it saves) leaves the stored modules to say."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return isinstance(targets, (list, tuple)) and any(module == t or module.endswith(f".{t}") for t in targets)


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
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_of(self, module: str) -> float:
        key = match_pattern_key(list(self.alpha_pattern), module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

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
    """Validate a PEFT config dict; `source` names the file in errors. Types are strict (no coercion:
    `"use_rslora": "false"` is not false, `"r": 4.5` is not 4) and every number must be finite."""
    problem = _unsupported(cfg, source)
    if problem:
        raise AdapterError(f"{source}: unsupported adapter feature: {problem}")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise AdapterError(f"{source}: missing field '{key}'")
    return LoraSettings(
        r=strict_int(cfg["r"], f"{source}: r", minimum=1, error=AdapterError),
        lora_alpha=finite_number(cfg["lora_alpha"], f"{source}: lora_alpha", AdapterError),
        use_rslora=_flag(cfg, "use_rslora", source),
        fan_in_fan_out=_flag(cfg, "fan_in_fan_out", source),
        rank_pattern={_pattern_key(k, "rank_pattern", source): strict_int(v, f"{source}: rank_pattern[{k!r}]", 1,
                                                                          AdapterError)
                      for k, v in _mapping(cfg, "rank_pattern", source).items()},
        alpha_pattern={_pattern_key(k, "alpha_pattern", source): finite_number(v, f"{source}: alpha_pattern[{k!r}]",
                                                                               AdapterError)
                       for k, v in _mapping(cfg, "alpha_pattern", source).items()},
        base_model=_optional_str(cfg, "base_model_name_or_path", source),
        task_type=_optional_str(cfg, "task_type", source),
        modules_to_save=_modules_to_save(cfg, source),
        raw=dict(cfg),
    )


def _flag(cfg: dict[str, Any], key: str, source: str) -> bool:
    value = cfg.get(key)
    return False if value is None else strict_bool(value, f"{source}: {key}", AdapterError)


def _mapping(cfg: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{source}: {key}: expected an object, got {value!r}")
    return value


def _pattern_key(key: str, field_name: str, source: str) -> str:
    return check_regex(key, f"{source}: {field_name} key", AdapterError)  # matched as PEFT's regex


def _optional_str(cfg: dict[str, Any], key: str, source: str) -> str | None:
    value = cfg.get(key)
    if value is not None and not isinstance(value, str):
        raise AdapterError(f"{source}: {key}: expected a string, got {value!r}")
    return value


def _modules_to_save(cfg: dict[str, Any], source: str) -> tuple[str, ...]:
    value = cfg.get("modules_to_save") or ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise AdapterError(f"{source}: modules_to_save: expected a list of module names, got {value!r}")
    return tuple(value)
