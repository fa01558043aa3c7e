"""Compiled (numba) kernels of the full-space element-wise merge: the per-task counting pass of a threshold and the
fused merge pass (DARE drop, trim with per-row tie budgets, sign election, disjoint mean, λ), each one parallel
pass over a band of rows [T, rows, n] that the engine's GEMMs have just formed.

The arithmetic is that of the torch path (elementwise.BandKernel), operation for operation in float32: the task
sums are fused multiply-adds from +0 in task order (llvm.fma, as torch's vectorised `add_` with alpha), the
products and the division are IEEE, nothing is reassociated (no fastmath). So the merged bits are the same.

Imported only by the engine's full-space path (never at `lorafuse --help`). Compiled once per machine
(`cache=True`: next to this file, else in NUMBA_CACHE_DIR or the user's cache); where no cache location is
writable (a read-only install and home) the kernels compile in memory on first use instead.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba.core import types
from numba.extending import intrinsic

if "NUMBA_THREADING_LAYER" not in os.environ:  # a user's own choice wins
    # fork-safe (the experiment executors fork) and no second OpenMP runtime beside torch's; it is not
    # thread-safe, so every parallel launch holds _LOCK
    numba.config.THREADING_LAYER = "workqueue"

_LOCK = threading.Lock()
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's constants (primitives.Draws)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TINY = np.float32(np.finfo(np.float32).tiny)
_ABS = np.uint32(0x7FFFFFFF)
_CHUNK = 8  # entries tested at once by the counting pass


def _jit(parallel: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """numba.njit with an on-disk cache (compiling the kernels takes ~10 s): beside this file or in the user's
    cache; where neither can be written (a read-only install and home), in a per-user temporary directory; and
    where that fails too, in memory only (numba refuses `cache=True` at decoration when no location is
    writable)."""

    def wrap(fn: Callable[..., Any]) -> Any:
        for _ in range(2):
            try:
                return numba.njit(cache=True, parallel=parallel, nogil=True)(fn)
            except RuntimeError:
                if numba.config.CACHE_DIR:
                    break
                numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"lorafuse-numba-{getattr(os, 'getuid', lambda: 0)()}")
        return numba.njit(parallel=parallel, nogil=True)(fn)

    return wrap


@intrinsic
def _fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a·b + c rounded once (llvm.fma.f32): torch's `add_(x, alpha=w)` is this fused multiply-add."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


@numba.njit(inline="always")
def _splitmix(z: np.ndarray, key: np.uint64, first: np.int64) -> None:
    """z[k] = SplitMix64(key + (first + k + 1)·γ): DARE's 64-bit counters first, first + 1, … (primitives.Draws);
    a vectorised loop (AVX-512's 64-bit multiply)."""
    for k in range(z.size):
        c = key + (np.uint64(first + k) + np.uint64(1)) * _GAMMA
        c = (c ^ (c >> np.uint64(30))) * _MIX1
        c = (c ^ (c >> np.uint64(27))) * _MIX2
        z[k] = c ^ (c >> np.uint64(31))


@numba.njit(inline="always")
def _drop_row(v: np.ndarray, key: np.uint64, first: np.int64, limit: np.uint64, scale: np.float32) -> None:
    """DARE's drop of one row in place, the row's entries at flat indices first, first + 1, … of the module:
    v·mask·scale, mask 1 where the entry's 32-bit word is < limit (entry i's word is the low half of counter
    ⌊i/2⌋'s value for even i, the high half for odd i: a little-endian uint32 view). The torch path's two
    products; x·0 keeps x's sign on the zero, as there."""
    pair = first >> 1
    z = np.empty(((first + v.size + 1) >> 1) - pair, np.uint64)
    _splitmix(z, key, pair)
    words = z.view(np.uint32)
    skip = first - 2 * pair
    for j in range(v.size):
        keep = np.float32(1.0) if words[skip + j] < limit else np.float32(0.0)
        v[j] = (v[j] * keep) * scale


@numba.njit(inline="always")
def _trim_row(v: np.ndarray, tau: np.float32, budget: np.int64) -> None:
    """The trim of one row in place: hardshrink (|v| > τ kept, +0 elsewhere), and of the entries equal to ±τ the
    first `budget` kept (this row's share of the task's tie budget, by position)."""
    if budget <= 0:
        for j in range(v.size):
            x = v[j]
            v[j] = np.float32(0.0) if (x >= -tau and x <= tau) else x
        return
    for j in range(v.size):
        x = v[j]
        if x >= -tau and x <= tau:
            if budget > 0 and abs(x) == tau:
                budget -= 1
            else:
                v[j] = np.float32(0.0)


@numba.njit(inline="always")
def _merge_row(x: np.ndarray, r: int, out: np.ndarray, offset: np.int64, weights: np.ndarray,
               abs_weights: np.ndarray, signs: np.ndarray, lam: np.float32, flags: np.ndarray, keys: np.ndarray,
               limit: np.uint64, scale: np.float32, taus: np.ndarray, budgets: np.ndarray) -> None:
    """Row r of `merge_band`."""
    tasks, n = x.shape[0], x.shape[2]
    for t in range(tasks):
        if flags[0]:
            _drop_row(x[t, r], keys[t], offset + r * n, limit, scale)
        if flags[1]:
            _trim_row(x[t, r], taus[t], budgets[t, r])
    if flags[2]:
        _consensus_row(x, r, out[r], weights, abs_weights, signs, flags)
    else:
        _sum_row(x, r, weights, out[r])
    if flags[5]:
        row = out[r]
        for j in range(n):
            row[j] = row[j] * lam


@_jit(parallel=True)
def merge_band(x: np.ndarray, out: np.ndarray, offset: np.int64, weights: np.ndarray, abs_weights: np.ndarray,
               signs: np.ndarray, lam: np.float32, flags: np.ndarray, keys: np.ndarray, limit: np.uint64,
               scale: np.float32, taus: np.ndarray, budgets: np.ndarray) -> None:
    """One band's merge, in parallel over its rows: x [T, R, n] (C-contiguous, overwritten) → out [R, n].

    Per task: DARE's drop (flags[0]; entry j of row r is entry offset + r·n + j of the module), the trim by τ_t
    with budgets[t, r] tied entries kept (flags[1]); then (flags[2]) the sign election on Σ w_t·x_t ('total') or
    Σ sign(w_t)·sign(x_t) (flags[3] = 0, 'frequency') and the disjoint mean Σ|w_t|·agreeing_t over the agreeing
    tasks' Σ|w_t| (or their count, flags[4]), or else Σ w_t·x_t; then ·λ (flags[5]). flags[6]: all w_t > 0."""
    for r in prange(x.shape[1]):
        _merge_row(x, r, out, offset, weights, abs_weights, signs, lam, flags, keys, limit, scale, taus, budgets)


@_jit()
def merge_band_serial(x: np.ndarray, out: np.ndarray, offset: np.int64, weights: np.ndarray,
                      abs_weights: np.ndarray, signs: np.ndarray, lam: np.float32, flags: np.ndarray,
                      keys: np.ndarray, limit: np.uint64, scale: np.float32, taus: np.ndarray, budgets: np.ndarray
                      ) -> None:
    """`merge_band` in the calling thread (one thread: no hand-off to numba's pool, which costs a scheduler
    wake-up per band on a busy machine)."""
    for r in range(x.shape[1]):
        _merge_row(x, r, out, offset, weights, abs_weights, signs, lam, flags, keys, limit, scale, taus, budgets)


@numba.njit(inline="always")
def _sum_row(x: np.ndarray, r: int, weights: np.ndarray, out: np.ndarray) -> None:
    """out = Σ_t w_t·x[t, r], fused multiply-adds from +0 in task order (P.weighted_sum). Rows are taken as
    x[t, r] (contiguous: the loops vectorise), never through a strided x[:, r]."""
    for j in range(out.size):
        out[j] = np.float32(0.0)
    for t in range(x.shape[0]):
        w = weights[t]
        v = x[t, r]
        for j in range(out.size):
            out[j] = _fma(v[j], w, out[j])


@numba.njit(inline="always")
def _consensus_row(x: np.ndarray, r: int, out: np.ndarray, weights: np.ndarray, abs_weights: np.ndarray,
                   signs: np.ndarray, flags: np.ndarray) -> None:
    """TIES's election and disjoint mean of row r (P.elect_sign, P.disjoint_mean_; the same operations)."""
    n = out.size
    elected = np.zeros(n, np.float32)  # the votes, then ±1
    for t in range(x.shape[0]):
        v = x[t, r]
        if flags[3]:
            w = weights[t]
            for j in range(n):
                elected[j] = _fma(v[j], w, elected[j])
        else:
            s = signs[t]
            for j in range(n):
                sg = np.float32(1.0) if v[j] > 0 else (np.float32(-1.0) if v[j] < 0 else np.float32(0.0))
                elected[j] = _fma(sg, s, elected[j])
    for j in range(n):
        elected[j] = np.float32(1.0) if elected[j] >= 0 else np.float32(-1.0)
    norm = np.zeros(n, np.float32)
    for j in range(n):
        out[j] = np.float32(0.0)
    for t in range(x.shape[0]):
        v = x[t, r]
        aw = abs_weights[t]
        c = np.float32(1.0) if flags[4] else aw
        s = signs[t]
        for j in range(n):
            a = v[j] * elected[j]
            if not flags[6]:
                a = a * s
            a = a if a > 0 else np.float32(0.0)  # clamp(min=0); a zero's sign reaches no sum (all start at +0)
            out[j] = _fma(a, aw, out[j])
            norm[j] = _fma(np.float32(1.0) if a > 0 else np.float32(0.0), c, norm[j])
    for j in range(n):
        out[j] = (out[j] * elected[j]) / max(norm[j], _TINY)


@numba.njit(inline="always")
def _count_item(i: int, x: np.ndarray, bits: np.ndarray, lo: np.ndarray, hi: np.ndarray, drop: bool,
                offset: np.int64, keys: np.ndarray, limit: np.uint64, scale: np.float32, above: np.ndarray,
                inside: np.ndarray) -> None:
    """Item i = (task, row) of `count_band`."""
    rows, n = x.shape[1], x.shape[2]
    t, r = i // rows, i % rows
    if drop:
        _drop_row(x[t, r], keys[t], offset + r * n, limit, scale)
    above[t, r], inside[t, r] = _count_row(bits[t, r], lo[t], hi[t])


@_jit(parallel=True)
def count_band(x: np.ndarray, bits: np.ndarray, lo: np.ndarray, hi: np.ndarray, drop: bool, offset: np.int64,
               keys: np.ndarray, limit: np.uint64, scale: np.float32, above: np.ndarray, inside: np.ndarray) -> None:
    """The counting pass of one band, in parallel over (task, row): per row of x [T, R, n] the number of |v| > hi_t
    (above[t, r]) and of lo_t ≤ |v| ≤ hi_t (inside[t, r]), those |v| moved, in row order, to the front of the row
    (x is overwritten; `bits` is x viewed as uint32, lo and hi the brackets' bit patterns). With `drop`, v is
    first DARE's dropped value (DARE-TIES trims the dropped values)."""
    for i in prange(x.shape[0] * x.shape[1]):
        _count_item(i, x, bits, lo, hi, drop, offset, keys, limit, scale, above, inside)


@_jit()
def count_band_serial(x: np.ndarray, bits: np.ndarray, lo: np.ndarray, hi: np.ndarray, drop: bool,
                      offset: np.int64, keys: np.ndarray, limit: np.uint64, scale: np.float32, above: np.ndarray,
                      inside: np.ndarray) -> None:
    """`count_band` in the calling thread (see `merge_band_serial`)."""
    for i in range(x.shape[0] * x.shape[1]):
        _count_item(i, x, bits, lo, hi, drop, offset, keys, limit, scale, above, inside)


@numba.njit(inline="always")
def _count_row(v: np.ndarray, low: np.uint32, high: np.uint32) -> tuple[int, int]:
    """`count_band` on one row of bit patterns: |v| is v & 0x7fffffff, and lo ≤ |v| ≤ hi one unsigned compare of
    |v| − lo (the bits of non-negative floats are ordered as the floats). Chunks of 8 are tested vectorised; the
    ~10% holding an in-bracket value (~1.25% of entries) are moved by a scalar loop (a branch per entry on
    |v| ≥ lo would mispredict ~1 in 5; chunks of 16 measured 1.3 against 0.95 ns an entry).)"""
    n = v.size
    full = n - n % _CHUNK
    width = high - low
    above, kept = 0, 0
    for s in range(0, n, _CHUNK):
        hit = 0
        if s < full:
            for j in range(_CHUNK):
                a = v[s + j] & _ABS
                above += a > high
                hit |= (a - low) <= width
        else:
            for j in range(s, n):
                a = v[j] & _ABS
                above += a > high
                hit |= (a - low) <= width
        if hit:
            for j in range(s, min(s + _CHUNK, n)):
                a = v[j] & _ABS
                if (a - low) <= width:
                    v[kept] = a
                    kept += 1
    return above, kept


@_jit()
def gather_inside(x: np.ndarray, inside: np.ndarray, t: np.int64, out: np.ndarray, at: np.int64) -> np.int64:
    """Append task t's in-bracket values that `count_band` left at the front of each row to out[at:]; the new end."""
    for r in range(x.shape[1]):
        for j in range(inside[t, r]):
            out[at] = x[t, r, j]
            at += 1
    return at


@_jit()
def sample_dots(B: np.ndarray, At: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Entries (rows[k], cols[k]) of B·Aᵀ (B [m, r], At [n, r]): the threshold's sample of ΔW without forming
    the gathered rows (it only brackets the threshold: its rounding changes no result)."""
    out = np.empty(rows.size, np.float32)
    for k in range(rows.size):
        b, a = B[rows[k]], At[cols[k]]
        acc = np.float32(0.0)
        for q in range(b.size):
            acc += b[q] * a[q]
        out[k] = acc
    return out


_SERIAL = {merge_band: merge_band_serial, count_band: count_band_serial}


def run(kernel: Callable[..., Any], threads: int, *args: Any) -> Any:
    """A parallel kernel on `threads` threads (numba's pool is not thread-safe: one launch at a time); on one
    thread its serial twin, in the calling thread."""
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if threads == 1 and kernel in _SERIAL:
        return _SERIAL[kernel](*args)
    with _LOCK:
        numba.set_num_threads(threads)
        return kernel(*args)
