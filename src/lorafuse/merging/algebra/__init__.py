"""Low-rank algebra on LoRA updates ΔW = B·A: exact sums, SVDs from the factors, dense fallbacks."""

from lorafuse.merging.algebra.dense import dense_truncated_svd
from lorafuse.merging.algebra.lowrank import (
    FactorSVD,
    LowRank,
    factor_svd,
    stack_lowrank,
    truncate,
)

__all__ = ["FactorSVD", "LowRank", "dense_truncated_svd", "factor_svd", "stack_lowrank", "truncate"]
