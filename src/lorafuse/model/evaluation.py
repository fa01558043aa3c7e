"""Evaluation: per-task accuracy, normalized accuracy (÷ the task's own adapter, as KnOTS reports it) and the
cross-task average.

The `Evaluator` loads the base model and tokenizes every task once; each adapter is then applied by adding its
exact update ΔW to the weights it touches (restored afterwards), so evaluating dozens of fused candidates costs
one forward pass each and no re-loading. Classification heads are swapped per task.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafuse.adapters.reader import PREFIX, LoraAdapter
from lorafuse.adapters.writer import HEADS_DIR
from lorafuse.errors import AdapterError, ConfigError
from lorafuse.merging.algebra.lowrank import LowRank
from lorafuse.model.apply import MasterWeights, _submodule, applied, head_loaded  # noqa: F401 (re-exported)
from lorafuse.model.formulations import Batch, check_formulation, load_model, make_formulation
from lorafuse.model.kinds import installable, load_fused
from lorafuse.tasks.registry import Task, get_task

Updates = Mapping[str, LowRank]
Heads = Mapping[str, "Mapping[str, torch.Tensor] | str | Path"]


@dataclass
class EvalResult:
    """Per-task accuracy (fractions), example counts and, once normalized, accuracy as % of each task's own
    adapter (`reference`), with their cross-task averages."""

    accuracy: dict[str, float]
    examples: dict[str, int]
    normalized: dict[str, float] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, dict[str, int]] = field(default_factory=dict)  # task → label → times predicted
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # task → gold label → examples
    correct: dict[str, str] = field(default_factory=dict)  # task → per-example correctness (stats.pack_bits)
    precision: dict[str, str] = field(default_factory=dict)  # the dtype it ran in and why (lorafuse.model.precision)

    def correct_flags(self, task: str) -> Any:
        """Per-example correctness of `task` (a numpy bool array, in the split's file order)."""
        from lorafuse.stats import unpack_bits

        return unpack_bits(self.correct[task], self.examples[task])

    @classmethod
    def combine(cls, results: Sequence[EvalResult]) -> EvalResult:
        """One result of several evaluations of disjoint tasks (e.g. each task with its own adapter)."""
        fields = ("accuracy", "examples", "predicted", "labels", "correct")
        merged = cls(**{f: {k: v for r in results for k, v in getattr(r, f).items()} for f in fields})
        merged.precision = results[0].precision if results else {}
        return merged

    def collapsed(self, task: str, share: float = 0.95) -> str | None:
        """The label predicted for at least `share` of the task's examples, if any: an adapter (or a fusion)
        that has collapsed onto one class, whatever its accuracy."""
        counts = self.predicted.get(task) or {}
        total = sum(counts.values())
        label, top = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
        return label if total and top >= share * total else None

    @property
    def average(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    @property
    def normalized_average(self) -> float | None:
        return sum(self.normalized.values()) / len(self.normalized) if self.normalized else None

    def normalize(self, reference: Mapping[str, float]) -> EvalResult:
        """Accuracy as a percentage of each task's own adapter's accuracy (KnOTS's normalized accuracy)."""
        self.reference = {t: float(reference[t]) for t in self.accuracy if reference.get(t)}
        self.normalized = {t: 100.0 * self.accuracy[t] / r for t, r in self.reference.items()}
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "examples": self.examples, "average": self.average,
                "normalized": self.normalized, "normalized_average": self.normalized_average,
                "reference": self.reference, "predicted": self.predicted, "labels": self.labels,
                "correct": self.correct, "precision": self.precision}

    def interval(self, task: str) -> tuple[float, float]:
        """The 95% Wilson interval of a task's accuracy (fractions)."""
        from lorafuse.stats import wilson_interval

        return wilson_interval(self.accuracy[task] * self.examples[task], self.examples[task])

    def to_percent_dict(self) -> dict[str, Any]:
        """`to_dict` for a person to read: every accuracy-like number in percent (accuracy and its 95% Wilson
        interval, average, reference, normalized), said by `units`, as `markdown_table` prints them."""
        pct = {t: 100 * a for t, a in self.accuracy.items()}
        return {**self.to_dict(), "units": "percent", "accuracy": pct, "average": 100 * self.average,
                "accuracy_interval": {t: [100 * x for x in self.interval(t)] for t in self.accuracy},
                "reference": {t: 100 * r for t, r in self.reference.items()}}


# -- heads and updates of an adapter ----------------------------------------------------------------------
def load_task_head(task: str, adapter: str | Path | None = None,
                   heads: Mapping[str, str | Path | Mapping[str, torch.Tensor]] | None = None,
                   heads_dir: str | Path | None = None) -> dict[str, torch.Tensor] | None:
    """Task `task`'s classification head, for single and fused adapters alike. First found wins:
    (1) the adapter's own modules_to_save when its lorafuse_train.json says it was trained on `task`;
    (2) `<adapter>/task_heads/<task>.safetensors` (a merge with modules_to_save: per_task);
    (3) `heads[task]`: the task's own adapter directory, or the head tensors themselves;
    (4) `<heads_dir>/<task>`: the task's own adapter directory;
    (5) the adapter's own modules_to_save when it has no training record (a PEFT adapter trained elsewhere) and
    no heads in task_heads/ (a fused adapter's stored head is then only its first task's, kept for PEFT's SEQ_CLS
    format)."""
    from safetensors.torch import load_file

    own = LoraAdapter(adapter) if adapter is not None else None
    trained_on = own.train_record.get("task") if own is not None else None
    if own is not None and trained_on == task and own.extra_keys:
        return own_head(own.path)
    if own is not None and (own.path / HEADS_DIR / f"{task}.safetensors").is_file():
        return load_file(str(own.path / HEADS_DIR / f"{task}.safetensors"))
    given = (heads or {}).get(task)
    if given is not None:
        return dict(given) if isinstance(given, Mapping) else _required_head(given, task)
    if heads_dir is not None and (Path(heads_dir) / task).is_dir():
        return _required_head(Path(heads_dir) / task, task)
    if own is not None and trained_on is None and own.extra_keys and not any((own.path / HEADS_DIR).glob("*")):
        return own_head(own.path)
    return None


def _required_head(path: str | Path, task: str) -> dict[str, torch.Tensor]:
    head = own_head(path)
    if not head:
        raise AdapterError(f"{path}: given as task '{task}'s head but has no modules_to_save tensors "
                           "(train it with --formulation classify)")
    return head


def adapter_heads(path: str | Path, tasks: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The heads an adapter directory carries itself (rules 1, 2 and 5 of `load_task_head`), by task."""
    found = {t: load_task_head(t, path) for t in tasks}
    return {t: h for t, h in found.items() if h is not None}


def own_head(path: str | Path) -> dict[str, torch.Tensor]:
    """The modules_to_save tensors (a classification head) stored in an adapter, or {} if it has none."""
    adapter = LoraAdapter(path)
    return {k: adapter.tensor(k) for k in adapter.extra_keys}


def adapter_updates(path: str | Path) -> tuple[dict[str, LowRank], bool]:
    """Every module's exact update (scale folded in) and whether the weights are stored transposed."""
    adapter = LoraAdapter(path)
    return {m: adapter.update(m) for m in adapter.modules}, adapter.settings.fan_in_fan_out


@dataclass(frozen=True)
class InMemoryAdapter:
    """PEFT-format tensors (`base_model.model.<module>.lora_A.weight` …) with their LoraConfig (or its dict):
    an adapter that never touched the disk, e.g. a LoraHub candidate."""

    tensors: Mapping[str, torch.Tensor]
    config: Any


def in_memory_updates(adapter: InMemoryAdapter) -> tuple[dict[str, LowRank], bool]:
    """The exact updates of PEFT-format tensors, scaled by their config as PEFT would."""
    from lorafuse.adapters.config import parse_settings
    from lorafuse.adapters.reader import _LORA_KEY

    cfg = adapter.config.to_dict() if hasattr(adapter.config, "to_dict") else dict(adapter.config)
    plain = {k: v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, set) else v for k, v in cfg.items()}
    settings = parse_settings(plain, "in-memory adapter config")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        match = _LORA_KEY.match(key)
        if match is not None:
            halves.setdefault(match["module"].removeprefix(PREFIX), {})[match["kind"][-1]] = tensor
    updates = {}
    for module, h in halves.items():
        if set(h) != {"A", "B"}:
            raise AdapterError(f"in-memory adapter: module '{module}' lacks lora_{'A' if 'A' not in h else 'B'}")
        scale = settings.scaling(module, stored_rank=h["A"].shape[0])
        updates[module] = LowRank(h["B"].float() * scale, h["A"].float())
    return updates, settings.fan_in_fan_out


# -- the evaluator -----------------------------------------------------------------------------------------
AdapterLike = Any  # a directory, None, {module: LowRank}, InMemoryAdapter, a MergeResult, a Router (or its dir)


class Evaluator:
    """A base model with its tasks tokenized once; `evaluate` any number of adapters against it.

    Each adapter is applied as its exact update W ← W + ΔW on the loaded model and undone afterwards (the same
    outputs as PEFT's wrapped model, without re-loading the base or wrapping it), so a candidate costs its
    forward passes only. Batches are length-sorted; other splits than `split` are tokenized on first use."""

    def __init__(self, model: str, tasks: Sequence[str | Task], split: str = "test", formulation: str | None = None,
                 data_dir: str | Path | None = None, max_examples: int | None = None, batch_size: int = 32,
                 max_length: int | None = None, progress: bool = True, device: str | None = None,
                 dtype: str = "auto") -> None:
        from lorafuse.model.models import check_max_length, default_device, resolve_model
        from lorafuse.model.precision import resolve_precision

        info = resolve_model(model)
        check_max_length(info.path, max_length)
        self.model_name, self.formulation_name = model, formulation or info.formulation
        self.tasks = [t if isinstance(t, Task) else get_task(t) for t in tasks]
        check_formulation(self.formulation_name, self.tasks)
        self.model, tokenizer = load_model(info.path, self.formulation_name)
        self.device = default_device(device)
        self.precision = resolve_precision(dtype, self.device)
        self.model.to(self.device).eval()  # batches stay on the host; formulations move them to the model
        self.masters = MasterWeights(self.model) if self.precision.reduced else None
        self.model.to(self.precision.torch_dtype)
        self.formulation = make_formulation(self.formulation_name, tokenizer, max_length)
        self.split, self.batch_size, self.progress = split, batch_size, progress
        self.data_dir, self.max_examples = data_dir, max_examples
        self._orders: dict[tuple[str, str], list[int]] = {}  # (task, split) → file index of each sorted row
        self.last_predictions: dict[str, list[int]] = {}  # task → the last evaluation's predictions, file order
        self.batches = {t.name: self._batches(t, split) for t in self.tasks}
        self._other_splits: dict[str, dict[str, list[Batch]]] = {}

    def _batches(self, task: Task, split: str) -> list[Batch]:
        rows = self.formulation.encode(task, task.load(split, self.data_dir, self.max_examples))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].get("input_ids", rows[i].get("prompt"))))
        rows = [rows[i] for i in order]  # length-sorted batches waste little on padding
        self._orders[(task.name, split)] = order
        return [self.formulation.collate(rows[i:i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]

    def batches_for(self, task: Task, split: str | None = None) -> list[Batch]:
        """A task's batches of `split` (the evaluator's own split by default), tokenized once."""
        if split is None or split == self.split:
            return self.batches[task.name]
        cache = self._other_splits.setdefault(split, {})
        if task.name not in cache:
            cache[task.name] = self._batches(task, split)
        return cache[task.name]

    def subset(self, names: Sequence[str]) -> Evaluator:
        """The same loaded model and batches, restricted to some tasks."""
        import copy

        unknown = [n for n in names if n not in {t.name for t in self.tasks}]
        if unknown:
            raise ConfigError(f"tasks {unknown} were not loaded by this evaluator (loaded: "
                              f"{', '.join(t.name for t in self.tasks)})")
        view = copy.copy(self)
        view.tasks = [t for t in self.tasks if t.name in names]
        return view

    def accuracy(self, task: Task, split: str | None = None, bar: Any = None) -> tuple[float, int]:
        """Accuracy of the model as it stands (adapter and head already applied) on one task."""
        flags, _, _ = self._score(task, split, bar)
        return sum(flags) / len(flags), len(flags)

    def _score(self, task: Task, split: str | None, bar: Any) -> tuple[list[bool], dict[str, int], dict[str, int]]:
        """Per-example correctness in the split's file order, how often each label was predicted, and how often
        each is the gold label."""
        from collections import Counter

        hits: list[bool] = []
        predictions: list[int] = []
        counts: Counter[int] = Counter()
        gold: Counter[int] = Counter()
        with torch.inference_mode():
            for batch in self.batches_for(task, split):
                predicted = self.formulation.predict(self.model, batch, task).cpu()
                hits += (predicted == batch.targets.cpu()).tolist()
                predictions += predicted.tolist()
                counts.update(predicted.tolist())
                gold.update(batch.targets.cpu().tolist())
                if bar is not None:
                    bar.update(len(batch.targets))
        order = self._orders[(task.name, split or self.split)]
        flags, labels = [False] * len(hits), [0] * len(hits)
        for sorted_index, file_index in enumerate(order):  # back to file order: pairable across evaluators
            flags[file_index] = hits[sorted_index]
            labels[file_index] = predictions[sorted_index]
        self.last_predictions[task.name] = labels
        names = self._label_names(task)
        return (flags, {names.get(i, str(i)): n for i, n in sorted(counts.items())},
                {names.get(i, str(i)): n for i, n in sorted(gold.items())})

    def _label_names(self, task: Task) -> dict[int, str]:
        return label_names(self.formulation_name, task)

    def evaluate(self, adapter: AdapterLike = None, heads: Heads | None = None, fan_in_fan_out: bool = False,
                 tasks: Sequence[str] | None = None, split: str | None = None) -> EvalResult:
        """Accuracy of each task (all loaded ones, or `tasks`) on `split` with `adapter`: a directory (single,
        fused or router), None for the base model, an `InMemoryAdapter` or (tensors, LoraConfig) pair,
        {module: LowRank} updates, or a MergeResult. `heads` gives per-task classification heads (tensors, or
        the task's own adapter directory) where the adapter has none of its own (see `load_task_head`)."""
        if tasks is not None:
            return self.subset(tasks).evaluate(adapter, heads, fan_in_fan_out, split=split)
        if isinstance(adapter, (str, Path)):
            adapter = load_fused(adapter)  # a directory of a registered kind (a router's): loaded; else the path
        if installable(adapter):
            with adapter.installed(self.model):  # classify: each task's adapter brings its own head
                return self.evaluate(None, {**(heads or {}), **adapter.heads}, split=split)
        updates, heads, fan_in_fan_out = self._resolve(adapter, heads, fan_in_fan_out)
        with self._naming_base(adapter), applied(self.model, updates, fan_in_fan_out, self.masters):
            return self._accuracies(heads, split)

    def _accuracies(self, heads: Mapping[str, Any], split: str | None) -> EvalResult:
        """Each task's accuracy with the adapter already applied, its head swapped in."""
        from tqdm.auto import tqdm

        from lorafuse.stats import pack_bits

        accuracy, examples, predicted, labels, correct = {}, {}, {}, {}, {}
        total = sum(len(b.targets) for t in self.tasks for b in self.batches_for(t, split))
        with tqdm(total=total, desc="evaluate", unit="ex", disable=not self.progress, leave=False) as bar:
            for task in self.tasks:
                head = heads.get(task.name)
                if self.formulation_name == "classify" and head is None:
                    raise ConfigError(f"task '{task.name}': no classification head (give the task's own adapter "
                                      "with --heads / --heads-dir, or merge with modules_to_save: per_task)")
                bar.set_postfix_str(task.name)
                with head_loaded(self.model, head):
                    flags, predicted[task.name], labels[task.name] = self._score(task, split, bar)
                examples[task.name], accuracy[task.name] = len(flags), sum(flags) / len(flags)
                correct[task.name] = pack_bits(flags)
        return EvalResult(accuracy, examples, predicted=predicted, labels=labels, correct=correct,
                          precision=self.precision.to_dict())

    @contextmanager
    def _naming_base(self, adapter: AdapterLike) -> Iterator[None]:
        """Adapter errors name the base model the adapter was made for beside the one loaded here."""
        try:
            yield
        except AdapterError as exc:
            if not isinstance(adapter, (str, Path)):
                raise
            made_for = LoraAdapter(adapter).settings.base_model
            raise AdapterError(f"{adapter}: {exc} [adapter made for base '{made_for}'; this evaluator loaded "
                               f"'{self.model_name}']") from None

    def _resolve(self, adapter: AdapterLike, heads: Heads | None, fan_in_fan_out: bool) -> tuple[Updates, dict, bool]:
        """The adapter's updates and each task's head (see `load_task_head` for the order)."""
        names = [t.name for t in self.tasks]
        given = dict(heads or {})
        if isinstance(adapter, (str, Path)):
            updates, fan_in_fan_out = adapter_updates(adapter)
            found = {t: load_task_head(t, adapter, given) for t in names}
            return updates, {t: h for t, h in found.items() if h is not None}, fan_in_fan_out
        given = {t: h for t in names if (h := load_task_head(t, None, given)) is not None}  # dirs -> tensors
        if adapter is None:
            return {}, given, fan_in_fan_out
        if isinstance(adapter, tuple) and len(adapter) == 2:  # (PEFT-format tensors, LoraConfig)
            adapter = InMemoryAdapter(*adapter)
        if isinstance(adapter, InMemoryAdapter):
            updates, fan_in_fan_out = in_memory_updates(adapter)
            return updates, given, fan_in_fan_out
        if hasattr(adapter, "exact_modules") and hasattr(adapter, "heads"):  # a MergeResult: its exact result
            return adapter.exact_modules(), {**given, **adapter.heads}, bool(adapter.config.get("fan_in_fan_out"))
        return adapter, given, fan_in_fan_out


def label_names(formulation: str, task: Task) -> dict[int, str]:
    """Prediction (and target) index → label word: classify predicts shared slots, chat indexes the task's
    labels."""
    if formulation == "classify":
        from lorafuse.model.formulations import SLOT

        return {SLOT[label]: label for label in task.labels}
    return dict(enumerate(task.labels))


def load_reference(path: str | Path) -> dict[str, float]:
    """Each task's own-adapter accuracy from a JSON file: a `lorafuse eval` results file (its `reference`
    section if it has one, else its `accuracy`) or a plain {task: accuracy} mapping; percentages become
    fractions."""
    path = Path(path)
    from lorafuse.validate import load_json, read_text

    data = load_json(read_text(path), f"{path} (reference results)")
    table = data.get("reference") or data.get("accuracy", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, (int, float)) for v in table.values()):
        raise ConfigError(f"{path}: expected {{task: accuracy}} or a `lorafuse eval` results file")
    if data.get("units") == "percent":  # `lorafuse eval --output`: 0.9 there is 0.9%, not 90%
        return {t: float(v) / 100 for t, v in table.items()}
    return {t: float(v) / 100 if v > 1 else float(v) for t, v in table.items()}


TABLE_KEY = ("percent; [95% Wilson interval of the accuracy]; (normalized: % of the task's own adapter)")


def markdown_table(rows: Mapping[str, EvalResult], tasks: Sequence[str]) -> str:
    """One row per evaluated model: accuracy per task with its 95% Wilson interval (normalized in brackets),
    average; all in percent (TABLE_KEY, the line under it, says so)."""
    head = "| model | " + " | ".join(tasks) + " | average | normalized avg |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for name, r in rows.items():
        cells = [_accuracy_cell(r, t) + (f" ({r.normalized[t]:.1f})" if t in r.normalized else "") for t in tasks]
        norm = f"{r.normalized_average:.1f}" if r.normalized_average is not None else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * r.average:.1f} | {norm} |")
    return "\n".join([*lines, "", TABLE_KEY])


def _accuracy_cell(r: EvalResult, task: str) -> str:
    low, high = r.interval(task)
    return f"{100 * r.accuracy[task]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
