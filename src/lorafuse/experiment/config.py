"""The experiment config: one YAML says which model, tasks, training budget, fusion methods and coefficient grids.
Validated with pydantic in strict mode: unknown fields, methods, spaces and tasks are named with the closest valid
name; values are never coerced (`rank: 4.5`, `rank: true`, `gradient_checkpointing: "false"` are refused, not read
as 4, 1 and True); numbers are finite; duplicate YAML keys are refused; names that become paths (the experiment's
`name`, its tasks, method labels) are plain names (lorafuse.validate.name_problem: the rule of adapter names)."""

from __future__ import annotations

import itertools
import math
import random
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafuse.errors import ConfigError, did_you_mean
from lorafuse.experiment.validate import check_space, file_slug
from lorafuse.validate import check_param_types, load_yaml_file, name_problem


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TrainSettings(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    lr: float | None = Field(None, gt=0.0)  # None: the model's recipe (lorafuse.model.models)
    epochs: float = Field(2.0, gt=0.0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_examples: int | None = Field(None, ge=1)
    max_length: int | None = Field(None, ge=8)
    seed: int = 0
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # see lorafuse.model.precision


class EvalSettings(_Strict):
    max_validation: int | None = Field(500, ge=1)
    max_test: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    max_length: int | None = Field(None, ge=8)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # see lorafuse.model.precision


# grid points (or trials) one method may run: a search beyond this is a typo or needs `samples:`, and its points
# are never all built (99 values of 4 parameters are 96 million points)
MAX_SEARCH_POINTS = 10_000


class MethodSpec(_Strict):
    """One fusion job: a method, its space, fixed parameters and a grid searched on validation."""

    method: str
    space: str = "full"
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, list[Any]] = Field(default_factory=dict)
    samples: int | None = Field(None, ge=1, description="random search: this many grid points (default: all)")
    sample_seed: int = 0
    sampler: Literal["random", "tpe"] = Field(
        "random", description="how `samples` points are chosen: drawn from the grid, or by Optuna's TPE")
    rank: int | None = Field(None, ge=1)

    @field_validator("label")
    @classmethod
    def _label_is_a_name(cls, label: str | None) -> str | None:
        if label is not None and (problem := name_problem(label)):
            raise ValueError(problem)
        return label

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from lorafuse.merging.methods.registry import get_method

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
    def _tpe_needs_samples(self) -> MethodSpec:
        if self.sampler == "tpe" and (self.samples is None or not self.search):
            raise ValueError("sampler: tpe needs `search` values and `samples` (the number of trials)")
        return self

    @model_validator(mode="after")
    def _bounded_search(self) -> MethodSpec:
        size = self.grid_size()
        runs = size if self.samples is None else self.samples if self.sampler == "tpe" else min(self.samples, size)
        if runs > MAX_SEARCH_POINTS:
            raise ValueError(f"search: {runs:,} {'trials' if self.sampler == 'tpe' else 'grid points'} (more than "
                             f"{MAX_SEARCH_POINTS:,}); give `samples:` to draw fewer of them")
        return self

    @model_validator(mode="after")
    def _known_params(self) -> MethodSpec:
        from lorafuse.merging.methods.registry import get_method

        spec = get_method(self.method)
        check_space(spec, self.space)
        where = f"method '{self.name}'"
        check_param_types(spec, self.params, where, "params.{}")
        for key, values in self.search.items():
            for value in values:
                check_param_types(spec, {key: value}, where, "search.{}")
        for point in self.grid() if self.grid_size() <= MAX_SEARCH_POINTS else self.points():
            spec.parse_params({**self.params, **point})
        return self

    @property
    def stochastic(self) -> bool:
        """Whether the merge draws random numbers (DARE's random drop): then it runs over several seeds."""
        from lorafuse.merging.methods.registry import get_method

        params = get_method(self.method).params
        return any(params.draws_random({**self.params, **point}) for point in self.grid())

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return self.method if self.space == "full" else f"{self.method}@{self.space}"

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the searched values (one point, {}, when nothing is searched)."""
        keys = list(self.search)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.search[k] for k in keys))] or [{}]

    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.search.values())

    def grid_point(self, index: int) -> dict[str, Any]:
        """Point `index` of `grid()`, built alone (itertools.product's order: the last key varies fastest)."""
        point: dict[str, Any] = {}
        for key in reversed(list(self.search)):
            index, at = divmod(index, len(self.search[key]))
            point[key] = self.search[key][at]
        return {key: point[key] for key in self.search}

    def points(self) -> list[dict[str, Any]]:
        """The grid, or `samples` points of it drawn without replacement (seeded) when the spec asks for a random
        search: drawn as indices, so the product is never built (the same points as sampling the built grid)."""
        size = self.grid_size()
        if self.samples is None or self.samples >= size:
            return self.grid()
        return [self.grid_point(i) for i in random.Random(self.sample_seed).sample(range(size), self.samples)]


class LoraHubSettings(_Strict):
    shots: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [5, 20], min_length=1)
    budget: int = Field(40, ge=1)
    seed: int = 0


class RouterSettings(_Strict):
    examples_per_task: int = Field(200, ge=1)
    epochs: int = Field(20, ge=1)
    seed: int = 0


class ArrowSettings(_Strict):
    """Arrow routing (lorafuse.fusion.arrow), training-free: each combination of the values is evaluated on
    validation and the best runs on test (one value each: nothing is chosen on data)."""

    top_k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2], min_length=1)
    temperature: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [1.0], min_length=1)

    def grid(self) -> list[dict[str, Any]]:
        return [{"top_k": k, "temperature": t} for k in self.top_k for t in self.temperature]


