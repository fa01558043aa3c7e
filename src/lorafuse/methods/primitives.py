"""Pure tensor primitives of the element-wise methods, each testable alone. `x` is a [T, ...] stack of task
blocks (one row per task); thresholds are per task."""

from __future__ import annotations

import torch


def per_task(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [T] vector against a [T, ...] stack."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def magnitude_mask(x: torch.Tensor, keep_above: torch.Tensor) -> torch.Tensor:
    """Keep entries with |x| ≥ the task's threshold (TIES trim / magnitude prune)."""
    return x.abs() >= per_task(keep_above, x)


def band_mask(x: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Keep entries with lower ≤ |x| < upper: drop the largest outliers and the small noise (Breadcrumbs)."""
    mag = x.abs()
    return (mag >= per_task(lower, x)) & (mag < per_task(upper, x))


def bernoulli_keep_mask(x: torch.Tensor, keep_prob: float, generators: list[torch.Generator]) -> torch.Tensor:
    """DARE's random drop: keep each entry with probability keep_prob, one seeded generator per task."""
    masks = [torch.rand(row.shape, generator=g) < keep_prob for row, g in zip(x, generators)]
    return torch.stack(masks)


def elect_sign(x: torch.Tensor, rule: str = "total") -> torch.Tensor:
    """TIES sign election: the sign of the summed values ('total') or of the summed signs ('frequency')."""
    if rule == "total":
        return torch.sign(x.sum(dim=0))
    if rule == "frequency":
        return torch.sign(torch.sign(x).sum(dim=0))
    raise ValueError(f"unknown sign election rule '{rule}'")


def disjoint_mean(x: torch.Tensor, elected: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over the tasks whose non-zero entry agrees with the elected sign; zero where none does.
    With unit weights this is TIES's disjoint mean; otherwise each task's weight counts in the denominator."""
    weights = torch.ones(x.shape[0], dtype=x.dtype) if weights is None else weights
    agree = (torch.sign(x) == elected.unsqueeze(0)) & (x != 0)
    zero = torch.zeros((), dtype=x.dtype)
    total = torch.where(agree, x * per_task(weights, x), zero).sum(dim=0)
    norm = torch.where(agree, per_task(weights.abs(), x), zero).sum(dim=0)
    return total / torch.where(norm > 0, norm, torch.ones((), dtype=x.dtype))


def kth_largest(values: torch.Tensor, fraction: float) -> float:
    """The threshold that keeps int(fraction·N) entries of |values| (inf keeps none, 0 keeps all)."""
    flat = values.reshape(-1).abs()
    k = int(fraction * flat.numel())
    if k <= 0:
        return float("inf")
    if k >= flat.numel():
        return 0.0
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)
