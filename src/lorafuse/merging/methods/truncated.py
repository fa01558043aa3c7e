"""Per-task truncated SVDs, from the factors: CART (centred task vectors, low rank) and STAR (spectral truncation
and rescaling). No m×n SVD: every task's matrix is a product of thin factors, and its SVD comes from QRs of those
factors and an SVD of a small core (lorafuse.merging.algebra.lowrank).

Both methods work on the weighted task values y_t = w_t·ΔW_t (negative weights allowed), like every method here;
with unit weights they are the papers' task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from lorafuse.merging.algebra.lowrank import (
    CORE_DTYPE,
    WORK_DTYPE,
    LowRank,
    factor_svd,
    numerical_rank,
    stack_lowrank,
)
from lorafuse.merging.methods.registry import MethodParams, register


def _zero(m: int, n: int) -> LowRank:
    return LowRank(torch.zeros(m, 0), torch.zeros(0, n))


# -- CART ---------------------------------------------------------------------------------------------------------
class CARTParams(MethodParams):
    lambda_: float = Field(2.0, alias="lambda",
                           description="scale of the summed low-rank centred parts (the CART code's `prior`)")
    rank_ratio: float = Field(0.12, ge=0.0, le=1.0,
                              description="share of min(m, n) singular directions kept per centred task vector")
    rounding: str = Field("floor", pattern="^(floor|ceil)$",
                          description="k = max(1, ⌊ratio·min(m, n)⌋) (CART code) or ⌈ratio·min(m, n)⌉ (Core Space)")

    def floors(self, shapes: Sequence[tuple[int, int]], ranks: Sequence[int]) -> dict[str, str]:
        if self.rank_ratio == 0.0 or not shapes or \
                any(cart_rank(self.rank_ratio, min(shape), self.rounding) != 1 for shape in shapes):
            return {}
        return {"rank_ratio": f"rank_ratio = {self.rank_ratio:g} keeps 1 singular direction of each task's centred "
                              "update in every module, the least short of rank_ratio 0 (the plain average)"}


def cart_rank(ratio: float, dim: int, rounding: str) -> int:
    """Directions kept per task: the CART code's max(1, int(ratio·dim)) (0 for ratio 0), or the Core Space code's
    ceil(ratio·dim)."""
    if ratio == 0.0:
        return 0
    return math.ceil(ratio * dim) if rounding == "ceil" else max(1, int(ratio * dim))


@register(
    "cart", kind="module", params=CARTParams, spaces=("full", "core"),
    summary="CART: the average plus λ·Σ of each task's centred update (y_t − mean) cut to its top rank_ratio·min(m, n)",
    paper="Choi et al., Revisiting Weight Averaging for Model Merging (CART), arXiv 2412.12153",
)
def cart(terms: Sequence[LowRank], weights: Sequence[float], params: CARTParams) -> LowRank:
    """ȳ + λ·Σ_t SVD_k(y_t − ȳ), ȳ = (1/T)·Σ_t y_t, as the authors' code (JH-GEECS/CART `merging.py`, CART branch:
    `_get_origin(1/T)` then `_get_truncated_task_vectors` summed and scaled by `prior`); the Core Space code's
    `get_cart_delta_w` is the same with k = ⌈ratio·dim⌉ (`rounding: ceil`). k = max(1, ⌊rank_ratio·min(m, n)⌋),
    min(m, n) of the module (in core space: R = Σr, the core's size, as the Core Space code).

    From the factors: with the stacked factors [w_1B_1 … w_TB_T] = Q_B R_B and [A_1; …; A_T]ᵀ = Q_A R_A, each
    centred task is y_t − ȳ = Q_B·(R_B D_t R_Aᵀ)·Q_Aᵀ with D_t = diag(δ_st − 1/T) over the blocks s: an R×R core
    whose SVD gives the exact top-k triplets; the truncated parts and the average are summed in that core, so the
    result is Q_B·M·Q_Aᵀ (rank ≤ R = Σr).

    LoRA: y_t − ȳ has rank ≤ R, so where k ≥ R nothing is cut and Σ_t (y_t − ȳ) = 0: the result is the mean ȳ (with
    the defaults, k = ⌊0.12·min(m, n)⌋ ≥ R for any module with min(m, n) ≥ 8.4·R). Only the numerically non-zero
    directions (σ > 1e-6·σ_max) are kept; the dense code's extra directions have σ = 0 and add nothing."""
    m, n = terms[0].shape
    T = len(terms)
    stacked = stack_lowrank(terms, weights)
    if stacked.rank == 0:
        return _zero(m, n)
    Qb, Rb = torch.linalg.qr(stacked.B)
    Qa, Ra = torch.linalg.qr(stacked.A.T)
    Rb, Ra = Rb.to(CORE_DTYPE), Ra.to(CORE_DTYPE)
    owner = torch.repeat_interleave(torch.arange(T), torch.tensor([t.rank for t in terms]))
    k = cart_rank(params.rank_ratio, min(m, n), params.rounding)
    core = (Rb / T) @ Ra.T  # the mean ȳ
    for t in range(T):
        if k == 0:
            break
        centred = (Rb * ((owner == t).to(CORE_DTYPE) - 1.0 / T)) @ Ra.T
        U, S, Vh = torch.linalg.svd(centred)
        keep = min(k, numerical_rank(S))
        core += params.lambda_ * (U[:, :keep] * S[:keep]) @ Vh[:keep]
    return LowRank(Qb @ core.to(WORK_DTYPE), Qa.T)


# -- STAR ---------------------------------------------------------------------------------------------------------
class STARParams(MethodParams):
    eta: float = Field(40.0, gt=0.0, le=100.0,
                       description="percentage of each task's nuclear norm its kept singular values must reach")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged (averaged) update")

    def floors(self, shapes: Sequence[tuple[int, int]], ranks: Sequence[int]) -> dict[str, str]:
        # σ_1 ≥ Σσ/r for a rank-r update, so eta ≤ 100/r keeps its top direction only, whatever its spectrum
        if not ranks or self.eta > 100.0 / max(ranks):
            return {}
        return {"eta": f"eta = {self.eta:g} keeps each task's top singular direction only, in every module (eta ≤ "
                       f"100/r for rank-r updates: r = {max(ranks)} here), the least it can keep"}


def star_rank(S: torch.Tensor, eta: float) -> int:
    """The STAR code's rank: searchsorted(cumsum(S), eta/100·ΣS) + 1, i.e. one more than the number of partial
    sums below the target (at most len(S))."""
    cumulative = torch.cumsum(S, 0)
    return min(S.numel(), int((cumulative < float(S.sum()) * eta / 100.0).sum()) + 1)


@register(
    "star", kind="module", params=STARParams, spaces=("full",),
    summary="STAR: each task's top singular values holding eta% of its nuclear norm, rescaled to keep it; averaged",
    paper="Lee et al., STAR: Spectral Truncation and Rescale for Model Merging, NAACL 2025 (arXiv 2502.10339)",
)
def star(terms: Sequence[LowRank], weights: Sequence[float], params: STARParams) -> LowRank:
    """(λ/T)·Σ_t STAR(y_t), as the authors' code (IBM/STAR `merger/STAR.py` `star`, then `simple_avg.weighted_merge`
    with 1/T): per task the SVD of y_t (from its factors), the k_t first singular values whose partial sum reaches
    eta% of the nuclear norm Σσ (searchsorted + 1), rescaled by Σσ / Σ_{i≤k}σ_i so that the nuclear norm is kept.
    `eta` is a percentage, as in the paper and the code (`--eta 40`, the paper's default).

    The SVD of a rank-r_t update has r_t non-zero values (the dense code's others are 0 and change neither the sum
    nor the cut). A task without the module counts in the 1/T, as in `average`. λ = 1 is the code."""
    m, n = terms[0].shape
    Bs, As = [], []
    for term, w in zip(terms, weights):
        if not term.rank or not w:
            continue
        svd = factor_svd(term.B * w, term.A)
        S = svd.S[:numerical_rank(svd.S)]
        if not S.numel():
            continue
        k = star_rank(S, params.eta)
        kept = S[:k] * (float(S.sum()) / float(S[:k].sum()))
        Bs.append(svd.U[:, :k] * (params.lambda_ / len(terms) * kept).to(WORK_DTYPE))
        As.append(svd.Vh[:k])
    if not Bs:
        return _zero(m, n)
    return LowRank(torch.cat(Bs, 1), torch.cat(As, 0))