class LoGoSettings(_Strict):
    """LoGo routing (lorafuse.fusion.logo), training-free: each `top_k` is evaluated on validation and the best
    runs on test; the signal and the probe are fixed."""

    top_k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2], min_length=1)
    signal: Literal["norm", "entropy"] = "norm"
    probe: Literal["adapters", "base"] = "adapters"

    def grid(self) -> list[dict[str, Any]]:
        return [{"top_k": k} for k in self.top_k]


class RegMeanSettings(_Strict):
    """RegMean (lorafuse.fusion.regmean): Grams from `examples` unlabelled inputs a task of `split`."""

    split: Literal["train", "validation"] = "train"
    examples: int = Field(256, ge=1)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    seeds: int | None = Field(None, ge=1, description="default: the experiment's `seeds`")


class AdaMergingSettings(_Strict):
    """AdaMerging (lorafuse.fusion.adamerging): one job per split of `inputs`, each on `examples` unlabelled inputs
    a task of it (`test`: the paper's transductive protocol, reported as such)."""

    inputs: list[Literal["train", "validation", "test"]] = Field(
        default_factory=lambda: ["validation", "test"], min_length=1)
    examples: int = Field(200, ge=1)
    steps: int = Field(500, ge=0)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(32, ge=1)
    init: float | Literal["task_arithmetic"] = Field(
        0.3, description="the starting λ, or the one the experiment's task_arithmetic chose on validation")
    granularity: Literal["layer", "task"] = "layer"
    seed: int = 0
    seeds: int | None = Field(None, ge=1, description="default: the experiment's `seeds`")

    @field_validator("inputs")
    @classmethod
    def _distinct_inputs(cls, inputs: list[str]) -> list[str]:
        if len(set(inputs)) != len(inputs):
            raise ValueError("each split once")
        return inputs

    @field_validator("init")
    @classmethod
    def _init_in_range(cls, init: float | str) -> float | str:
        if not isinstance(init, str) and not 0.0 <= init <= 1.0:
            raise ValueError("λ in [0, 1] (AdaMerging clamps it there)")
        return init


