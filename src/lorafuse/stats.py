"""Statistics for results a reader can trust: intervals for accuracies, a paired bootstrap of average normalized
accuracy, paired tests between methods and an exact binomial test against the majority class.

Pure (numpy and the standard library): it works on per-example correctness vectors, in the same example order for
every method of a run, and never imports torch.

References: Wilson (1927) and Clopper & Pearson (1934) for binomial intervals (Brown, Cai & DasGupta 2001 compare
them); Efron & Tibshirani (1993) for the percentile bootstrap; Koehn (2004) and Berg-Kirkpatrick et al. (2012) for
the paired bootstrap of system comparisons in NLP.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# -- per-example correctness, stored compactly --------------------------------------------------------------
def pack_bits(flags: Sequence[bool] | np.ndarray) -> str:
    """Per-example correctness as base64 of packed bits (10,000 examples: 1.7 kB of JSON)."""
    return base64.b64encode(np.packbits(np.asarray(flags, dtype=bool)).tobytes()).decode("ascii")


def unpack_bits(packed: str, n: int) -> np.ndarray:
    """The inverse of `pack_bits`: a bool array of length n."""
    raw = np.frombuffer(base64.b64decode(packed), dtype=np.uint8)
    return np.unpackbits(raw)[:n].astype(bool)


# -- binomial intervals and tests -----------------------------------------------------------------------------
def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (95% by default); `successes` may be fractional (a mean over
    seeds × n). Good coverage down to small n, unlike the normal approximation."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _log_factorials(n: int) -> np.ndarray:
    """log(i!) for i = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=float)))])


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), summed exactly in log space (stable for n in the tens of thousands)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    i = np.arange(k, n + 1)
    lf = _log_factorials(n)
    logs = lf[n] - lf[i] - lf[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def binomial_test_greater(successes: int, n: int, p0: float) -> float:
    """One-sided exact binomial test of H0: p ≤ p0 against p > p0; returns the p-value P(X ≥ successes | p0)."""
    return binomial_sf(successes, n, p0)


def clopper_pearson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (conservative) Clopper-Pearson interval, found by bisection on the binomial tails."""
    if n <= 0:
        return (0.0, 1.0)
    alpha = (1 - level) / 2

    def solve(tail_at: Callable[[float], float], increasing: bool) -> float:  # the p where tail_at(p) crosses alpha
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if (tail_at(mid) > alpha) == increasing:
                hi = mid
            else:
                lo = mid
        return (lo + hi) / 2

    lower = 0.0 if successes == 0 else solve(lambda p: binomial_sf(successes, n, p), True)
    upper = 1.0 if successes == n else solve(lambda p: 1 - binomial_sf(successes + 1, n, p), False)
    return (lower, upper)


def above_majority(successes: int, n: int, majority_share: float, alpha: float = 0.05) -> tuple[bool, float]:
    """Whether an accuracy of successes/n is significantly above always predicting the majority class (exact
    one-sided binomial test at level alpha), and the test's p-value."""
    p = binomial_test_greater(successes, n, majority_share)
    return p < alpha, p


# -- the paired bootstrap of average normalized accuracy --------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """Method minus another on average normalized accuracy: the observed difference, its 95% paired-bootstrap
    interval and a two-sided bootstrap p-value (0 difference on every resample gives p = 1)."""

    difference: float
    low: float
    high: float
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05


@dataclass(frozen=True)
class Bootstrap:
    """Average normalized accuracy per method on the observed data and on each resample (rows: resamples)."""

    methods: list[str]
    observed: np.ndarray  # [methods]
    samples: np.ndarray  # [resamples, methods]

    def interval(self, method: str, level: float = 0.95) -> tuple[float, float]:
        col = self.samples[:, self.methods.index(method)]
        return (float(np.quantile(col, (1 - level) / 2)), float(np.quantile(col, (1 + level) / 2)))

    def compare(self, method: str, other: str, level: float = 0.95) -> Comparison:
        """`method` − `other` on the same resamples (paired: the correlation between methods cancels)."""
        i, j = self.methods.index(method), self.methods.index(other)
        diff = self.samples[:, i] - self.samples[:, j]
        observed = float(self.observed[i] - self.observed[j])
        if np.allclose(diff, 0.0, atol=1e-9):
            return Comparison(observed, 0.0, 0.0, 1.0)
        # two-sided percentile p-value: twice the smaller tail mass on either side of 0 (with the +1 correction)
        below, above = (diff <= 0).sum(), (diff >= 0).sum()
        p = min(1.0, 2 * (min(below, above) + 1) / (len(diff) + 1))
        return Comparison(observed, float(np.quantile(diff, (1 - level) / 2)),
                          float(np.quantile(diff, (1 + level) / 2)), float(p))


def resample_counts(n: int, resamples: int, rng: np.random.Generator, chunk: int = 250) -> list[np.ndarray]:
    """How often each of n examples is drawn in each resample of size n (with replacement), in chunks of rows:
    [chunk, n] count matrices, so one matrix product gives every method's resampled accuracy."""
    out = []
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        flat = (np.arange(rows)[:, None] * n + rng.integers(0, n, size=(rows, n))).ravel()
        out.append(np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float32))
    return out


