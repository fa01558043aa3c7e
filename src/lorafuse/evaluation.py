"""Evaluation: per-task accuracy, normalized accuracy (÷ the task's own adapter, as KnOTS reports it) and the
cross-task average.

The `Evaluator` loads the base model and tokenizes every task once; each adapter is then applied by adding its
exact update ΔW to the weights it touches (restored afterwards), so evaluating dozens of fused candidates costs
one forward pass each and no re-loading. Classification heads are swapped per task.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafuse.adapters.reader import PREFIX, LoraAdapter
from lorafuse.adapters.writer import HEADS_DIR
from lorafuse.algebra.lowrank import LowRank
from lorafuse.errors import AdapterError, ConfigError
from lorafuse.formulations import Batch, load_model, make_formulation
from lorafuse.tasks.registry import Task, get_task

Updates = Mapping[str, LowRank]
Heads = Mapping[str, Mapping[str, torch.Tensor]]


@dataclass
class EvalResult:
    accuracy: dict[str, float]
    examples: dict[str, int]
    normalized: dict[str, float] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    @property
    def normalized_average(self) -> float | None:
        return sum(self.normalized.values()) / len(self.normalized) if self.normalized else None

    def normalize(self, reference: Mapping[str, float]) -> EvalResult:
        """Accuracy as a percentage of each task's own adapter's accuracy."""
        self.normalized = {t: 100.0 * a / reference[t] for t, a in self.accuracy.items() if reference.get(t)}
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "examples": self.examples, "average": self.average,
                "normalized": self.normalized, "normalized_average": self.normalized_average}


# -- applying adapters -------------------------------------------------------------------------------------
def _submodule(model: torch.nn.Module, module: str) -> torch.nn.Module:
    """The model's module for an adapter path; tolerates a wrapper prefix present on one side only."""
    parts = module.split(".")
    for start in range(len(parts)):
        try:
            return model.get_submodule(".".join(parts[start:]))
        except AttributeError:
            continue
    raise AdapterError(f"module '{module}' of the adapter is not in the model (an adapter for another base?)")


@contextmanager
def applied(model: torch.nn.Module, updates: Updates, fan_in_fan_out: bool = False) -> Iterator[None]:
    """Temporarily W ← W + ΔW for every module of `updates` (exact; originals restored on exit)."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, update in updates.items():
                weight = _submodule(model, name).weight
                delta = update.dense().to(weight.device)
                delta = delta.T if fan_in_fan_out else delta
                if delta.shape != weight.shape:
                    raise AdapterError(f"module '{name}': update {tuple(delta.shape)} does not fit weight "
                                       f"{tuple(weight.shape)} (an adapter for another base model?)")
                saved.append((weight, weight.detach().clone()))
                weight.add_(delta.to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


@contextmanager
def head_loaded(model: torch.nn.Module, head: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily load a task's classification head (keys as PEFT stores modules_to_save)."""
    if not head:
        yield
        return
    state = {k.removeprefix(PREFIX): v for k, v in head.items()}
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise AdapterError(f"head tensors {missing[:2]} do not match the model's parameters")
    saved = {k: params[k].detach().clone() for k in state}
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


