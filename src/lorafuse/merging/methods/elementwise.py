"""The element-wise family: one parameterised merge = sparsifier × sign consensus × combination, as in
generalized task arithmetic (mergekit). TIES, DARE, magnitude prune and Breadcrumbs are presets of it.
Each runs on task blocks in a space (dense ΔW_t in `full`; aligned blocks in `knots`/`core`).

Weights. Every method works on the weighted task values y_t = w_t·x_t (negative weights allowed): the sum methods
return λ·Σ y_t, TIES elects signs on the y_t and averages the agreeing y_t over the summed |w_t| of the tasks
that keep them (`denominator: weights`, mergekit's `normalize: true` with |w| so that a negative weight can not
flip or zero the divisor) or over their count (`denominator: count`, PEFT's disjoint merge). With unit weights
both are the TIES paper's disjoint mean. PEFT elects on the unweighted values and weights afterwards, which lets
a negatively weighted entry take the sign opposite to the elected one; we do not follow it there.

Trim scope. `trim_scope` unset follows the space's reference (lorafuse.merging.spaces.REFERENCE_TRIM_SCOPE): per module in
`full` (PEFT, mergekit) and `core` (the Core Space code), over the whole adapter in `knots` (the KnOTS code).

Ties. Every 'keep the k largest' keeps exactly k entries: of the values tied at the threshold (quantised adapters)
the first in position order (modules in the engine's order, entries row-major), as a stable descending sort; a
threshold alone would keep every tied entry.
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from pydantic import Field

from lorafuse.merging.methods import primitives as P
from lorafuse.merging.methods.registry import MethodParams, register


class Sparsify(str, enum.Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"  # keep the top-density fraction by |x|
    RANDOM = "random"  # DARE: keep with probability 1-p, rescale
    BAND = "band"  # Breadcrumbs: drop the top gamma fraction, keep the next density fraction


class TrimScope(str, enum.Enum):
    MODULE = "module"  # threshold per module (PEFT, mergekit, Core Space)
    GLOBAL = "global"  # threshold over the whole adapter (TIES paper, KnOTS)


class ElementwiseParams(MethodParams):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged update")
    trim_scope: TrimScope | None = Field(None, description="module or global; unset: the space's reference")
    seed: int = 0


class ConsensusParams(ElementwiseParams):
    majority: str = Field("total", pattern="^(total|frequency)$", description="TIES sign election rule")
    denominator: str = Field("weights", pattern="^(weights|count)$",
                             description="disjoint mean over the agreeing tasks' summed |weight| or their count")


class MagnitudeParams(ElementwiseParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of entries kept per task")


class TiesParams(MagnitudeParams, ConsensusParams):
    pass


_DARE_DENSITY = ("DARE's random drop is set by `drop_rate` (the probability of dropping an entry; PEFT's and "
                 "mergekit's `density` is 1 − drop_rate)")


class DareParams(ElementwiseParams):
    REFUSED: ClassVar[dict[str, str]] = {"density": _DARE_DENSITY}
    drop_rate: float = Field(0.9, ge=0.0, lt=1.0, description="probability of dropping each entry")
    rescale: bool = True


class DareTiesParams(DareParams, ConsensusParams):
    REFUSED: ClassVar[dict[str, str]] = {
        "density": _DARE_DENSITY + "; the optional magnitude trim after the drop is `trim_density`"}
    trim_density: float = Field(1.0, gt=0.0, le=1.0,
                                description="fraction kept by a TIES trim after the drop (1: no trim)")


class BreadcrumbsParams(ElementwiseParams):
    density: float = Field(0.9, gt=0.0, le=1.0, description="fraction of entries kept per task")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest entries dropped")
    rule: str = Field("mergekit", pattern="^(mergekit|authors)$",
                      description="mergekit: per module or adapter, int(density·N) kept; authors: per row")


@dataclass(frozen=True)
class Recipe:
    sparsify: Sparsify
    consensus: bool  # TIES sign election + disjoint mean, else a weighted sum
    trim_after_drop: bool = False  # DARE-TIES: a magnitude trim of the dropped values (trim_density)


Counts = Callable[[int], list[int]]


def breadcrumbs_counts(gamma: float, density: float) -> Counts:
    """mergekit's band of N entries: int(gamma·N) largest dropped and int(density·N) kept; where the two exceed N,
    fewer of the largest are dropped so that int(density·N) are still kept (density 1 keeps everything).
    Returned as the two thresholds' 'keep the k largest' counts: [top dropped, top dropped + kept]."""

    def counts(total: int) -> list[int]:
        kept = int(density * total)
        top = min(int(gamma * total), total - kept)
        return [top, top + kept]

    return counts


