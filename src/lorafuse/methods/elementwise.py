"""The element-wise family: one parameterised merge = sparsifier × sign consensus × combination, as in
generalized task arithmetic (mergekit). TIES, DARE, magnitude prune and Breadcrumbs are presets of it.
Each runs on task blocks in a space (dense ΔW_t in `full`; aligned blocks in `knots`/`core`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from pydantic import Field

from lorafuse.methods import primitives as P
from lorafuse.methods.registry import MethodParams, register


class Sparsify(str, enum.Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"  # keep the top-density fraction by |x|
    RANDOM = "random"  # DARE: keep with probability 1-p, rescale
    BAND = "band"  # Breadcrumbs: drop the top gamma fraction, keep the next density fraction


class TrimScope(str, enum.Enum):
    MODULE = "module"  # threshold per module (PEFT, mergekit)
    GLOBAL = "global"  # threshold over the whole adapter (TIES paper, KnOTS)


class ElementwiseParams(MethodParams):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged update")
    density: float = Field(1.0, gt=0.0, le=1.0, description="fraction of entries kept per task")
    trim_scope: TrimScope = TrimScope.MODULE
    majority: str = Field("total", pattern="^(total|frequency)$", description="TIES sign election rule")
    seed: int = 0


class TiesParams(ElementwiseParams):
    density: float = Field(0.2, gt=0.0, le=1.0)


class DareParams(ElementwiseParams):
    drop_rate: float = Field(0.9, ge=0.0, lt=1.0, description="probability of dropping each entry")
    rescale: bool = True


class BreadcrumbsParams(ElementwiseParams):
    density: float = Field(0.9, gt=0.0, le=1.0)
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest entries dropped")


@dataclass(frozen=True)
class Recipe:
    sparsify: Sparsify
    consensus: bool  # TIES sign election + disjoint mean, else a weighted sum


def quantile_fractions(params: ElementwiseParams, recipe: Recipe, density: float) -> list[float]:
    """Top fractions whose |x| thresholds the engine must find for one task (per module or globally)."""
    if recipe.sparsify is Sparsify.MAGNITUDE:
        return [density]
    if recipe.sparsify is Sparsify.BAND:
        gamma = getattr(params, "gamma", 0.0)
        return [gamma, min(1.0, gamma + density)]
    return []


def sparsify(x: torch.Tensor, recipe: Recipe, params: ElementwiseParams, thresholds: torch.Tensor,
             generators: list[torch.Generator]) -> torch.Tensor:
    """Zero the entries each task drops; thresholds is [T, n_fractions]."""
    if recipe.sparsify is Sparsify.MAGNITUDE:
        return P.magnitude_mask(x, thresholds[:, 0]).mul_(x)
    if recipe.sparsify is Sparsify.BAND:
        return P.band_mask(x, thresholds[:, 0], thresholds[:, 1]).mul_(x)
    if recipe.sparsify is Sparsify.RANDOM:
        keep = 1.0 - params.drop_rate
        scale = 1.0 / keep if params.rescale else 1.0
        return x * P.bernoulli_keep_mask(x, keep, generators) * scale
    return x


def combine(x: torch.Tensor, weights: torch.Tensor, recipe: Recipe, params: ElementwiseParams) -> torch.Tensor:
    """Weighted sum, or TIES's sign election and disjoint (weighted) mean, then λ."""
    if not recipe.consensus:
        return params.lambda_ * P.weighted_sum(x, weights)
    votes = weights if params.majority == "total" else None
    return params.lambda_ * P.disjoint_mean(x, P.elect_sign(x, params.majority, votes), weights)


def _preset(name: str, recipe: Recipe, params: type[ElementwiseParams], summary: str, paper: str) -> None:
    def merge_blocks(x: torch.Tensor, weights: torch.Tensor, thresholds: torch.Tensor,
                     params: ElementwiseParams, generators: list[torch.Generator]) -> torch.Tensor:
        return combine(sparsify(x, recipe, params, thresholds, generators), weights, recipe, params)

    merge_blocks.recipe = recipe  # type: ignore[attr-defined]  # the engine reads it to plan thresholds
    merge_blocks.__name__ = name
    register(name, kind="elementwise", params=params, summary=summary, paper=paper)(merge_blocks)


_preset("ties", Recipe(Sparsify.MAGNITUDE, True), TiesParams,
        "trim to density by magnitude, elect signs, disjoint mean, λ",
        "Yadav et al., TIES-Merging, NeurIPS 2023")
_preset("dare_linear", Recipe(Sparsify.RANDOM, False), DareParams,
        "drop entries with probability p, rescale 1/(1-p), weighted sum",
        "Yu et al., Language models are Super Mario (DARE), ICML 2024")
_preset("dare_ties", Recipe(Sparsify.RANDOM, True), DareParams,
        "DARE drop and rescale, then TIES sign election and disjoint mean",
        "Yu et al., Language models are Super Mario (DARE), ICML 2024")
_preset("magnitude_prune", Recipe(Sparsify.MAGNITUDE, False), TiesParams,
        "keep the top density fraction by magnitude, then task arithmetic",
        "Yadav et al., TIES-Merging, NeurIPS 2023 (trim-only ablation); PEFT magnitude_prune")
_preset("breadcrumbs", Recipe(Sparsify.BAND, False), BreadcrumbsParams,
        "drop the largest gamma fraction and the smallest entries, keep a middle band, task arithmetic",
        "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024")
