"""Spaces in which element-wise methods run. A space projects one module's T updates to T blocks (stacked
[T, ...]) and rebuilds a merged block into an update: dense ΔW (full) or factors (aligned spaces).

`full`: the dense ΔW_t themselves; the merged dense update comes back to low rank by a truncated SVD.
Aligned spaces (`knots`, `core`) live in lorafuse.aligned and register here on import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorafuse.algebra.lowrank import LowRank
from lorafuse.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Projection:
    blocks: torch.Tensor  # [T, ...], one block per task
    rebuild: Callable[[torch.Tensor], LowRank | torch.Tensor]


SpaceFn = Callable[[Sequence[LowRank]], Projection]
SPACES: dict[str, SpaceFn] = {}
_OPTIONAL_SPACE_MODULES = ("lorafuse.aligned",)


def register_space(name: str) -> Callable[[SpaceFn], SpaceFn]:
    def wrap(fn: SpaceFn) -> SpaceFn:
        SPACES[name] = fn
        return fn

    return wrap


def get_space(name: str) -> SpaceFn:
    import importlib

    for module in _OPTIONAL_SPACE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if name not in SPACES:
        raise ConfigError(f"unknown space '{name}'{did_you_mean(name, SPACES)}")
    return SPACES[name]


@register_space("full")
def full_space(terms: Sequence[LowRank]) -> Projection:
    """Dense per-module updates: what TIES and DARE are defined on."""
    return Projection(torch.stack([t.dense() for t in terms]), lambda merged: merged)
