"""Exact top-fraction magnitude thresholds over many tensors that never sit in memory together.

TIES (as in its paper and in KnOTS) trims each task over the whole adapter, not per module. Two streaming
passes give the exact k-th largest |x|: a fine histogram of log2|x| finds the bin holding it, then the values
of that one bin are gathered and sorted.
"""

from __future__ import annotations

import torch

_LOW, _HIGH, _BINS = -96.0, 32.0, 1 << 20


def _bin_index(x: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each |x| in log2 space; zeros (and tiny values) fall in bin 0."""
    logs = torch.log2(x.abs().float().clamp(min=2.0**_LOW))
    idx = ((logs - _LOW) * (_BINS / (_HIGH - _LOW))).long()
    return idx.clamp(0, _BINS - 1)


class StreamingQuantile:
    """Exact thresholds keeping int(f·N) of the largest |x| for each fraction f, over a stream of tensors."""

    def __init__(self, fractions: list[float]) -> None:
        self.fractions = fractions
        self.counts = torch.zeros(_BINS, dtype=torch.int64)
        self.total = 0
        self._targets: list[tuple[int, int]] = []  # (bin, rank inside the bin counted from its top)
        self._gathered: list[list[torch.Tensor]] = []

    def observe(self, x: torch.Tensor) -> None:
        """Pass 1: count entries per bin."""
        self.counts += torch.bincount(_bin_index(x).reshape(-1), minlength=_BINS)
        self.total += x.numel()

    def plan(self) -> None:
        """Between passes: locate the bin of each target rank."""
        above = torch.flip(torch.cumsum(torch.flip(self.counts, [0]), 0), [0])  # entries in bins ≥ b
        self._targets = []
        for f in self.fractions:
            k = int(f * self.total)
            if k <= 0 or k >= self.total:
                self._targets.append((-1, k))
                continue
            b = int((above >= k).nonzero().max())
            in_higher = int(above[b + 1]) if b + 1 < _BINS else 0
            self._targets.append((b, k - in_higher))
        self._gathered = [[] for _ in self.fractions]

    def gather(self, x: torch.Tensor) -> None:
        """Pass 2: keep the values that fall in a target bin."""
        flat = x.reshape(-1)
        idx = _bin_index(flat)
        for slot, (b, _) in enumerate(self._targets):
            if b >= 0:
                self._gathered[slot].append(flat[idx == b].abs().float())

    def thresholds(self) -> list[float]:
        """The exact thresholds: keep |x| ≥ threshold (inf keeps none, 0 keeps all)."""
        out = []
        for (b, rank), values in zip(self._targets, self._gathered):
            if b < 0:
                out.append(float("inf") if rank <= 0 else 0.0)
                continue
            sorted_desc = torch.sort(torch.cat(values), descending=True).values
            out.append(float(sorted_desc[rank - 1]))
        return out
