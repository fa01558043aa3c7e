"""Which engines load a LoRA adapter, and whether they compute the update PEFT computes: each engine's loading
rules, replayed on the adapter's config and tensor shapes (no tensor is read, no engine is imported).

The rules are read from the engines' own code (Dec 2026):
- vLLM: `vllm/lora/peft_helper.py` (`PEFTHelper.from_dict`, `_validate_features`, `validate_legal`: r ≤
  max_lora_rank, no modules_to_save, no DoRA, bias none; `vllm_lora_scaling_factor` = lora_alpha/r or
  lora_alpha/√r), `vllm/lora/utils.py::parse_fine_tuned_lora_name` (keys `base_model.model.*.lora_A.weight`, ...)
  and the LoRA layers' buffers of max_lora_rank columns (a larger tensor fails to copy when the adapter is
  activated). The newest PEFTHelper reads rank_pattern/alpha_pattern (`get_rank_and_scaling`); the releases
  before it scale every module by the one r, which is what this module checks (one rank loads in both).
- SGLang: `python/sglang/srt/lora/lora_config.py`, `lora.py` (`LoRAAdapter`: scaling lora_alpha/r, rsLoRA not
  read; `normalize_qkv_proj` concatenates q, k, v (k may be absent: zeros) and `normalize_gate_up_proj` gate and
  up, so their lora_B's must share a rank) and `mem_pool.py` (buffers sliced at the config's r: every tensor is
  exactly rank r).
- LoRAX and TGI (TGI's `adapters/lora.py` is LoRAX's): `LoraConfig.map_weights_for_model` (only
  `lora_A.weight`/`lora_B.weight` keys; other tensors are left unused), `LoraWeights.prepare_weights`/`load`
  (a layer type missing from any layer is dropped whole; the layers' tensors are `torch.stack`ed, so one rank
  per layer type; `get_scaling_factor(lora_alpha, r, use_rslora)` with the one r).
- llama.cpp: `convert_lora_to_gguf.py` (one `adapter.lora.alpha` = lora_alpha; any tensor that is not a LoRA
  factor stops the conversion) and `llama-adapter.h::get_scale` (alpha / the tensor's own rank; rsLoRA not read).
- PEFT: `LoraModel` builds each module at r or its rank_pattern entry and loads with those shapes; SEQ_CLS /
  TOKEN_CLS adapters wrap the head as modules_to_save and need its tensors in the file
  (`set_peft_model_state_dict` raises KeyError otherwise). Scaling alpha/r per module, patterns honoured.
Model-specific rules (which module names a model supports, packed q/k/v layouts) need the model and are not
checked.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from lorafuse.adapters.config import match_pattern_key
from lorafuse.errors import AdapterError, ConfigError, did_you_mean
from lorafuse.validate import load_json, read_text

ENGINES = ("vllm", "sglang", "lorax", "llamacpp", "peft")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices
VLLM_DEFAULT_MAX_LORA_RANK = 16
SERVING_ENGINES = ("vllm", "sglang", "lorax", "llamacpp")  # engines that serve the adapter without its heads
PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|"
                     r"^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")
LAYERED_NAME = re.compile(r"^(?P<stem>.*?\.(?:layers|layer|h|blocks))\.(?P<index>\d+)\.(?P<type>.+)$")
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


@dataclass(frozen=True)
class ModuleFactors:
    """One module's LoRA factors as stored: lora_A (rank×in) and lora_B (out×rank) shapes."""

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.a_shape[0]


@dataclass(frozen=True)
class AdapterLayout:
    """What an engine's loader sees: adapter_config.json and the weights file's keys and shapes."""

    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    source: str = "adapter"

    @cached_property
    def modules(self) -> dict[str, ModuleFactors]:
        halves: dict[str, dict[str, Any]] = defaultdict(dict)
        for key, shape in self.shapes.items():
            m = _FACTOR.match(key)
            if m is None:
                continue
            module = (m["module"] or m["emodule"]).removeprefix(PREFIX)
            kind = m["kind"] or m["ekind"]
            halves[module][kind[-1]] = shape
            halves[module]["embedding"] = m["ekind"] is not None
        return {k: ModuleFactors(tuple(h["A"]), tuple(h["B"]), h["embedding"])
                for k, h in sorted(halves.items()) if "A" in h and "B" in h}

    @property
    def other_keys(self) -> list[str]:
        """Keys that are not LoRA factors (modules_to_save tensors, stray weights)."""
        return sorted(k for k in self.shapes if _FACTOR.match(k) is None)

    @property
    def unpaired(self) -> list[str]:
        paired = set(self.modules)
        return sorted({(m["module"] or m["emodule"]).removeprefix(PREFIX) for k in self.shapes
                       if (m := _FACTOR.match(k)) is not None} - paired)

    def r(self) -> int:
        return int(self.config.get("r") or 0)

    def alpha(self) -> float:
        return float(self.config.get("lora_alpha") or 0.0)


