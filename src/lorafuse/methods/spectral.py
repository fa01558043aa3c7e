"""Spectral methods, computed from the factors: per-task and summed SVDs via QR + small SVD, orthogonalisations
on thin m×K and K×n matrices. In core space (`space: core`) they run on the (Σr)×(Σr) cores instead, as the Core
Space paper does with TSV."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from lorafuse.algebra.lowrank import WORK_DTYPE, LowRank, factor_svd, numerical_rank, stack_lowrank
from lorafuse.methods.registry import MethodParams, register


class TSVParams(MethodParams):
    alpha: float = Field(1.0, description="scale of the merged update")
    fraction: float | None = Field(None, gt=0.0, le=1.0,
                                   description="share of min(m, n) singular directions kept per task (default 1/T)")


class IsoParams(MethodParams):
    alpha: float = Field(1.0, description="scale of the merged update")


class IsoCTSParams(IsoParams):
    common: float = Field(0.8, gt=0.0, le=1.0, description="share of the rank budget for the common subspace")


def nearest_orthogonal(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal Procrustes: the matrix with orthonormal columns closest to M (P·Qᵀ from M = P S Qᵀ)."""
    P, _, Qh = torch.linalg.svd(M.double(), full_matrices=False)
    return (P @ Qh).to(WORK_DTYPE)


@register(
    "tsv", kind="module", params=TSVParams,
    summary="Task Singular Vectors: each task's top 1/T singular directions, decorrelated by Procrustes",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
)
def tsv(terms: Sequence[LowRank], weights: Sequence[float], params: TSVParams) -> LowRank:
    """TSV-M. With LoRA each task has rank r_t, so it keeps min(r_t, ⌊fraction·min(m, n)⌋) directions."""
    m, n = terms[0].shape
    budget = max(1, math.floor((params.fraction or 1.0 / len(terms)) * min(m, n)))
    Us, Ss, Vs = [], [], []
    for term, w in zip(terms, weights):
        if term.rank == 0:
            continue
        svd = factor_svd(term.B * w, term.A)
        k = min(budget, numerical_rank(svd.S))
        Us.append(svd.U[:, :k]), Ss.append(svd.S[:k]), Vs.append(svd.Vh[:k].T)
    U, V = nearest_orthogonal(torch.cat(Us, 1)), nearest_orthogonal(torch.cat(Vs, 1))
    S = torch.cat(Ss).to(WORK_DTYPE)
    return LowRank(params.alpha * U * S, V.T)


def _isotropic(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, alpha: float) -> LowRank:
    """α·mean(S)·U·Vh: every kept direction with the same singular value."""
    return LowRank(alpha * float(S.mean()) * U, Vh)


@register(
    "iso_c", kind="module", params=IsoParams,
    summary="Iso-C: the task-arithmetic sum with a flat spectrum (all singular values set to their mean)",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
          "ICML 2025",
)
def iso_c(terms: Sequence[LowRank], weights: Sequence[float], params: IsoParams) -> LowRank:
    """The mean is over the non-zero spectrum of the sum (rank ≤ Σr for LoRA), not over min(m, n) zeros."""
    svd = factor_svd(*_stacked(terms, weights))
    k = max(1, numerical_rank(svd.S))
    return _isotropic(svd.U[:, :k], svd.S[:k], svd.Vh[:k], params.alpha)


@register(
    "iso_cts", kind="module", params=IsoCTSParams,
    summary="Iso-CTS: the sum's top common subspace plus each task's own directions outside it, flat spectrum",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
          "ICML 2025",
)
def iso_cts(terms: Sequence[LowRank], weights: Sequence[float], params: IsoCTSParams) -> LowRank:
    """Budget K = the sum's numerical rank; ⌈common·K⌉ common directions, ⌊(K − k_c)/T⌋ per task from the task's
    update projected off the common subspace; both bases orthogonalised (Procrustes), spectrum made flat."""
    B, A = _stacked(terms, weights)
    total = factor_svd(B, A)
    K = max(1, numerical_rank(total.S))
    kc = min(K, math.ceil(params.common * K))
    per_task = (K - kc) // len(terms)
    Uc, Vc = total.U[:, :kc], total.Vh[:kc].T
    Us, Vs, Ss = [Uc], [Vc], [total.S[:kc]]
    for term, w in zip(terms, weights):
        if per_task == 0 or term.rank == 0:
            continue
        own = factor_svd(term.B * w - Uc @ (Uc.T @ (term.B * w)), term.A)
        k = min(per_task, numerical_rank(own.S))
        Us.append(own.U[:, :k]), Vs.append(own.Vh[:k].T), Ss.append(own.S[:k])
    U, V = nearest_orthogonal(torch.cat(Us, 1)), nearest_orthogonal(torch.cat(Vs, 1))
    return _isotropic(U, torch.cat(Ss), V.T, params.alpha)


def _stacked(terms: Sequence[LowRank], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = stack_lowrank(terms, weights)
    return stacked.B, stacked.A
