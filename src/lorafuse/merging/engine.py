"""The merge engine: streams modules one at a time through a registered method and collects the fused adapter.

`merge()` is the Python API behind `lorafuse merge`; it returns a `MergeResult` with `.save(dir)`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafuse.adapters.config import targeted
from lorafuse.adapters.reader import LoraAdapter
from lorafuse.adapters.writer import (
    HEADS_DIR,
    adapter_state_dict,
    at_least_rank_one,
    fused_config,
    stored_rank,
    within_shape_rank,
    write_adapter_dir,
    write_adapter_files,
)
from lorafuse.atomic import check_writable
from lorafuse.errors import AdapterError, ConfigError, IncompatibleAdaptersError
from lorafuse.merging.algebra.dense import (
    ENERGY_RTOL,
    MAX_KRYLOV_BLOCKS,
    DenseUpdate,
    RangeStart,
    dense_truncated_svd,
    needs_exact,
    range_start,
    serial,
)
from lorafuse.merging.algebra.lowrank import CORE_DTYPE, LowRank, truncate
from lorafuse.merging.methods.elementwise import Sparsify
from lorafuse.merging.methods.primitives import Draws, dare_key
from lorafuse.merging.methods.registry import MergeMethod, MethodParams, get_method
from lorafuse.merging.methods.thresholds import StreamingQuantile, top_limits
from lorafuse.merging.spaces import (
    MERGE_BAND_ENTRIES,
    REFERENCE_TRIM_SCOPE,
    SAMPLE_ENTRIES,
    DenseRows,
    Projection,
    get_space,
)
from lorafuse.model.models import portable_name
from lorafuse.provenance import stamp
from lorafuse.validate import check_param_types, cut_name, finite_number, strict_bool, strict_int

# auto (the default): per_task when every adapter with modules_to_save is a lorafuse-trained classify adapter (its
# head belongs to its task), else error (a user must say what the heads mean)
MODULES_TO_SAVE_POLICIES = ("auto", "error", "per_task", "average", "drop")


@dataclass(frozen=True)
class MergeOptions:
    """Engine settings shared by every method."""

    rank: int | None = None  # output rank; None: each result's natural rank (dense results: min(Σr, m, n))
    space: str = "full"
    exact_svd: bool = False  # dense truncation by full SVD instead of randomized
    modules_to_save: str = "auto"
    dtype: torch.dtype | None = None  # output dtype; default: the adapters' dtype
    progress: bool = True
    rank_patterns: bool = False  # per-module ranks in rank_pattern instead of one zero-padded rank
    keep_exact: bool = False  # also hold each truncated module's exact result (MergeResult.exact)
    device: str = "cpu"  # where each module's work runs (streamed one module at a time; results come back to the CPU)


@dataclass
class MergeResult:
    """A fused adapter held as factors (scaling 1), ready to save in PEFT's format."""

    modules: dict[str, LowRank]
    config: dict[str, Any]
    provenance: dict[str, Any]
    dtype: torch.dtype
    embeddings: set[str] = field(default_factory=set)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    extra_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # with keep_exact: each truncated module's result before the cut (a DenseUpdate or the full LowRank)
    exact: dict[str, LowRank | DenseUpdate] = field(default_factory=dict)

    def delta(self, module: str) -> torch.Tensor:
        """The fused dense update of one module (out×in), as saved."""
        return self.modules[module].dense()

    def exact_modules(self) -> dict[str, LowRank | DenseUpdate]:
        """Every module's update before any truncation (the method's exact result, where `keep_exact` held
        it; elsewhere nothing was cut and the saved factors are exact)."""
        return {m: self.exact.get(m, u) for m, u in self.modules.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = adapter_state_dict(self.modules, self.embeddings, self.dtype, stored_rank(self.config))
        state.update(self.extra_state)
        return state

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        check_writable(path, self.nbytes())
        # padded to the config's one rank and cast one tensor at a time while writing
        lora = adapter_state_dict(self.modules, self.embeddings, rank=stored_rank(self.config))
        dtypes = dict.fromkeys(lora, self.dtype)
        return write_adapter_dir(path, {**lora, **self.extra_state}, self.config, self.provenance, self.heads,
                                 overwrite, dtypes)

    def write_files(self, directory: Path) -> None:
        """The files of `save`, into an existing (temporary) directory (for outputs committed together)."""
        lora = adapter_state_dict(self.modules, self.embeddings, rank=stored_rank(self.config))
        write_adapter_files(directory, {**lora, **self.extra_state}, self.config, self.provenance, self.heads,
                            dict.fromkeys(lora, self.dtype))

    def nbytes(self) -> int:
        """The size of the saved tensors (factors in the output dtype, heads, extra state)."""
        rank = stored_rank(self.config)  # modules are stored zero-padded to the config's one rank
        factors = sum((u.A.shape[1] + u.B.shape[0]) * max(rank or 0, u.A.shape[0]) * self.dtype.itemsize
                      for u in self.modules.values())
        tensors = [*self.extra_state.values(), *(t for head in self.heads.values() for t in head.values())]
        return factors + sum(t.numel() * t.element_size() for t in tensors)


# -- loading and checks ------------------------------------------------------------------------------------
def load_adapters(
    sources: Sequence[str | Path | LoraAdapter], names: Sequence[str] | None = None, allow_bin: bool = False
) -> list[LoraAdapter]:
    if isinstance(sources, (str, bytes, Path)) or not isinstance(sources, Sequence):
        raise ConfigError(f"adapters: expected a list of adapter directories or Hub ids, got {sources!r}")
    if not sources:
        raise ConfigError("no adapters given")
    if names is not None and (isinstance(names, (str, bytes)) or not isinstance(names, Sequence)):
        raise ConfigError(f"names: expected a list of names, got {names!r}")
    if names is not None and len(names) != len(sources):
        raise ConfigError(f"{len(names)} names for {len(sources)} adapters")
    adapters = [
        s if isinstance(s, LoraAdapter) else LoraAdapter(s, name=names[i] if names else None, allow_bin=allow_bin)
        for i, s in enumerate(sources)
    ]
    for adapter in adapters:
        adapter.check_dtypes()
    _make_names_unique(adapters)
    return adapters


def _make_names_unique(adapters: list[LoraAdapter]) -> None:
    """`x`, `x-2`, `x-3`, ...; cut to leave room for the suffix, so each stays a plain name (it names a file)."""
    seen: dict[str, int] = {}
    for adapter in adapters:
        count = seen.get(adapter.name, 0)
        seen[adapter.name] = count + 1
        if count:
            suffix = f"-{count + 1}"
            adapter.name = cut_name(adapter.name, room=len(suffix)) + suffix


def check_compatible(adapters: Sequence[LoraAdapter], base_model: str | None = None) -> list[str]:
    """All adapters must share base model, orientation and module shapes; returns the union of modules."""
    first = adapters[0]
    for adapter in adapters[1:]:
        if adapter.settings.fan_in_fan_out != first.settings.fan_in_fan_out:  # a value: False differs from True
            raise IncompatibleAdaptersError(
                f"{adapter.path}: fan_in_fan_out {adapter.settings.fan_in_fan_out} differs from "
                f"{first.settings.fan_in_fan_out} of {first.path}")
        for attr, label in (("base_model", "base model"), ("task_type", "task_type")):
            mine, theirs = getattr(first.settings, attr), getattr(adapter.settings, attr)
            # an unnamed base or task type matches any; base models compare as models (a path recorded by its final
            # name, a short name, a Hub id and a local copy of one embedded model are the same)
            same = _same_model(mine, theirs) if attr == "base_model" and mine and theirs else mine == theirs
            if mine and theirs and not same:
                raise IncompatibleAdaptersError(
                    f"{adapter.path}: {label} '{theirs}' differs from '{mine}' of {first.path}")
    if base_model and first.settings.base_model and not _same_model(base_model, first.settings.base_model):
        raise IncompatibleAdaptersError(
            f"base_model '{base_model}' differs from the adapters' '{first.settings.base_model}'")
    shapes: dict[str, tuple[tuple[int, int], LoraAdapter]] = {}
    for adapter in adapters:
        for module in adapter.modules:
            shape = adapter.module_shape(module)
            if module in shapes and shapes[module][0] != shape:
                other = shapes[module][1]
                raise IncompatibleAdaptersError(
                    f"module '{module}': shape {shape} in {adapter.path} but {shapes[module][0]} in {other.path} "
                    "(adapters of different base models?)")
            shapes.setdefault(module, (shape, adapter))
    return sorted(shapes, key=_natural_key)


def _same_model(a: str, b: str) -> bool:
    from lorafuse.model.models import (
        same_model,  # short name, Hub id and local copy of an embedded model are one
    )

    return same_model(a, b)


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


# -- the engine ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dense:
    """A module's merged update as a full matrix, with the inputs' row space (stacked A's) that seeds its
    truncation (see algebra.dense)."""

    matrix: torch.Tensor
    row_space: torch.Tensor | None = None
    start: RangeStart | None = None  # the range finder's test block and matrix·block, formed with the matrix


class _ModuleStream:
    """Reads one module's updates across adapters; a missing module is an exact zero of rank 0."""

    def __init__(self, adapters: Sequence[LoraAdapter], shapes: dict[str, tuple[int, int]],
                 device: str = "cpu") -> None:
        self.adapters = adapters
        self.shapes = shapes
        self.device = torch.device(device)

    def terms(self, module: str) -> list[LowRank]:
        m, n = self.shapes[module]
        terms = [a.update(module) if module in a.modules else LowRank(torch.zeros(m, 0), torch.zeros(0, n))
                 for a in self.adapters]
        if self.device.type == "cpu":
            return terms
        return [LowRank(t.B.to(self.device), t.A.to(self.device)) for t in terms]


def _generators(seed: int, names: Sequence[str], module: str) -> Draws:
    """DARE's counter-based draws of one module, a key per (adapter name, module): its drops depend on neither the
    adapters' order nor the modules' (see primitives.Draws)."""
    return Draws(tuple(dare_key(seed, n, module) for n in names))


class _Thresholds:
    """Per-task trim thresholds for element-wise methods, per module or global over the adapter. `generators`
    gives a module's DARE draws: DARE-TIES trims the dropped values, so its thresholds are taken on the very draws
    the merge makes."""

    def __init__(self, method: MergeMethod, params: MethodParams, densities: list[float], scope: str,
                 generators: Callable[[str], Draws], compiled: bool = False) -> None:
        from lorafuse.merging.methods.elementwise import keep_rule

        self.recipe = method.fn.recipe  # type: ignore[attr-defined]
        self.params = params
        self.rules = [keep_rule(params, self.recipe, d) for d in densities]
        self.width = max((len(r(1)) for r in self.rules if r), default=0)  # thresholds per task
        self.global_scope = scope == "global" and any(self.rules)
        self.generators = generators
        self.fixed: torch.Tensor | None = None
        # the compiled full-space path: thresholds by kernels.count_band, and each row's share of the tie budgets
        # per module ([T, m]), so that the merge's bands need no order
        self.compiled = compiled
        self.budgets: dict[str, np.ndarray] = {}

    def _input(self, module: str, blocks: torch.Tensor) -> torch.Tensor:
        from lorafuse.merging.methods.elementwise import threshold_input

        return threshold_input(blocks, self.recipe, self.params, self.generators(module))

    def fit_global(self, projections: Any) -> None:
        """Two streaming passes over all modules' blocks (`projections` yields (module, projection) pairs)."""
        quantiles = [StreamingQuantile(r or (lambda _: [])) for r in self.rules]
        for module, proj in projections("global trim: histogram"):
            for q, block in zip(quantiles, self._input(module, proj.blocks)):
                q.observe(block)
        for q in quantiles:
            q.plan()
        for module, proj in projections("global trim: threshold"):
            for q, block in zip(quantiles, self._input(module, proj.blocks)):
                q.gather(block)
        self.fixed = self._table([q.limits() for q in quantiles])

    def _table(self, per_task: list[list[tuple[float, int]]]) -> torch.Tensor:
        """[T, width, 2]: per task and count its (τ, ties) limit. One table serves one trim scope: its tie budgets
        are consumed as the scope's chunks are masked (bands in row order; modules in self.modules order, the
        order of the global passes), so ties are kept by position (see primitives.top_mask)."""
        return torch.tensor([list(v) + [(0.0, 0)] * (self.width - len(v)) for v in per_task], dtype=torch.float64
                            ).reshape(len(per_task), self.width, 2)

    def for_module(self, module: str, blocks: torch.Tensor) -> torch.Tensor:
        from lorafuse.merging.methods.primitives import top_limit

        if self.fixed is not None or not any(self.rules):
            return self.fixed if self.fixed is not None else self._table([[] for _ in self.rules])
        values = self._input(module, blocks)
        return self._table([[top_limit(b, k) for k in rule(b.numel())] if rule else []
                            for b, rule in zip(values, self.rules)])

    def for_rows(self, module: str, rows: DenseRows) -> torch.Tensor:
        """Per-module thresholds of a full-space module produced in bands (exact, one pass per task)."""
        if self.fixed is not None:
            return self.fixed
        return self._fit_rows([module], lambda _: rows, [rows.shape[0] * rows.shape[1]])

    def fit_global_rows(self, modules: list[str], rows_of: Callable[[str], DenseRows], sizes: list[int]) -> None:
        """The global thresholds of the full space, streamed: per task one counting pass over every module's
        bands (in the merge's module order), bracketed by a sample spread over the modules in proportion to
        their sizes; a module's updates are formed only while it is read (`rows_of`), and no module's T dense
        updates are ever stacked."""
        self.fixed = self._fit_rows(modules, rows_of, sizes)

    def row_budgets(self, module: str, rows: int) -> np.ndarray:
        """[T, rows]: how many entries tied at τ each row of the module keeps (compiled path; zeros where none)."""
        budgets = self.budgets.get(module)
        return np.zeros((len(self.rules), rows), np.int64) if budgets is None or budgets.shape[1] != rows else budgets

    def _fit_rows(self, modules: list[str], rows_of: Callable[[str], DenseRows], sizes: list[int]) -> torch.Tensor:
        if self.compiled:
            return self._fit_rows_compiled(modules, rows_of, sizes)
        total = sum(sizes)
        counts = [max(1, round(SAMPLE_ENTRIES * size / total)) for size in sizes]  # a stratified sample

        def task_limits(t: int) -> list[tuple[float, int]]:
            rule = self.rules[t]
            if not rule:
                return []
            sample = torch.cat([self._task_sample(t, rows_of(m), c) for m, c in zip(modules, counts)])
            values = lambda: (v for m in modules for v in self._task_values(t, m, rows_of(m)))  # noqa: E731
            # strict: limits without a tie budget where nothing ties at τ, so bands can be masked in parallel
            return top_limits(values, total, rule, sample, strict=True)

        # Tasks are independent, and the counting pass is numpy (one core, GIL released): one thread per core.
        return self._table(list(_pool().map(task_limits, range(len(self.rules)))))

    def _fit_rows_compiled(self, modules: list[str], rows_of: Callable[[str], DenseRows], sizes: list[int]
                           ) -> torch.Tensor:
        """`_fit_rows` by the compiled counting pass (thresholds.count_pass): every task in one pass over each band
        of every module, the rows' tie budgets kept in self.budgets."""
        from lorafuse.merging.methods.thresholds import Band, count_pass

        if not any(self.rules):
            return self._table([[] for _ in self.rules])
        total = sum(sizes)
        counts = [max(1, round(SAMPLE_ENTRIES * size / total)) for size in sizes]  # a stratified sample
        ks = [rule(total)[0] if rule else 0 for rule in self.rules]  # one count each: magnitude trims
        drop = self._drop()

        def samples(t: int) -> torch.Tensor:
            return torch.cat([self._task_sample(t, rows_of(m), c) for m, c in zip(modules, counts)])

        heights: dict[str, int] = {}  # rows per module, in the bands' order

        def bands() -> Iterator[Band]:
            for module in modules:
                rows = rows_of(module)
                heights[module] = rows.shape[0]
                keys = np.array(self.generators(module).keys if drop else (), np.uint64)
                for start, _, x in rows.stacked_bands(COMPILED_BAND_ENTRIES):
                    yield Band(x.numpy(), start * rows.shape[1], keys)

        limits, budgets = count_pass(bands, total, ks, samples, drop, torch.get_num_threads())
        first = 0
        for module, m in heights.items():  # empty where no task needed a pass (no budgets then)
            self.budgets[module] = budgets[:, first:first + m]
            first += m
        return self._table([[limit] for limit in limits])

    def _drop(self) -> Any:
        """DARE-TIES's drop before its trim, for the compiled counting pass (None for a plain trim)."""
        from lorafuse.merging.methods.primitives import keep_threshold
        from lorafuse.merging.methods.thresholds import Drop

        if not self.recipe.trim_after_drop:
            return None
        keep = 1.0 - self.params.drop_rate  # type: ignore[attr-defined]
        return Drop(keep_threshold(keep), 1.0 / keep if self.params.rescale else 1.0)  # type: ignore[attr-defined]

    @staticmethod
    def _compiled_sample(t: int, rows: DenseRows, count: int) -> torch.Tensor:
        """`rows.task_sample` by a compiled loop (kernels.sample_dots): no gathered copies of B's and Aᵀ's rows."""
        from lorafuse.merging.methods import kernels

        at, cols = rows.sample_positions(count=count)
        return torch.from_numpy(kernels.sample_dots(rows.B[t].contiguous().numpy(),
                                                    rows.A[t].T.contiguous().numpy(), at.numpy(), cols.numpy()))

    def _task_values(self, t: int, module: str, rows: DenseRows) -> Iterator[torch.Tensor]:
        """Task t's values of one module band by band: ΔW_t, or for DARE-TIES's trim its dropped values (the
        generator is counter-based: the same draws as the merge's, band by band)."""
        if not self.recipe.trim_after_drop:
            return rows.task_values(t)
        from lorafuse.merging.methods.elementwise import drop

        draws, n = self.generators(module).task(t), rows.shape[1]
        return (drop(band.unsqueeze(0), self.params, draws.at(start * n))[0]
                for band, (start, _) in zip(rows.task_values(t), rows.bands()))

    def _task_sample(self, t: int, rows: DenseRows, count: int) -> torch.Tensor:
        sample = self._compiled_sample(t, rows, count) if self.compiled else rows.task_sample(t, count=count)
        if not self.recipe.trim_after_drop:
            return sample
        from lorafuse.merging.methods.elementwise import drop

        # only brackets the threshold (exactness does not depend on it): an independent drop of the sample
        return drop(sample.unsqueeze(0), self.params, Draws((t,)))[0]


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="lorafuse-trim")


