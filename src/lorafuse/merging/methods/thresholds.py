"""Exact top-fraction magnitude thresholds over many tensors that never sit in memory together.

TIES (as in its paper and in KnOTS) trims each task over the whole adapter, not per module. Two streaming
passes give the exact k-th largest |x|: a fine histogram of log2|x| finds the bin holding it, then the values
of that one bin are gathered and sorted.

Each threshold comes with a tie count (τ, ties): the k largest are the entries above τ plus `ties` of those equal
to τ, so that tied values (quantised adapters) keep exactly k (lorafuse.merging.methods.primitives.top_mask).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

_LOW, _HIGH, _BINS = -96.0, 32.0, 1 << 20

# What to keep: fractions f (keep int(f·N) of the largest |x|), or a rule giving those counts from N (Breadcrumbs'
# band, whose two counts are not int(f·N) of one fraction each).
KeepSpec = Sequence[float] | Callable[[int], Sequence[int]]


def keep_counts(spec: KeepSpec, total: int) -> list[int]:
    """How many of the `total` largest |x| each threshold keeps."""
    if callable(spec):
        return [int(k) for k in spec(total)]
    return [int(f * total) for f in spec]


def _bin_index(x: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each |x| in log2 space; zeros (and tiny values) fall in bin 0."""
    logs = torch.log2(x.abs().float().clamp(min=2.0**_LOW))
    idx = ((logs - _LOW) * (_BINS / (_HIGH - _LOW))).long()
    return idx.clamp(0, _BINS - 1)


class StreamingQuantile:
    """Exact thresholds keeping int(f·N) of the largest |x| for each fraction f (or the counts of a rule), over a
    stream of tensors."""

    def __init__(self, fractions: KeepSpec) -> None:
        self.fractions = fractions
        self.counts = torch.zeros(_BINS, dtype=torch.int64)
        self.total = 0
        self._targets: list[tuple[int, int]] = []  # (bin, rank inside the bin counted from its top)
        self._gathered: list[list[torch.Tensor]] = []

    def observe(self, x: torch.Tensor) -> None:
        """Pass 1: count entries per bin."""
        self.counts += torch.bincount(_bin_index(x).reshape(-1), minlength=_BINS).cpu()
        self.total += x.numel()

    def plan(self) -> None:
        """Between passes: locate the bin of each target rank."""
        above = torch.flip(torch.cumsum(torch.flip(self.counts, [0]), 0), [0])  # entries in bins ≥ b
        self._targets = []
        for k in keep_counts(self.fractions, self.total):
            if k <= 0 or k >= self.total:
                self._targets.append((-1, k))
                continue
            b = int((above >= k).nonzero().max())
            in_higher = int(above[b + 1]) if b + 1 < _BINS else 0
            self._targets.append((b, k - in_higher))
        self._gathered = [[] for _ in self._targets]

    def gather(self, x: torch.Tensor) -> None:
        """Pass 2: keep the values that fall in a target bin."""
        flat = x.reshape(-1)
        idx = _bin_index(flat)
        for slot, (b, _) in enumerate(self._targets):
            if b >= 0:
                self._gathered[slot].append(flat[idx == b].abs().float().cpu())

    def thresholds(self) -> list[float]:
        """The exact thresholds: the k-th largest |x| (inf keeps none, 0 keeps all)."""
        return [tau for tau, _ in self.limits()]

    def limits(self) -> list[tuple[float, int]]:
        """(τ, ties) per count: the k-th largest |x| and how many entries equal to it the k largest include (see
        lorafuse.merging.methods.primitives.top_mask)."""
        out = []
        for (b, rank), values in zip(self._targets, self._gathered):
            if b < 0:
                out.append((float("inf"), 0) if rank <= 0 else (0.0, self.total))
                continue
            sorted_desc = torch.sort(torch.cat(values), descending=True).values
            tau = float(sorted_desc[rank - 1])
            out.append((tau, rank - int((sorted_desc > tau).sum())))
        return out


# -- one-pass exact selection, bracketed by a sample -------------------------------------------------------
_BRACKET_SIGMAS = 8.0  # half-width of the bracket in binomial standard deviations of the sample quantile


def _bracket(sample: torch.Tensor, k: int, total: int) -> tuple[float, float]:
    """Values lo ≤ hi that very likely enclose the k-th largest |x| of `total` entries, from a sample of |x|."""
    mags = np.abs(sample.detach().reshape(-1).float().numpy())
    n = mags.size
    q = k / total
    spread = _BRACKET_SIGMAS * (n * q * (1.0 - q)) ** 0.5 + 2.0
    upper, lower = int(q * n - spread), int(q * n + spread) + 1  # ranks from the top, 0-based
    wanted = [n - 1 - r for r in (upper, lower) if 0 <= r < n]  # the same ranks in ascending order
    picked = np.partition(mags, wanted) if wanted else mags
    hi = float("inf") if upper < 0 else float(picked[n - 1 - upper])
    lo = 0.0 if lower >= n else float(picked[n - 1 - lower])
    return lo, hi


