"""Aligned spaces for element-wise methods, computed exactly from the LoRA factors.

KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): per module, the SVD of the updates
side by side, [ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ]. Each task is the block S·V_tᵀ (k×n); TA/TIES/DARE merge the blocks
and ΔW = U·merged. The concatenation is [B_1 … B_T]·blockdiag(A_1 … A_T) = Q_B R_B·blockdiag(R_1ᵀ Q_1ᵀ, …) (thin
QRs of the stacked B's and of each A_tᵀ), so with the SVD U_c S V_cᵀ of the (Σr)×(Σr) core R_B·blockdiag(R_tᵀ):
U = Q_B U_c and V_tᵀ = (V_c's rows for task t)·Q_tᵀ. Never the m×(T·n) SVD that KnOTS's code takes.

Paper and code, and what is done here:
- Σ placement. The paper writes the merge on the V_t and rebuilds U Σ V_mergedᵀ; the released code (`s_on_V=True`,
  the setting of every shipped config and of the reported numbers) folds Σ into each task's block before merging.
  Both agree for task arithmetic and DARE; for TIES they differ only in which entries the magnitude trim keeps. We
  fold Σ (blocks S·V_tᵀ), as the code and the reported numbers do; the trim is then on the entries' contribution
  to ΔW rather than on unit-norm rows of V.
- Spectrum cut. The code keeps σ > 1e-5 (absolute) of its float64 SVD, which removes the rounding-noise tail of an
  m×(T·n) matrix of rank ≤ Σr. Here the core is only (Σr)×(Σr), and the cut is relative, σ > 1e-5·σ_max, so that
  it does not depend on the adapters' scale (α/r, weights); on KnOTS's own models both keep the same directions.
- Trim scope. KnOTS trims over all modules' blocks flattened together: the engine's `trim_scope="global"`.
  One λ for all tasks (the code multiplies every block by weights[0]): the methods' `lambda`, weights default 1.

Core Space (Panariello et al., NeurIPS 2025): reference bases U_B (left singular vectors of the stacked B's, m×R)
and V_A (right singular vectors of the stacked A's, R×n); each task's core M_t = U_Bᵀ ΔW_t V_Aᵀ (R×R, R = Σr)
rebuilds it exactly (ΔW_t = U_B M_t V_A), since every B_t lies in span(U_B) and every A_t in the row span of V_A.
From thin QRs B_stack = Q_B R_B and A_stackᵀ = Q_A R_A with SVDs R_B = P_B…, R_A = P_A…: U_B = Q_B P_B,
V_A = (Q_A P_A)ᵀ and M_t = (P_Bᵀ R_B,t)(R_A,tᵀ P_A), all small. The code computes the same M_t from per-factor SVDs
(its comment notes the equivalence). Any method runs on the cores; ΔW = U_B·M·V_A, returned as factors.

Element-wise methods are basis-dependent, so both spaces use singular bases (unique up to the sign of each pair,
which TIES's trim/election and DARE's masks do not see: a sign flip flips one row in every task's block alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafuse.algebra.lowrank import CORE_DTYPE, WORK_DTYPE, LowRank, numerical_rank
from lorafuse.spaces import Projection, register_space

KNOTS_TOL = 1e-5  # relative cut of the joint spectrum (see the module docstring)


def _offsets(terms: Sequence[LowRank]) -> list[int]:
    return torch.tensor([0] + [t.rank for t in terms]).cumsum(0).tolist()


def _stacked_qr(factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of the column-stacked tall factors [F_1 … F_T] (m×Σr)."""
    return torch.linalg.qr(torch.cat([f.to(WORK_DTYPE) for f in factors], dim=1))


@dataclass(frozen=True)
class KnotsBasis:
    """The joint SVD of one module's concatenated updates, held small: U = Q_B·U_c (m×k), S (k), and per task
    S·V_tᵀ = C_t·Q_tᵀ with C_t = S·(the task's k×r_t slice of the core's right singular vectors)."""

    Qb: torch.Tensor  # m×Σr, orthonormal columns
    Uc: torch.Tensor  # Σr×k
    S: torch.Tensor  # k, descending, float64
    coefficients: list[torch.Tensor]  # T × (k×r_t)
    Qa: list[torch.Tensor]  # T × (n×r_t), orthonormal columns: A_tᵀ = Q_t R_t

    @property
    def U(self) -> torch.Tensor:
        return self.Qb @ self.Uc

    def blocks(self) -> torch.Tensor:
        """[T, k, n]: each task's S·V_tᵀ (= Uᵀ ΔW_t), written in place (no stacking copy)."""
        out = torch.empty(len(self.Qa), self.S.numel(), self.Qa[0].shape[0], dtype=WORK_DTYPE)
        for t, (c, q) in enumerate(zip(self.coefficients, self.Qa)):
            torch.matmul(c, q.T, out=out[t])
        return out


