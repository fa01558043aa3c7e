"""Data-driven fusion: LoraHub (few-shot, gradient-free weights per adapter), an input-routed mixture, RegMean
(input Gram matrices) and AdaMerging (coefficients by entropy minimisation), and the pieces they share."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any


def loss_batches(formulation: Any, task: Any, examples: Sequence[Any], batch_size: int | None = None) -> list[Any]:
    """Examples tokenized once into batches the formulation's `loss` accepts (chat's generative loss: with the
    answer tokens; its verbalizer loss: up to the scored position, as for prediction)."""
    rows = formulation.encode(task, examples)
    size = batch_size or max(len(rows), 1)
    extra = {"with_answer": True} if getattr(formulation, "trains_on_answer", False) else {}
    return [formulation.collate(rows[i:i + size], **extra) for i in range(0, len(rows), size)]


def without_labels(task: Any, examples: Sequence[Any]) -> list[Any]:
    """The examples with every gold label replaced by the task's first label: what an unlabelled method (RegMean,
    AdaMerging) encodes, so nothing downstream can read a label (the formulations' `encode` takes one per row and
    puts it in `Batch.targets`; after this the targets are one constant)."""
    placeholder = task.labels[0]
    return [replace(e, label=placeholder) for e in examples]


def input_batches(formulation: Any, task: Any, examples: Sequence[Any], batch_size: int) -> list[Any]:
    """Unlabelled examples tokenized once as the formulation predicts them (chat: up to the scored position),
    `batch_size` rows a batch, in the given order."""
    rows = formulation.encode(task, without_labels(task, examples))
    return [formulation.collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def sample_examples(task: Any, split: str, data_dir: str | Path | None, count: int, seed: int | str) -> list[Any]:
    """`count` examples of a task's split drawn without replacement (all of them when it has fewer), seeded."""
    import random

    pool = task.load(split, data_dir)
    return random.Random(f"{seed}-{task.name}-{split}").sample(pool, min(count, len(pool)))


def job_seeds(runner: Any, settings: Any) -> list[int]:
    """The seeds an experiment's data-driven job runs with: `settings.seeds` consecutive ones from `settings.seed`,
    or the experiment's number of seeds when the job's section leaves `seeds` out."""
    count = getattr(settings, "seeds", None)
    return runner.seeds(settings.seed) if count is None else [settings.seed + i for i in range(count)]


def data_record(split: str, examples_per_task: Mapping[str, int], labels: str, seeds: int, seconds: float,
                **notes: Any) -> dict[str, Any]:
    """What a data-driven job saw and spent, in the one form the report's cost table reads: the split its examples
    came from, how many a task (per seed), which labels it read (`none`, `class labels`, `task identity`), the
    seeds, and the method's own seconds (its search or fitting, evaluation not included)."""
    return {"split": split, "examples_per_task": dict(examples_per_task), "labels": labels, "seeds": seeds,
            "seconds": round(float(seconds), 2), **notes}


def save_fused_updates(adapters: Sequence[str | Path], names: Sequence[str] | None, updates: Mapping[str, Any],
                       out: str | Path, method: Mapping[str, Any], record: Mapping[str, Any], record_file: str,
                       overwrite: bool = False, modules_to_save: str = "auto") -> Path:
    """A data-driven method's per-module result (`{module: LowRank}`, scale folded in, exact at rank Σr) saved as a
    PEFT adapter, whole or not at all: the adapter's config, heads (`modules_to_save`) and input provenance come from
    the merge engine's exact task arithmetic of the same adapters (rank Σr per module, as here), its method and
    `record` (settings, data seen, time) are the method's own; `record_file` holds the record beside it."""
    import torch

    from lorafuse.adapters.writer import at_least_rank_one, within_shape_rank
    from lorafuse.atomic import atomic_output_dir
    from lorafuse.errors import ConfigError
    from lorafuse.merging.algebra.lowrank import LowRank
    from lorafuse.merging.engine import merge

    fused = merge(list(adapters), "linear", names=list(names) if names else None, modules_to_save=modules_to_save,
                  progress=False)
    mine = {m: at_least_rank_one(within_shape_rank(LowRank(u.B.float().cpu(), u.A.float().cpu())))
            for m, u in updates.items()}
    if set(mine) != set(fused.modules) or any(mine[m].rank != fused.modules[m].rank for m in mine):
        raise ConfigError(f"{method['name']}: its result's modules or ranks differ from its adapters' (Σr a module)")
    bad = [m for m, u in mine.items() if not (torch.isfinite(u.B).all() and torch.isfinite(u.A).all())]
    if bad:
        raise ConfigError(f"{method['name']}: non-finite result in module '{bad[0]}'")
    fused.modules = mine
    fused.provenance.update(tool=f"lorafuse {method['name']}", method=dict(method),
                            parameters=dict(record.get("settings", {})), **{method["name"]: dict(record)})
    with atomic_output_dir(out, overwrite, kind="adapter") as tmp:
        fused.write_files(tmp)
        (tmp / record_file).write_text(json.dumps(dict(record), indent=2) + "\n")
    return Path(out)