@dataclass(frozen=True)
class Finding:
    """One loading rule of an engine: whether the adapter meets it, what happens if not, and what to change."""

    rule: str
    passed: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Verdict:
    engine: str
    source: str
    max_lora_rank: int | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.passed for f in self.findings)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "source": self.source, "max_lora_rank": self.max_lora_rank, "ok": self.ok,
                "findings": [vars(f) for f in self.findings]}

    def format(self) -> str:
        limit = f" (max_lora_rank {self.max_lora_rank})" if self.max_lora_rank else ""
        lines = [f"{self.engine}{limit}: {'loads, same ΔW as PEFT' if self.ok else 'FAILS'} — {self.source}"]
        for f in self.findings:
            lines.append(f"  {'ok  ' if f.passed else 'FAIL'} {f.rule}: {f.detail}")
            if not f.passed and f.fix:
                lines.append(f"       fix: {f.fix}")
        return "\n".join(lines)


# -- reading ------------------------------------------------------------------------------------------------
def layout_from_dir(path: str | Path) -> AdapterLayout:
    """The layout of a PEFT adapter directory, from its config and its safetensors header."""
    from lorafuse.adapters.safetensors_io import SafetensorsFile

    path = Path(path)
    cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: missing adapter_config.json (not a PEFT adapter directory)")
    if not weights.is_file():
        raise AdapterError(f"{path}: missing adapter_model.safetensors")
    config = load_json(read_text(cfg_path, AdapterError), str(cfg_path), AdapterError)
    header = SafetensorsFile(weights)
    return AdapterLayout(config, {k: tuple(header.shape(k)) for k in header.keys()}, str(path))


def layout_of(config: Mapping[str, Any], modules: Mapping[str, Any], embeddings: set[str] = frozenset(),
              extra_keys: list[str] | tuple[str, ...] = (), rank: int | None = None, source: str = "merge") -> AdapterLayout:
    """The layout lorafuse's writer will produce for `modules` (LowRank updates, padded to `rank` if given)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module, update in modules.items():
        k = rank if rank is not None else update.rank
        m, n = update.shape
        if module in embeddings:
            shapes[f"{PREFIX}{module}.lora_embedding_A"] = (k, n)
            shapes[f"{PREFIX}{module}.lora_embedding_B"] = (m, k)
        else:
            shapes[f"{PREFIX}{module}.lora_A.weight"] = (k, n)
            shapes[f"{PREFIX}{module}.lora_B.weight"] = (m, k)
    shapes.update({key: (0,) for key in extra_keys})
    return AdapterLayout(dict(config), shapes, source)


# -- shared pieces ----------------------------------------------------------------------------------------------
def peft_scaling(config: Mapping[str, Any], module: str) -> float:
    """The scale PEFT applies to `module`: alpha/r (alpha/√r with rsLoRA), rank_pattern/alpha_pattern honoured."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rk, ak = match_pattern_key(list(ranks), module), match_pattern_key(list(alphas), module)
    r = float(ranks[rk]) if rk is not None else float(config["r"])
    alpha = float(alphas[ak]) if ak is not None else float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _scaling_finding(layout: AdapterLayout, engine_scale: Callable[[str, ModuleFactors], float], how: str,
                     engine: str) -> Finding:
    """Whether the engine's scale of every module equals PEFT's (same stored factors, so the same ΔW)."""
    wrong: dict[str, float] = {}
    for module, factors in layout.modules.items():
        want = peft_scaling(layout.config, module)
        got = engine_scale(module, factors)
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12):
            wrong[module] = got / want if want else math.inf
    if not wrong:
        return Finding("scaling", True, f"{how}: every module's scale equals PEFT's")
    ratios = ", ".join(f"×{v:.4g}" for v in sorted(set(round(v, 4) for v in wrong.values())))
    return Finding("scaling", False,
                   f"{how}: {len(wrong)} of {len(layout.modules)} modules scaled {ratios} relative to PEFT "
                   f"(e.g. {next(iter(wrong))})",
                   _rewrite_fix(layout, engine))