class ExecutorSettings(_Strict):
    """Where the jobs of a stage run: one after another in this process (`local`), or in parallel on a Ray
    cluster (`ray`: one worker per GPU, or per CPU slot, each keeping the model and tokenized tasks loaded)."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="`auto`, HOST:PORT of a running cluster; default: start one")
    workers: int | None = Field(None, ge=1, description="default: one per GPU of the cluster, else per CPU slot")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")
    max_retries: int = Field(2, ge=0, description="times a job is rerun after its worker died")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value  # `executor: ray`


class ExperimentConfig(_Strict):
    name: str
    model: str
    formulation: Literal["classify", "chat"] | None = None
    tasks: list[str] = Field(min_length=1)
    data_dir: str | None = None
    task_file: str | None = None
    train: TrainSettings = Field(default_factory=TrainSettings)
    train_per_task: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per task, the `train` fields it sets otherwise (checked as `train`)")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="per task, an existing PEFT adapter (directory or Hub id) used instead of "
                                          "training one; classify heads come from its modules_to_save")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    methods: list[MethodSpec] = Field(default_factory=list)
    lorahub: LoraHubSettings | None = None
    router: RouterSettings | None = None
    arrow: ArrowSettings | None = None
    logo: LoGoSettings | None = None
    regmean: RegMeanSettings | None = None
    adamerging: AdaMergingSettings | None = None
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    hardware: Literal["cpu", "gpu"] = "cpu"
    seeds: int = Field(3, ge=1, description="seeds of each stochastic method (DARE variants, LoraHub, the "
                                            "router's training), reported as mean ± sd")
    notes: str = ""

    @field_validator("name")
    @classmethod
    def _name_is_a_name(cls, name: str) -> str:
        if problem := name_problem(name):
            raise ValueError(problem)
        return name

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, tasks: list[str]) -> list[str]:
        for task in tasks:
            if problem := name_problem(task):
                raise ValueError(f"task {problem}")
        if len(set(tasks)) != len(tasks):
            raise ValueError("tasks must be distinct")
        return tasks

    @model_validator(mode="after")
    def _distinct_methods(self) -> ExperimentConfig:
        seen: dict[str, str] = {}
        for spec in self.methods:
            slug = file_slug(spec.name)  # fused/<slug> and the job id: distinct names must stay distinct there
            if slug in seen:
                raise ValueError(f"two methods are named '{spec.name}'"
                                 + (f" and '{seen[slug]}' (both fused/{slug})" if seen[slug] != spec.name else "")
                                 + ": give one a distinct `label`")
            seen[slug] = spec.name
        return self

    @model_validator(mode="after")
    def _adamerging_init_has_its_job(self) -> ExperimentConfig:
        if self.adamerging is not None and self.adamerging.init == "task_arithmetic" and not any(
                s.method == "task_arithmetic" and s.space == "full" and "lambda" in {**s.params, **s.search}
                for s in self.methods):
            raise ValueError("adamerging.init: task_arithmetic needs a `task_arithmetic` method (full space) whose "
                             "lambda is given or searched in `methods`, or a number")
        return self

    @model_validator(mode="after")
    def _adapters_name_tasks(self) -> ExperimentConfig:
        for task in self.adapters:
            if task not in self.tasks:
                raise ValueError(f"adapters.{task}: not one of the experiment's tasks{did_you_mean(task, self.tasks)}")
        return self

    @model_validator(mode="after")
    def _train_per_task_is_valid(self) -> ExperimentConfig:
        for task in self.train_per_task:
            if task not in self.tasks:
                raise ValueError(f"train_per_task.{task}: not one of the experiment's tasks"
                                 f"{did_you_mean(task, self.tasks)}")
            try:
                self.train_for(task)
            except ValidationError as exc:
                raise ValueError(_describe(exc, f"train_per_task.{task}")) from None
        return self

    def train_for(self, task: str) -> TrainSettings:
        """The training settings of one task: `train`, with the fields its `train_per_task` entry gives (validated
        as `train` is, so `max_examples: null` there means the whole split). Tasks differ in what they need:
        SmolLM2 learns RTE only from its whole train split twice over (benchmarks/results/single_task.md)."""
        if task not in self.train_per_task:
            return self.train
        return TrainSettings(**{**self.train.model_dump(), **self.train_per_task[task]})

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


def _describe(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(map(str, [prefix, *err["loc"]] if prefix else err["loc"]))
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif err["type"].endswith("_type") or err["type"] in ("finite_number", "literal_error"):
            hint = " (quote words YAML reads as booleans or numbers)" if err["type"] == "string_type" else ""
            parts.append(f"{loc}: {err['msg']} (got {_shown(err['input'])}){hint}")
        else:
            parts.append((f"{loc}: " if loc else "") + err["msg"].replace("Value error, ", ""))
    return "; ".join(parts)


def _shown(value: Any, limit: int = 80) -> str:
    """A value for an error message, cut: the message stays one readable line whatever the input holds."""
    shorter = reprlib.Repr()  # keyword arguments only from Python 3.12
    shorter.maxlevel, shorter.maxlist, shorter.maxdict, shorter.maxstring, shorter.maxother = 3, 4, 4, limit, limit
    text = shorter.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def load_config(path: str | Path) -> ExperimentConfig:
    """A config file, or the name of a shipped one (e.g. `nli5-minilm`)."""
    path = resolve_config_path(path)
    raw = load_yaml_file(path)
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
