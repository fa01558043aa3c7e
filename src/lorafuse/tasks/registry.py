"""Tasks as data: a registry of NLI tasks (label words, where the data lives), extensible by YAML or by code.

Data comes from a local directory in the shared JSONL schema (`<data_dir>/<task>/<split>.jsonl`, one object a line
with premise, hypothesis, label), from the Hugging Face Hub through `datasets`, or from a Python loader (the
demo's generated tasks).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lorafuse.errors import ConfigError, LorafuseError, did_you_mean

SPLITS = ("train", "validation", "test")


class DataError(LorafuseError):
    """A data file is missing, empty or malformed."""


@dataclass(frozen=True)
class Example:
    premise: str
    hypothesis: str
    label: str
    id: str = ""


@dataclass(frozen=True)
class HubSource:
    dataset: str
    premise: str
    hypothesis: str
    label: str
    config: str | None = None
    splits: dict[str, str] = field(default_factory=dict)
    label_names: list[str | None] | None = None
    label_map: dict[str, str] | None = None


Loader = Callable[[str], list[Example]]


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    description: str = ""
    hub: HubSource | None = None
    files: dict[str, str] = field(default_factory=dict)  # split -> path (user task files)
    loader: Loader | None = None  # generated tasks

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
            return read_jsonl(Path(self.files[split]), self.labels)
        if data_dir is not None:
            return read_jsonl(Path(data_dir) / self.name / f"{split}.jsonl", self.labels)
        if self.hub is not None:
            return load_from_hub(self.hub, split, self.labels)
        raise ConfigError(f"task '{self.name}': no data source (give --data-dir, or a task file with files/hub)")

    def data_fingerprint(self, split: str, data_dir: str | Path | None = None) -> str:
        """sha256 of the split's file (or of its examples, for generated and Hub data), for caches and records."""
        path = Path(self.files[split]) if split in self.files else (
            Path(data_dir) / self.name / f"{split}.jsonl" if data_dir is not None and self.loader is None else None)
        if path is not None and path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
        text = json.dumps([e.__dict__ for e in self.load(split, data_dir)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def read_jsonl(path: Path, labels: tuple[str, ...]) -> list[Example]:
    """The shared schema; errors name the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    examples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                examples.append(_parse_line(line, path, lineno, labels))
    if not examples:
        raise DataError(f"{path}: empty data file")
    return examples


def _parse_line(line: str, path: Path, lineno: int, labels: tuple[str, ...]) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object")
    for key in ("premise", "hypothesis", "label"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{path}:{lineno}: field '{key}' missing or not a string")
    if row["label"] not in labels:
        raise DataError(f"{path}:{lineno}: unknown label '{row['label']}' (task labels: {', '.join(labels)})")
    return Example(row["premise"], row["hypothesis"], row["label"], str(row.get("id", f"{path.stem}-{lineno}")))


def load_from_hub(hub: HubSource, split: str, labels: tuple[str, ...]) -> list[Example]:
    """Load a split with `datasets` and map its labels to the task's label words."""
    import datasets

    name = hub.splits.get(split, split)
    try:
        rows = datasets.load_dataset(hub.dataset, hub.config, split=name)
    except Exception as exc:
        raise DataError(f"Hub dataset {hub.dataset} ({hub.config or 'default'}, split {name}): {exc}") from exc
    examples = []
    for i, row in enumerate(rows):
        label = _hub_label(row[hub.label], hub)
        if label is None:
            continue
        if label not in labels:
            raise DataError(f"{hub.dataset}[{name}][{i}]: label '{label}' not in {labels}")
        examples.append(Example(str(row[hub.premise]), str(row[hub.hypothesis]), label, f"{hub.dataset}-{name}-{i}"))
    return examples


def _hub_label(value: Any, hub: HubSource) -> str | None:
    if hub.label_names is not None and isinstance(value, int):
        return hub.label_names[value] if 0 <= value < len(hub.label_names) else None
    if hub.label_map is not None:
        return hub.label_map.get(str(value))
    return str(value)


# -- the registry --------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    if task.name in _REGISTRY and not replace:
        raise ConfigError(f"task '{task.name}' is already registered")
    if len(set(task.labels)) != len(task.labels) or len(task.labels) < 2:
        raise ConfigError(f"task '{task.name}': needs at least two distinct labels (got {list(task.labels)})")
    _REGISTRY[task.name] = task
    return task


def task_from_dict(name: str, spec: dict[str, Any], base_dir: Path | None = None) -> Task:
    known = {"labels", "description", "hub", "files"}
    for key in spec:
        if key not in known:
            raise ConfigError(f"task '{name}': unknown field '{key}'{did_you_mean(key, known)}")
    if "labels" not in spec:
        raise ConfigError(f"task '{name}': missing field 'labels'")
    files = {s: str((base_dir / p) if base_dir and not Path(p).is_absolute() else p)
             for s, p in (spec.get("files") or {}).items()}
    hub = HubSource(**spec["hub"]) if spec.get("hub") else None
    return Task(name, tuple(spec["labels"]), spec.get("description", ""), hub, files)


def load_task_file(path: str | Path) -> list[Task]:
    """Register the tasks of a user YAML: `name: {labels: [...], files: {train: a.jsonl, ...} | hub: {...}}`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read task file ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of task name -> definition")
    try:
        return [register_task(task_from_dict(n, s, path.parent), replace=True) for n, s in raw.items()]
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


_BUILTIN_LOADED: list[bool] = []


def _load_builtin() -> None:
    """Built-in and generated tasks, once; user tasks registered before keep their definitions."""
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED.append(True)
    text = resources.files("lorafuse.tasks").joinpath("builtin.yaml").read_text()
    for name, spec in yaml.safe_load(text).items():
        if name not in _REGISTRY:
            register_task(task_from_dict(name, spec))
    from lorafuse.tasks import synthetic

    synthetic.register_all()


def get_task(name: str) -> Task:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown task '{name}'{did_you_mean(name, _REGISTRY)}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_tasks() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)
