"""Random LoRA adapters written in PEFT's format, built in code (no model needed), for merge tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_SHAPES = {  # tiny Llama: hidden 32, intermediate 64, 4 heads / 2 KV heads (head dim 8)
    "self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32),
    "self_attn.o_proj": (32, 32), "mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32), "mlp.down_proj": (32, 64),
}


def llama_modules(layers: int = 2, names: tuple[str, ...] = tuple(LLAMA_SHAPES)) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{n}": LLAMA_SHAPES[n] for i in range(layers) for n in names}


def write_adapter(
    path: Path,
    modules: dict[str, tuple[int, int]],
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    base_model: str = "tiny-llama",
    dtype: torch.dtype = torch.float32,
    extra: dict[str, torch.Tensor] | None = None,
    **config: object,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with random A and B (B non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out_f, in_f) in modules.items():
        rank = (rank_pattern or {}).get(module, r)
        state[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(dtype)
        state[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.1).to(dtype)
    state.update(extra or {})
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": sorted(modules), "base_model_name_or_path": base_model,
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}, "bias": "none",
        "fan_in_fan_out": False, "lora_dropout": 0.0,
    }
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def dense_update(path: Path, module: str) -> torch.Tensor:
    """Independent reference: ΔW = scaling·B·A straight from the files, computed in float64."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    state = load_file(str(path / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    if f"{key}.lora_A.weight" not in state:
        return None
    A, B = state[f"{key}.lora_A.weight"].double(), state[f"{key}.lora_B.weight"].double()
    r = cfg.get("rank_pattern", {}).get(module, cfg["r"])
    alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
    scale = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
    return scale * B @ A


MIXED_MODULES = llama_modules(2, ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"))


def mixed_adapters(root: Path, dtype: torch.dtype = torch.float32, equal_ranks: bool = False) -> list[Path]:
    """Mixed ranks (a: r=4, one module r=6 by rank_pattern; b: r=2 rsLoRA; c: r=3 without the MLP), or three
    r=3 adapters: the set the aligned-space and spectral tests share."""
    attn = {m: s for m, s in MIXED_MODULES.items() if "self_attn" in m}
    if equal_ranks:
        return [write_adapter(root / n, MIXED_MODULES, r=3, alpha=6, seed=s, dtype=dtype)
                for n, s in (("a", 1), ("b", 2), ("c", 3))]
    pattern = {"model.layers.0.self_attn.q_proj": 6}
    return [write_adapter(root / "a", MIXED_MODULES, r=4, alpha=8, seed=1, rank_pattern=pattern, dtype=dtype),
            write_adapter(root / "b", MIXED_MODULES, r=2, alpha=4, seed=2, rslora=True, dtype=dtype),
            write_adapter(root / "c", attn, r=3, alpha=3, seed=3, dtype=dtype)]


def dense_stack(paths: list[Path], module: str, weights: list[float] | None = None) -> torch.Tensor:
    """[T, m, n] float64 reference updates (weighted), zeros where an adapter lacks the module."""
    m, n = MIXED_MODULES[module]
    weights = weights or [1.0] * len(paths)
    return torch.stack([w * u if (u := dense_update(p, module)) is not None else torch.zeros(m, n, dtype=torch.float64)
                        for p, w in zip(paths, weights)])


def core_bases(paths: list[Path], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Core Space's bases as its code computes them: U_B and V_A from dense float64 SVDs of the stacked (scaled)
    B's and A's of the adapters that have the module."""
    from lorafuse.adapters.reader import LoraAdapter

    Bs, As = [], []
    for p in paths:
        adapter = LoraAdapter(p)
        if module in adapter.modules:
            u = adapter.update(module)
            Bs.append(u.B.double())
            As.append(u.A.double())
    UB = torch.linalg.svd(torch.cat(Bs, 1), full_matrices=False)[0]
    VA = torch.linalg.svd(torch.cat(As), full_matrices=False)[2]
    return UB, VA