def _rewrite_fix(layout: AdapterLayout, engine: str) -> str:
    return (f"rewrite it at one rank with scaling 1: `lorafuse merge --method linear --adapters {layout.source} "
            f"-o OUT --target {engine}` (a one-adapter linear merge is exact; it zero-pads every module to one rank)")


def _global_scale(layout: AdapterLayout, rslora: bool) -> float:
    r, alpha = layout.r(), layout.alpha()
    if r <= 0:
        return math.nan
    return alpha / math.sqrt(r) if rslora else alpha / r


def _fields(layout: AdapterLayout, required: tuple[str, ...], where: str) -> Finding:
    missing = [k for k in required if k not in layout.config]
    if missing:
        return Finding("config fields", False, f"{where} requires {', '.join(missing)}",
                       f"add {', '.join(missing)} to adapter_config.json")
    return Finding("config fields", True, f"{', '.join(required)} present ({where})")


def _pairs(layout: AdapterLayout) -> Finding:
    bad = [m for m, f in layout.modules.items() if f.a_shape[0] != (f.b_shape[1] if len(f.b_shape) > 1 else -1)]
    if layout.unpaired or bad:
        names = layout.unpaired + bad
        return Finding("factor pairs", False, f"{len(names)} modules lack lora_A/lora_B or their ranks differ "
                       f"({names[0]})", "re-save the adapter with PEFT")
    if not layout.modules:
        return Finding("factor pairs", False, "no LoRA factors (lora_A/lora_B) in the weights file")
    return Finding("factor pairs", True, f"{len(layout.modules)} modules, each with lora_A and lora_B of one rank")


def _no_extra(layout: AdapterLayout, what: str, fix: str) -> Finding:
    extra = layout.other_keys
    mts = layout.config.get("modules_to_save") or []
    if extra or mts:
        shown = ", ".join((extra or mts)[:2])
        return Finding("modules_to_save", False, f"{what} ({shown}{'…' if len(extra) > 2 else ''})", fix)
    return Finding("modules_to_save", True, "no modules_to_save and no tensor other than LoRA factors")


HEADS_FIX = ("merge with --modules-to-save drop (heads in task_heads/ are for transformers/PEFT), or export a "
              "merged model (--output-model) and serve that")


def _rank_at_most(layout: AdapterLayout, limit: int | None, rule: str, why: str, fix: str) -> Finding:
    if limit is None:
        return Finding(rule, True, "no max_lora_rank given")
    over = {m: f.rank for m, f in layout.modules.items() if f.rank > limit}
    if layout.r() > limit or over:
        worst = max([layout.r(), *over.values()])
        detail = f"r={layout.r()}" + (f", {len(over)} tensors up to rank {worst}" if over else "")
        return Finding(rule, False, f"{detail} > max_lora_rank {limit}: {why}", fix)
    return Finding(rule, True, f"r={layout.r()} and every tensor ≤ max_lora_rank {limit}")


def _ranks_equal_r(layout: AdapterLayout, why: str, engine: str) -> Finding:
    off = {m: f.rank for m, f in layout.modules.items() if f.rank != layout.r()}
    if off:
        sizes = ", ".join(str(k) for k in sorted(set(off.values())))
        return Finding("one rank", False, f"{len(off)} of {len(layout.modules)} modules stored at rank {sizes}, not "
                       f"r={layout.r()}: {why}", _rewrite_fix(layout, engine))
    return Finding("one rank", True, f"every module stored at r={layout.r()}")


def _layer_types(layout: AdapterLayout) -> tuple[dict[str, dict[int, str]], list[str]]:
    """Modules by layer type (`self_attn.q_proj`) and layer index; modules outside numbered layers apart."""
    by_type: dict[str, dict[int, str]] = defaultdict(dict)
    loose = []
    for module in layout.modules:
        m = LAYERED_NAME.match(module)
        if m is None:
            loose.append(module)
        else:
            by_type[f"{m['stem']}.*.{m['type']}"][int(m["index"])] = module
    return by_type, loose


