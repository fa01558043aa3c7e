"""One registry of merge methods. A method is a small typed function plus a pydantic parameter model; the
engine (lorafuse.merging.engine) streams modules through it.

Two kinds:
- `module`: receives one module's updates as factors (list of LowRank, weights) and returns a LowRank (exact
  methods, spectral methods) or a dense tensor.
- `elementwise`: defined entry by entry (TIES, DARE, ...); receives the tasks' blocks in a *space* (dense ΔW_t in
  `full`, aligned blocks in `knots`/`core`) stacked as a [T, ...] tensor, with per-task trim thresholds computed
  by the engine (per module, or globally over the whole adapter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from lorafuse.errors import ConfigError, did_you_mean


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown names are errors, never silently ignored. REFUSED names
    parameters that other tools take under the same name with another meaning, each with what to use instead."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)
    REFUSED: ClassVar[dict[str, str]] = {}

    @classmethod
    def draws_random(cls, values: dict[str, Any]) -> bool:
        """Whether a merge with these parameter values draws random numbers (DARE's drop): then experiments run it
        over several seeds."""
        return "drop_rate" in cls.model_fields

    def floors(self, shapes: Sequence[tuple[int, int]], ranks: Sequence[int]) -> dict[str, str]:
        """The parameters whose value is at the method's floor for these modules (each module's (m, n) in the
        space merged, and the adapters' ranks): a lower value would not change the merge, so a search that chose
        the lowest value of its grid there is bracketed by the method itself. Each with why, in words."""
        return {}


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kind: Literal["module", "elementwise"]
    fn: Callable[..., Any]
    params: type[MethodParams]
    summary: str
    paper: str
    exact: bool = False
    uses_weights: bool = True  # False: per-adapter weights other than 1 are refused (e.g. `average`)
    takes_rank: bool = False  # the engine passes the requested output rank (`rank=`; None: the natural rank)
    # the spaces the method is defined in; empty: its kind's (module: full and core; element-wise: every space)
    spaces: tuple[str, ...] = ()
    # the engine passes the module's seeded per-adapter generators (`generators=`, one per adapter, by name)
    takes_generators: bool = False

    def check_space(self, space: str) -> None:
        """Refuse a space the method is not defined in (the space's existence is checked by lorafuse.merging.spaces)."""
        if self.spaces and space not in self.spaces:
            allowed = " or ".join(f"'{s}'" for s in self.spaces)
            raise ConfigError(f"method '{self.name}' is defined in the {allowed} space only, not '{space}'")
        if self.kind == "module" and space not in ("full", "core"):
            raise ConfigError(f"method '{self.name}' works on whole updates: it runs in the 'full' or 'core' space, "
                              f"not '{space}'")

    def parse_params(self, values: dict[str, Any]) -> MethodParams:
        """Validate user parameters, naming an unknown one with the closest valid name."""
        known = set(self.params.model_fields) | {f.alias for f in self.params.model_fields.values() if f.alias}
        for key in values:
            if key in self.params.REFUSED:
                raise ConfigError(f"method '{self.name}' takes no '{key}': {self.params.REFUSED[key]}")
            if key not in known:
                raise ConfigError(f"method '{self.name}': unknown parameter '{key}'{did_you_mean(key, known)}")
        try:
            return self.params(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"method '{self.name}': invalid parameters: {problems}") from None


REGISTRY: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    kind: Literal["module", "elementwise"],
    params: type[MethodParams],
    summary: str,
    paper: str,
    exact: bool = False,
    uses_weights: bool = True,
    takes_rank: bool = False,
    spaces: tuple[str, ...] = (),
    takes_generators: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding a method to the registry."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in REGISTRY:
            raise ValueError(f"merge method '{name}' registered twice")
        REGISTRY[name] = MergeMethod(name, kind, fn, params, summary, paper, exact, uses_weights, takes_rank, spaces,
                                     takes_generators)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    _load_builtin_methods()
    if name not in REGISTRY:
        raise ConfigError(f"unknown merge method '{name}'{did_you_mean(name, REGISTRY)}")
    return REGISTRY[name]


def list_methods() -> list[MergeMethod]:
    _load_builtin_methods()
    return list(REGISTRY.values())


def _load_builtin_methods() -> None:
    import importlib

    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


# Modules whose import registers methods; optional ones are skipped when absent.
BUILTIN_MODULES = (
    "lorafuse.merging.methods.linear",
    "lorafuse.merging.methods.elementwise",
    "lorafuse.merging.methods.spectral",
    "lorafuse.merging.methods.truncated",
    "lorafuse.merging.methods.robustmerge",
    "lorafuse.merging.methods.wudi",
    "lorafuse.merging.methods.ctm",
)