# one task's entries per band of the compiled path (16 MB for 4 tasks, in L3): each parallel launch wakes numba's
# pool, which on a busy machine costs a scheduler wake-up, so fewer, larger bands (the GEMMs gain a little too)
COMPILED_BAND_ENTRIES = 1 << 20


def merge(
    adapters: Sequence[str | Path | LoraAdapter],
    method: str = "task_arithmetic",
    *,
    weights: Sequence[float] | None = None,
    densities: Sequence[float | None] | None = None,
    names: Sequence[str] | None = None,
    base_model: str | None = None,
    rank: int | None = None,
    space: str = "full",
    exact_svd: bool = False,
    modules_to_save: str = "auto",
    dtype: torch.dtype | str | None = None,
    allow_bin: bool = False,
    progress: bool = True,
    rank_patterns: bool = False,
    keep_exact: bool = False,
    device: str | None = None,
    **params: Any,
) -> MergeResult:
    """Fuse LoRA adapters with a registered method. `params` are the method's own (lambda, density, ...).
    The saved adapter stores every module at one rank (zero-padded, no rank_pattern) unless `rank_patterns`.
    `keep_exact` also holds each truncated module's exact result in memory (`MergeResult.exact_modules`: what an
    experiment evaluates; dense element-wise results cost one m×n matrix a module). `device`: where each module's
    work runs (default: the GPU when there is one, as evaluation, see lorafuse.models.default_device); modules are
    streamed to it one at a time and the results come back to the CPU."""
    spec = get_method(method)
    check_param_types(spec, params, f"method '{spec.name}'")
    parsed = spec.parse_params(params)
    rank = None if rank is None else strict_int(rank, "rank", minimum=1)
    exact_svd = strict_bool(exact_svd, "exact_svd")
    for value, field_name in ((space, "space"), (modules_to_save, "modules_to_save")):
        if not isinstance(value, str):
            raise ConfigError(f"{field_name}: expected a string, got {value!r}")
    loaded = load_adapters(adapters, names, allow_bin)
    options = MergeOptions(rank, space, exact_svd, modules_to_save, _as_dtype(dtype) or loaded[0].dtype(), progress,
                           rank_patterns, strict_bool(keep_exact, "keep_exact"), _device(device))
    _check_per_adapter(spec, parsed, weights, densities)
    weights = _per_adapter(weights, loaded, "weights", 1.0)
    densities = _per_adapter(densities, loaded, "densities", getattr(parsed, "density", 1.0))
    _check_options(spec, options, densities)
    modules = check_compatible(loaded, base_model)
    engine = _Engine(spec, parsed, loaded, modules, weights, densities, options)
    return engine.run()