# -- the engines --------------------------------------------------------------------------------------------
def vllm_rules(layout: AdapterLayout, max_lora_rank: int | None) -> list[Finding]:
    limit = VLLM_DEFAULT_MAX_LORA_RANK if max_lora_rank is None else max_lora_rank
    cfg = layout.config
    features = [name for name, bad in (("DoRA", cfg.get("use_dora")), ("LoRA bias", cfg.get("lora_bias")),
                                       (f"bias={cfg.get('bias')}", cfg.get("bias", "none") not in ("none", None)))
                if bad]
    keys = [k for k in layout.shapes if not k.startswith(PREFIX) or _FACTOR.match(k) is None]
    out = [
        _fields(layout, ("r", "lora_alpha", "target_modules"), "PEFTHelper.from_dict"),
        Finding("max_lora_rank value", limit in VLLM_MAX_LORA_RANKS,
                f"--max-lora-rank {limit} " + ("is" if limit in VLLM_MAX_LORA_RANKS else "is not") +
                f" one of vLLM's {', '.join(map(str, VLLM_MAX_LORA_RANKS))}",
                "pick one of those values"),
        _no_extra(layout, "vLLM refuses modules_to_save (PEFTHelper._validate_features)", HEADS_FIX),
        Finding("features", not features, f"unsupported: {', '.join(features)}" if features else
                "no DoRA, LoRA bias or trained bias", "fuse into the base model instead (--output-model)"),
        Finding("keys", not keys, (f"{len(keys)} keys are not base_model.model.*.lora_A/B.weight ({keys[0]}): "
                                   "parse_fine_tuned_lora_name raises 'unsupported LoRA weight'") if keys else
                "every key is base_model.model.<module>.lora_A/B.weight (or lora_embedding_A/B)",
                "re-save with PEFT's key names"),
        _pairs(layout),
        _rank_at_most(layout, limit, "max_lora_rank",
                      "validate_legal refuses r above it, and a tensor above it fails to copy into vLLM's "
                      "max_lora_rank-wide buffers when the adapter is activated",
                      f"serve with a larger --max-lora-rank, or re-merge with `--target vllm --max-lora-rank {limit}`"),
        _scaling_finding(layout, lambda m, f: _global_scale(layout, bool(cfg.get("use_rslora"))),
                         "vLLM scales every module by lora_alpha/r (√r with rsLoRA), rank_pattern/alpha_pattern "
                         "not read", "vllm"),
    ]
    return out


def sglang_rules(layout: AdapterLayout, max_lora_rank: int | None) -> list[Finding]:
    cfg = layout.config
    peft_type = str(cfg.get("peft_type", "")).lower()
    out = [
        _fields(layout, ("r", "lora_alpha", "target_modules", "peft_type"), "LoRAConfig / LoRAAdapter"),
        Finding("peft_type", peft_type == "lora", f"peft_type {cfg.get('peft_type')!r}"
                + ("" if peft_type == "lora" else ": LoRAAdapter asserts 'lora'"), "only LoRA adapters load"),
        _no_extra(layout, "SGLang loads LoRA factors only: the head is silently not applied", HEADS_FIX),
        Finding("features", not cfg.get("use_dora"), "DoRA is not supported" if cfg.get("use_dora") else "no DoRA",
                "fuse into the base model instead (--output-model)"),
        _pairs(layout),
        _ranks_equal_r(layout, "SGLang's memory pool copies each tensor into a slice of the config's r (and "
                       "concatenates q/k/v and gate/up lora_B's, which needs one rank)", "sglang"),
        _sglang_stacking(layout),
        _rank_at_most(layout, max_lora_rank, "max_lora_rank", "the server's --max-lora-rank buffers are smaller",
                      f"serve with --max-lora-rank ≥ {layout.r()}, or re-merge with `--target sglang --max-lora-rank "
                      f"{max_lora_rank}`"),
        _scaling_finding(layout, lambda m, f: _global_scale(layout, False),
                         "SGLang scales every module by lora_alpha/r (use_rslora, rank_pattern and alpha_pattern "
                         "not read)", "sglang"),
    ]
    return out


