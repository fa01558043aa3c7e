"""The experiment config: one YAML says which model, tasks, training budget, fusion methods and coefficient grids.
Validated with pydantic; unknown fields, methods and tasks are named with the closest valid name."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafuse.errors import ConfigError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSettings(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    lr: float | None = Field(None, gt=0.0)  # None: the model's recipe (lorafuse.models)
    epochs: float = Field(2.0, gt=0.0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_examples: int | None = Field(None, ge=1)
    max_length: int | None = Field(None, ge=8)
    seed: int = 0
    gradient_checkpointing: bool = False


class EvalSettings(_Strict):
    max_validation: int | None = Field(500, ge=1)
    max_test: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    max_length: int | None = Field(None, ge=8)


class MethodSpec(_Strict):
    """One fusion job: a method, its space, fixed parameters and a grid searched on validation."""

    method: str
    space: str = "full"
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, list[Any]] = Field(default_factory=dict)
    samples: int | None = Field(None, ge=1, description="random search: this many grid points (default: all)")
    sample_seed: int = 0
    rank: int | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from lorafuse.methods.registry import get_method

        get_method(name)
        return name

    @field_validator("search")
    @classmethod
    def _nonempty_lists(cls, search: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in search.items():
            if not values:
                raise ValueError(f"search.{name}: give at least one value")
        return search

    @model_validator(mode="after")
    def _known_params(self) -> MethodSpec:
        from lorafuse.methods.registry import get_method

        spec = get_method(self.method)
        for point in self.grid():
            spec.parse_params({**self.params, **point})
        return self

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return self.method if self.space == "full" else f"{self.method}@{self.space}"

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the searched values (one point, {}, when nothing is searched)."""
        keys = list(self.search)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.search[k] for k in keys))] or [{}]


class LoraHubSettings(_Strict):
    shots: list[int] = Field(default_factory=lambda: [5, 20])
    budget: int = Field(40, ge=1)
    seed: int = 0


class RouterSettings(_Strict):
    examples_per_task: int = Field(200, ge=1)
    epochs: int = Field(20, ge=1)
    seed: int = 0


class ExperimentConfig(_Strict):
    name: str
    model: str
    formulation: Literal["classify", "chat"] | None = None
    tasks: list[str] = Field(min_length=1)
    data_dir: str | None = None
    task_file: str | None = None
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    methods: list[MethodSpec] = Field(default_factory=list)
    lorahub: LoraHubSettings | None = None
    router: RouterSettings | None = None
    hardware: Literal["cpu", "gpu"] = "cpu"
    notes: str = ""

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError("tasks must be distinct")
        return tasks

    @model_validator(mode="after")
    def _distinct_methods(self) -> ExperimentConfig:
        seen: set[str] = set()
        for spec in self.methods:
            if spec.name in seen:
                raise ValueError(f"two methods are named '{spec.name}': give one a distinct `label`")
            seen.add(spec.name)
        return self

    def check_tasks(self) -> None:
        """Tasks must exist (after any task file is loaded)."""
        from lorafuse.tasks import get_task, load_task_file

        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"data_dir '{self.data_dir}': no such directory (relative paths are taken from "
                              f"the current directory, {Path.cwd()})")
        if self.task_file:
            load_task_file(self.task_file)
        for task in self.tasks:
            get_task(task)


def parse_config(raw: dict[str, Any], source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(map(str, err["loc"]))
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        else:
            parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def load_config(path: str | Path) -> ExperimentConfig:
    """A config file, or the name of a shipped one (e.g. `nli5-minilm`)."""
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return parse_config(raw, str(path))


def shipped_configs() -> dict[str, Path]:
    from importlib import resources

    root = Path(str(resources.files("lorafuse") / "configs"))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def resolve_config_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = shipped_configs()
    if str(path) in shipped:
        return shipped[str(path)]
    raise ConfigError(f"{path}: no such config file or shipped config{did_you_mean(str(path), shipped)}")
