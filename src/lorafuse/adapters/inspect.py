"""A summary of an adapter: per module shape, rank, scaling and ‖ΔW‖_F (from the factors, no dense update)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorafuse.adapters.reader import LoraAdapter


def update_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F = ‖R_B·R_Aᵀ‖_F from thin QRs: exact without forming the m×n product."""
    _, Rb = torch.linalg.qr(B.double())
    _, Ra = torch.linalg.qr(A.double().T)
    return float(torch.linalg.matrix_norm(Rb @ Ra.T))


def describe_adapter(source: str | Path, allow_bin: bool = False) -> dict[str, Any]:
    adapter = LoraAdapter(source, allow_bin=allow_bin)
    s = adapter.settings
    modules = []
    for name in adapter.modules:
        update = adapter.update(name)
        modules.append({"module": name, "shape": list(adapter.module_shape(name)), "rank": update.rank,
                        "scaling": s.scaling(name), "norm": update_norm(update.B, update.A)})
    return {
        "path": str(adapter.path), "name": adapter.name, "base_model": s.base_model, "task_type": s.task_type,
        "r": s.r, "lora_alpha": s.lora_alpha, "use_rslora": s.use_rslora, "fan_in_fan_out": s.fan_in_fan_out,
        "dtype": str(adapter.dtype()), "modules_to_save": list(s.modules_to_save), "extra_tensors": adapter.extra_keys,
        "n_modules": len(modules), "parameters": sum(m["rank"] * sum(m["shape"]) for m in modules),
        "sha256": adapter.sha256, "modules": modules,
    }


def format_description(info: dict[str, Any]) -> str:
    head = [f"adapter      {info['path']}  ({info['name']})",
            f"base model   {info['base_model']}  task_type={info['task_type']}",
            f"r={info['r']}  lora_alpha={info['lora_alpha']}  rslora={info['use_rslora']}  "
            f"fan_in_fan_out={info['fan_in_fan_out']}  dtype={info['dtype']}",
            f"{info['n_modules']} modules, {info['parameters']:,} LoRA parameters, sha256 {info['sha256'][:16]}…"]
    if info["modules_to_save"]:
        head.append(f"modules_to_save {info['modules_to_save']} ({len(info['extra_tensors'])} tensors)")
    width = max(len(m["module"]) for m in info["modules"])
    rows = [f"{'module':{width}s}  {'shape':>12s}  {'rank':>4s}  {'scaling':>8s}  {'‖ΔW‖_F':>10s}"]
    rows += [f"{m['module']:{width}s}  {m['shape'][0]:>5d}×{m['shape'][1]:<6d}  {m['rank']:>4d}  "
             f"{m['scaling']:>8.4g}  {m['norm']:>10.4g}" for m in info["modules"]]
    return "\n".join(head + [""] + rows)
