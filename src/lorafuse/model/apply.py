"""Applying an adapter to a loaded model, undone afterwards: the exact update W ← W + ΔW of each module (`applied`,
with fp32 masters for a reduced-precision model: `MasterWeights`) and a task's classification head (`head_loaded`).
The evaluator and the data-driven fusions (router, LoraHub) both build on these."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from lorafuse.adapters.reader import PREFIX
from lorafuse.errors import AdapterError
from lorafuse.merging.algebra.lowrank import LowRank

Updates = Mapping[str, LowRank]


def _submodule(model: torch.nn.Module, module: str) -> torch.nn.Module:
    """The model's module for an adapter path; tolerates a wrapper prefix present on one side only."""
    parts = module.split(".")
    for start in range(len(parts)):
        try:
            return model.get_submodule(".".join(parts[start:]))
        except AttributeError:
            continue
    raise AdapterError(f"module '{module}' of the adapter is not in the model (an adapter for another base?)")


class MasterWeights:
    """fp32 copies of a model's weights taken before it is cast to a lower precision: an update is added to the
    fp32 master and only the sum is rounded (lorafuse.model.precision), and removing it restores the rounded master."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._copies = {id(p): p.detach().float().clone() for p in model.parameters()
                        if p.is_floating_point() and p.ndim >= 2}

    def of(self, weight: torch.Tensor) -> torch.Tensor | None:
        return self._copies.get(id(weight))


@contextmanager
def applied(model: torch.nn.Module, updates: Updates, fan_in_fan_out: bool = False,
            masters: MasterWeights | None = None) -> Iterator[None]:
    """Temporarily W ← W + ΔW for every module of `updates` (exact; originals restored on exit). With `masters`
    (a reduced-precision model) W + ΔW is formed from the fp32 master, then rounded to the weight's dtype."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, update in updates.items():
                weight = _submodule(model, name).weight
                delta = update.dense().to(weight.device)
                delta = delta.T if fan_in_fan_out else delta
                if delta.shape != weight.shape:
                    raise AdapterError(f"module '{name}': update {tuple(delta.shape)} does not fit weight "
                                       f"{tuple(weight.shape)} (an adapter for another base model?)")
                master = masters.of(weight) if masters is not None else None
                if master is None:
                    saved.append((weight, weight.detach().clone()))
                    weight.add_(delta.to(weight.dtype))
                else:
                    saved.append((weight, master))
                    weight.copy_(master.to(weight.device) + delta.float())
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


@contextmanager
def head_loaded(model: torch.nn.Module, head: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily load a task's classification head (keys as PEFT stores modules_to_save)."""
    if not head:
        yield
        return
    state = {k.removeprefix(PREFIX): v for k, v in head.items()}
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise AdapterError(f"head tensors {missing[:2]} do not match the model's parameters")
    saved = {k: params[k].detach().clone() for k in state}
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