def _sglang_stacking(layout: AdapterLayout) -> Finding:
    """normalize_qkv_proj needs q_proj and v_proj wherever q/k/v are targeted (only k_proj may be missing: zeros);
    normalize_gate_up_proj stacks up_proj under gate_proj, so up_proj needs gate_proj."""
    by_layer: dict[str, set[str]] = defaultdict(set)
    for module in layout.modules:
        m = LAYERED_NAME.match(module)
        if m is not None:
            by_layer[f"{m['stem']}.{m['index']}"].add(module.rpartition(".")[2])
    missing = []
    for layer, leaves in sorted(by_layer.items()):
        if leaves & {"q_proj", "k_proj", "v_proj"}:
            missing += [f"{layer}.….{need}" for need in ("q_proj", "v_proj") if need not in leaves]
        if "up_proj" in leaves and "gate_proj" not in leaves:
            missing.append(f"{layer}.….gate_proj")
    if missing:
        return Finding("stacking", False, f"{len(missing)} modules SGLang stacks are absent ({missing[0]}): "
                       "normalize_qkv_proj / normalize_gate_up_proj fail", "train or merge adapters that target q_proj "
                       "and v_proj (and gate_proj with up_proj) in every layer")
    return Finding("stacking", True, "q/k/v and gate/up present as SGLang stacks them")


def lorax_rules(layout: AdapterLayout, max_lora_rank: int | None) -> list[Finding]:
    cfg = layout.config
    by_type, loose = _layer_types(layout)
    layers: dict[str, set[int]] = defaultdict(set)  # layer indices per stack (`model.layers`, a vision tower, ...)
    for t, per in by_type.items():
        layers[t.split(".*.")[0]].update(per)
    gaps = {t: [i for i in sorted(layers[t.split(".*.")[0]]) if i not in per] for t, per in by_type.items()}
    gaps = {t: g for t, g in gaps.items() if g}
    uneven = {t: sorted({layout.modules[m].rank for m in per.values()}) for t, per in by_type.items()}
    uneven = {t: r for t, r in uneven.items() if len(r) > 1}
    embeddings = [m for m, f in layout.modules.items() if f.embedding]
    out = [
        _fields(layout, ("r", "lora_alpha"), "LoraConfig.load"),
        _no_extra(layout, "LoRAX/TGI map only lora_A/lora_B weights: the rest is unused and the head not applied",
                  HEADS_FIX),
        Finding("embeddings", not embeddings, f"{len(embeddings)} embedding LoRAs are not mapped ({embeddings[0]})"
                if embeddings else "no embedding LoRA (not mapped by LoRAX/TGI)", "leave embeddings out of the merge"),
        _pairs(layout),
        Finding("every layer", not gaps, (f"{len(gaps)} layer types are missing from some layers ({next(iter(gaps))} "
                                          f"in layers {gaps[next(iter(gaps))][:4]}): LoraWeights.load drops such a type "
                                          "from every layer, silently") if gaps else
                "every targeted layer type is present in every layer",
                "target the same modules in every layer (a merge with --target lorax writes zeros where one is absent)"),
        Finding("one rank per type", not uneven, (f"{len(uneven)} layer types have ranks {next(iter(uneven.values()))} "
                                                  "across layers: torch.stack of the layers' factors fails")
                if uneven else "one rank per layer type across layers", _rewrite_fix(layout, "lorax")),
        _rank_at_most(layout, max_lora_rank, "max_lora_rank", "above the limit given", "re-merge with --rank"),
        _scaling_finding(layout, lambda m, f: _global_scale(layout, bool(cfg.get("use_rslora"))),
                         "LoRAX/TGI scale every module by get_scaling_factor(lora_alpha, r, use_rslora) with the one r",
                         "lorax"),
    ]
    if loose:
        out.append(Finding("numbered layers", True, f"{len(loose)} modules outside numbered layers ({loose[0]}) "
                           "load only if the model maps them"))
    return out


def llamacpp_rules(layout: AdapterLayout, max_lora_rank: int | None) -> list[Finding]:
    cfg = layout.config
    alpha = layout.alpha()
    return [
        _fields(layout, ("lora_alpha",), "convert_lora_to_gguf.py"),
        _no_extra(layout, "convert_lora_to_gguf.py stops at a tensor that is not lora_A/lora_B ('Unexpected name')",
                  HEADS_FIX),
        _pairs(layout),
        Finding("base model", bool(cfg.get("base_model_name_or_path")), "base_model_name_or_path "
                + (f"'{cfg.get('base_model_name_or_path')}'" if cfg.get("base_model_name_or_path") else
                   "missing: the converter needs --base DIR"), "pass --base to convert_lora_to_gguf.py"),
        _rank_at_most(layout, max_lora_rank, "max_lora_rank", "above the limit given", "re-merge with --rank"),
        _scaling_finding(layout, lambda m, f: (alpha / f.rank if alpha else 1.0) if f.rank else math.nan,
                         "llama.cpp writes one alpha (lora_alpha) and scales each tensor by alpha / its own rank "
                         "(rsLoRA, rank_pattern and alpha_pattern not read)", "llamacpp"),
    ]