def knots_basis(terms: Sequence[LowRank], tol: float = KNOTS_TOL) -> KnotsBasis:
    """The KnOTS decomposition from the factors: QR of the stacked B's, QR of each A_tᵀ, one (Σr)×(Σr) SVD."""
    Qb, Rb = _stacked_qr([t.B for t in terms])
    qa = [torch.linalg.qr(t.A.to(WORK_DTYPE).T) for t in terms]
    core = Rb.to(CORE_DTYPE) @ torch.block_diag(*[R.T.to(CORE_DTYPE) for _, R in qa])
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    k = max(1, numerical_rank(S, tol))
    scaled = S[:k, None] * Vch[:k]
    offsets = _offsets(terms)
    coefficients = [scaled[:, offsets[i]:offsets[i + 1]].to(WORK_DTYPE) for i in range(len(terms))]
    return KnotsBasis(Qb, Uc[:, :k].to(WORK_DTYPE), S[:k], coefficients, [Q for Q, _ in qa])


def knots_decomposition(terms: Sequence[LowRank], tol: float = KNOTS_TOL) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     list[torch.Tensor]]:
    """U (m×k), S (k) and the per-task V_tᵀ (k×n) of [ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ], from the factors."""
    basis = knots_basis(terms, tol)
    inverse = (1.0 / basis.S).to(WORK_DTYPE)[:, None]
    return basis.U, basis.S, [inverse * block for block in basis.blocks()]


@register_space("knots")
def knots_space(terms: Sequence[LowRank]) -> Projection:
    """Task blocks S·V_tᵀ (k×n); the merged block M comes back as the factors (U, M). U is formed only on rebuild
    (the engine's global-trim passes need the blocks alone)."""
    basis = knots_basis(terms)
    return Projection(basis.blocks(), lambda merged: LowRank(basis.U, merged.to(WORK_DTYPE)))


# -- Core Space ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoreBasis:
    """U_B = Q_B·P_B (m×R) and V_A = (Q_A·P_A)ᵀ (R×n), with the small pieces that map each task into the core."""

    Qb: torch.Tensor
    Pb: torch.Tensor  # R×R, left singular vectors of R_B
    Rb: torch.Tensor  # R×R
    Qa: torch.Tensor
    Pa: torch.Tensor
    Ra: torch.Tensor

    @property
    def UB(self) -> torch.Tensor:
        return self.Qb @ self.Pb

    @property
    def VA(self) -> torch.Tensor:
        return (self.Qa @ self.Pa).T

    def cores(self, terms: Sequence[LowRank]) -> list[LowRank]:
        """M_t = U_Bᵀ B_t A_t V_Aᵀ = (P_Bᵀ R_B,t)(R_A,tᵀ P_A), as R×r_t and r_t×R factors."""
        offsets = _offsets(terms)
        return [LowRank(self.Pb.T @ self.Rb[:, offsets[i]:offsets[i + 1]],
                        self.Ra[:, offsets[i]:offsets[i + 1]].T @ self.Pa) for i in range(len(terms))]


def _singular_basis(factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, R of the stacked tall factors and P, the left singular vectors of R (so Q·P are those of the stack)."""
    Q, R = _stacked_qr(factors)
    P, _, _ = torch.linalg.svd(R.to(CORE_DTYPE))
    return Q, P.to(WORK_DTYPE), R


def core_basis(terms: Sequence[LowRank]) -> CoreBasis:
    Qb, Pb, Rb = _singular_basis([t.B for t in terms])
    Qa, Pa, Ra = _singular_basis([t.A.T for t in terms])
    return CoreBasis(Qb, Pb, Rb, Qa, Pa, Ra)


def core_bases(terms: Sequence[LowRank]) -> tuple[torch.Tensor, torch.Tensor]:
    """U_B (m×R) and V_A (R×n): the singular bases of the stacked B's and of the stacked A's."""
    basis = core_basis(terms)
    return basis.UB, basis.VA


def to_core(terms: Sequence[LowRank]) -> tuple[list[LowRank], torch.Tensor, torch.Tensor]:
    """Each update expressed in the core (as R×R factors), with the bases U_B, V_A to rebuild from."""
    basis = core_basis(terms)
    return basis.cores(terms), basis.UB, basis.VA


def from_core(update: LowRank | torch.Tensor, UB: torch.Tensor, VA: torch.Tensor) -> LowRank:
    """U_B·M·V_A as factors (M given as a dense core or as core factors)."""
    if isinstance(update, torch.Tensor):
        return LowRank(UB @ update.to(WORK_DTYPE), VA)
    return LowRank(UB @ update.B.to(WORK_DTYPE), update.A.to(WORK_DTYPE) @ VA)


@register_space("core")
def core_space(terms: Sequence[LowRank]) -> Projection:
    """Task cores M_t (R×R); the merged core comes back as U_B·M·V_A (bases formed only on rebuild)."""
    basis = core_basis(terms)
    blocks = torch.stack([c.dense() for c in basis.cores(terms)])
    return Projection(blocks, lambda merged: from_core(merged, basis.UB, basis.VA))
