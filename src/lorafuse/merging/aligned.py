"""Aligned spaces for element-wise methods, computed exactly from the LoRA factors.

KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): per module, the SVD of the updates
side by side, [ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ]. Each task is the block S·V_tᵀ (k×n); TA/TIES/DARE merge the blocks
and ΔW = U·merged. The concatenation is [B_1 … B_T]·blockdiag(A_1 … A_T) = Q_B R_B·blockdiag(R_1ᵀ Q_1ᵀ, …) (thin
QRs of the stacked B's and of each A_tᵀ), so its SVD follows from the SVD of the (Σr)×(Σr) core R_B·blockdiag(R_tᵀ)
(see `KnotsBasis`): never the m×(T·n) SVD that KnOTS's code takes, and no m×n matrix at all.

Paper and code, and what is done here:
- Σ placement. The paper merges the V_t ("merges the V's into a single V(merged) … multiplies the U, Σ and
  V(merged)", Fig. 1); the released code (`s_on_V=True`, the setting of every shipped config, so of the reported
  numbers) folds Σ into each task's block before merging.
  Both agree for task arithmetic and DARE; for TIES they differ only in which entries the magnitude trim keeps. We
  fold Σ (blocks S·V_tᵀ), as the code and the reported numbers do; the trim is then on the entries' contribution
  to ΔW rather than on unit-norm rows of V.
- Spectrum cut. The paper states none; the code keeps σ > 1e-5 (absolute) of its float64 SVD, which removes the
  rounding-noise tail of an m×(T·n) matrix of rank ≤ Σr. Here the core is only (Σr)×(Σr) (no such tail), and the
  cut is relative, σ > 1e-5·σ_max, so that which directions survive does not depend on the adapters' scale (α/r).
- Trim scope. KnOTS trims over all modules' blocks flattened together: the engine's `trim_scope="global"`.
  One λ for all tasks (the code multiplies every block by weights[0]): the methods' `lambda`, weights default 1.

Core Space (Panariello et al., NeurIPS 2025): reference bases U_B (left singular vectors of the stacked B's, m×R)
and V_A (right singular vectors of the stacked A's, R×n); each task's core M_t = U_Bᵀ ΔW_t V_Aᵀ (R×R, R = Σr)
rebuilds it exactly (ΔW_t = U_B M_t V_A), since every B_t lies in span(U_B) and every A_t in the row span of V_A.
From thin QRs B_stack = Q_B R_B and A_stackᵀ = Q_A R_A with SVDs R_B = P_B…, R_A = P_A…: U_B = Q_B P_B,
V_A = (Q_A P_A)ᵀ and M_t = (P_Bᵀ R_B,t)(R_A,tᵀ P_A), all small. The code computes the same M_t from per-factor SVDs
(its comment notes the equivalence). Any method runs on the cores; ΔW = U_B·M·V_A, returned as factors. As
everywhere in lorafuse the LoRA scale is folded into B (the Core Space code stacks the raw factors, with α = r).

Element-wise methods are basis-dependent, so both spaces use singular bases. These are unique up to the sign of
each pair, which TIES's trim and 'total' election and DARE's masks do not see (a sign flip flips one row in every
task's block alike), but a tie of the 'frequency' election (elected +) does. So the sign of each singular vector
is fixed here: its entry of largest magnitude is positive (each left vector in KnOTS; each of U_B's columns and
V_A's rows in Core Space), whatever SVD computed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafuse.merging.algebra.lowrank import CORE_DTYPE, WORK_DTYPE, LowRank, numerical_rank
from lorafuse.merging.spaces import Projection, register_space

KNOTS_TOL = 1e-5  # relative cut of the joint spectrum (see the module docstring)


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """±1 per column of `vectors` making its entry of largest magnitude positive (a fixed sign for SVD bases)."""
    if vectors.numel() == 0:
        return torch.ones(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    picked = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))[0]
    return torch.where(picked < 0, -1.0, 1.0).to(vectors.dtype)


def _offsets(terms: Sequence[LowRank]) -> list[int]:
    return torch.tensor([0] + [t.rank for t in terms]).cumsum(0).tolist()


def _stacked_qr(factors: Sequence[torch.Tensor], dtype: torch.dtype = WORK_DTYPE
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of the column-stacked tall factors [F_1 … F_T] (m×Σr), in `dtype`."""
    return torch.linalg.qr(torch.cat([f.to(dtype) for f in factors], dim=1))


@dataclass(frozen=True)
class KnotsBasis:
    """The joint SVD U S [V_1ᵀ … V_Tᵀ] of one module's C = [B_1 … B_T]·blockdiag(A_1 … A_T), held small.

    With B_stack = Q_B R_B, A_tᵀ = Q_t R_t and the core SVD R_B·blockdiag(R_tᵀ) = U_c S V_cᵀ:
    - blocks S·V_tᵀ = Uᵀ ΔW_t = (U_cᵀ R_B,t)·A_t: a k×r_t coefficient times the task's own A_t;
    - U = Q_B U_c = C·V·S⁻¹ = B_stack·X with X = blockdiag(R_tᵀ)·V_cᵀ·S⁻¹ (Σr×k).
    So only R factors are computed (no Q formed), and U only when a merged block is rebuilt: the engine's
    global-trim passes use the blocks alone. Rounding: each block carries the error of a float32 product B_t·A_t;
    a float32 column of U with small σ_i carries ~ε·σ_max/σ_i, which the merged block's row i (of size ~σ_i)
    brings back to ~ε·σ_max: the rebuilt update is as exact as ΔW_t = B_t·A_t in float32."""

    B: torch.Tensor  # m×Σr, the stacked B's
    X: torch.Tensor  # Σr×k, float64
    S: torch.Tensor  # k, descending, float64
    coefficients: list[torch.Tensor]  # T × (k×r_t): U_cᵀ R_B,t
    A: list[torch.Tensor]  # T × (r_t×n)

    @property
    def U(self) -> torch.Tensor:
        """The left singular vectors (m×k)."""
        return self.B @ self.X.to(self.B.dtype)

    def blocks(self) -> torch.Tensor:
        """[T, k, n]: each task's S·V_tᵀ, written in place (no stacking copy)."""
        out = torch.empty(len(self.A), self.S.numel(), self.A[0].shape[1], dtype=self.B.dtype, device=self.B.device)
        for t, (c, a) in enumerate(zip(self.coefficients, self.A)):
            torch.matmul(c, a, out=out[t])
        return out


