"""CtM, Compress then Merge (He et al., "Compress then Merge: From Multiple LoRAs into One Low-Rank Adapter",
ICML 2026, arXiv 2606.03723). No code of the authors was found: this is written from the paper's abstract and the
project's method notes (Tucker-2 by HOSVD + HOOI, computed in core space; a target rank r; a base merging rule),
so details the paper may fix differently are stated here as choices.

The T updates of a module form an m×n×T tensor. CtM compresses it first: a Tucker-2 decomposition with shared
orthonormal bases U (m×r) and V (n×r), each task becoming an r×r core C_t = Uᵀ·ΔW_t·V; then a standard rule
merges the cores (`base`: task_arithmetic, ties or dare_ties, with that rule's parameters); the result U·C·Vᵀ is one
rank-r adapter by construction, with no truncation afterwards.

Computation: every ΔW_t = U_B·M_t·V_A exactly (Core Space's bases of the stacked B's and A's, R = Σr), and U_B, V_A
are orthonormal, so the Tucker-2 of the cores M_t (R×R) is that of the ΔW_t: U = U_B·U_c, V = V_Aᵀ·V_c. HOSVD: U_c
the top r left singular vectors of [M_1 … M_T] (the mode-1 unfolding), V_c those of [M_1ᵀ … M_Tᵀ]; then `hooi_iters`
sweeps of HOOI (U_c from [M_1 V_c … M_T V_c], then V_c from [M_1ᵀ U_c … M_Tᵀ U_c]). No m×n matrix is formed.

Choices (the paper's details unknown to us):
- The bases come from the unweighted updates (the adapters as trained, their α/r folded in); the weights w_t enter
  the merge of the cores, as in every element-wise rule here (y_t = w_t·C_t). The notes' β is not implemented.
- r: the engine's `rank` when given, else max r_t; at most R.
- hooi_iters = 10 (0: plain truncated HOSVD).
- Each basis vector's sign is fixed (its entry of largest magnitude positive), as in lorafuse's aligned spaces.
- The base rule's trim is per module (as Core Space's); DARE's drops are seeded per adapter name and module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, model_validator

from lorafuse.merging.algebra.lowrank import CORE_DTYPE, WORK_DTYPE, LowRank
from lorafuse.merging.methods.registry import MethodParams, get_method, register

BASE_FIELDS = {  # the parameters each base rule takes (beyond the method's own; `seed`, as every element-wise rule)
    "task_arithmetic": {"lambda_", "seed"},
    "ties": {"lambda_", "density", "majority", "denominator", "seed"},
    "dare_ties": {"lambda_", "drop_rate", "rescale", "trim_density", "majority", "denominator", "seed"},
}


class CtMParams(MethodParams):
    base: str = Field("task_arithmetic", pattern="^(task_arithmetic|ties|dare_ties)$",
                      description="the rule merging the r×r cores")
    hooi_iters: int = Field(10, ge=0, description="HOOI sweeps after the HOSVD (0: plain HOSVD)")
    lambda_: float = Field(1.0, alias="lambda", description="the base rule's scale")
    density: float = Field(0.2, gt=0.0, le=1.0, description="ties: fraction of each core's entries kept")
    majority: str = Field("total", pattern="^(total|frequency)$", description="ties, dare_ties: sign election")
    denominator: str = Field("weights", pattern="^(weights|count)$", description="ties, dare_ties: disjoint mean")
    drop_rate: float = Field(0.9, ge=0.0, lt=1.0, description="dare_ties: probability of dropping an entry")
    rescale: bool = Field(True, description="dare_ties: rescale survivors by 1/(1 − drop_rate)")
    trim_density: float = Field(1.0, gt=0.0, le=1.0, description="dare_ties: trim after the drop (1: none)")
    seed: int = Field(0, description="dare_ties: seed of the drops (taken, and unused, by the other rules)")

    @model_validator(mode="after")
    def _only_the_base_rules_parameters(self) -> CtMParams:
        extra = self.model_fields_set - BASE_FIELDS[self.base] - {"base", "hooi_iters"}
        if extra:
            names = ", ".join(sorted(type(self).model_fields[f].alias or f for f in extra))
            raise ValueError(f"base '{self.base}' takes no {names}")
        return self

    @classmethod
    def draws_random(cls, values: dict[str, Any]) -> bool:
        return values.get("base", cls.model_fields["base"].default) == "dare_ties"

    def base_values(self) -> dict[str, Any]:
        """The base rule's own parameters, as its registered method takes them."""
        return {type(self).model_fields[f].alias or f: getattr(self, f) for f in sorted(BASE_FIELDS[self.base])}