def keep_rule(params: ElementwiseParams, recipe: Recipe, density: float) -> Counts | None:
    """The counts of largest |x| whose thresholds the engine must find for one task (per module or globally),
    or None when the method needs no threshold."""
    if recipe.sparsify is Sparsify.MAGNITUDE:
        return lambda total: [int(density * total)]
    if recipe.sparsify is Sparsify.BAND and getattr(params, "rule", "mergekit") == "mergekit":
        return breadcrumbs_counts(getattr(params, "gamma", 0.0), density)
    trim = getattr(params, "trim_density", 1.0)
    if recipe.trim_after_drop and trim < 1.0:
        return lambda total: [int(trim * total)]
    return None


def drop(x: torch.Tensor, params: ElementwiseParams, generators: P.Draws) -> torch.Tensor:
    """DARE's drop: each entry kept with probability 1 − p, survivors rescaled by 1/(1 − p) unless rescale=false
    (`generators`: the counter-based draws of x's tasks, see primitives.Draws)."""
    return drop_(x.clone(), params, generators)


def drop_(x: torch.Tensor, params: ElementwiseParams, generators: P.Draws, scratch: torch.Tensor | None = None
          ) -> torch.Tensor:
    """`drop` in x's own memory: x·mask·scale (the same bits as mask·x·scale: the mask is 0 or 1). `scratch`: a
    float32 CPU buffer of x's shape for the mask."""
    keep = 1.0 - params.drop_rate  # type: ignore[attr-defined]
    scale = 1.0 / keep if params.rescale else 1.0  # type: ignore[attr-defined]
    return x.mul_(P.bernoulli_keep_mask(x, keep, generators, scratch)).mul_(scale)


def threshold_input(x: torch.Tensor, recipe: Recipe, params: ElementwiseParams,
                    generators: P.Draws) -> torch.Tensor:
    """The values a method's thresholds are taken on: the dropped values for DARE-TIES's trim, else x itself
    (the same draws the merge makes: the generator is counter-based)."""
    return drop(x, params, generators) if recipe.trim_after_drop else x


def sparsify(x: torch.Tensor, recipe: Recipe, params: ElementwiseParams, thresholds: torch.Tensor,
             generators: P.Draws) -> torch.Tensor:
    """Zero the entries each task drops, in a new tensor (x unchanged); see `sparsify_`."""
    return sparsify_(x.clone(), recipe, params, thresholds, generators)


