"""Pure tensor primitives of the element-wise methods, each testable alone. `x` is a [T, ...] stack of task
blocks (one row per task); thresholds are per task."""

from __future__ import annotations

import torch


def per_task(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [T] vector against a [T, ...] stack."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def magnitude_mask(x: torch.Tensor, keep_above: torch.Tensor) -> torch.Tensor:
    """1 where |x| ≥ the task's threshold, else 0 (TIES trim / magnitude prune). Masks are 0/1 in x's dtype:
    on CPU, comparing into a float tensor and multiplying is several times faster than a bool mask."""
    return x.abs().ge_(per_task(keep_above, x))


def band_mask(x: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """1 where lower ≤ |x| < upper, else 0: drop the largest outliers and the small noise (Breadcrumbs)."""
    mag = x.abs()
    return mag.lt(per_task(upper, x)).to(x.dtype).mul_(mag.ge_(per_task(lower, x)))


def bernoulli_keep_mask(x: torch.Tensor, keep_prob: float, generators: list[torch.Generator]) -> torch.Tensor:
    """DARE's random drop: 1 with probability keep_prob, else 0; one seeded generator per task, drawn in
    row-major order (so drawing a module band by band gives the same mask as drawing it whole)."""
    masks = [torch.rand(row.shape, generator=g, dtype=torch.float32) for row, g in zip(x, generators)]
    return torch.stack([u.lt_(keep_prob) for u in masks]).to(x.dtype)


def weighted_sum(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t·x_t over the task axis, as one GEMV (no [T, ...] temporary)."""
    return torch.tensordot(weights.to(x.dtype), x, dims=1)


def elect_sign(x: torch.Tensor, rule: str = "total", weights: torch.Tensor | None = None) -> torch.Tensor:
    """TIES sign election: the sign of the (weighted) summed values ('total') or of the summed signs
    ('frequency')."""
    if rule == "total":
        return torch.sign(x.sum(dim=0) if weights is None else weighted_sum(x, weights))
    if rule == "frequency":
        return torch.sign(torch.sign(x).sum(dim=0))
    raise ValueError(f"unknown sign election rule '{rule}'")


def disjoint_mean(x: torch.Tensor, elected: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over the tasks whose non-zero entry agrees with the elected sign; zero where none does.
    With unit weights this is TIES's disjoint mean; otherwise each task's weight counts in the denominator.

    x·elected > 0 exactly where a task agrees (elected is ±1 or 0), so its positive part is |x| on agreeing
    entries and 0 elsewhere: both sums are then GEMVs over the task axis."""
    weights = torch.ones(x.shape[0], dtype=x.dtype) if weights is None else weights.to(x.dtype)
    agreeing = (x * elected.unsqueeze(0)).clamp_(min=0)
    total = weighted_sum(agreeing, weights).mul_(elected)
    norm = weighted_sum(torch.sign(agreeing), weights.abs())
    # where no task agrees both sums are 0: clamping the count to the smallest normal number keeps 0/… = 0
    return total.div_(norm.clamp_(min=torch.finfo(norm.dtype).tiny))


def kth_largest(values: torch.Tensor, fraction: float) -> float:
    """The threshold that keeps int(fraction·N) entries of |values| (inf keeps none, 0 keeps all)."""
    flat = values.reshape(-1).abs()
    k = int(fraction * flat.numel())
    if k <= 0:
        return float("inf")
    if k >= flat.numel():
        return 0.0
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)
