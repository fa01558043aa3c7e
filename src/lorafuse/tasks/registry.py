"""Tasks as data: a registry of NLI tasks (label words, where the data lives), extensible by YAML or by code.

Data comes from a local directory in the shared JSONL schema (`<data_dir>/<task>/<split>.jsonl`, one object a line
with premise, hypothesis, label), from the Hugging Face Hub through `datasets`, or from a Python loader (the
demo's generated tasks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lorafuse.errors import ConfigError, LorafuseError, did_you_mean
from lorafuse.validate import check_name, load_json, load_yaml_file

SPLITS = ("train", "validation", "test")


class DataError(LorafuseError):
    """A data file is missing, empty or malformed."""


class MissingSplitError(DataError):
    """A split has no data file or source at all (as opposed to one that is empty or malformed)."""


@dataclass(frozen=True)
class Example:
    premise: str
    hypothesis: str
    label: str
    id: str = ""


@dataclass(frozen=True)
class Fields:
    """Which keys of a data row hold the premise, hypothesis and label (the shared schema's by default)."""

    premise: str = "premise"
    hypothesis: str = "hypothesis"
    label: str = "label"


@dataclass(frozen=True)
class HubSource:
    """How to load a task with `datasets.load_dataset`: id, config, split names, fields and label mapping."""

    dataset: str
    premise: str = "premise"
    hypothesis: str = "hypothesis"
    label: str = "label"
    config: str | None = None
    splits: dict[str, str] = field(default_factory=dict)
    label_names: list[str | None] | None = None
    label_map: dict[str, str] | None = None
    # validation held out of the Hub's train split (for datasets whose only labelled evaluation split is the
    # test split): {fraction, max_examples, seed}; train is then the rest of the train split
    heldout: dict[str, Any] | None = None


HELDOUT_DEFAULTS = {"fraction": 0.1, "max_examples": 2000, "seed": 0}


def heldout_indices(n: int, heldout: dict[str, Any]) -> set[int]:
    """The rows of an n-row train split held out as validation: a seeded sample of fraction·n, at most
    max_examples (the same rows on every machine and run)."""
    import random

    spec = {**HELDOUT_DEFAULTS, **heldout}
    k = min(int(spec["fraction"] * n), int(spec["max_examples"]))
    return set(random.Random(int(spec["seed"])).sample(range(n), k))


Loader = Callable[[str], list[Example]]


@dataclass(frozen=True)
class Task:
    """A task's definition: label words and where its examples come from (first match wins: `loader` (Python),
    `files` (a task file's own paths), `--data-dir` (`<dir>/<name>/<split>.jsonl`), `hub`)."""

    name: str
    labels: tuple[str, ...]
    description: str = ""
    hub: HubSource | None = None
    files: dict[str, str] = field(default_factory=dict)  # split -> path (user task files)
    loader: Loader | None = None  # examples made in Python, e.g. the generated demo suite
    fields: Fields = field(default_factory=Fields)  # keys of the local JSONL rows

    def load(self, split: str, data_dir: str | Path | None = None, max_examples: int | None = None) -> list[Example]:
        """Examples of one split, validated against the task's labels, truncated to max_examples."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split '{split}'{did_you_mean(split, SPLITS)}")
        examples = self._read(split, data_dir)
        if not examples:
            raise DataError(f"task '{self.name}': split '{split}' has no examples")
        return examples[:max_examples] if max_examples else examples

    def _read(self, split: str, data_dir: str | Path | None) -> list[Example]:
        if self.loader is not None:
            return self.loader(split)
        if split in self.files:
            return read_jsonl(Path(self.files[split]), self.labels, self.fields)
        if data_dir is not None:
            return read_jsonl(Path(data_dir) / self.name / f"{split}.jsonl", self.labels, self.fields)
        if self.hub is not None:
            return load_from_hub(self.hub, split, self.labels)
        raise MissingSplitError(f"task '{self.name}': no data source (give --data-dir, or a task file with "
                                "files/hub)")

    def data_fingerprint(self, split: str, data_dir: str | Path | None = None) -> str:
        """sha256 of the split's file (or of its examples, for generated and Hub data), for caches and records."""
        path = Path(self.files[split]) if split in self.files else (
            Path(data_dir) / self.name / f"{split}.jsonl" if data_dir is not None and self.loader is None else None)
        if path is not None and path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
        text = json.dumps([e.__dict__ for e in self.load(split, data_dir)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def read_jsonl(path: Path, labels: tuple[str, ...], fields: Fields = Fields()) -> list[Example]:
    """The shared schema (or a task's own field names); errors name the file and line."""
    if not path.is_file():
        raise MissingSplitError(f"{path}: no such data file")
    examples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                examples.append(_parse_line(line, path, lineno, labels, fields))
    if not examples:
        raise DataError(f"{path}: empty data file")
    return examples


def _parse_line(line: str, path: Path, lineno: int, labels: tuple[str, ...], fields: Fields) -> Example:
    row = load_json(line, f"{path}:{lineno}", DataError)
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object")
    for key in (fields.premise, fields.hypothesis, fields.label):
        if not isinstance(row.get(key), str):
            raise DataError(f"{path}:{lineno}: field '{key}' missing or not a string")
        _check_unicode(row[key], f"{path}:{lineno}: field '{key}'")
    label = row[fields.label]
    if label not in labels:
        raise DataError(f"{path}:{lineno}: unknown label '{label}'{did_you_mean(label, labels)}")
    return Example(row[fields.premise], row[fields.hypothesis], label, str(row.get("id", f"{path.stem}-{lineno}")))


def _check_unicode(text: str, where: str) -> None:
    """JSON's `\\ud800` escapes decode to lone surrogates, which no tokenizer or UTF-8 writer accepts (a
    UnicodeEncodeError deep in training or evaluation): refused here, naming the line and field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: not valid Unicode text (lone surrogate {text[exc.start]!a} at character "
                        f"{exc.start})") from None


def load_from_hub(hub: HubSource, split: str, labels: tuple[str, ...]) -> list[Example]:
    """Load a split with `datasets` and map its labels to the task's label words."""
    import datasets

    held = hub.heldout is not None and split in ("train", "validation")
    name = hub.splits.get("train", "train") if held else hub.splits.get(split, split)
    try:
        rows = datasets.load_dataset(hub.dataset, hub.config, split=name)
    except Exception as exc:
        raise DataError(f"Hub dataset {hub.dataset} ({hub.config or 'default'}, split {name}): {exc}") from exc
    if held:
        chosen = heldout_indices(len(rows), hub.heldout or {})
        rows = _rows_where(rows, lambda i: (i in chosen) == (split == "validation"))
    else:
        rows = list(enumerate(rows))
    examples = []
    for i, row in rows:
        label = _hub_label(row[hub.label], hub)
        if label is None:
            continue
        if label not in labels:
            raise DataError(f"{hub.dataset}[{name}][{i}]: label '{label}' not in {labels}")
        examples.append(Example(str(row[hub.premise]), str(row[hub.hypothesis]), label, f"{hub.dataset}-{name}-{i}"))
    return examples


def _rows_where(rows: Any, keep: Callable[[int], bool]) -> list[tuple[int, Any]]:
    return [(i, row) for i, row in enumerate(rows) if keep(i)]


def _hub_label(value: Any, hub: HubSource) -> str | None:
    if hub.label_names is not None and isinstance(value, int):
        return hub.label_names[value] if 0 <= value < len(hub.label_names) else None
    if hub.label_map is not None:
        return hub.label_map.get(str(value))
    return str(value)


# -- the registry --------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False, examples: Loader | None = None) -> Task:
    """Add a task to the registry; `examples(split) -> list[Example]` supplies its data from Python."""
    if examples is not None:
        task = dataclasses.replace(task, loader=examples)
    check_name(task.name, "task name")  # names become file names (adapters/<task>-…, task_heads/<task>…)
    if task.name in _REGISTRY and not replace:
        raise ConfigError(f"task '{task.name}' is already registered (pass replace=True to redefine it)")
    if len(set(task.labels)) != len(task.labels) or len(task.labels) < 2:
        raise ConfigError(f"task '{task.name}': needs at least two distinct labels (got {list(task.labels)})")
    _REGISTRY[task.name] = task
    return task


TASK_FIELDS = ("labels", "description", "hub", "files", "fields")
HUB_FIELDS = {f.name for f in dataclasses.fields(HubSource)}


def task_from_dict(name: str, spec: dict[str, Any], base_dir: Path | None = None) -> Task:
    """A task from its YAML mapping; relative `files` are resolved against the task file's directory."""
    if not isinstance(spec, dict):
        raise ConfigError(f"task '{name}': expected a mapping with labels and files or hub")
    for key in spec:
        if key not in TASK_FIELDS:
            raise ConfigError(f"task '{name}': unknown field '{key}'{did_you_mean(key, TASK_FIELDS)}")
    labels = spec.get("labels")
    if not isinstance(labels, list) or not all(isinstance(lab, str) for lab in labels):
        raise ConfigError(f"task '{name}': 'labels' must be a list of label words (got {labels!r}; quote "
                          "words YAML reads otherwise, such as yes/no/true/null or numbers)")
    files = {s: str((base_dir / p) if base_dir and not Path(p).is_absolute() else p)
             for s, p in (spec.get("files") or {}).items()}
    for split in files:
        if split not in SPLITS:
            raise ConfigError(f"task '{name}': files: unknown split '{split}'{did_you_mean(split, SPLITS)}")
    fields = _mapping(name, "fields", spec.get("fields") or {}, {"premise", "hypothesis", "label"})
    return Task(name, tuple(labels), spec.get("description", ""), _hub(name, spec.get("hub"), fields), files,
                fields=Fields(**fields))


def _hub(name: str, hub: Any, fields: dict[str, str]) -> HubSource | None:
    """`hub: org/dataset` (with the task's `fields`) or `hub: {dataset: ..., config: ..., splits: ...}`."""
    if hub is None:
        return None
    spec = {"dataset": hub} if isinstance(hub, str) else _mapping(name, "hub", hub, HUB_FIELDS)
    if "dataset" not in spec:
        raise ConfigError(f"task '{name}': hub: missing 'dataset' (a Hugging Face dataset id)")
    source = HubSource(**{**fields, **spec})
    _check_heldout(name, source)
    return source


def _check_heldout(name: str, hub: HubSource) -> None:
    """Validation must never be the test split: coefficients searched on it would be tuned on test."""
    if hub.heldout is not None:
        _mapping(name, "hub: heldout", hub.heldout, set(HELDOUT_DEFAULTS))
        spec = {**HELDOUT_DEFAULTS, **hub.heldout}
        if not (isinstance(spec["fraction"], (int, float)) and 0 < spec["fraction"] < 1):
            raise ConfigError(f"task '{name}': hub: heldout: fraction must be in (0, 1) (got {spec['fraction']!r})")
        for key in ("max_examples", "seed"):
            if not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < 0:
                raise ConfigError(f"task '{name}': hub: heldout: {key} must be an integer ≥ 0")
        return
    validation, test = hub.splits.get("validation", "validation"), hub.splits.get("test", "test")
    if validation == test:
        raise ConfigError(f"task '{name}': hub: validation and test are the same Hub split '{test}', so a search "
                          "on validation would tune on the test set; give `heldout: {fraction: 0.1}` to hold "
                          "validation out of the train split instead")


def _mapping(name: str, where: str, value: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"task '{name}': '{where}' must be a mapping")
    for key in value:
        if key not in known:
            raise ConfigError(f"task '{name}': {where}: unknown field '{key}'{did_you_mean(key, known)}")
    return dict(value)


def load_task_file(path: str | Path) -> list[Task]:
    """Register the tasks of a user YAML, either one task (`name: x`, `labels: [...]`, `files:`/`hub:`,
    optional `fields:`) or a mapping of several (`x: {labels: [...], files: {...}}`)."""
    path = Path(path)
    raw = load_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a task (name, labels, files or hub) or a mapping name -> task")
    specs = {raw.pop("name"): raw} if "name" in raw else raw
    try:
        return [register_task(task_from_dict(str(n), s, path.parent), replace=True) for n, s in specs.items()]
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


_BUILTIN_LOADED: list[bool] = []
_BUILTIN_SETS: list[Callable[[], None]] = []  # generated task sets (lorafuse.tasks adds the demo's synthetic suite)


def add_builtin_set(register: Callable[[], None]) -> None:
    """A set of built-in tasks registered (by `register()`) after builtin.yaml's, on first use of the registry."""
    _BUILTIN_SETS.append(register)


def _load_builtin() -> None:
    """Built-in and generated tasks, once; user tasks registered before keep their definitions."""
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED.append(True)
    text = resources.files("lorafuse.tasks").joinpath("builtin.yaml").read_text()
    for name, spec in yaml.safe_load(text).items():
        if name not in _REGISTRY:
            register_task(task_from_dict(name, spec))
    for register in _BUILTIN_SETS:
        register()


def get_task(name: str) -> Task:
    """A registered task by name; unknown names get a did-you-mean and the list of known tasks."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown task '{name}'{did_you_mean(name, _REGISTRY)}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_tasks() -> list[str]:
    """Names of every registered task (built-in, generated and user-defined)."""
    _load_builtin()
    return sorted(_REGISTRY)
