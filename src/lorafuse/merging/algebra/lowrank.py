"""Exact algebra on updates held as factors.

A module's update is ΔW = B·A with B (m×r) and A (r×n); the scale s = alpha/r is folded into B. A weighted sum of
T updates is exactly the rank-(Σr) product [w_1B_1 … w_TB_T]·[A_1; …; A_T], and its SVD comes from thin QRs of
the two stacked factors plus an SVD of the small (Σr)×(Σr) core: never an m×n SVD.
Big work (QR of tall factors) runs in float32; the small core in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CORE_DTYPE = torch.float64
WORK_DTYPE = torch.float32


@dataclass(frozen=True)
class LowRank:
    """An update ΔW = B @ A (B: m×r, A: r×n), scale already folded into B."""

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"incompatible factors B{tuple(self.B.shape)} A{tuple(self.A.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self, dtype: torch.dtype = WORK_DTYPE) -> torch.Tensor:
        return self.B.to(dtype) @ self.A.to(dtype)

    def scaled(self, factor: float) -> LowRank:
        return LowRank(self.B * factor, self.A)

    def to(self, dtype: torch.dtype) -> LowRank:
        return LowRank(self.B.to(dtype), self.A.to(dtype))


def stack_lowrank(terms: Sequence[LowRank], weights: Sequence[float] | None = None) -> LowRank:
    """The exact factorisation of Σ w_t·B_t·A_t: B = [w_1B_1 … w_TB_T], A = [A_1; …; A_T] (rank Σr)."""
    if not terms:
        raise ValueError("no terms to stack")
    weights = [1.0] * len(terms) if weights is None else list(weights)
    if len(weights) != len(terms):
        raise ValueError(f"{len(weights)} weights for {len(terms)} terms")
    B = torch.empty(terms[0].B.shape[0], sum(t.rank for t in terms), dtype=WORK_DTYPE, device=terms[0].B.device)
    start = 0
    for t, w in zip(terms, weights):  # scaled straight into place: one pass over each B
        torch.mul(t.B.to(WORK_DTYPE), float(w), out=B[:, start:start + t.rank])
        start += t.rank
    A = torch.cat([t.A.to(WORK_DTYPE) for t in terms], dim=0)
    return LowRank(B, A)


@dataclass(frozen=True)
class FactorSVD:
    """Thin SVD U·diag(S)·Vh of a product B·A, computed from its factors."""

    U: torch.Tensor  # m×k, orthonormal columns
    S: torch.Tensor  # k, descending, float64
    Vh: torch.Tensor  # k×n, orthonormal rows

    def energy(self, k: int) -> float:
        """Fraction of the squared Frobenius norm kept by the top k singular values."""
        total = float((self.S**2).sum())
        return 1.0 if total == 0.0 else float((self.S[:k] ** 2).sum()) / total

    def lowrank(self, k: int | None = None) -> LowRank:
        """The rank-k truncation, with √S split between the factors (balanced, as LoRA training leaves them)."""
        k = self.S.numel() if k is None else min(k, self.S.numel())
        root = self.S[:k].sqrt().to(self.U.dtype)
        return LowRank(self.U[:, :k] * root, root[:, None] * self.Vh[:k])


def factor_svd(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype = WORK_DTYPE) -> FactorSVD:
    """SVD of B·A from QR(B) and QR(Aᵀ) plus an SVD of the r×r core (r = B.shape[1]); the tall QRs and the
    returned U, Vh in `dtype` (float32 by default; float64 where a method's subspaces must be exact), the core
    always in float64."""
    Qb, Rb = torch.linalg.qr(B.to(dtype))
    Qa, Ra = torch.linalg.qr(A.to(dtype).T)
    core = Rb.to(CORE_DTYPE) @ Ra.to(CORE_DTYPE).T
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    U = Qb @ Uc.to(dtype)
    Vh = Vch.to(dtype) @ Qa.T
    return FactorSVD(U, S, Vh)


def numerical_rank(S: torch.Tensor, rtol: float = 1e-6, floor: float = 0.0) -> int:
    """Number of singular values above rtol·S_max and above `floor` (an absolute noise level, e.g. from the
    inputs' scale: see `noise_floor`); the rest is rounding noise."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int((S > max(rtol * float(S[0]), floor)).sum())


def noise_floor(terms: Sequence[LowRank], weights: Sequence[float], dtype: torch.dtype = WORK_DTYPE) -> float:
    """The rounding noise of a sum of the weighted updates computed in `dtype`: eps·max(m, n)·max_t σ_max(w_t·ΔW_t)
    (numpy's matrix_rank rule, taken on the inputs' scale). A rank measured against the result's own σ_max
    counts noise as directions when the sum cancels (ΔW and −ΔW: σ_max of the result is noise itself)."""
    scale = max((abs(w) * float(factor_svd(t.B, t.A, dtype).S[0]) for t, w in zip(terms, weights)
                 if t.rank and w), default=0.0)
    return torch.finfo(dtype).eps * max(terms[0].shape) * scale


def truncate(update: LowRank, rank: int | None) -> tuple[LowRank, float]:
    """Best rank-`rank` approximation of B·A (None: drop only numerically-zero directions) and the energy kept."""
    svd = factor_svd(update.B, update.A)
    keep = numerical_rank(svd.S) if rank is None else min(rank, numerical_rank(svd.S))
    keep = max(keep, 1)
    return svd.lowrank(keep), svd.energy(keep)
