"""Spectral methods, computed from the factors: per-task and summed SVDs by `factor_svd` (QR + small SVD), and
orthogonalisations (orthogonal Procrustes) of thin m×K and n×K matrices via a QR and a K×K SVD. No m×n matrix is
formed. With `space="core"` the engine runs them on the (Σr)×(Σr) cores of Core Space instead (Core-Space TSV).

LoRA and the papers' dense definitions. A rank-r update has r non-zero singular values; the papers' code takes
dense SVDs, whose trailing singular vectors (σ = 0) are an arbitrary basis of the null space. Here only the
numerically non-zero directions (σ > 1e-6·σ_max; for Iso-C and Iso-CTS also above the inputs' float64 rounding,
`noise_floor`, so that a sum that cancels is 0) are used, so the results depend on the updates alone:
- TSV-M keeps min(r_t, ⌊fraction·min(m, n)⌋) directions per task. The dense code keeps ⌊min(m, n)/T⌋ columns even
  past rank r_t, and those null-space columns enter the Procrustes step and perturb the others. When every r_t ≤
  ⌊R/T⌋ (equal ranks), our full-space TSV equals Core-Space TSV exactly.
- Iso-C averages the non-zero spectrum of the sum (rank ≤ Σr). The dense mean over min(m, n) values, zeros
  included, would spread that mean over arbitrary null directions: a full-rank update unrelated to the tasks.
- Iso-CTS sizes its subspaces from the sum's numerical rank K (the dense code: min(m, n)).

Output rank. Without a rank every method keeps its natural rank (≤ Σr): nothing is cut. With a rank k, Iso-C and
Iso-CTS take it as their budget (Iso-C: the top k directions of the sum, then flattened; Iso-CTS: k directions
split by `iso_cts_sizes`), since cutting a flat spectrum afterwards would keep an arbitrary k of equal directions,
decided by rounding and by the order of the adapters. TSV's result (orthonormal U, V) is cut by the engine to its
k largest singular values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from lorafuse.merging.algebra.lowrank import (
    CORE_DTYPE,
    WORK_DTYPE,
    FactorSVD,
    LowRank,
    factor_svd,
    noise_floor,
    numerical_rank,
    stack_lowrank,
)
from lorafuse.merging.methods.registry import MethodParams, register

ISO_PAPER = ("Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
             "Subspaces, ICML 2025")


class TSVParams(MethodParams):
    alpha: float = Field(1.0, description="scale of the merged update")
    fraction: float | None = Field(None, gt=0.0, le=1.0,
                                   description="share of min(m, n) singular directions kept per task (default 1/T)")


class IsoParams(MethodParams):
    alpha: float = Field(1.0, description="scale of the merged update")


class IsoCTSParams(IsoParams):
    common: float = Field(0.8, gt=0.0, le=1.0, description="share of the rank budget for the common subspace")


def nearest_orthogonal(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal Procrustes: the matrix with orthonormal columns closest to a tall M (P·Qᵀ from M = P S Qᵀ),
    from a thin QR (M = Q R, in M's dtype: float32 for TSV, float64 for Iso-CTS) and the SVD of the small R in
    float64: P·Qᵀ = Q·(P_R Q_Rᵀ)."""
    dtype = M.dtype if M.dtype in (WORK_DTYPE, CORE_DTYPE) else WORK_DTYPE
    Q, R = torch.linalg.qr(M.to(dtype))
    P, _, Qh = torch.linalg.svd(R.to(CORE_DTYPE))
    return Q @ (P @ Qh).to(dtype)


