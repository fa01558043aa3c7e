"""Aligned spaces for element-wise methods, computed exactly from the LoRA factors.

KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): per module, the SVD of the updates
side by side, [ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ]. Each task is the block S·V_tᵀ; TA/TIES/DARE merge the blocks and
ΔW = U·merged. The concatenation equals [B_1 … B_T]·blockdiag(A_1 … A_T), so its SVD comes from a QR of the
stacked B's, a QR of each A_tᵀ and one (Σr)×(Σr) SVD — never an m×(T·n) SVD as in the paper's code.
Singular values at or below `KNOTS_TOL`·S_max are dropped. The paper states an absolute 1e-5 on its own scale; a
relative cut gives the same result there and does not depend on the adapters' scale.

Core Space (Panariello et al., NeurIPS 2025): reference bases U_B (SVD of the stacked B's, m×R) and V_A (SVD of the
stacked A's, R×n); each task's core M_t = U_Bᵀ ΔW_t V_Aᵀ (R×R) rebuilds it exactly (ΔW_t = U_B M_t V_A), since every
B_t lies in span(U_B) and every A_t in the row span of V_A. Any method runs on the cores; ΔW = U_B·M·V_A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafuse.algebra.lowrank import CORE_DTYPE, WORK_DTYPE, LowRank, numerical_rank
from lorafuse.spaces import Projection, register_space

KNOTS_TOL = 1e-5


def knots_decomposition(terms: Sequence[LowRank], tol: float = KNOTS_TOL) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     list[torch.Tensor]]:
    """U (m×k), S (k) and the per-task V_tᵀ (k×n) of [ΔW_1 … ΔW_T], from the factors."""
    Qb, Rb = torch.linalg.qr(torch.cat([t.B.to(WORK_DTYPE) for t in terms], dim=1))
    qa = [torch.linalg.qr(t.A.to(WORK_DTYPE).T) for t in terms]  # A_tᵀ = Q_t R_t
    core = Rb.to(CORE_DTYPE) @ torch.block_diag(*[R.T.to(CORE_DTYPE) for _, R in qa])
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    k = max(1, numerical_rank(S, tol))
    U = Qb @ Uc[:, :k].to(WORK_DTYPE)
    offsets = torch.tensor([0] + [t.rank for t in terms]).cumsum(0).tolist()
    Vt = [Vch[:k, offsets[i]:offsets[i + 1]].to(WORK_DTYPE) @ qa[i][0].T for i in range(len(terms))]
    return U, S[:k], Vt


@register_space("knots")
def knots_space(terms: Sequence[LowRank]) -> Projection:
    """Task blocks S·V_tᵀ (k×n); the merged block M comes back as the factors (U, M)."""
    U, S, Vt = knots_decomposition(terms)
    blocks = torch.stack([S.to(WORK_DTYPE)[:, None] * v for v in Vt])
    return Projection(blocks, lambda merged: LowRank(U, merged.to(WORK_DTYPE)))


def core_bases(terms: Sequence[LowRank]) -> tuple[torch.Tensor, torch.Tensor]:
    """U_B (m×R) and V_A (R×n): the singular bases of the stacked B's and of the stacked A's."""
    return _left_basis(torch.cat([t.B for t in terms], dim=1)), _left_basis(torch.cat([t.A for t in terms]).T).T


def _left_basis(M: torch.Tensor) -> torch.Tensor:
    """Left singular vectors of a tall matrix from its thin QR and a small SVD."""
    Q, R = torch.linalg.qr(M.to(WORK_DTYPE))
    U, _, _ = torch.linalg.svd(R.to(CORE_DTYPE))
    return Q @ U.to(WORK_DTYPE)


def to_core(terms: Sequence[LowRank]) -> tuple[list[LowRank], torch.Tensor, torch.Tensor]:
    """Each update expressed in the core: (U_Bᵀ B_t)·(A_t V_Aᵀ), with the bases to rebuild from."""
    UB, VA = core_bases(terms)
    return [LowRank(UB.T @ t.B.to(WORK_DTYPE), t.A.to(WORK_DTYPE) @ VA.T) for t in terms], UB, VA


def from_core(update: LowRank | torch.Tensor, UB: torch.Tensor, VA: torch.Tensor) -> LowRank:
    """U_B·M·V_A as factors (M given as a dense core or as core factors)."""
    if isinstance(update, torch.Tensor):
        return LowRank(UB @ update.to(WORK_DTYPE), VA)
    return LowRank(UB @ update.B.to(WORK_DTYPE), update.A.to(WORK_DTYPE) @ VA)


@register_space("core")
def core_space(terms: Sequence[LowRank]) -> Projection:
    """Task cores M_t (R×R); the merged core comes back as U_B·M·V_A."""
    cores, UB, VA = to_core(terms)
    return Projection(torch.stack([c.dense() for c in cores]), lambda merged: from_core(merged, UB, VA))
