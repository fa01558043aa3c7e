"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via
Task Vectors", ICML 2025, arXiv 2503.08099): per module, the merged update τ that minimises

    L(τ) = Σ_t ‖(τ − τ_t)·τ_tᵀ‖²_F / ‖τ_t‖²_F,

found by Adam (lr 1e-5, 300 steps, weight decay 0) from τ = Σ_t τ_t, as FusionBench's `wudi_merging` and the
authors' RoBERTa code (`nlp_roberta/lamassu.py`, there lr 2e-5) do. The authors' ViT code (`vit/coef.py`) divides by
‖τ_t‖_F, not its square; we follow the paper, FusionBench and the RoBERTa code.

This method is dense: Adam's steps are per entry, so τ leaves the span of the inputs and is a full m×n matrix (one
module at a time). The objective's gradient is taken from the factors: with τ_t = B_t·A_t (weight and LoRA scale in
B_t), ∇L = 2·Σ_t (τ − τ_t)·τ_tᵀτ_t/‖τ_t‖² = 2·[(τ·Aᵀ)·K·A − C], A the stacked A_t (Σr×n), K = blockdiag(B_tᵀB_t/‖τ_t‖²)
and C = Σ_t τ_t·τ_tᵀτ_t/‖τ_t‖² (formed once): 2·m·n·Σr multiply-adds a step instead of the dense 2·T·m²·n, and no
autograd. The steps are torch's Adam with that gradient, so the iterates are the reference's up to rounding.

Where lorafuse differs:
- The task vectors are the weighted updates τ_t = w_t·ΔW_t (the code has no weights). A task without the module
  (or with weight 0) is left out: its term is 0/0 in the code.
- Output rank: τ is full rank; like the element-wise methods' dense results it comes back at min(Σr, m, n), or at
  `rank`, by a truncated SVD whose kept energy the provenance records.
- Order: the tasks are put in a canonical order (by their norms) before anything is summed, so permuting the
  adapters gives bitwise the same result (float32 sums in another order differ in the last bits, and Adam's
  sign-like steps would amplify that where a gradient entry is near zero).
- Deterministic: no randomness is involved (nothing to seed); float32, as the reference code on GPU.
- A scale `lambda` multiplies the result (default 1: the paper's method, which has no coefficient). The paper's
  premise is full fine-tunes; on LoRA adapters of related tasks the update is small and the tasks' row spaces
  overlap. Measured on 3 of the 36 modules of knots6-minilm's six MiniLM adapters (entries' rms 3.3-3.4e-3): 300
  Adam steps at lr 1e-5 lower the objective only 2.4-6.2× and stay near the sum Σ_t τ_t (cosine 0.92-0.93 to it),
  which overshoots as task arithmetic at λ = 1 does (on 1,661 validation examples: WUDI 73.6 normalized, TA 70.7
  at λ = 1 and 88.8 at λ = 0.3); lr 1e-4 and 1e-3 lower it 36-440× and 900-9,000× but fill the directions the
  objective leaves free (norm 1.2-1.5× and 1.4-2.6× the sum's; cosine to it 0.49-0.74). Searching λ beside lr, as
  TA searches its λ, makes WUDI comparable with the other methods there; λ = 1 reproduces the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from lorafuse.merging.algebra.lowrank import CORE_DTYPE, WORK_DTYPE, LowRank
from lorafuse.merging.methods.registry import MethodParams, register


class WUDIParams(MethodParams):
    steps: int = Field(300, ge=0, description="Adam steps (the code's iter_num)")
    lr: float = Field(1e-5, gt=0.0, description="Adam's learning rate")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the result (not in the paper: 1 is the paper)")


def _squared_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖²_F = tr((BᵀB)(AAᵀ)) from the factors."""
    B, A = B.to(CORE_DTYPE), A.to(CORE_DTYPE)
    return float(((B.T @ B) * (A @ A.T)).sum())


@register(
    "wudi", kind="module", params=WUDIParams, spaces=("full",),
    summary="WUDI: Adam on the dense merged update minimising Σ_t ‖(τ − τ_t)τ_tᵀ‖²/‖τ_t‖², from the sum, × λ (dense)",
    paper="Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task "
          "Vectors (WUDI-Merging), ICML 2025 (arXiv 2503.08099)",
)
def wudi(terms: Sequence[LowRank], weights: Sequence[float], params: WUDIParams) -> torch.Tensor:
    """The dense τ after `steps` Adam steps (see the module docstring)."""
    m, n = terms[0].shape
    tasks = []
    for term, w in zip(terms, weights):
        if term.rank and w:
            B, A = term.B.to(WORK_DTYPE) * float(w), term.A.to(WORK_DTYPE)
            norm = _squared_norm(B, A)
            if norm > 0.0:
                tasks.append((norm, B, A))
    if not tasks:
        return torch.zeros(m, n, dtype=WORK_DTYPE)
    tasks.sort(key=lambda task: (task[0], task[1].shape[1], float(task[1].sum()), float(task[2].sum())))
    Bs = torch.cat([B for _, B, _ in tasks], 1)
    As = torch.cat([A for _, _, A in tasks], 0)
    K = torch.block_diag(*[(B.T @ B) / norm for norm, B, _ in tasks])
    # C = Σ_t τ_t·τ_tᵀτ_t/‖τ_t‖² = Bs·blockdiag(A_tA_tᵀ·K_t)·As
    inner = torch.block_diag(*[(A @ A.T) @ ((B.T @ B) / norm) for norm, B, A in tasks])
    C = (Bs @ inner) @ As
    tau = torch.nn.Parameter(Bs @ As)
    optimizer = torch.optim.Adam([tau], lr=params.lr, weight_decay=0)
    with torch.no_grad():
        for _ in range(params.steps):
            tau.grad = ((tau @ As.T) @ K @ As - C).mul_(2.0)
            optimizer.step()
    merged = tau.detach()
    return merged if params.lambda_ == 1.0 else merged.mul_(params.lambda_)  # × 1 is exact
