"""Independent replays of serving engines' LoRA loading, on real tensors, written from each engine's code (not
from lorafuse.adapters.engines): the checks they make, the buffers and stacks they build, the scale they apply.
Each returns the dense update every module gets, or raises LoadError where the engine raises; tensors the engine
leaves unused come back in `ignored` (a classification head that is silently not applied).

- vLLM: PEFTHelper.from_dict/_validate_features/validate_legal, parse_fine_tuned_lora_name, lora_b × scaling,
  buffers of max_lora_rank columns filled by `buffer[:rank].copy_(tensor)`.
- SGLang: LoRAAdapter (scaling = lora_alpha / r), normalize_qkv_proj / normalize_gate_up_proj (torch.cat of
  q, k (zeros if absent), v and of gate, up), memory-pool slices of r rows per stacked module.
- LoRAX / TGI: map_weights_for_model (lora_A/lora_B keys only), prepare_weights (a layer type missing in a layer:
  the type is dropped; get_scaling_factor(alpha, r, rslora); torch.stack over layers; no SGMV padding on CPU).
- llama.cpp: convert_lora_to_gguf.py (non-LoRA tensors stop it; one alpha) and get_scale = alpha / rank(b).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file


class LoadError(Exception):
    """Where the engine raises (or, for llama.cpp's converter, exits)."""


@dataclass
class Loaded:
    deltas: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((path / "adapter_config.json").read_text()), load_file(str(path / "adapter_model.safetensors"))


def intended_deltas(path: Path) -> dict[str, torch.Tensor]:
    """What the adapter means (PEFT's rule): scale alpha/r per module, rank_pattern/alpha_pattern keys matched as
    PEFT's get_pattern_key does, rsLoRA alpha/√r; float64."""
    cfg, state = _read(path)

    def pattern(name: str, module: str, default: float) -> float:
        for key, value in (cfg.get(name) or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return float(value)
        return float(default)

    out = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            r, alpha = pattern("rank_pattern", module, cfg["r"]), pattern("alpha_pattern", module, cfg["lora_alpha"])
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            B = state[key.replace("lora_A", "lora_B")].double()
            out[module] = scale * B @ state[key].double()
    return out


# -- vLLM ---------------------------------------------------------------------------------------------------
def vllm_load(path: Path, max_lora_rank: int = 16) -> Loaded:
    cfg, state = _read(path)
    missing = {"r", "lora_alpha", "target_modules"} - set(cfg)
    if missing:
        raise LoadError(f"Missing required configuration fields: {missing}")
    errors = []
    if cfg.get("modules_to_save"):
        errors.append("vLLM only supports modules_to_save being None.")
    if cfg.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if cfg["r"] > max_lora_rank:
        errors.append(f"LoRA rank {cfg['r']} is greater than max_lora_rank {max_lora_rank}.")
    if cfg.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    if errors:
        raise LoadError(" ".join(errors))
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[:2] != ["base_model", "model"]:
            raise LoadError(f"{name} is unsupported LoRA weight")
        if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
            factors.setdefault(".".join(parts[2:-2]), {})[parts[-2][-1]] = tensor
        elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
            factors.setdefault(".".join(parts[2:-1]), {})[parts[-1][-1]] = tensor
        else:
            raise LoadError(f"{name} is unsupported LoRA weight")
    deltas = {}
    for module, f in factors.items():
        A, B = f["A"], f["B"] * scaling  # from_lora_tensors folds the scaling into lora_b
        a_buf, b_buf = torch.zeros(max_lora_rank, A.shape[1]), torch.zeros(B.shape[0], max_lora_rank)
        try:  # set_lora: the adapter's tensors copied into the max_lora_rank-wide stacked buffers
            a_buf[:A.shape[0]].copy_(A)
            b_buf[:, :B.shape[1]].copy_(B)
        except RuntimeError as exc:
            raise LoadError(f"{module}: {exc}") from exc
        deltas[module] = b_buf.double() @ a_buf.double()
    return Loaded(deltas)


# -- SGLang -------------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^base_model\.model\.(?P<stem>.*\.layers)\.(?P<i>\d+)\.(?P<rest>.+)$")


def sglang_load(path: Path, max_lora_rank: int | None = None) -> Loaded:
    cfg, state = _read(path)
    if str(cfg.get("peft_type", "")).lower() != "lora":
        raise LoadError("peft_type must be lora")
    r, scaling = cfg["r"], cfg["lora_alpha"] / cfg["r"]
    max_rank = max_lora_rank or r
    if r > max_rank:
        raise LoadError(f"LoRA rank {r} exceeds --max-lora-rank {max_rank}")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    ignored = []
    for name, tensor in state.items():
        m = _LAYER.match(name)
        if m is None or "lora_" not in name:
            ignored.append(name)  # not a LoRA weight of a decoder layer: not applied
            continue
        layers.setdefault(f"{m['stem']}.{m['i']}", {})[m["rest"]] = tensor
    deltas = {}
    for layer, weights in layers.items():
        names = set(weights)
        splits: dict[str, list[int]] = {}  # the stacked lora_B's row blocks, for reading each part back
        for kind in ("lora_A", "lora_B"):
            q, k, v = (f"self_attn.{p}.{kind}.weight" for p in ("q_proj", "k_proj", "v_proj"))
            if {q, k, v} & names:
                if q not in names or v not in names:
                    raise LoadError(f"{layer}: q_proj/v_proj missing where SGLang stacks qkv_proj (KeyError)")
                kw = weights[k] if k in names else torch.zeros_like(weights[v])
                splits["self_attn.qkv_proj"] = [weights[q].shape[0], kw.shape[0], weights[v].shape[0]]
                try:
                    weights[f"self_attn.qkv_proj.{kind}.weight"] = torch.cat((weights.pop(q), kw, weights.pop(v)), 0)
                except RuntimeError as exc:
                    raise LoadError(f"{layer} qkv_proj {kind}: {exc}") from exc
                weights.pop(k, None)
            g, u = f"mlp.gate_proj.{kind}.weight", f"mlp.up_proj.{kind}.weight"
            if u in names and g not in names:
                raise LoadError(f"{layer}: up_proj without gate_proj is not stacked")
            if g in names:
                uw = weights.pop(u) if u in names else torch.zeros_like(weights[g])
                splits["mlp.gate_up_proj"] = [weights[g].shape[0], uw.shape[0]]
                try:
                    weights[f"mlp.gate_up_proj.{kind}.weight"] = torch.cat((weights.pop(g), uw), 0)
                except RuntimeError as exc:
                    raise LoadError(f"{layer} gate_up_proj {kind}: {exc}") from exc
        deltas.update(_sglang_pool(layer, weights, splits, r, max_rank, scaling))
    return Loaded(deltas, ignored)


def _sglang_pool(layer: str, weights: dict[str, torch.Tensor], splits: dict[str, list[int]], r: int,
                 max_rank: int, scaling: float) -> dict[str, torch.Tensor]:
    """The memory pool: per module A (c·max_rank × in) and B (out × max_rank) buffers, filled at [:c·r] / [:, :r];
    then each stacked part's update from its slices."""
    parts = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}
    out = {}
    for name in {n.rsplit(".", 2)[0] for n in weights}:
        A, B = weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]
        c = len(parts.get(name, (None,)))
        a_buf, b_buf = torch.zeros(c * max_rank, A.shape[1]), torch.zeros(B.shape[0], max_rank)
        try:
            a_buf[:c * r].copy_(A)
            b_buf[:, :r].copy_(B)
        except RuntimeError as exc:
            raise LoadError(f"{layer}.{name}: {exc}") from exc
        if name not in parts:
            out[f"{layer}.{name}"] = scaling * b_buf[:, :r].double() @ a_buf[:r].double()
            continue
        sizes = splits[name]
        start = 0
        stem = name.rsplit(".", 1)[0]
        for j, (part, size) in enumerate(zip(parts[name], sizes)):
            out[f"{layer}.{stem}.{part}"] = scaling * (b_buf[start:start + size, :r].double()
                                                       @ a_buf[j * r:(j + 1) * r].double())
            start += size
    return out