def _device(device: str | None) -> str:
    from lorafuse.model.models import default_device

    if device is not None and not isinstance(device, str):
        raise ConfigError(f"device: expected a string (cpu, cuda, cuda:1), got {device!r}")
    return default_device(device)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if not isinstance(dtype, str) or dtype not in names:
        raise ConfigError(f"unknown dtype '{dtype}' (valid: {', '.join(names)})")
    return names[dtype]


def _per_adapter(values: Sequence[Any] | None, adapters: list[LoraAdapter], field_name: str,
                 default: float) -> list[float]:
    if values is None:
        return [float(default)] * len(adapters)
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):  # lists, tuples, arrays
        raise ConfigError(f"{field_name}: expected a list of numbers, got {values!r}")
    if len(values) != len(adapters):
        raise ConfigError(f"{field_name}: {len(values)} values for {len(adapters)} adapters")
    return [float(default) if v is None else finite_number(v, f"{field_name} of {a.source}")
            for v, a in zip(values, adapters)]


def _check_per_adapter(spec: MergeMethod, params: MethodParams, weights: Sequence[float] | None,
                       densities: Sequence[float | None] | None) -> None:
    """Refuse per-adapter values a method would ignore."""
    if not spec.uses_weights and weights is not None and any(w is not None and float(w) != 1.0 for w in weights):
        raise ConfigError(f"method '{spec.name}' takes no weights (it is the plain mean); for a weighted mean use "
                          "'linear' with normalize: true")
    if densities is not None and any(d is not None for d in densities) and "density" not in type(params).model_fields:
        hint = params.REFUSED.get("density", "it has no density parameter")
        raise ConfigError(f"method '{spec.name}' takes no per-adapter densities: {hint}")
    if spec.kind == "module" and densities is not None and any(
            d is not None and float(d) != getattr(params, "density", None) for d in densities):
        raise ConfigError(f"method '{spec.name}' takes one density for all adapters (its `density` parameter)")
    if getattr(params, "rule", None) == "authors" and densities is not None and any(
            d is not None and float(d) != params.density for d in densities):  # type: ignore[attr-defined]
        raise ConfigError(f"method '{spec.name}': rule 'authors' takes one density for all adapters")
    if getattr(params, "rule", None) == "authors" and getattr(params, "trim_scope", None) == "global":
        raise ConfigError(f"method '{spec.name}': rule 'authors' thresholds each row, so trim_scope 'global' does "
                          "not apply (use rule 'mergekit' for a global band)")