def paired_bootstrap(correct: Mapping[str, Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray],
                     tasks: Sequence[str], resamples: int = 2000, seed: int = 0) -> Bootstrap:
    """Average normalized accuracy, 100 × mean over `tasks` of acc_method / acc_reference, for every method, on
    the data and on `resamples` paired resamples: each task's test examples are resampled with replacement, the
    same draw for every method *and for the reference* (so the denominator's uncertainty is included).

    `correct[method][task]` is per-example correctness (bool, or a fraction in [0, 1] such as the mean over seeds)
    in the same order as `reference[task]`. Tasks are resampled independently (a stratified bootstrap)."""
    methods = list(correct)
    if not tasks:
        raise ValueError("no tasks to average over")
    rng = np.random.default_rng(seed)
    totals = np.zeros((resamples, len(methods)))
    observed = np.zeros(len(methods))
    for task in tasks:
        ref = np.asarray(reference[task], dtype=np.float32)
        cols = np.stack([np.asarray(correct[m][task], dtype=np.float32) for m in methods] + [ref], axis=1)
        if cols.shape[0] != ref.shape[0]:
            raise ValueError(f"task '{task}': methods were evaluated on different numbers of examples")
        observed += 100 * cols[:, :-1].mean(0) / max(cols[:, -1].mean(), 1e-12)
        rows = []
        for counts in resample_counts(len(ref), resamples, rng):
            hits = counts @ cols  # [rows, methods + 1]: resampled correct counts
            rows.append(100 * hits[:, :-1] / np.maximum(hits[:, -1:], 1e-12))
        totals += np.concatenate(rows)
    return Bootstrap(methods, observed / len(tasks), totals / len(tasks))


def randomization_test(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], weights: Mapping[str, float],
                       rounds: int = 4000, seed: int = 0) -> float:
    """Two-sided paired approximate randomization test (Noreen 1989; Riezler & Maxwell 2005; Dror et al. 2018)
    of Σ_t weights[t] · Σ_i (a_ti − b_ti): under H0 the two methods' outputs on each example are exchangeable,
    so each paired difference's sign is flipped at random. Only discordant examples matter; p = (hits + 1) /
    (rounds + 1). Unlike a bootstrap p-value it stays honest with few discordant examples (4 of 4 in one
    direction: p = 1/8, as the exact sign test)."""
    diffs = np.concatenate([weights[t] * (np.asarray(a[t], dtype=float) - np.asarray(b[t], dtype=float))
                            for t in weights])
    diffs = diffs[diffs != 0]
    if diffs.size == 0:
        return 1.0
    observed = abs(diffs.sum()) * (1 - 1e-9)  # ties with the observed statistic count as at least as extreme
    rng = np.random.default_rng(seed)
    hits, chunk = 0, max(1, min(rounds, 2_000_000 // diffs.size))
    for start in range(0, rounds, chunk):
        rows = min(chunk, rounds - start)
        bits = np.unpackbits(np.frombuffer(rng.bytes(rows * diffs.size // 8 + 1), dtype=np.uint8))
        signs = bits[:rows * diffs.size].reshape(rows, diffs.size).astype(np.float64) * 2 - 1
        hits += int((np.abs(signs @ diffs) >= observed).sum())
    return (hits + 1) / (rounds + 1)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


# -- results over seeds --------------------------------------------------------------------------------------
def mean_split(splits: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean over seeds of several evaluations of one split (accuracy, normalized accuracy and their averages;
    prediction counts summed). Per-example correctness stays with each seed's own record."""
    first = splits[0]
    mean = {"accuracy": {t: float(np.mean([s["accuracy"][t] for s in splits])) for t in first["accuracy"]},
            "examples": first.get("examples", {}), "reference": first.get("reference", {}),
            "labels": first.get("labels", {})}
    mean["normalized"] = {t: float(np.mean([s["normalized"][t] for s in splits])) for t in first.get("normalized", {})}
    mean["average"] = float(np.mean([s["average"] for s in splits]))
    navg = [s.get("normalized_average") for s in splits]
    mean["normalized_average"] = float(np.mean(navg)) if None not in navg else None
    predicted: dict[str, dict[str, int]] = {}
    for s in splits:
        for t, counts in s.get("predicted", {}).items():
            for label, n in counts.items():
                predicted.setdefault(t, {})[label] = predicted.setdefault(t, {}).get(label, 0) + n
    mean["predicted"] = predicted
    return mean


def over_seeds(runs: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """A stochastic method's test results over seeds: the mean in `test`, each seed's own in `seed_runs`."""
    if len(runs) == 1:
        return {"test": runs[0][1], "seeds": [runs[0][0]]}
    return {"test": mean_split([r for _, r in runs]), "seeds": [s for s, _ in runs],
            "seed_runs": [{"seed": s, "test": r} for s, r in runs]}