def _top(svd: FactorSVD, limit: int | None = None, floor: float = 0.0
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m×k), S (k), V (n×k) of the top k = min(limit, numerical rank) directions; `floor` is the inputs'
    rounding noise (`noise_floor`), below which no direction counts."""
    rank = numerical_rank(svd.S, floor=floor)
    k = rank if limit is None else min(limit, rank)
    return svd.U[:, :k], svd.S[:k], svd.Vh[:k].T


Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _orthogonalised(parts: Sequence[Triplets]) -> Triplets:
    """The concatenated directions of all parts, each side replaced by its nearest orthonormal matrix."""
    Us, Ss, Vs = zip(*parts)
    return nearest_orthogonal(torch.cat(Us, 1)), torch.cat(Ss), nearest_orthogonal(torch.cat(Vs, 1))


def _zero(m: int, n: int, device: torch.device | str = "cpu") -> LowRank:
    return LowRank(torch.zeros(m, 0, device=device), torch.zeros(0, n, device=device))


@register(
    "tsv", kind="module", params=TSVParams,
    summary="Task Singular Vectors (TSV-M): each task's top singular directions, decorrelated by Procrustes",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
)
def tsv(terms: Sequence[LowRank], weights: Sequence[float], params: TSVParams) -> LowRank:
    """α·Û·diag(S)·V̂ᵀ: per task the top ⌊fraction·min(m, n)⌋ triplets of w_t·ΔW_t (at most its rank), the U's and
    V's concatenated and orthogonalised, the singular values kept. In core space min(m, n) = R = Σr, as in the Core
    Space code (⌊R/T⌋ per task)."""
    m, n = terms[0].shape
    budget = max(1, math.floor((params.fraction or 1.0 / len(terms)) * min(m, n)))
    parts = [_top(factor_svd(t.B * w, t.A), budget) for t, w in zip(terms, weights) if t.rank and w]
    parts = [p for p in parts if p[1].numel()]
    if not parts:
        return _zero(m, n)
    U, S, V = _orthogonalised(parts)
    return LowRank(params.alpha * U * S.to(WORK_DTYPE), V.T)


def _flat(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, alpha: float) -> LowRank:
    """α·mean(S)·U·Vᵀ: every kept direction with the same singular value (returned in float32)."""
    return LowRank((alpha * float(S.mean()) * U).to(WORK_DTYPE), V.T.to(WORK_DTYPE))


def _task_sum(terms: Sequence[LowRank], weights: Sequence[float], dtype: torch.dtype = WORK_DTYPE) -> FactorSVD:
    """SVD of Σ w_t ΔW_t from the stacked factors, computed in `dtype`."""
    stacked = stack_lowrank(terms, weights)
    return factor_svd(stacked.B, stacked.A, dtype)


@register("iso_c", kind="module", params=IsoParams, paper=ISO_PAPER, takes_rank=True,
          summary="Iso-C: the task-arithmetic sum with a flat spectrum (its singular values set to their mean)")
def iso_c(terms: Sequence[LowRank], weights: Sequence[float], params: IsoParams, rank: int | None = None
          ) -> LowRank:
    """α·σ̄·U·Vᵀ over the sum's non-zero spectrum (rank ≤ Σr), or over its top `rank` directions (σ̄ their mean).
    The sum Σ w_t ΔW_t, as in the paper and the authors' code (`iso.py` averages the task vectors and then
    multiplies by T: the sum).

    Deviation: the sum's rank counts only singular values above the inputs' rounding noise (`noise_floor`, in
    float64), not above a fraction of the sum's own σ_max: a sum that cancels (ΔW and −ΔW) is exactly 0, where
    the relative rule would flatten its rounding noise into a full-size update."""
    U, S, V = _top(_task_sum(terms, weights, CORE_DTYPE), rank, noise_floor(terms, weights, CORE_DTYPE))
    return _flat(U, S, V, params.alpha) if S.numel() else _zero(*terms[0].shape, terms[0].B.device)


def iso_cts_sizes(rank: int, tasks: int, common: float) -> tuple[int, int]:
    """(common directions, directions per task) for a budget of `rank`: ⌊common·rank⌋, then the rest rounded to a
    multiple of T and the common part grown to fill the budget (the authors' code)."""
    kc = math.floor(common * rank)
    per_task = min(round((rank - kc) / tasks), rank // tasks)
    return rank - per_task * tasks, per_task


@register("iso_cts", kind="module", params=IsoCTSParams, paper=ISO_PAPER, takes_rank=True,
          summary="Iso-CTS: the sum's top common subspace plus each task's own directions outside it, flat spectrum")
def iso_cts(terms: Sequence[LowRank], weights: Sequence[float], params: IsoCTSParams, rank: int | None = None
            ) -> LowRank:
    """The common subspace: the top k_c directions of the sum. Each task adds the top s directions of its update
    with the common left subspace projected out (w_t·(I − U_c U_cᵀ)ΔW_t). Both sides are orthogonalised
    (Procrustes) and every direction gets the mean of the collected singular values, scaled by α. Budget: the
    sum's numerical rank K (≤ Σr; the authors' dense code: min(m, n)), or min(rank, K) when a rank is asked
    for, split by `iso_cts_sizes`.

    Precision: every subspace (the sum's SVD, the projections, each task's SVD, both Procrustes steps) is computed
    in float64 and only the result is float32, so that which directions are cut at k_c and s, near-equal singular
    values included, does not depend on float32 rounding or the adapters' order. Deviation: ranks count only
    singular values above the inputs' rounding noise (`noise_floor`), so a sum that cancels is exactly 0 and a
    task lying inside the common subspace adds nothing (a relative rule would add its rounding noise)."""
    floor = noise_floor(terms, weights, CORE_DTYPE)
    U, S, V = _top(_task_sum(terms, weights, CORE_DTYPE), floor=floor)
    if S.numel() == 0:
        return _zero(*terms[0].shape, terms[0].B.device)
    budget = S.numel() if rank is None else min(rank, S.numel())
    kc, per_task = iso_cts_sizes(budget, len(terms), params.common)
    common = U[:, :kc]
    parts = [(common, S[:kc], V[:, :kc])]
    for term, w in zip(terms, weights):
        if per_task and term.rank and w:
            B = term.B.to(CORE_DTYPE) * w
            parts.append(_top(factor_svd(B - common @ (common.T @ B), term.A, CORE_DTYPE), per_task, floor))
    return _flat(*_orthogonalised(parts), params.alpha)
