"""Spaces in which element-wise methods run. A space projects one module's T updates to T blocks (stacked
[T, ...]) and rebuilds a merged block into an update: dense ΔW (full) or factors (aligned spaces).

`full`: the dense ΔW_t themselves; the merged dense update comes back to low rank by a truncated SVD.
Aligned spaces (`knots`, `core`) live in lorafuse.merging.aligned and register here on import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lorafuse.errors import ConfigError, did_you_mean
from lorafuse.merging.algebra.lowrank import LowRank


@dataclass(frozen=True)
class Projection:
    blocks: torch.Tensor  # [T, ...], one block per task
    rebuild: Callable[[torch.Tensor], LowRank | torch.Tensor]


SpaceFn = Callable[[Sequence[LowRank]], Projection]

# The trim scope of element-wise methods when none is asked for: each space's reference implementation. PEFT and
# mergekit trim each tensor; the KnOTS code trims all modules' blocks together; the Core Space code each module.
REFERENCE_TRIM_SCOPE = {"full": "module", "knots": "global", "core": "module"}
SPACES: dict[str, SpaceFn] = {}
_OPTIONAL_SPACE_MODULES = ("lorafuse.merging.aligned",)


def register_space(name: str) -> Callable[[SpaceFn], SpaceFn]:
    def wrap(fn: SpaceFn) -> SpaceFn:
        SPACES[name] = fn
        return fn

    return wrap


def get_space(name: str) -> SpaceFn:
    import importlib

    for module in _OPTIONAL_SPACE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if name not in SPACES:
        raise ConfigError(f"unknown space '{name}'{did_you_mean(name, SPACES)}")
    return SPACES[name]


@register_space("full")
def full_space(terms: Sequence[LowRank]) -> Projection:
    """Dense per-module updates: what TIES and DARE are defined on."""
    return Projection(torch.stack([t.dense() for t in terms]), lambda merged: merged)


BAND_ENTRIES = 1 << 18  # one task's entries per band of rows: a few MB, reused, so no page faults per band
# one task's entries per sub-band of the merge: the T blocks, their masks and the sums (~2.5 MB for T = 4) stay in
# L2/L3 through the ~20 element-wise passes of a merge; large enough that each torch call's overhead is small
MERGE_BAND_ENTRIES = 1 << 16
SAMPLE_ENTRIES = 1 << 18  # entries per threshold's sample (spread over the modules of a global trim)


class DenseRows:
    """The full space of one module produced a band of rows at a time. Element-wise methods are separable per
    entry once their thresholds are known, so the T dense m×n updates never need to sit in memory together."""

    def __init__(self, terms: Sequence[LowRank]) -> None:
        self.B = [t.B.to(torch.float32) for t in terms]
        self.A = [t.A.to(torch.float32) for t in terms]
        self.shape = terms[0].shape
        self.rows = max(1, BAND_ENTRIES // max(1, self.shape[1]))
        self.device = self.B[0].device
        # made on the first band(): a global trim holds every module's DenseRows at once
        self._buffer: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.B)

    def bands(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.rows, self.shape[0])) for s in range(0, self.shape[0], self.rows)]

    def band(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of every task's ΔW, [T, stop-start, n]; a view of a buffer reused by the next call."""
        if self._buffer is None:
            self._buffer = torch.empty(len(self), min(self.rows, self.shape[0]), self.shape[1], device=self.device)
        out = self._buffer[:, : stop - start]
        for t in range(len(self)):
            self.task_band(t, start, stop, out[t])
        return out

    def stacked_bands(self, entries: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows [start, stop) of every task's ΔW as one contiguous [T, stop-start, n] tensor), bands
        of about `entries` entries a task; each tensor is a view of one buffer, overwritten by the next band."""
        m, n = self.shape
        height = max(1, min(m, entries // max(1, n)))
        buffer = torch.empty(len(self) * height * n, device=self.device)
        for start in range(0, m, height):
            stop = min(start + height, m)
            out = buffer[: len(self) * (stop - start) * n].view(len(self), stop - start, n)
            for t in range(len(self)):
                self.task_band(t, start, stop, out[t])
            yield start, stop, out

    def task_band(self, t: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.matmul(self.B[t][start:stop], self.A[t], out=out)

    def task_values(self, t: int) -> Iterator[torch.Tensor]:
        """Task t's ΔW band by band (each yielded view is overwritten by the next). Each call has its own buffer,
        so several tasks can be read at once from different threads."""
        out = torch.empty(min(self.rows, self.shape[0]), self.shape[1], device=self.device)
        for start, stop in self.bands():
            yield self.task_band(t, start, stop, out[: stop - start])

    def task_sample(self, t: int, seed: int = 0, count: int = SAMPLE_ENTRIES) -> torch.Tensor:
        """Entries of ΔW_t at independent uniformly random positions, to bracket its magnitude quantiles.

        Independent positions, not a grid of rows × columns: a low-rank update's entries share their row's and
        column's scale, so a grid's entries are correlated and its quantiles scatter far more than a binomial
        bracket allows (on Llama-3-8B's gate_proj a 1024×512 grid missed the 20% quantile for one task in four,
        and each miss costs a second pass)."""
        rows, cols = self.sample_positions(seed, count)
        # rows of Aᵀ, not columns of A: a gather of contiguous rows (a strided column gather was 20x slower)
        return (self.B[t][rows] * self.A[t].T.contiguous()[cols]).sum(dim=1)

    def sample_positions(self, seed: int = 0, count: int = SAMPLE_ENTRIES) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows and columns of `task_sample`'s entries."""
        gen = torch.Generator().manual_seed(seed)
        m, n = self.shape
        rows = torch.randint(m, (count,), generator=gen).to(self.device)
        return rows, torch.randint(n, (count,), generator=gen).to(self.device)
