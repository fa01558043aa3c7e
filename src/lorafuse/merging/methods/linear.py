"""Exact methods: linear combinations of the updates, computed on the factors and returned at rank Σr.

Deliberate choices against mergekit: `linear` is the plain Σ w_t ΔW_t (`normalize: false`; mergekit's `linear`
defaults to `normalize: true`, dividing by Σw), and `average` is the unweighted mean, so it refuses weights
(for a weighted mean: `linear` with `normalize: true`)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from lorafuse.merging.algebra.lowrank import LowRank, stack_lowrank
from lorafuse.merging.methods.registry import MethodParams, register


class NoParams(MethodParams):
    pass


class LinearParams(MethodParams):
    normalize: bool = Field(False, description="divide the weights by their sum")


class TaskArithmeticParams(MethodParams):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the summed task vectors")


@register(
    "average",
    kind="module",
    params=NoParams,
    exact=True,
    uses_weights=False,
    summary="the unweighted mean of the updates (Simple Average; weights refused: use linear, normalize: true)",
    paper="Wortsman et al., Model soups, ICML 2022",
)
def average(terms: Sequence[LowRank], weights: Sequence[float], params: NoParams) -> LowRank:
    """(1/T)·Σ ΔW_t. The engine refuses weights other than 1 for it: they would be ignored."""
    return stack_lowrank(terms, [1.0 / len(terms)] * len(terms))


@register(
    "linear",
    kind="module",
    params=LinearParams,
    exact=True,
    summary="Σ w_t ΔW_t with user weights (negative allowed); normalize: false by default (mergekit: true)",
    paper="Wortsman et al., Model soups, ICML 2022; mergekit linear",
)
def linear(terms: Sequence[LowRank], weights: Sequence[float], params: LinearParams) -> LowRank:
    """Σ w_t ΔW_t, or Σ w_t ΔW_t / Σ w_t with normalize=true (mergekit's default; ours is false, so that the
    weights are the coefficients the user wrote)."""
    if params.normalize:
        total = sum(weights)
        if total == 0:
            raise ValueError("normalize=true needs weights that do not sum to zero")
        weights = [w / total for w in weights]
    return stack_lowrank(terms, weights)


@register(
    "task_arithmetic",
    kind="module",
    params=TaskArithmeticParams,
    exact=True,
    summary="λ·Σ w_t ΔW_t",
    paper="Ilharco et al., Editing models with task arithmetic, ICLR 2023",
)
def task_arithmetic(terms: Sequence[LowRank], weights: Sequence[float], params: TaskArithmeticParams) -> LowRank:
    return stack_lowrank(terms, [params.lambda_ * w for w in weights])


@register(
    "cat",
    kind="module",
    params=NoParams,
    exact=True,
    summary="exact concatenation of the weighted factors (rank Σr, nothing recomputed)",
    paper="PEFT add_weighted_adapter(combination_type='cat'), done on the updates",
)
def cat(terms: Sequence[LowRank], weights: Sequence[float], params: NoParams) -> LowRank:
    return stack_lowrank(terms, weights)
