"""Pure tensor primitives of the element-wise methods, each testable alone. `x` is a [T, ...] stack of task
blocks (one row per task); thresholds are per task."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch


def per_task(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [T] vector against a [T, ...] stack."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def magnitude_mask(x: torch.Tensor, keep_above: torch.Tensor) -> torch.Tensor:
    """1 where |x| ≥ the task's threshold, else 0 (TIES trim / magnitude prune). Masks are 0/1 in x's dtype:
    on CPU, comparing into a float tensor and multiplying is several times faster than a bool mask."""
    return x.abs().ge_(per_task(keep_above, x))


def top_mask(x: torch.Tensor, limits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """1 on each task's k largest |x|, exactly k: limits is [T, 2], per task the k-th largest |x| (τ) and how many
    entries equal to τ are still to keep (k − #{|x| > τ} over the whole scope). Entries above τ are kept, and of
    those equal to τ the first in position order (row-major; chunks given in position order), as a stable
    descending sort would, so tied (quantised) values never push the count past k. The tie budget is consumed in
    place: a scope's chunks (bands of a module, modules of an adapter) share one table. `out`: a buffer of x's shape
    for the mask (no allocation per band)."""
    mag = torch.abs(x, out=out) if out is not None else x.abs()
    tau = per_task(limits[:, 0], x)
    if not bool((limits[:, 1] > 0).any()):  # no tie left to keep (the usual case past τ's own entry): one pass
        return mag.gt_(tau)
    tied = mag.eq(tau)
    mask = mag.gt_(tau)
    if bool(tied.any()):
        _keep_first_ties(mask, tied, limits[:, 1])
    return mask


def keep_top_(x: torch.Tensor, limits: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x with every entry outside each task's k largest |x| zeroed, in place: x·top_mask(x) (the same bits as
    top_mask(x)·x, a product of one factor in {0, 1})."""
    return x.mul_(top_mask(x, limits, scratch))


def _keep_first_ties(mask: torch.Tensor, tied: torch.Tensor, budget: torch.Tensor) -> None:
    """Add to `mask` the first `budget` tied entries of each task (row-major), and take them from the budget."""
    flat = tied.reshape(tied.shape[0], -1)
    keep = flat & (flat.cumsum(1) <= budget.reshape(-1, 1))
    mask.add_(keep.reshape(mask.shape).to(mask.dtype))
    budget.sub_(torch.minimum(flat.sum(1).to(budget.dtype), budget))


# -- DARE's drop masks: a counter-based generator --------------------------------------------------------------
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's constants
_WORDS_PER_CHUNK = 1 << 15  # 64-bit words per numpy chunk (256 KiB of temporaries: in cache)


def dare_key(seed: int, name: str, module: str) -> int:
    """The 64-bit key of one (adapter, module)'s DARE mask: the first 8 bytes, little-endian, of
    SHA-256(f"{seed}:{name}:{module}"). By name, so the masks do not depend on the adapters' or the modules' order."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{module}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Draws:
    """Where DARE's uniforms come from: per task a 64-bit key, and the flat row-major index (`offset`) in the
    module of the first entry of the block at hand. Entry i of a module draws the 32-bit word

        z = SplitMix64(key + (⌊i/2⌋ + 1)·0x9E3779B97F4A7C15 mod 2⁶⁴),   word_i = (z >> 32·(i mod 2)) mod 2³²

    (SplitMix64's finaliser: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
    z ^= z >> 31; all mod 2⁶⁴) and is kept iff word_i < ⌊(1 − p)·2³²⌋. A counter-based generator: any band of any
    module is drawn on its own (in parallel), with the same mask as one draw of the whole module."""

    keys: tuple[int, ...]
    offset: int = 0
    threaded: bool = True  # draw the tasks on the mask pool's threads (False: in the calling thread)

    def at(self, offset: int) -> Draws:
        return Draws(self.keys, offset, self.threaded)

    def task(self, t: int) -> Draws:
        return Draws((self.keys[t],), self.offset, self.threaded)

    def in_thread(self) -> Draws:
        """The same draws, made in the calling thread (for callers that are themselves one of several threads)."""
        return Draws(self.keys, self.offset, False)


def uniform_words(key: int, offset: int, count: int) -> np.ndarray:
    """word_i (see `Draws`) for i in [offset, offset + count), as uint32. The counters' products with the golden
    gamma come from a table (one add per chunk instead of arange, multiply, add), the finaliser runs in place in
    the output: 9 numpy passes per chunk, each over 256 KiB that stays in cache."""
    first, last = offset // 2, (offset + count + 1) // 2  # the 64-bit counters covering the range
    out = np.empty(last - first, np.uint64)
    spare = np.empty(min(_WORDS_PER_CHUNK, last - first), np.uint64)
    mix1, mix2 = np.uint64(_MIX1), np.uint64(_MIX2)
    steps = _gamma_steps()
    for start in range(first, last, _WORDS_PER_CHUNK):
        stop = min(start + _WORDS_PER_CHUNK, last)
        z, y = out[start - first: stop - first], spare[: stop - start]
        # counter c = start + 1 + j: key + c·γ = (key + start·γ) + (j + 1)·γ  (mod 2⁶⁴)
        np.add(steps[: stop - start], np.uint64((key + start * _GAMMA) % 2**64), out=z)
        for shift, mix in ((30, mix1), (27, mix2), (31, None)):
            np.right_shift(z, np.uint64(shift), out=y)
            np.bitwise_xor(z, y, out=z)
            if mix is not None:
                np.multiply(z, mix, out=z)
    skip = offset - 2 * first
    return out.view("<u4")[skip: skip + count]  # low word first


@functools.cache
def _gamma_steps() -> np.ndarray:
    """(j + 1)·γ mod 2⁶⁴ for j < _WORDS_PER_CHUNK."""
    return np.arange(1, _WORDS_PER_CHUNK + 1, dtype=np.uint64) * np.uint64(_GAMMA)


def keep_threshold(keep_prob: float) -> int:
    """⌊keep_prob·2³²⌋: a word below it is kept."""
    return int(keep_prob * 2.0**32)


def bernoulli_keep_mask(x: torch.Tensor, keep_prob: float, draws: Draws, out: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """DARE's random drop: 1 with probability keep_prob, else 0, from the counter-based generator of `Draws` (one
    key per task of the [T, ...] stack x, whose entries start at draws.offset of their module). Tasks are drawn on
    parallel threads (numpy releases the GIL). `out`: a float32 CPU buffer of x's shape to write the mask into."""
    limit = keep_threshold(keep_prob)
    if limit >= 2**32:
        return torch.ones_like(x)
    count = x[0].numel()
    mask = np.empty((len(draws.keys), count), dtype=np.float32) if out is None else out.numpy().reshape(-1, count)

    def task(t: int) -> None:  # numpy end to end, written in place: no torch op (OpenMP region) per task
        np.less(uniform_words(draws.keys[t], draws.offset, count), np.uint32(limit), out=mask[t])

    if len(draws.keys) > 1 and draws.threaded:
        list(_pool().map(task, range(len(draws.keys))))
    else:
        for t in range(len(draws.keys)):
            task(t)
    return torch.from_numpy(mask).reshape(x.shape).to(device=x.device, dtype=x.dtype)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="lorafuse-dare")