def sparsify_(x: torch.Tensor, recipe: Recipe, params: ElementwiseParams, thresholds: torch.Tensor,
              generators: P.Draws, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the entries each task drops, in x's own memory; thresholds is [T, n_thresholds, 2]: per count its
    (τ, ties) limit, whose tie budget `P.top_mask` consumes in place (so a scope's chunks must come in position
    order). `scratch`: a buffer of x's shape for the masks (none allocated per band)."""
    if recipe.sparsify is Sparsify.MAGNITUDE:
        return P.keep_top_(x, thresholds[:, 0], scratch)
    if recipe.sparsify is Sparsify.BAND:
        if params.rule == "authors":  # type: ignore[attr-defined]
            return x.mul_(P.row_band_mask(x, params.gamma, params.density))  # type: ignore[attr-defined]
        return x.mul_(P.top_mask(x, thresholds[:, 1]).sub_(P.top_mask(x, thresholds[:, 0])))
    if recipe.sparsify is Sparsify.RANDOM:
        on_cpu = scratch is not None and scratch.device.type == "cpu" and scratch.dtype == torch.float32
        dropped = drop_(x, params, generators, scratch if on_cpu else None)
        if recipe.trim_after_drop and thresholds.shape[1]:
            return P.keep_top_(dropped, thresholds[:, 0], scratch)
        return dropped
    return x


def combine(x: torch.Tensor, weights: torch.Tensor, recipe: Recipe, params: ElementwiseParams,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """λ·Σ w_t x_t, or TIES's sign election and disjoint mean on the weighted values, then λ; into `out` if given.
    x (the sparsified values) is overwritten by the consensus."""
    if not recipe.consensus:
        merged = P.weighted_sum(x, weights, out=out)
    else:
        elected = P.elect_sign(x, params.majority, weights)  # type: ignore[attr-defined]
        count = params.denominator == "count"  # type: ignore[attr-defined]
        merged = P.disjoint_mean_(x, elected, weights, count, out=out)
    return merged if params.lambda_ == 1.0 else merged.mul_(params.lambda_)  # × 1 is exact


def merge_blocks_(x: torch.Tensor, weights: torch.Tensor, thresholds: torch.Tensor, params: ElementwiseParams,
                  generators: P.Draws, out: torch.Tensor, scratch: torch.Tensor | None = None, *, recipe: Recipe
                  ) -> torch.Tensor:
    """One preset's merge of the blocks x written into `out`, in x's own memory (x is overwritten; `scratch`, of
    x's shape, holds the masks): what the engine runs band by band, with no allocation of a block's size. The same
    bits as the preset's function. `combine` and `sparsify_` are looked up at call time (tests spy on them)."""
    return combine(sparsify_(x, recipe, params, thresholds, generators, scratch), weights, recipe, params, out)


class BandKernel:
    """`merge_blocks_` for one module's magnitude trims and DARE drops, planned once per module: every per-band constant (the weights as Python floats, the
    thresholds, the weights' signs) is read before the first band, and the per-band sums live in buffers reused by
    each thread. On a sub-band that stays in cache the small tensor ops of the generic path (conversions, ones,
    checks read back from tensors, allocations of the sums) cost as much as the element-wise passes themselves.

    Limits with a tie budget (float32 values tie at τ in most modules of Llama-3-8B's size) are consumed as
    `P.top_mask` does, in place and in the order the bands come (the engine runs such modules' bands in row order):
    a task with budget left looks for its entries equal to τ, keeps the first ones, and takes them from the budget.

    The same bits as `merge_blocks_` (tests/test_merge_elementwise.py checks them). The one difference is a trimmed
    entry's zero: the trim keeps x where |x| > τ and writes +0 elsewhere (`hardshrink`: one pass instead of abs,
    compare and multiply), where x·0 gave −0 for negative x. No result sees that sign: every later sum over the
    tasks starts from +0, and +0 + (±0) = +0, so the votes, the agreeing sums and their norms are unchanged."""

    def __init__(self, recipe: Recipe, params: ElementwiseParams, weights: torch.Tensor, thresholds: torch.Tensor
                 ) -> None:
        self.recipe, self.params = recipe, params
        as_float = weights.to(torch.float32)  # the values add_ takes as alpha in the generic path
        self.weights = as_float.tolist()
        self.abs_weights = as_float.abs().tolist()
        self.signs = torch.sign(as_float)
        self.all_positive = bool(self.signs.eq(1).all())
        trims = recipe.sparsify is Sparsify.MAGNITUDE or (recipe.trim_after_drop and thresholds.shape[1] > 0)
        # τ as the float32 the generic path compares against (its per_task conversion)
        self.taus = thresholds[:, 0, 0].to(torch.float32).tolist() if trims else None
        self.budgets = thresholds[:, 0, 1] if trims else None  # consumed in place, as P.top_mask does
        self.tied = trims and bool(thresholds[:, 0, 1].gt(0).any())  # False once every budget is spent
        self.local = threading.local()

    @staticmethod
    def applies(recipe: Recipe, params: ElementwiseParams, thresholds: torch.Tensor) -> bool:
        """Whether a kernel can stand in for `merge_blocks_`: magnitude trims and DARE's drop (not Breadcrumbs'
        band, whose two limits' ties would need both budgets), on the CPU."""
        return recipe.sparsify in (Sparsify.MAGNITUDE, Sparsify.RANDOM) and thresholds.device.type == "cpu"

    def _buffer(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        """A per-thread buffer of like's shape (one per slot), grown as needed, so no band allocates its sums."""
        buffers = self.local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(slot)
        if buffer is None or buffer.numel() < like.numel():
            buffer = buffers[slot] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return buffer[: like.numel()].view(like.shape)

    def _trim(self, x: torch.Tensor) -> None:
        assert self.taus is not None and self.budgets is not None
        budgets = self.budgets.tolist() if self.tied else [0.0] * len(self.taus)
        for t, tau in enumerate(self.taus):
            kept = self._first_ties(x[t], tau, int(budgets[t]), t) if budgets[t] > 0 else None
            torch.ops.aten.hardshrink.out(x[t], tau, out=x[t])  # |x| > τ kept, +0 elsewhere (class docstring)
            if kept is not None:
                x[t].view(-1)[kept[0]] = kept[1]
        if self.tied:
            self.tied = bool(self.budgets.gt(0).any())

    def _first_ties(self, block: torch.Tensor, tau: float, budget: int, t: int
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The positions (row-major) and values of the first `budget` entries with |x| = τ in one task's block,
        taken from its budget (P._keep_first_ties' rule); None where there is none."""
        assert self.budgets is not None
        tied = torch.abs(block).eq_(tau).view(-1)
        if not bool(tied.any()):
            return None
        positions = tied.nonzero().view(-1)[:budget]
        self.budgets[t] -= positions.numel()
        return positions, block.view(-1)[positions].clone()

    def _sum(self, x: torch.Tensor, weights: list[float], out: torch.Tensor) -> torch.Tensor:
        """P.weighted_sum with the weights already read: from 0, each w_t·x_t added in task order."""
        out.zero_()
        for t, w in enumerate(weights):
            out.add_(x[t], alpha=w)
        return out

    def __call__(self, x: torch.Tensor, generators: P.Draws, out: torch.Tensor,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
        params = self.params
        if self.recipe.sparsify is Sparsify.RANDOM:
            on_cpu = scratch is not None and scratch.dtype == torch.float32
            drop_(x, params, generators, scratch if on_cpu else None)
        if self.taus is not None:
            self._trim(x)
        if not self.recipe.consensus:
            merged = self._sum(x, self.weights, out)
        else:
            merged = self._disjoint_mean(x, self._elect(x, scratch), out)
        return merged if params.lambda_ == 1.0 else merged.mul_(params.lambda_)

    def _elect(self, x: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
        """P.elect_sign: +1 where the votes are ≥ 0, else −1, in this thread's buffer."""
        votes = self._buffer(0, x[0])
        if self.params.majority == "total":  # type: ignore[attr-defined]
            self._sum(x, self.weights, votes)
        else:  # 'frequency': the votes on the signs (scratch is free once the drop mask is applied)
            signs = torch.sign(x, out=scratch) if scratch is not None else torch.sign(x)
            self._sum(signs, self.signs.tolist(), votes)
        return votes.ge_(0).mul_(2).sub_(1)

    def _disjoint_mean(self, x: torch.Tensor, elected: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """P.disjoint_mean_ with the constants read once and its norm in this thread's buffer."""
        agreeing = x.mul_(elected.unsqueeze(0))
        if not self.all_positive:
            agreeing.mul_(P.per_task(self.signs, x))
        agreeing.clamp_(min=0)
        total = self._sum(agreeing, self.abs_weights, out).mul_(elected)
        kept = agreeing.sign_()
        count = self.params.denominator == "count"  # type: ignore[attr-defined]
        norm = self._sum(kept, [1.0] * len(self.weights) if count else self.abs_weights, self._buffer(1, x[0]))
        return total.div_(norm.clamp_(min=torch.finfo(norm.dtype).tiny))


def compiled_kernels() -> bool:
    """Whether the compiled kernels (kernels.py, numba) can run: numba installed, a little-endian machine (DARE's
    words are halves of a uint64) and LORAFUSE_COMPILED not 0."""
    import importlib.util
    import os
    import sys

    return (os.environ.get("LORAFUSE_COMPILED", "1") != "0" and sys.byteorder == "little"
            and importlib.util.find_spec("numba") is not None)


class CompiledKernel:
    """`BandKernel` compiled (kernels.merge_band): one module's merge of magnitude trims and DARE drops, its
    constants read once, each band one parallel pass. Ties at τ are kept by each row's share of the budget
    (thresholds.row_tie_budgets), so bands and rows need no order. The same bits as `BandKernel`."""

    def __init__(self, recipe: Recipe, params: ElementwiseParams, weights: torch.Tensor, thresholds: torch.Tensor,
                 keys: tuple[int, ...]) -> None:
        w = weights.to(torch.float32).cpu().numpy()
        trims = recipe.sparsify is Sparsify.MAGNITUDE or (recipe.trim_after_drop and thresholds.shape[1] > 0)
        self.drops = recipe.sparsify is Sparsify.RANDOM
        keep = 1.0 - getattr(params, "drop_rate", 0.0)
        scale = 1.0 / keep if getattr(params, "rescale", True) else 1.0
        self.constants = (w, np.abs(w), np.sign(w), np.float32(params.lambda_), np.array([
            self.drops, trims, recipe.consensus, getattr(params, "majority", "total") == "total",
            getattr(params, "denominator", "weights") == "count", params.lambda_ != 1.0, bool((w > 0).all())]),
            np.array(keys, np.uint64), np.uint64(P.keep_threshold(keep)), np.float32(scale),
            # τ as the float32 the torch path compares against
            thresholds[:, 0, 0].to(torch.float32).numpy() if trims else np.zeros(len(w), np.float32))

    def __call__(self, x: np.ndarray, out: np.ndarray, offset: int, budgets: np.ndarray, threads: int) -> None:
        """Merge one band x [T, R, n] (overwritten), entry (r, j) at flat index offset + r·n + j of the module,
        into out [R, n]; budgets [T, R]: the tied entries each row keeps."""
        from lorafuse.merging.methods import kernels

        kernels.run(kernels.merge_band, threads, x, out, np.int64(offset), *self.constants,
                    np.ascontiguousarray(budgets))


def band_kernel(weights: torch.Tensor, thresholds: torch.Tensor, params: ElementwiseParams, *, recipe: Recipe
                ) -> Callable[..., torch.Tensor]:
    """What the engine runs on each sub-band of a full-space module, (x, draws, out, scratch) → out: a planned
    `BandKernel` where it applies, else `merge_blocks_` itself."""
    if BandKernel.applies(recipe, params, thresholds):
        return BandKernel(recipe, params, weights, thresholds)
    return lambda x, generators, out, scratch=None: merge_blocks_(x, weights, thresholds, params, generators, out,
                                                                   scratch, recipe=recipe)


def _preset(name: str, recipe: Recipe, params: type[ElementwiseParams], summary: str, paper: str,
            doc: str) -> None:
    def merge_blocks(x: torch.Tensor, weights: torch.Tensor, thresholds: torch.Tensor,
                     params: ElementwiseParams, generators: P.Draws) -> torch.Tensor:
        return combine(sparsify(x, recipe, params, thresholds, generators), weights, recipe, params)

    merge_blocks.recipe = recipe  # type: ignore[attr-defined]  # the engine reads it to plan thresholds
    # the engine's in-place form, band by band (same bits)
    merge_blocks.merge_into = functools.partial(merge_blocks_, recipe=recipe)  # type: ignore[attr-defined]
    merge_blocks.band_kernel = functools.partial(band_kernel, recipe=recipe)  # type: ignore[attr-defined]
    merge_blocks.__name__ = name
    merge_blocks.__doc__ = doc
    register(name, kind="elementwise", params=params, summary=summary, paper=paper)(merge_blocks)


_preset("ties", Recipe(Sparsify.MAGNITUDE, True), TiesParams,
        "trim to density by magnitude, elect signs on w·x (ties elect +), disjoint mean over Σ|w|, λ",
        "Yadav et al., TIES-Merging, NeurIPS 2023; PEFT/mergekit ties (sign rules of mergekit)",
        """TIES (Yadav et al. 2023): per task the int(density·N) largest |x| (per module as PEFT/mergekit, or over the
        adapter as the paper), signs elected on the weighted values y = w·x ('total': Σy; 'frequency': Σsign(y);
        a tie elects +, as PEFT and mergekit), the agreeing y summed and divided by their tasks' Σ|w| (mergekit
        divides by Σw) or, with denominator=count, by their number (PEFT); λ. Deviation from PEFT: it elects on
        the unweighted x, so a negatively weighted entry could take the sign opposite to the elected one.
        Deviation from the TIES authors' code (and KnOTS and Core Space, which reuse its topk_values_mask): its
        kthvalue threshold with ≥ keeps int(density·N)+1 entries (more on ties); here exactly int(density·N), as
        PEFT and mergekit.""")
_preset("dare_linear", Recipe(Sparsify.RANDOM, False), DareParams,
        "drop entries with probability drop_rate, rescale 1/(1-p), weighted sum (no density: use drop_rate)",
        "Yu et al., Language models are Super Mario (DARE), ICML 2024",
        """DARE (Yu et al. 2024; PEFT/mergekit dare_linear): each entry dropped with probability drop_rate, the
        survivors divided by 1 − drop_rate, then λ·Σ w·x. `density` (PEFT's keep probability) is refused.""")
_preset("dare_ties", Recipe(Sparsify.RANDOM, True, trim_after_drop=True), DareTiesParams,
        "DARE drop and rescale, optional magnitude trim (trim_density, after the drop), TIES election, disjoint mean",
        "Yu et al., Language models are Super Mario (DARE), ICML 2024 (MergeLM DARE + ties_merging)",
        """DARE-TIES as the DARE authors' code (MergeLM): DARE's drop and rescale, then TIES on the dropped values:
        a magnitude trim keeping trim_density of them (MergeLM's 1 − param_value_mask_rate; Core Space's
        dare-ties), the sign election and the disjoint mean of `ties`. trim_density = 1 (the default) is PEFT's and
        mergekit's dare_ties, which do not trim. `density` is refused (PEFT's keep probability). Deviation: the
        trim keeps exactly int(trim_density·N) entries, where MergeLM's kthvalue threshold with ≥ keeps one more.""")
_preset("magnitude_prune", Recipe(Sparsify.MAGNITUDE, False), MagnitudeParams,
        "keep the top density fraction by magnitude, then task arithmetic",
        "Yadav et al., TIES-Merging, NeurIPS 2023 (trim-only ablation); PEFT magnitude_prune",
        """PEFT magnitude_prune: per task exactly the int(density·N) largest |x| (ties by position), then λ·Σ w·x.
        The TIES authors' trim (their kthvalue threshold with ≥) keeps int(density·N)+1.""")
_preset("breadcrumbs", Recipe(Sparsify.BAND, False), BreadcrumbsParams,
        "drop the top gamma fraction, keep the next int(density·N) entries (mergekit; rule=authors: per row), TA",
        "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024; mergekit breadcrumbs (magnitude_outliers)",
        """Breadcrumbs. rule=mergekit (default; mergekit sparsify.magnitude_outliers): per module or adapter, the
        int(gamma·N) largest |x| dropped and the next int(density·N) kept; where both exceed N fewer of the largest
        are dropped, so density 1 keeps everything. Deviation: with int(gamma·N) = 0 mergekit's slice keeps
        nothing; here the int(density·N) largest. rule=authors (Davari & Belilovsky's TaskVectorMiddleKeep): the
        same per row of each block, int(gamma·n) dropped and the next int(density·n) kept (all that remain when
        fewer do); in the full space the rows of the stored weight, so of ΔWᵀ for fan_in_fan_out adapters (GPT-2's
        Conv1D stores in×out), in knots/core the rows of the task blocks. Then λ·Σ w·x.""")
