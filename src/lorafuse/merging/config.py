"""mergekit-style YAML for `lorafuse merge`:

    merge_method: ties
    base_model: meta-llama/Meta-Llama-3-8B-Instruct   # optional; checked against the adapters
    models:
      - model: ./adapters/mnli            # adapter directory or Hub id
        name: mnli                        # optional label (default: training record's task, else dir name)
        parameters: {weight: 1.0, density: 0.2}
    parameters: {lambda: 1.0, density: 0.2, rank: 16, space: knots, trim_scope: global}
    dtype: bfloat16

Precedence: method defaults < global `parameters` < per-model `parameters`. Engine options (rank, space,
exact_svd, modules_to_save, rank_patterns, device) may sit in `parameters` or at the top level. Types are strict (`rank: true` is not 1,
`exact_svd: "false"` is not false), numbers finite, duplicate keys refused, and `parameters` holds method and
engine parameters only (`parameters: {method: ...}` does not override `merge_method`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafuse.errors import ConfigError, did_you_mean
from lorafuse.validate import finite_number, load_yaml_file, name_problem

ENGINE_OPTIONS = ("rank", "space", "exact_svd", "modules_to_save", "rank_patterns", "device")
PER_MODEL_PARAMETERS = ("weight", "density")
# merge() arguments that have their own place in the config (or on the command line), never in `parameters`
RESERVED = ("method", "merge_method", "adapters", "models", "model", "names", "name", "weights", "densities",
            "base_model", "dtype", "allow_bin", "progress")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    name: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        if value is not None and (problem := name_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("parameters")
    @classmethod
    def _known(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, item in value.items():
            if key not in PER_MODEL_PARAMETERS:
                raise ValueError(f"unknown per-model parameter '{key}'{did_you_mean(key, PER_MODEL_PARAMETERS)}")
            finite_number(item, key, ValueError)  # pydantic reports a ValueError with the field's location
        return value


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    merge_method: str
    models: list[ModelEntry] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    rank: int | None = None
    space: str | None = None
    exact_svd: bool | None = None
    modules_to_save: str | None = None
    rank_patterns: bool | None = None
    device: str | None = None  # cpu, cuda, cuda:1; default: the GPU when there is one

    @field_validator("parameters")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in RESERVED:
                raise ValueError(f"'{key}' is not a method parameter (it has its own field: "
                                 f"{'merge_method' if 'method' in key else 'see the models list'})")
        return value

    def merge_kwargs(self, base_dir: Path | None = None) -> dict[str, Any]:
        """Keyword arguments for `lorafuse.merging.engine.merge`, adapter paths resolved against the config's folder."""
        params = dict(self.parameters)
        engine = {k: params.pop(k) for k in ENGINE_OPTIONS if k in params}
        engine.update({k: getattr(self, k) for k in ENGINE_OPTIONS if getattr(self, k) is not None})
        return {
            "adapters": [_resolve(m.model, base_dir) for m in self.models],
            "method": self.merge_method,
            "names": [m.name for m in self.models] if any(m.name for m in self.models) else None,
            "weights": [m.parameters.get("weight", 1.0) for m in self.models],
            "densities": [m.parameters.get("density") for m in self.models]
            if any("density" in m.parameters for m in self.models) else None,
            "base_model": self.base_model,
            "dtype": self.dtype,
            **engine,
            **params,
        }


def _resolve(model: str, base_dir: Path | None) -> str:
    """Relative adapter paths are relative to the config file (mergekit resolves them against the working
    directory: a path that exists only from there is refused, saying so); Hub ids pass through."""
    if base_dir is None or Path(model).is_absolute():
        return model
    candidate = base_dir / model
    if not candidate.exists() and Path(model).expanduser().exists() and base_dir.resolve() != Path.cwd().resolve():
        raise ConfigError(f"models: '{model}' is not in the config's folder {base_dir}: lorafuse resolves a merge "
                          "YAML's relative paths against the YAML's folder (mergekit: against the working directory, "
                          "where it does exist); write it relative to the YAML, or absolute")
    return str(candidate) if candidate.exists() or model.startswith(".") else model


def load_merge_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    raw = load_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with merge_method and models")
    try:
        config = MergeConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc, raw)}") from None
    _check_refused(config, path)
    return config


def _check_refused(config: MergeConfig, path: Path) -> None:
    """Parameters the method would read with another meaning than other tools give them (DARE's `density`),
    named with the file and the field."""
    from lorafuse.merging.methods.registry import get_method

    try:
        spec = get_method(config.merge_method)
    except ConfigError:
        return  # the engine names an unknown method with the closest valid one
    refused = spec.params.REFUSED
    for key, why in refused.items():
        if key in config.parameters:
            raise ConfigError(f"{path}: parameters.{key}: method '{spec.name}' takes no '{key}': {why}")
    if "density" not in spec.params.model_fields:
        for i, entry in enumerate(config.models):
            if "density" in entry.parameters:
                why = refused.get("density", "it has no density parameter")
                raise ConfigError(f"{path}: models[{i}].parameters.density: method '{spec.name}' takes no "
                                  f"density: {why}")


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(map(str, err["loc"]))
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            fields = MergeConfig.model_fields if len(err["loc"]) == 1 else ModelEntry.model_fields
            parts.append(f"unknown field '{loc}'{did_you_mean(key, fields)}")
        else:
            parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def dump_merge_config(kwargs: dict[str, Any]) -> str:
    """The mergekit-style YAML equivalent of merge() arguments (written beside outputs for reruns)."""
    adapters = kwargs["adapters"]
    names = kwargs.get("names") or [None] * len(adapters)
    weights = kwargs.get("weights") or [1.0] * len(adapters)
    densities = kwargs.get("densities") or [None] * len(adapters)
    models = []
    for src, name, w, d in zip(adapters, names, weights, densities):
        entry: dict[str, Any] = {"model": str(src), "parameters": {"weight": w}}
        if name:
            entry["name"] = name
        if d is not None:
            entry["parameters"]["density"] = d
        models.append(entry)
    skip = {"adapters", "names", "weights", "densities", "method", "base_model", "dtype", "progress"}
    params = {k: v for k, v in kwargs.items() if k not in skip and v is not None}
    doc = {"merge_method": kwargs["method"], "base_model": kwargs.get("base_model"), "models": models,
           "parameters": params, "dtype": kwargs.get("dtype")}
    return yaml.safe_dump({k: v for k, v in doc.items() if v is not None}, sort_keys=False)