def adapter_heads(path: str | Path, tasks: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Heads stored with an adapter: its own modules_to_save (for the task it was trained on, or for every task
    when it names none) and any `task_heads/<task>.safetensors` of a fused adapter."""
    from safetensors.torch import load_file

    adapter = LoraAdapter(path)
    heads: dict[str, dict[str, torch.Tensor]] = {}
    own_task = adapter.train_record.get("task")
    if adapter.extra_keys:
        own = own_head(path)
        heads.update({t: own for t in tasks if own_task in (None, t)})
    for task in tasks:
        file = adapter.path / HEADS_DIR / f"{task}.safetensors"
        if file.is_file():
            heads[task] = load_file(str(file))
    return heads


def own_head(path: str | Path) -> dict[str, torch.Tensor]:
    """The modules_to_save tensors (a classification head) stored in an adapter, or {} if it has none."""
    adapter = LoraAdapter(path)
    return {k: adapter.tensor(k) for k in adapter.extra_keys}


def adapter_updates(path: str | Path) -> tuple[dict[str, LowRank], bool]:
    adapter = LoraAdapter(path)
    return {m: adapter.update(m) for m in adapter.modules}, adapter.settings.fan_in_fan_out


# -- the evaluator -----------------------------------------------------------------------------------------
class Evaluator:
    """A base model with its tasks tokenized once; `evaluate` any number of adapters against it."""

    def __init__(self, model: str, tasks: Sequence[str | Task], split: str = "test", formulation: str | None = None,
                 data_dir: str | Path | None = None, max_examples: int | None = None, batch_size: int = 32,
                 max_length: int | None = None, progress: bool = True) -> None:
        from lorafuse.models import resolve_model

        info = resolve_model(model)
        self.model_name, self.formulation_name = model, formulation or info.formulation
        self.model, tokenizer = load_model(info.path, self.formulation_name)
        self.model.eval()
        self.formulation = make_formulation(self.formulation_name, tokenizer, max_length)
        self.tasks = [t if isinstance(t, Task) else get_task(t) for t in tasks]
        self.split, self.batch_size, self.progress = split, batch_size, progress
        self.batches = {t.name: self._batches(t, data_dir, max_examples) for t in self.tasks}

    def _batches(self, task: Task, data_dir: str | Path | None, max_examples: int | None) -> list[Batch]:
        rows = self.formulation.encode(task, task.load(self.split, data_dir, max_examples))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].get("input_ids", rows[i].get("prompt"))))
        rows = [rows[i] for i in order]  # length-sorted batches waste little on padding
        return [self.formulation.collate(rows[i:i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]

    def subset(self, names: Sequence[str]) -> Evaluator:
        """The same loaded model and batches, restricted to some tasks."""
        import copy

        view = copy.copy(self)
        view.tasks = [t for t in self.tasks if t.name in names]
        return view

    def accuracy(self, task: Task) -> tuple[float, int]:
        correct = total = 0
        with torch.inference_mode():
            for batch in self.batches[task.name]:
                correct += int((self.formulation.predict(self.model, batch, task) == batch.targets).sum())
                total += len(batch.targets)
        return correct / total, total

    def evaluate(self, adapter: str | Path | Updates | Any | None = None, heads: Heads | None = None,
                 fan_in_fan_out: bool = False) -> EvalResult:
        """Accuracy of each task with `adapter` (a directory, a MergeResult, factor updates, or None for the
        base model), or an input-routed mixture (a router directory or `Router`); `heads` supplies per-task
        classification heads where the adapter has none."""
        from lorafuse.fusion.router import Router, is_router

        if isinstance(adapter, (str, Path)) and is_router(adapter):
            adapter = Router.load(adapter)
        if isinstance(adapter, Router):
            with adapter.installed(self.model):  # classify: each task's adapter brings its own head
                return self.evaluate(None, {**(heads or {}), **adapter.heads})
        updates, heads, fan_in_fan_out = self._resolve(adapter, heads, fan_in_fan_out)
        accuracy, examples = {}, {}
        from tqdm.auto import tqdm

        with applied(self.model, updates, fan_in_fan_out):
            for task in tqdm(self.tasks, desc="evaluate", unit="task", disable=not self.progress, leave=False):
                head = heads.get(task.name)
                if self.formulation_name == "classify" and head is None:
                    raise ConfigError(f"task '{task.name}': no classification head (give the task's own adapter "
                                      "with --heads, or merge with modules_to_save=per_task)")
                with head_loaded(self.model, head):
                    accuracy[task.name], examples[task.name] = self.accuracy(task)
        return EvalResult(accuracy, examples)

    def _resolve(self, adapter: Any, heads: Heads | None, fan_in_fan_out: bool) -> tuple[Updates, dict, bool]:
        names = [t.name for t in self.tasks]
        own: dict[str, Any] = {}
        if adapter is None:
            updates: Updates = {}
        elif isinstance(adapter, (str, Path)):
            updates, fan_in_fan_out = adapter_updates(adapter)
            own = adapter_heads(adapter, names)
        elif hasattr(adapter, "modules") and hasattr(adapter, "heads"):  # a MergeResult
            updates, own = adapter.modules, dict(adapter.heads)
            fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        else:
            updates = adapter
        return updates, {**(heads or {}), **own}, fan_in_fan_out


def load_reference(path: str | Path) -> dict[str, float]:
    """Per-task accuracies of each task's own adapter, from a results JSON written by `lorafuse eval`."""
    data = json.loads(Path(path).read_text())
    return dict(data.get("accuracy", data))


def markdown_table(rows: Mapping[str, EvalResult], tasks: Sequence[str]) -> str:
    """One row per evaluated model: accuracy per task (normalized in brackets), average."""
    head = "| model | " + " | ".join(tasks) + " | average | normalized avg |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for name, r in rows.items():
        cells = [f"{100 * r.accuracy[t]:.1f}" + (f" ({r.normalized[t]:.1f})" if t in r.normalized else "")
                 for t in tasks]
        norm = f"{r.normalized_average:.1f}" if r.normalized_average is not None else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * r.average:.1f} | {norm} |")
    return "\n".join(lines)