def count_on_device(chunk: torch.Tensor) -> bool:
    """Whether a chunk is counted by torch where it lies (an accelerator) rather than by numpy on the CPU."""
    return chunk.device.type != "cpu"


def _count_and_band(values: Iterable[torch.Tensor], brackets: list[tuple[float, float]]
                    ) -> list[tuple[int, np.ndarray]]:
    """For each (lo, hi): how many |x| exceed hi, and the |x| lying in [lo, hi] (numpy: fast boolean selection,
    into buffers reused from chunk to chunk). Selecting only the narrow bracket matters: a boolean selection of
    every entry ≥ lo (the kept fifth) was 4x slower than these five passes (unpredictable branches)."""
    above = [0] * len(brackets)
    inside: list[list[np.ndarray]] = [[] for _ in brackets]
    buffers: dict[tuple[int, np.dtype], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for chunk in values:
        chunk = chunk.detach() if chunk.dtype in (torch.float32, torch.float64) else chunk.detach().float()
        if count_on_device(chunk):  # on an accelerator: count there, bring back only the bracketed values
            mag_t = chunk.abs().reshape(-1)
            for i, (lo, hi) in enumerate(brackets):
                above[i] += int((mag_t > hi).sum())
                inside[i].append(mag_t[(mag_t >= lo) & (mag_t <= hi)].cpu().numpy())
            continue
        flat = chunk.numpy().reshape(-1)
        key = (flat.size, flat.dtype)
        if key not in buffers:
            buffers = {key: (np.empty(flat.size, flat.dtype), np.empty(flat.size, np.bool_),
                             np.empty(flat.size, np.bool_))}
        mag, first, second = buffers[key]
        np.abs(flat, out=mag)
        for i, (lo, hi) in enumerate(brackets):
            np.greater(mag, hi, out=first)
            above[i] += int(np.count_nonzero(first))
            np.greater_equal(mag, lo, out=first)
            np.less_equal(mag, hi, out=second)
            inside[i].append(mag[np.logical_and(first, second, out=first)])
    return [(a, np.concatenate(v) if v else np.zeros(0, np.float32)) for a, v in zip(above, inside)]


def top_thresholds(values: Callable[[], Iterable[torch.Tensor]], total: int, fractions: KeepSpec,
                   sample: torch.Tensor) -> list[float]:
    """The thresholds τ of `top_limits` alone."""
    return [tau for tau, _ in top_limits(values, total, fractions, sample)]


def top_limits(values: Callable[[], Iterable[torch.Tensor]], total: int, fractions: KeepSpec,
               sample: torch.Tensor, strict: bool = False) -> list[tuple[float, int]]:
    """Exact (τ, ties) keeping int(f·total) of the largest |x| per fraction f (same rule as top_limit:
    (inf, 0) keeps none, (0, total) keeps all) over chunks that `values()` produces (e.g. bands of a dense update).

    A sample of |x| brackets each threshold; one pass counts the entries above the bracket and keeps those
    inside it, so the k-th largest is read from a small sorted set. Where the sample misses (improbable, but
    possible on adversarial data), a second pass with the bracket widened to the side it missed stays exact.

    `strict`: where the k largest include every entry equal to τ > 0 (no tie at the threshold, the usual case),
    the limit is (τ⁻, 0) instead, τ⁻ the float just below τ in the values' dtype: `|x| > τ⁻` keeps the same k
    entries with no tie budget to consume, so chunks can be masked in any order (in parallel)."""
    ks = keep_counts(fractions, total)
    out: list[tuple[float, int] | None] = [(float("inf"), 0) if k <= 0 else (0.0, total) if k >= total else None
                                           for k in ks]
    todo = [i for i, v in enumerate(out) if v is None]
    brackets = {i: _bracket(sample, ks[i], total) for i in todo}
    for _ in range(2):
        if not todo:
            break
        found = _count_and_band(values(), [brackets[i] for i in todo])
        missed = []
        for i, (above, inside) in zip(todo, found):
            limit = limit_in_bracket(ks[i], above, inside)
            if limit is None:
                brackets[i] = widened(brackets[i], ks[i] - above)
                missed.append(i)
                continue
            tau, ties = limit
            if strict and tau > 0 and ties == int(np.count_nonzero(inside == tau)):
                out[i] = (float(np.nextafter(inside.dtype.type(tau), inside.dtype.type(0))), 0)
            else:
                out[i] = limit
        todo = missed
    if todo:
        raise AssertionError("top_thresholds: a widened bracket must contain the threshold")
    return [v for v in out if v is not None]


def limit_in_bracket(k: int, above: int, inside: np.ndarray) -> tuple[float, int] | None:
    """(τ, ties) keeping the k largest |x|, from the count of |x| above a bracket and the |x| inside it: τ is the
    (k − above)-th largest inside; None where the bracket missed it."""
    rank = k - above
    if not 0 < rank <= inside.size:
        return None
    tau = inside.dtype.type(np.partition(inside, inside.size - rank)[inside.size - rank])
    return float(tau), rank - int(np.count_nonzero(inside > tau))


def widened(bracket: tuple[float, float], rank: int) -> tuple[float, float]:
    """The bracket to count again where `limit_in_bracket` missed: above it (rank ≤ 0) or below it."""
    lo, hi = bracket
    return (hi, float("inf")) if rank <= 0 else (0.0, lo)


def row_tie_budgets(tau: float, ties: int, inside: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    """Each row's share of a tie budget: of the entries equal to τ the first `ties` in position order are kept,
    so row r keeps min(its tied entries, what the rows before it left). `inside` holds the rows' in-bracket |x|
    in row order, per_row[r] of them in row r (τ lies in every bracket, so every tied entry is there)."""
    tied = np.concatenate([[0], np.cumsum(inside == inside.dtype.type(tau))])
    bounds = np.concatenate([[0], np.cumsum(per_row)])
    in_row = tied[bounds[1:]] - tied[bounds[:-1]]
    before = np.cumsum(in_row) - in_row
    return np.clip(ties - before, 0, in_row).astype(np.int64)


# -- the compiled counting pass (lorafuse.merging.methods.kernels) -----------------------------------------------
@dataclass(frozen=True)
class Band:
    """Rows of every task's values, [T, R, n] float32 (the counting pass overwrites them), at flat index `offset` of
    their module, whose DARE keys are `keys` (uint64 [T]; used only with a drop)."""

    values: np.ndarray
    offset: int
    keys: np.ndarray


@dataclass(frozen=True)
class Drop:
    """DARE's drop applied before counting (DARE-TIES trims the dropped values): word < limit kept, ·scale."""

    limit: int
    scale: float


def count_pass(bands: Callable[[], Iterable[Band]], total: int, ks: Sequence[int],
               samples: Callable[[int], torch.Tensor], drop: Drop | None = None, threads: int = 1
               ) -> tuple[list[tuple[float, int]], np.ndarray]:
    """`top_limits` for every task at once, by the compiled counting pass, with each row's tie budget: per task
    t the exact (τ, ties) keeping the ks[t] largest of its `total` values (bracketed by samples(t)), and
    budgets [T, rows of all bands in order], the tied entries each row keeps (`row_tie_budgets`). One pass over
    the bands per try; a task whose bracket missed is counted again with the widened bracket."""
    tasks = len(ks)
    limits: list[tuple[float, int] | None] = [(float("inf"), 0) if k <= 0 else (0.0, total) if k >= total else None
                                              for k in ks]
    brackets = {t: _bracket(samples(t), ks[t], total) for t in range(tasks) if limits[t] is None}
    budgets: dict[int, np.ndarray] = {}
    for _ in range(2):
        todo = [t for t in range(tasks) if limits[t] is None]
        if not todo:
            break
        above, inside, per_row = _count_bands(bands, tasks, {t: brackets[t] for t in todo}, drop, threads)
        for t in todo:
            limit = limit_in_bracket(ks[t], int(above[t]), inside[t])
            if limit is None:
                brackets[t] = widened(brackets[t], ks[t] - int(above[t]))
                continue
            limits[t], budgets[t] = limit, row_tie_budgets(*limit, inside[t], per_row[t])
    if any(v is None for v in limits):
        raise AssertionError("count_pass: a widened bracket must contain the threshold")
    rows = per_row.shape[1] if tasks and budgets else 0
    table = np.zeros((tasks, rows), np.int64)
    for t, b in budgets.items():
        table[t] = b
    return [v for v in limits if v is not None], table


def _count_bands(bands: Callable[[], Iterable[Band]], tasks: int, brackets: dict[int, tuple[float, float]],
                 drop: Drop | None, threads: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """One counting pass: per task the count above its bracket, the in-bracket |x| in position order, and the
    number of them in each row [T, rows]. Tasks without a bracket are skipped (nothing lies in [inf, inf])."""
    from lorafuse.merging.methods import kernels

    lo = np.full(tasks, np.inf, np.float32)
    hi = np.full(tasks, np.inf, np.float32)
    for t, (low, high) in brackets.items():
        lo[t], hi[t] = low, high
    above = np.zeros(tasks, np.int64)
    inside: list[list[np.ndarray]] = [[] for _ in range(tasks)]
    per_row: list[np.ndarray] = []
    limit, scale = (np.uint64(drop.limit), np.float32(drop.scale)) if drop else (np.uint64(0), np.float32(1))
    for band in bands():
        x = band.values
        band_above = np.empty(x.shape[:2], np.int64)
        band_inside = np.empty(x.shape[:2], np.int64)
        kernels.run(kernels.count_band, threads, x, x.view(np.uint32), lo.view(np.uint32), hi.view(np.uint32),
                    drop is not None, np.int64(band.offset), band.keys, limit, scale, band_above, band_inside)
        above += band_above.sum(1)
        per_row.append(band_inside)
        for t in brackets:
            out = np.empty(int(band_inside[t].sum()), np.float32)
            kernels.gather_inside(x, band_inside, t, out, 0)
            inside[t].append(out)
    values = [np.concatenate(v) if v else np.zeros(0, np.float32) for v in inside]
    return above, values, np.concatenate(per_row, axis=1) if per_row else np.zeros((tasks, 0), np.int64)