def peft_rules(layout: AdapterLayout, max_lora_rank: int | None) -> list[Finding]:
    cfg = layout.config
    pattern = cfg.get("rank_pattern") or {}
    off = {}
    for module, f in layout.modules.items():
        key = match_pattern_key(list(pattern), module)
        want = int(pattern[key]) if key is not None else layout.r()
        if f.rank != want:
            off[module] = (f.rank, want)
    head_needed = cfg.get("task_type") in _HEAD_TASKS
    has_head = bool(layout.other_keys)
    listed = cfg.get("modules_to_save") or []
    heads_ok = (not head_needed or has_head) and (has_head or not listed)
    return [
        _fields(layout, ("r", "lora_alpha"), "LoraConfig"),
        _pairs(layout),
        Finding("shapes", not off, (f"{len(off)} modules stored at a rank other than r/rank_pattern says "
                                    f"({next(iter(off))}: {off[next(iter(off))][0]} vs {off[next(iter(off))][1]}): "
                                    "load_state_dict fails with a size mismatch") if off else
                "every module stored at the rank r/rank_pattern gives it", "fix r or rank_pattern"),
        Finding("heads", heads_ok, (f"task_type {cfg.get('task_type')} makes PEFT wrap the head as modules_to_save "
                                    "and require its tensors in the file (KeyError)") if not heads_ok else
                ("head tensors stored as modules_to_save" if has_head else "no head needed"),
                "store the head (--modules-to-save per_task or average) or set task_type to null"),
        _scaling_finding(layout, lambda m, f: peft_scaling(cfg, m), "PEFT scales each module by its own "
                         "alpha/r (rank_pattern, alpha_pattern and rsLoRA honoured)", "peft"),
    ]


RULES: dict[str, Callable[[AdapterLayout, int | None], list[Finding]]] = {
    "vllm": vllm_rules, "sglang": sglang_rules, "lorax": lorax_rules, "llamacpp": llamacpp_rules, "peft": peft_rules,
}


def check_layout(layout: AdapterLayout, engine: str, max_lora_rank: int | None = None) -> Verdict:
    """Every loading rule of `engine` replayed on `layout`."""
    if engine not in RULES:
        raise ConfigError(f"unknown engine '{engine}'{did_you_mean(engine, RULES)}")
    if max_lora_rank is not None and max_lora_rank < 1:
        raise ConfigError(f"--max-lora-rank must be ≥ 1 (got {max_lora_rank})")
    limit = VLLM_DEFAULT_MAX_LORA_RANK if engine == "vllm" and max_lora_rank is None else max_lora_rank
    rank = _positive_ranks(layout)
    if not rank.passed:  # every engine's rules divide by r: report this one fatal finding instead of crashing
        return Verdict(engine, layout.source, limit, [rank])
    return Verdict(engine, layout.source, limit, RULES[engine](layout, max_lora_rank))


def _positive_ranks(layout: AdapterLayout) -> Finding:
    """r, every rank_pattern value and every stored tensor's rank must be ≥ 1: PEFT's LoraConfig refuses r ≤ 0
    and every engine scales by alpha/r."""
    pattern = layout.config.get("rank_pattern") or {}
    bad = [f"r={layout.config.get('r')}"] if _not_positive(layout.config.get("r")) else []
    bad += [f"rank_pattern {k}={v}" for k, v in pattern.items() if _not_positive(v)]
    bad += [f"{m} stored at rank {f.rank}" for m, f in layout.modules.items() if f.rank < 1]
    if bad:
        return Finding("positive rank", False, f"{', '.join(bad[:3])}: PEFT refuses r ≤ 0 and engines divide by r",
                       "store a zero update at rank 1 with zero factors (lorafuse merge does), or drop the module")
    return Finding("positive rank", True, "r and every module's rank ≥ 1")


def _not_positive(value: Any) -> bool:
    try:
        return float(value) < 1
    except (TypeError, ValueError):
        return False  # a missing or malformed r is the config-fields rule's finding