# -- LoRAX / TGI --------------------------------------------------------------------------------------------
def lorax_load(path: Path, num_layers: int) -> Loaded:
    cfg, state = _read(path)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
    types = set()
    for name in state:
        m = _LAYER.match(name)
        if m is not None and name.endswith((".lora_A.weight", ".lora_B.weight")):
            types.add((m["stem"], m["rest"].rsplit(".", 2)[0]))
    unused = set(state)
    deltas = {}
    for stem, kind in sorted(types):
        a_list, b_list = [], []
        for i in range(num_layers):
            a_key = f"base_model.model.{stem}.{i}.{kind}.lora_A.weight"
            b_key = a_key.replace("lora_A", "lora_B")
            if a_key not in state or b_key not in state:
                a_list = None  # "There is no LoRA weight for this layer type in the adapter": return None
                break
            unused -= {a_key, b_key}
            a_list.append(state[a_key].transpose(0, 1))
            b_list.append(state[b_key].transpose(0, 1) * scale)
        if a_list is None:
            continue
        try:
            A, B = torch.stack(a_list), torch.stack(b_list)
        except RuntimeError as exc:
            raise LoadError(f"{kind}: {exc}") from exc
        for i in range(num_layers):
            deltas[f"{stem}.{i}.{kind}"] = (A[i].double() @ B[i].double()).T
    return Loaded(deltas, sorted(unused))


# -- llama.cpp ----------------------------------------------------------------------------------------------
def llamacpp_convert(path: Path) -> Loaded:
    cfg, state = _read(path)
    alpha = float(cfg["lora_alpha"])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        is_a, is_b = ".lora_A.weight" in name, ".lora_B.weight" in name
        if not is_a and not is_b:
            raise LoadError(f"Unexpected name '{name}': Not a lora_A or lora_B tensor")
        base = name.removeprefix("base_model.model.").replace(".lora_A.weight", "").replace(".lora_B.weight", "")
        pairs.setdefault(base, {})["A" if is_a else "B"] = tensor
    deltas = {}
    for base, f in pairs.items():
        if set(f) != {"A", "B"}:
            raise LoadError(f"LoRA tensor pair for {base!r} is missing a factor")
        rank = f["B"].shape[1]  # ggml's b->ne[0]
        scale = alpha / rank if alpha else 1.0
        deltas[base] = scale * f["B"].double() @ f["A"].double()
    return Loaded(deltas)


# -- PEFT (the real library) -------------------------------------------------------------------------------
def peft_load(path: Path, model: torch.nn.Module) -> Loaded:
    import copy

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    try:
        loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(path))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise LoadError(f"PEFT: {exc!r}") from exc
    deltas = {}
    for name, module in loaded.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            deltas[name] = module.get_delta_weight("default").double()
    return Loaded(deltas)