def weighted_sum(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t w_t·x_t over the task axis: from 0, each w_t·x_t added in task order (`add_` with alpha, a fused
    multiply-add): the same bits as the GEMV torch.tensordot(w, x) makes on the CPU, signed zeros included (a sum
    of −0's from 0 is +0), and cheaper on bands that stay in cache."""
    out = torch.zeros(x.shape[1:], dtype=x.dtype, device=x.device) if out is None else out.zero_()
    for t, w in enumerate(weights.to(x.dtype).tolist()):
        out.add_(x[t], alpha=w)
    return out


def elect_sign(x: torch.Tensor, rule: str = "total", weights: torch.Tensor | None = None) -> torch.Tensor:
    """TIES sign election on the weighted task values y_t = w_t·x_t (weights None: 1): +1 where the sum of the y_t
    ('total') or of their signs ('frequency') is ≥ 0, else −1. A tie (a zero sum) elects +1, as PEFT and mergekit
    do; an entry every task trimmed is 0 in all of them, so no task agrees with either sign there. Computed
    without forming the y_t: Σ y_t = Σ w_t·x_t and Σ sign(y_t) = Σ sign(w_t)·sign(x_t) are weighted sums."""
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    weights = ones if weights is None else weights.to(x.dtype)
    if rule == "total":
        votes = weighted_sum(x, weights)
    elif rule == "frequency":
        votes = weighted_sum(torch.sign(x), torch.sign(weights))
    else:
        raise ValueError(f"unknown sign election rule '{rule}'")
    return votes.ge_(0).mul_(2).sub_(1)  # ge_ on a float tensor writes 1.0 / 0.0


def disjoint_mean(x: torch.Tensor, elected: torch.Tensor, weights: torch.Tensor | None = None,
                  count: bool = False) -> torch.Tensor:
    """TIES's disjoint mean of the weighted values y_t = w_t·x_t: the sum of the y_t whose sign is the elected one,
    divided by the summed |w_t| of the tasks they come from (count=True: by their number); zero where none agrees.
    With unit weights both are the TIES paper's disjoint mean. x is left unchanged (see `disjoint_mean_`)."""
    return disjoint_mean_(x.clone(), elected, weights, count)


def disjoint_mean_(x: torch.Tensor, elected: torch.Tensor, weights: torch.Tensor | None = None,
                   count: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """`disjoint_mean` computed in x's own memory (x is overwritten), the result written into `out` if given.

    y_t agrees iff x_t·sign(w_t)·elected > 0, so the positive part of that product is |x_t| on agreeing entries
    and 0 elsewhere, and an agreeing y_t is elected·|w_t|·|x_t|: every sum is a weighted sum over the task axis."""
    weights = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if weights is None else weights.to(x.dtype)
    agreeing = x.mul_(elected.unsqueeze(0))
    signs = torch.sign(weights)
    if not bool(signs.eq(1).all()):  # × 1 is exact: only other signs change anything
        agreeing.mul_(per_task(signs, x))
    agreeing.clamp_(min=0)
    total = weighted_sum(agreeing, weights.abs(), out=out).mul_(elected)
    kept = agreeing.sign_()
    norm = weighted_sum(kept, torch.ones_like(weights) if count else weights.abs())
    # where no task agrees both sums are 0: clamping the count to the smallest normal number keeps 0/… = 0
    return total.div_(norm.clamp_(min=torch.finfo(norm.dtype).tiny))


def row_band_mask(x: torch.Tensor, gamma: float, density: float) -> torch.Tensor:
    """Breadcrumbs as its authors' code does it, per row of each task's block (the last axis): drop the
    int(gamma·n) largest |x| of the row, keep the next int(density·n) (all that remain when fewer do). Exactly
    those counts: ties are ranked by position (a stable descending sort; the authors' topk breaks them its own
    way)."""
    n = x.shape[-1]
    top, keep = int(gamma * n), int(density * n)
    order = x.abs().argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=x.device).expand_as(order))
    return ((ranks >= top) & (ranks < top + keep)).to(x.dtype)


def kth_largest(values: torch.Tensor, fraction: float) -> float:
    """The threshold that keeps int(fraction·N) entries of |values| (inf keeps none, 0 keeps all)."""
    return kth_largest_count(values, int(fraction * values.numel()))


def kth_largest_count(values: torch.Tensor, k: int) -> float:
    """The threshold that keeps the k largest |values| (inf keeps none, 0 keeps all)."""
    return top_limit(values, k)[0]


def top_limit(values: torch.Tensor, k: int) -> tuple[float, int]:
    """(τ, ties): the k-th largest |values| and how many entries equal to it the k largest include (see
    `top_mask`); (inf, 0) keeps none, (0, N) keeps all."""
    flat = values.reshape(-1).abs()
    if k <= 0:
        return float("inf"), 0
    if k >= flat.numel():
        return 0.0, flat.numel()
    tau = float(torch.kthvalue(flat, flat.numel() - k + 1).values)
    return tau, k - int((flat > tau).sum())