def _top_left(M: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(M, full_matrices=False)[0][:, :r]


def tucker2(cores: Sequence[torch.Tensor], r: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U_c, V_c (R×r) of the Tucker-2 of the stacked cores: truncated HOSVD, then `iters` HOOI sweeps."""
    U = _top_left(torch.cat(list(cores), 1), r)
    V = _top_left(torch.cat([c.T for c in cores], 1), r)
    for _ in range(iters):
        U = _top_left(torch.cat([c @ V for c in cores], 1), r)
        V = _top_left(torch.cat([c.T @ U for c in cores], 1), r)
    return U, V


def merge_cores(x: torch.Tensor, weights: Sequence[float], params: CtMParams,
                generators: Any) -> torch.Tensor:
    """The base rule on the [T, r, r] cores: λ·Σ w_t C_t, or the registered ties / dare_ties on them with per-task
    thresholds of this module (DARE-TIES's taken on the very drops the merge makes)."""
    w = torch.tensor(list(weights), dtype=x.dtype)
    if params.base == "task_arithmetic":
        return params.lambda_ * torch.tensordot(w, x, dims=1)
    from lorafuse.merging.methods.elementwise import keep_rule, threshold_input
    from lorafuse.merging.methods.primitives import Draws, top_limit

    spec = get_method(params.base)
    base = spec.parse_params(params.base_values())
    recipe = spec.fn.recipe  # type: ignore[attr-defined]
    # counter-based draws (primitives.Draws): the thresholds and the merge see the very same drops
    draws = generators if generators is not None else Draws(tuple(range(len(x))))

    rule = keep_rule(base, recipe, getattr(base, "density", 1.0))
    if rule is None:
        thresholds = torch.zeros(len(x), 0, 2, dtype=torch.float64)
    else:  # [T, width, 2]: per task its (τ, ties) limits, as the engine's threshold tables
        values = threshold_input(x, recipe, base, draws)
        limits = [[top_limit(v, k) for k in rule(v.numel())] for v in values]
        thresholds = torch.tensor(limits, dtype=torch.float64).reshape(len(limits), -1, 2)
    return spec.fn(x, w, thresholds, base, draws)


@register(
    "ctm", kind="module", params=CtMParams, spaces=("full",), takes_rank=True, takes_generators=True,
    summary="CtM: Tucker-2 (HOSVD + HOOI) of the updates into shared rank-r bases, a base rule "
            "(task_arithmetic, ties, dare_ties) on the r×r cores, one rank-r adapter",
    paper="He et al., Compress then Merge: From Multiple LoRAs into One Low-Rank Adapter, ICML 2026 "
          "(arXiv 2606.03723); no code found, written from the paper",
)
def ctm(terms: Sequence[LowRank], weights: Sequence[float], params: CtMParams, rank: int | None = None,
        generators: Any = None) -> LowRank:
    """U·merge(C_1 … C_T)·Vᵀ (see the module docstring)."""
    from lorafuse.merging.aligned import canonical_signs, core_basis

    m, n = terms[0].shape
    R = sum(t.rank for t in terms)
    if R == 0:
        return LowRank(torch.zeros(m, 0), torch.zeros(0, n))
    r = min(rank or max(t.rank for t in terms), R)
    basis = core_basis(terms)
    cores = [c.to(CORE_DTYPE).dense(CORE_DTYPE) for c in basis.cores(terms)]
    Uc, Vc = tucker2(cores, r, params.hooi_iters)
    U = basis.UB @ Uc.to(WORK_DTYPE)
    V = basis.VA.T @ Vc.to(WORK_DTYPE)
    su, sv = canonical_signs(U), canonical_signs(V)
    U, V = U * su, V * sv
    Uc, Vc = Uc * su.to(CORE_DTYPE), Vc * sv.to(CORE_DTYPE)
    x = torch.stack([Uc.T @ c @ Vc for c in cores]).to(WORK_DTYPE)
    merged = merge_cores(x, weights, params, generators)
    return LowRank(U @ merged.to(WORK_DTYPE), V.T)