def knots_basis(terms: Sequence[LowRank], tol: float = KNOTS_TOL, dtype: torch.dtype = WORK_DTYPE) -> KnotsBasis:
    """The KnOTS decomposition from the factors: R of the stacked B's, R of each A_tᵀ, one (Σr)×(Σr) SVD in
    float64; the tall work in `dtype`."""
    B = torch.cat([t.B.to(dtype) for t in terms], dim=1)
    A = [t.A.to(dtype) for t in terms]
    Rb = torch.linalg.qr(B, mode="r").R.to(CORE_DTYPE)
    Ra = torch.block_diag(*[torch.linalg.qr(a.T, mode="r").R.T.to(CORE_DTYPE) for a in A])
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra, full_matrices=False)
    k = numerical_rank(S, tol)  # 0 when every update of the module is zero
    Uc, S, Vch = Uc[:, :k], S[:k], Vch[:k]
    X = Ra @ Vch.T / S
    signs = canonical_signs(B @ X.to(dtype)).to(CORE_DTYPE)  # U = B_stack·X, formed once for its signs
    Uc, X = Uc * signs, X * signs
    offsets = _offsets(terms)
    coefficients = [(Uc.T @ Rb[:, offsets[i]:offsets[i + 1]]).to(dtype) for i in range(len(terms))]
    return KnotsBasis(B, X, S, coefficients, A)


def knots_decomposition(terms: Sequence[LowRank], tol: float = KNOTS_TOL) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     list[torch.Tensor]]:
    """U (m×k), S (k) and the per-task V_tᵀ (k×n) of [ΔW_1 … ΔW_T] = U S [V_1ᵀ … V_Tᵀ], from the factors (an
    analysis helper, computed in float64 since V_tᵀ = S⁻¹·(S·V_tᵀ) divides each row by its σ)."""
    basis = knots_basis(terms, tol, CORE_DTYPE)
    return basis.U, basis.S, list(basis.blocks() / basis.S[:, None])


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


def _singular_basis(factors: Sequence[torch.Tensor], dtype: torch.dtype = WORK_DTYPE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, R of the stacked tall factors and P, the left singular vectors of R (so Q·P are those of the stack, each
    with its canonical sign), in `dtype`."""
    Q, R = _stacked_qr(factors, dtype)
    P = torch.linalg.svd(R.to(CORE_DTYPE))[0].to(dtype)
    return Q, P * canonical_signs(Q @ P), R


def core_basis(terms: Sequence[LowRank], dtype: torch.dtype = WORK_DTYPE) -> CoreBasis:
    """The Core Space bases and pieces, computed in `dtype` (float64 for spectral methods, whose ranks must see
    the inputs' rounding only: see lorafuse.merging.methods.spectral)."""
    Qb, Pb, Rb = _singular_basis([t.B for t in terms], dtype)
    Qa, Pa, Ra = _singular_basis([t.A.T for t in terms], dtype)
    return CoreBasis(Qb, Pb, Rb, Qa, Pa, Ra)


def core_bases(terms: Sequence[LowRank]) -> tuple[torch.Tensor, torch.Tensor]:
    """U_B (m×R) and V_A (R×n): the singular bases of the stacked B's and of the stacked A's."""
    basis = core_basis(terms)
    return basis.UB, basis.VA


def to_core(terms: Sequence[LowRank], dtype: torch.dtype = WORK_DTYPE
            ) -> tuple[list[LowRank], torch.Tensor, torch.Tensor]:
    """Each update expressed in the core (as R×R factors), with the bases U_B, V_A to rebuild from, in `dtype`."""
    basis = core_basis(terms, dtype)
    return basis.cores(terms), basis.UB, basis.VA


def from_core(update: LowRank | torch.Tensor, UB: torch.Tensor, VA: torch.Tensor) -> LowRank:
    """U_B·M·V_A as float32 factors (M given as a dense core or as core factors), multiplied in U_B's dtype."""
    if isinstance(update, torch.Tensor):
        return LowRank((UB @ update.to(UB.dtype)).to(WORK_DTYPE), VA.to(WORK_DTYPE))
    return LowRank((UB @ update.B.to(UB.dtype)).to(WORK_DTYPE), (update.A.to(VA.dtype) @ VA).to(WORK_DTYPE))


@register_space("core")
def core_space(terms: Sequence[LowRank]) -> Projection:
    """Task cores M_t (R×R); the merged core comes back as U_B·M·V_A (bases formed only on rebuild)."""
    basis = core_basis(terms)
    blocks = torch.stack([c.dense() for c in basis.cores(terms)])
    return Projection(blocks, lambda merged: from_core(merged, basis.UB, basis.VA))