def _check_options(spec: MergeMethod, options: MergeOptions, densities: list[float]) -> None:
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise ConfigError(f"density {d} is outside (0, 1]")
    if options.rank is not None and options.rank < 1:
        raise ConfigError(f"rank must be ≥ 1 (got {options.rank})")
    if options.modules_to_save not in MODULES_TO_SAVE_POLICIES:
        raise ConfigError(f"modules_to_save: '{options.modules_to_save}' is not one of "
                          f"{', '.join(MODULES_TO_SAVE_POLICIES)}")
    get_space(options.space)
    spec.check_space(options.space)


class _Bands:
    """One full-space module's merge band by band: each band of rows.bands() is formed and merged in sub-bands of
    MERGE_BAND_ENTRIES per task (the T blocks, their masks and the sums stay in cache through the ~20 element-wise
    passes), written into the m×n result, and multiplied by the range finder's test block Ω while in cache (per
    band of rows.bands(): the same GEMMs, so the same product, whatever the sub-bands)."""

    def __init__(self, rows: DenseRows, kernel: Callable[..., torch.Tensor], generators: Draws,
                 omega: torch.Tensor | None) -> None:
        self.rows, self.kernel, self.generators, self.omega = rows, kernel, generators, omega
        self.sub = max(1, MERGE_BAND_ENTRIES // max(1, rows.shape[1]))
        self.merged = torch.empty(rows.shape, device=rows.device)
        self.product = None if omega is None else torch.empty(rows.shape[0], omega.shape[1], device=rows.device)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A sub-band's T blocks and a scratch of their shape (one pair per thread)."""
        blocks = torch.empty(len(self.rows), min(self.sub, self.rows.shape[0]), self.rows.shape[1],
                             device=self.rows.device)
        return blocks, torch.empty_like(blocks)

    def run(self, bands: Iterable[tuple[int, int]], buffers: tuple[torch.Tensor, torch.Tensor],
            draws: Draws | None = None, multiply: bool = True) -> None:
        blocks, scratch = buffers
        draws = self.generators if draws is None else draws
        n = self.rows.shape[1]
        for start, stop in bands:
            for first in range(start, stop, self.sub):
                last = min(first + self.sub, stop)
                x, mask = blocks[:, : last - first], scratch[:, : last - first]
                for t in range(len(self.rows)):
                    self.rows.task_band(t, first, last, x[t])
                self.kernel(x, draws.at(first * n), self.merged[first:last], mask)
            if multiply:  # the range finder's first pass, while the band is in cache
                self.multiply(start, stop)

    def multiply(self, start: int, stop: int) -> None:
        if self.omega is not None:
            torch.matmul(self.merged[start:stop], self.omega, out=self.product[start:stop])

    def run_parallel(self, workers: int) -> None:
        """The bands shared out to `workers` threads as they finish (torch and numpy release the GIL); each thread
        draws its DARE masks itself (the mask pool is not used from inside another pool's threads). The product
        with Ω is left to the caller (`multiply`)."""
        queue = iter(self.rows.bands())
        lock = threading.Lock()

        def next_band() -> Iterator[tuple[int, int]]:
            while True:
                with lock:
                    band = next(queue, None)
                if band is None:
                    return
                yield band

        def work(_: int) -> None:
            self.run(next_band(), self.buffers(), self.generators.in_thread(), multiply=False)

        list(_band_pool(workers).map(work, range(workers)))


@functools.cache
def _band_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorafuse-bands")


class _Engine:
    def __init__(self, spec: MergeMethod, params: MethodParams, adapters: list[LoraAdapter], modules: list[str],
                 weights: list[float], densities: list[float], options: MergeOptions) -> None:
        self.spec, self.params, self.adapters, self.modules = spec, params, adapters, modules
        self.weights, self.densities, self.options = weights, densities, options
        shapes = {m: next(a.module_shape(m) for a in adapters if m in a.modules) for m in modules}
        self.stream = _ModuleStream(adapters, shapes, options.device)
        self.device = torch.device(options.device)
        self.names = [a.name for a in adapters]
        self.trim_scope = _trim_scope(params, options.space)
        self.energy: dict[str, float] = {}
        self.exact: dict[str, LowRank | DenseUpdate] = {}
        for adapter in adapters:  # the provenance's hashes, computed beside the merge
            adapter.start_hashing()

    def run(self) -> MergeResult:
        heads, extra = self._modules_to_save()  # first: small, and its errors need no merge to be found
        merged = {m: at_least_rank_one(within_shape_rank(u)) for m, u in self._merge_all().items()}
        _check_finite(merged, self.options.dtype)
        return MergeResult(
            modules=merged,
            config=self._config(merged, extra),
            provenance=self._provenance(merged),
            dtype=self.options.dtype,
            embeddings={m for m in merged if any(m in a.modules and a.modules[m].embedding for a in self.adapters)},
            heads=heads,
            extra_state=extra,
            exact=self.exact,
        )

    def _progress(self, items: Sequence[str], desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="module", disable=not self.options.progress, leave=False)

    def _merge_all(self) -> dict[str, LowRank]:
        if self.spec.kind == "module":
            return {m: self._finish(m, self._module_update(m))
                    for m in self._progress(self.modules, f"merge ({self.spec.name})")}
        thresholds = _Thresholds(self.spec, self.params, self.densities, self.trim_scope, self._generators,
                                 compiled=self._compiled())
        if thresholds.global_scope and self.options.space == "full":
            thresholds.fit_global_rows(self.modules, self._rows, [m * n for m, n in map(self.stream.shapes.get,
                                                                                         self.modules)])
        elif thresholds.global_scope:
            thresholds.fit_global(lambda desc: ((m, self._project(m)) for m in self._progress(self.modules, desc)))
            thresholds.fixed = thresholds.fixed.to(self.device)  # one table: its tie budgets are consumed in place
        return {m: self._finish(m, self._elementwise_update(m, thresholds))
                for m in self._progress(self.modules, f"merge ({self.spec.name}, {self.options.space} space)")}

    def _generators(self, module: str) -> Draws:
        return _generators(getattr(self.params, "seed", 0), self.names, module)

    def _module_update(self, module: str) -> LowRank | torch.Tensor:
        terms = self.stream.terms(module)
        # methods whose result a later cut would make arbitrary (a flat spectrum) take the rank as their budget
        extra: dict[str, Any] = {"rank": self.options.rank} if self.spec.takes_rank else {}
        if self.spec.takes_generators:  # seeded per adapter name and module: independent of the adapters' order
            extra["generators"] = self._generators(module)
        if self.options.space == "core":  # the method sees each update as its (Σr)×(Σr) core
            from lorafuse.merging.aligned import from_core, to_core

            # float64 bases: a spectral method's ranks see the inputs' rounding only (a cancelling sum is 0)
            cores, UB, VA = to_core(terms, CORE_DTYPE)
            return from_core(self.spec.fn(cores, self.weights, self.params, **extra), UB, VA)
        return self.spec.fn(terms, self.weights, self.params, **extra)

    def _project(self, module: str) -> Projection:
        return get_space(self.options.space)(self.stream.terms(module))

    def _elementwise_update(self, module: str, thresholds: _Thresholds) -> LowRank | _Dense:
        if self.options.space == "full":
            return self._elementwise_full(module, thresholds)
        proj = self._project(module)
        blocks = proj.blocks.float()
        merged = self.spec.fn(blocks, torch.tensor(self.weights, dtype=blocks.dtype, device=blocks.device),
                              thresholds.for_module(module, blocks).to(blocks.device), self.params,
                              self._generators(module))
        return proj.rebuild(merged)

    def _rows(self, module: str, terms: Sequence[LowRank] | None = None) -> DenseRows:
        """A full-space module's T dense updates, produced band by band (ΔWᵀ in the stored layout)."""
        terms = self.stream.terms(module) if terms is None else terms
        return DenseRows([LowRank(t.A.T, t.B.T) for t in terms] if self._stored_layout() else terms)

    def _compiled(self) -> bool:
        """Whether the full space's element-wise merge runs the compiled kernels (methods/kernels.py): on the CPU,
        for magnitude trims and DARE's drop, where numba is installed; else the torch path (the same bits)."""
        from lorafuse.merging.methods.elementwise import compiled_kernels
        from lorafuse.merging.methods.thresholds import count_on_device

        return (self.options.space == "full" and self.device.type == "cpu" and not self._stored_layout()
                and self.spec.fn.recipe.sparsify in (Sparsify.MAGNITUDE, Sparsify.RANDOM)  # type: ignore[attr-defined]
                and not count_on_device(torch.empty(0)) and compiled_kernels())

    def _elementwise_compiled(self, module: str, thresholds: _Thresholds) -> _Dense:
        """`_elementwise_full` by the compiled kernels: each band of rows formed by the GEMMs (the engine's
        threads) and merged in one parallel pass (kernels.merge_band); every row knows its tie budget, so no band
        waits for another."""
        from lorafuse.merging.methods.elementwise import CompiledKernel

        terms = self.stream.terms(module)
        rows = self._rows(module, terms)
        limits = thresholds.for_rows(module, rows)
        budgets = thresholds.row_budgets(module, rows.shape[0])
        row_space = torch.cat([t.A for t in terms]).float()
        omega = self._range_start(module, rows.shape, row_space)
        weights = torch.tensor(self.weights, dtype=torch.float32)
        kernel = CompiledKernel(self.spec.fn.recipe, self.params, weights, limits,  # type: ignore[attr-defined]
                                self._generators(module).keys)
        merged = torch.empty(rows.shape)
        threads, n = torch.get_num_threads(), rows.shape[1]
        for start, stop, x in rows.stacked_bands(COMPILED_BAND_ENTRIES):
            kernel(x.numpy(), merged[start:stop].numpy(), start * n, budgets[:, start:stop], threads)
        if omega is None:
            return _Dense(merged, row_space)
        product = torch.empty(rows.shape[0], omega.shape[1])
        # MKL's sums depend on its thread count: band by band on the torch path's threads (one where it draws
        # masks), so the truncation and the saved factors are its bits
        with serial() if kernel.drops else contextlib.nullcontext():
            for start, stop in rows.bands():
                torch.matmul(merged[start:stop], omega, out=product[start:stop])
        return _Dense(merged, row_space, RangeStart(omega, product))

    def _elementwise_full(self, module: str, thresholds: _Thresholds) -> _Dense:
        """The full space a band of rows at a time: the same entries as the stacked dense blocks (element-wise
        methods are separable once thresholds are known; DARE's generator is counter-based, so its masks are those of
        one draw over the whole module), in memory of one m×n result plus a band per thread."""
        if thresholds.compiled:
            return self._elementwise_compiled(module, thresholds)
        terms = self.stream.terms(module)
        stored = self._stored_layout()
        rows = self._rows(module, terms)
        limits = thresholds.for_rows(module, rows).to(self.device)
        row_space = torch.cat([t.A for t in terms]).float()
        omega = None if stored else self._range_start(module, rows.shape, row_space)
        weights = torch.tensor(self.weights, dtype=torch.float32, device=self.device)
        kernel = self.spec.fn.band_kernel(weights, limits, self.params)  # type: ignore[attr-defined]
        bands = _Bands(rows, kernel, self._generators(module), omega)
        workers = torch.get_num_threads()
        # Bands are independent where no tie budget is left to consume in position order (strict limits: the
        # usual case): one band per thread, torch on one thread each. Else in row order, as one table's ties need;
        # there DARE's masks are numpy on the mask pool's threads, and OpenMP's idle worker, spinning between torch's
        # parallel regions, takes the core those threads need (5x slower on the shared 2-core machine): torch
        # runs on one thread there, the masks on all.
        independent = self.device.type == "cpu" and workers > 1 and not bool(limits[..., 1].gt(0).any())
        drawing = self.spec.fn.recipe.sparsify is Sparsify.RANDOM and self.device.type == "cpu"  # type: ignore[attr-defined]
        if independent:
            with serial():
                bands.run_parallel(workers)
            # MKL's sums depend on its thread count: the product is formed band by band on as many threads as the
            # sequential merge uses (one where it draws masks), so the truncation, and the saved factors, are bit
            # for bit those of a sequential merge
            with serial() if drawing else contextlib.nullcontext():
                for start, stop in rows.bands():
                    bands.multiply(start, stop)
        else:
            with serial() if drawing else contextlib.nullcontext():
                bands.run(rows.bands(), bands.buffers())
        start = None if omega is None else RangeStart(omega, bands.product)
        return _Dense(bands.merged.T.contiguous() if stored else bands.merged, row_space, start)

    def _cut_rank(self, module: str, shape: tuple[int, ...]) -> int:
        """The rank a dense result is cut to: `rank`, else min(Σr, m, n)."""
        return self.options.rank or max(1, min(self._input_rank(module), *shape))

    def _range_start(self, module: str, shape: tuple[int, ...], row_space: torch.Tensor) -> torch.Tensor | None:
        """The test block of the dense truncation's range finder, where it will run (not an exact SVD)."""
        rank = self._cut_rank(module, shape)
        if self.options.exact_svd or needs_exact(shape, rank, row_space=row_space):
            return None
        return range_start(shape, rank, seed=zlib.crc32(module.encode()), row_space=row_space, device=self.device)

    def _stored_layout(self) -> bool:
        """Whether the full space must run on the stored weights' layout ΔWᵀ (in×out) instead of ΔW: a per-row rule
        (Breadcrumbs' rule=authors) on fan_in_fan_out adapters (GPT-2's Conv1D stores W as in×out, so the authors'
        rows of the weight are columns of ΔW = B·A)."""
        return getattr(self.params, "rule", None) == "authors" and self.adapters[0].settings.fan_in_fan_out

    def _finish(self, module: str, update: LowRank | torch.Tensor | _Dense) -> LowRank:
        """Bring a module's result to the output rank, recording the energy kept where it was truncated.

        Without a rank nothing low-rank is cut: a result keeps its natural rank (≤ Σr, e.g. KnOTS's k, Core Space's
        R, Iso-C's numerical rank). A dense result (element-wise methods in the full space) is full rank and
        comes back at min(Σr, m, n), the rank of its inputs together."""
        out = self._finish_on_device(module, update)
        return out if out.B.device.type == "cpu" else LowRank(out.B.cpu(), out.A.cpu())

    def _finish_on_device(self, module: str, update: LowRank | torch.Tensor | _Dense) -> LowRank:
        rank = self.options.rank
        if isinstance(update, torch.Tensor):
            update = _Dense(update)
        if isinstance(update, _Dense):
            out, kept = dense_truncated_svd(update.matrix, self._cut_rank(module, update.matrix.shape),
                                            exact=self.options.exact_svd, seed=zlib.crc32(module.encode()),
                                            row_space=update.row_space, start=update.start)
            self.energy[module] = kept
            if self.options.keep_exact:
                self.exact[module] = DenseUpdate(update.matrix.cpu())
            return out
        if rank is None:  # only numerically zero directions go (e.g. rows of a KnOTS block that TIES zeroed)
            return update if self.spec.exact else truncate(update, None)[0]
        out, kept = truncate(update, rank)
        self.energy[module] = kept
        if self.options.keep_exact and kept < 1.0:
            self.exact[module] = update if update.B.device.type == "cpu" else LowRank(update.B.cpu(), update.A.cpu())
        return out

    def _input_rank(self, module: str) -> int:
        """Σr of a module over the adapters that have it."""
        return sum(a.module_rank(module) for a in self.adapters if module in a.modules)

    def _modules_to_save(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        with_extra = [a for a in self.adapters if a.extra_keys]
        policy = self.heads_policy = _heads_policy(self.options.modules_to_save, with_extra)
        if not with_extra or policy == "drop":
            return {}, {}
        if policy == "error":
            raise ConfigError(
                f"{with_extra[0].path}: adapter has modules_to_save ({', '.join(with_extra[0].settings.modules_to_save)}"
                "), and it is not a lorafuse-trained classify adapter; choose what to do with them: modules_to_save = "
                f"per_task (keep each adapter's, in {HEADS_DIR}/), average, or drop")
        per_task = {a.name: {k: _checked_head(a, k) for k in a.extra_keys} for a in with_extra}
        if policy == "per_task":
            # PEFT's SEQ_CLS/TOKEN_CLS loading requires the head in the adapter file: the first task's is stored
            # there too (the model card says so), every task's in task_heads/.
            return per_task, dict(next(iter(per_task.values())))
        return {}, _average_tensors(per_task, with_extra)

    def _config(self, merged: dict[str, LowRank], extra: dict[str, torch.Tensor]) -> dict[str, Any]:
        first = self.adapters[0]
        same_modules = all(set(a.modules) == set(first.modules) for a in self.adapters)
        targets = first.settings.raw.get("target_modules") if same_modules else None
        if not isinstance(targets, (list, str)) or not all(targeted(targets, m) for m in merged):
            targets = list(merged)  # PEFT loads only the modules target_modules names: it must name every one
        saved = sorted({m for a in self.adapters for m in a.settings.modules_to_save}) if extra else None
        return fused_config(first.settings.raw, {m: u.rank for m, u in merged.items()}, targets, saved,
                            self.options.rank_patterns)

    def _truncation_rule(self) -> str | None:
        """How dense results (element-wise methods in the full space) were brought back to low rank."""
        if self.spec.kind != "elementwise" or self.options.space != "full":
            return None
        if self.options.exact_svd:
            return "exact SVD"
        return (f"best rank-k by a block Krylov range finder from the inputs' row space, blocks of width 2k + 8, "
                f"until the kept energy converges to {ENERGY_RTOL:g} (at most {MAX_KRYLOV_BLOCKS} blocks); exact SVD "
                "when the rank is near full")

    def _provenance(self, merged: dict[str, LowRank]) -> dict[str, Any]:
        energies = list(self.energy.values())
        return {
            "tool": "lorafuse merge",
            "method": {"name": self.spec.name, "paper": self.spec.paper, "exact": self.spec.exact},
            "parameters": self.params.model_dump(mode="json", by_alias=True),
            "options": {"rank": self.options.rank, "space": self.options.space, "exact_svd": self.options.exact_svd,
                        "device": self.options.device,
                        "trim_scope": self.trim_scope if self.spec.kind == "elementwise" else None,
                        "dense_truncation": self._truncation_rule(),
                        "modules_to_save": self.options.modules_to_save,
                        "modules_to_save_applied": getattr(self, "heads_policy", self.options.modules_to_save),
                        "dtype": str(self.options.dtype),
                        "rank_patterns": self.options.rank_patterns},
            "inputs": [{"name": a.name, "source": portable_name(a.source), "path": portable_name(a.source), "weights_file": a.weights_path.name,
                        "sha256": a.sha256, "weight": w, "density": d, "r": a.settings.r,
                        "lora_alpha": a.settings.lora_alpha, "use_rslora": a.settings.use_rslora,
                        **_trained_on(a)}
                       for a, w, d in zip(self.adapters, self.weights, self.densities)],
            "output": {"modules": len(merged), "ranks": sorted({u.rank for u in merged.values()})},
            "retained_energy": {
                "min": min(energies) if energies else None,
                "mean": sum(energies) / len(energies) if energies else None,
                "per_module": self.energy,
            },
            **stamp(),
        }


def _heads_policy(policy: str, with_extra: list[LoraAdapter]) -> str:
    """`auto` made concrete: per_task when every adapter with modules_to_save is a lorafuse-trained classify
    adapter (`lorafuse train` stores its task's head there), else error."""
    if policy != "auto":
        return policy
    return "per_task" if with_extra and all(_trained_on(a) for a in with_extra) else "error"


def _trained_on(adapter: LoraAdapter) -> dict[str, Any]:
    """What an input's lorafuse_train.json says a classify head needs outside lorafuse (its task's labels and
    the pooling it was trained with), for the fused adapter's card; {} for adapters trained elsewhere."""
    record = adapter.train_record
    keys = ("task", "labels", "formulation", "pooling")
    found = {k: record[k] for k in keys if isinstance(record.get(k), (str, list))}
    labels = found.get("labels", [])
    if found.get("formulation") != "classify" or not all(isinstance(x, str) for x in labels):
        return {}  # a record trained elsewhere or edited by hand: the card then shows no label mask
    return found


def _trim_scope(params: MethodParams, space: str) -> str:
    """The trim scope asked for, else the space's reference (full and core: per module; knots: global)."""
    scope = getattr(params, "trim_scope", None)
    if scope is None:
        return REFERENCE_TRIM_SCOPE.get(space, "module")
    return scope.value if hasattr(scope, "value") else str(scope)


def _checked_head(adapter: LoraAdapter, key: str) -> torch.Tensor:
    """A modules_to_save tensor (a classification head), floating point and finite like the factors."""
    tensor = adapter.tensor(key)
    if not tensor.dtype.is_floating_point or not bool(torch.isfinite(tensor).all()):
        raise AdapterError(f"{adapter.weights_path}: modules_to_save tensor '{key}' is {tensor.dtype} or has "
                           "NaN/Inf entries; heads must be finite floating point")
    return tensor


def _check_finite(merged: dict[str, LowRank], dtype: torch.dtype) -> None:
    """The last guard before anything is written: finite inputs and coefficients can still overflow (weights of
    1e39, or values past float16's 65504 once cast to the output dtype)."""
    for module, update in merged.items():
        for name, factor in (("lora_A", update.A), ("lora_B", update.B)):
            if not bool(torch.isfinite(factor.to(dtype)).all()):
                raise ConfigError(f"module '{module}': the fused {name} has NaN or Inf entries in {dtype} "
                                  "(weights or lambda too large for the output dtype?); nothing was written")


def _average_tensors(per_task: dict[str, dict[str, torch.Tensor]], adapters: list[LoraAdapter]) -> dict[str, torch.Tensor]:
    keys = set(next(iter(per_task.values())))
    for adapter in adapters:
        if set(per_task[adapter.name]) != keys:
            raise IncompatibleAdaptersError(f"{adapter.path}: its modules_to_save tensors differ from the others' "
                                            "and cannot be averaged")
    return {k: torch.stack([t[k].float() for t in per_task.values()]).mean(0).to(next(iter(per_task.values()))[k].dtype)
            for k in sorted(keys)}
