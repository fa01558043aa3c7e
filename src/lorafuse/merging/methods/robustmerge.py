"""RobustMerge (Zeng et al., "RobustMerge: Parameter-Efficient Model Merging for MLLMs with Direction Robustness",
NeurIPS 2025, arXiv 2502.17159), as the authors' code does it (AuroraZengfh/RobustMerge,
`llava/model/builder.py::load_and_merge_pretrained_model`, with its `clamp` helper).

The method acts on the LoRA factors themselves, not on ΔW: per task and per factor, a magnitude prune keeping the
top `density` of the entries; per task and rank direction i (row i of A, column i of B), the complementary scale
s_i = Σ_j|A_ij| / Σ_j|Ã_ij| (how much of the row the prune removed), raised to the task's ⌊(1 − att_ratio)·r⌋-th
smallest value (the code's `clamp(s, 1 − att_ratio, 0)`); then the factors are summed across tasks, direction by
direction: Â = f·Σ_t Ã_t and B̂[:, i] = f·Σ_t s_{t,i}·B̃_t[:, i] / Σ_t s_{t,i} (the cross-task normalisation), with
f the code's `fuse_weight` (2.0 on each factor, so ΔW = B̂·Â carries f²). The merged adapter is B̂·Â: a rank-r
product of the summed factors, so task t's B meets task u's A (cross terms), exactly as the authors' merged
adapter; no ΔW is formed.

Where lorafuse extends or deviates (the code handles T adapters of one rank and one α/r):
- Scale and weights: each task's B carries its LoRA scale s_t and its weight w_t (B̃ pruned on s_t·B_t, a mask the
  scale does not change; the weight multiplies B̃ in the sum). With one α/r and unit weights this is the code.
- Mixed ranks: directions are matched by index, as in the code; the merged rank is max r_t and the normalisation
  of direction i sums over the tasks that have it. A task without the module takes no part in it.
- A row of A pruned entirely has s = ∞ in the code (NaN in its merged B); here its scale is the task's floor.
- `density` is the share of entries kept: the code's `mask_ratio` (0.2) keeps the entries at or above the
  int(N·(1 − mask_ratio))-th smallest |x| (kthvalue), i.e. the top 20%.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from lorafuse.merging.algebra.lowrank import WORK_DTYPE, LowRank
from lorafuse.merging.methods.registry import MethodParams, register


class RobustMergeParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0,
                           description="share of each factor's entries kept per task (the code's mask_ratio)")
    att_ratio: float = Field(0.2, gt=0.0, le=1.0,
                             description="share of each task's rank directions whose scale is kept as computed; "
                                         "the others are raised to the smallest of them")
    fuse_weight: float = Field(2.0, description="factor on each summed factor (the code's fuse_weight)")


def prune(x: torch.Tensor, density: float) -> torch.Tensor:
    """The code's mask: keep |x| ≥ the int(N·(1 − density))-th smallest |x| (everything when that index is 0)."""
    k = int(x.numel() * (1.0 - density))
    if k == 0:
        return x.clone()
    threshold = torch.kthvalue(x.abs().reshape(-1), k).values
    return x * (x.abs() >= threshold)


def complementary_scale(A: torch.Tensor, pruned: torch.Tensor, att_ratio: float) -> torch.Tensor:
    """Per row of A: Σ|A| / Σ|Ã|, floored at the row values' int(r·(1 − att_ratio))-th smallest (0-based), as the
    code's clamp with min_ratio = 1 − att_ratio and max_ratio = 0 (its upper bound is the largest value)."""
    kept = pruned.abs().sum(1)
    s = A.abs().sum(1) / kept.clamp(min=torch.finfo(kept.dtype).tiny)
    floor = torch.sort(s[kept > 0]).values if bool((kept > 0).any()) else torch.ones(1, dtype=s.dtype)
    floor = floor[min(int(A.shape[0] * (1.0 - att_ratio)), floor.numel() - 1)]
    s = torch.where(kept > 0, s, floor)
    return torch.clamp(s, min=floor)


@register(
    "robustmerge", kind="module", params=RobustMergeParams, spaces=("full",),
    summary="RobustMerge: per-factor magnitude prune, complementary per-direction scales normalised across tasks, "
            "factors summed (the authors' code)",
    paper="Zeng et al., RobustMerge: Parameter-Efficient Model Merging for MLLMs with Direction Robustness, "
          "NeurIPS 2025 (arXiv 2502.17159)",
)
def robustmerge(terms: Sequence[LowRank], weights: Sequence[float], params: RobustMergeParams) -> LowRank:
    """B̂·Â with Â = f·Σ_t Ã_t and B̂[:, i] = f·Σ_t s_{t,i}·w_t·B̃_t[:, i] / Σ_t s_{t,i} (see the module docstring)."""
    m, n = terms[0].shape
    present = [(t, w) for t, w in zip(terms, weights) if t.rank]
    rank = max((t.rank for t, _ in present), default=0)
    A = torch.zeros(rank, n, dtype=WORK_DTYPE)
    B = torch.zeros(m, rank, dtype=WORK_DTYPE)
    norm = torch.zeros(rank, dtype=WORK_DTYPE)
    for term, w in present:
        a, b = term.A.to(WORK_DTYPE), term.B.to(WORK_DTYPE)
        pruned_a = prune(a, params.density)
        scale = complementary_scale(a, pruned_a, params.att_ratio)
        A[:term.rank] += pruned_a
        B[:, :term.rank] += prune(b, params.density) * (scale * w)
        norm[:term.rank] += scale
    return LowRank(B * (params.fuse_weight / norm.clamp(min=torch.finfo(norm.dtype).tiny)), A * params.fuse_weight)
