"""`lorafuse experiment`: train each task's adapter, fuse with every requested method and space, search each
method's coefficients on validation, evaluate the chosen setting on test, and write the report.

Each stage's unit of work (an adapter, a fusion job) is cached on disk, so a rerun skips finished work and an
interrupted run resumes. One failed job is recorded with its error and the others go on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafuse import __version__
from lorafuse.experiment.config import ExperimentConfig, MethodSpec
from lorafuse.experiment.store import JobStore, stable_hash


@dataclass
class RunState:
    adapters: dict[str, Path] = field(default_factory=dict)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> task -> own accuracy
    jobs: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)  # what actually ran (not loaded from the cache)


class ExperimentRunner:
    def __init__(self, config: ExperimentConfig, out: str | Path, progress: bool = True,
                 trainer: Callable[..., Path] | None = None) -> None:
        self.config, self.out, self.progress = config, Path(out), progress
        self.store = JobStore(self.out / "jobs")
        self.state = RunState()
        self._trainer = trainer
        self._evaluators: dict[str, Any] = {}

    # -- stages ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self.config.check_tasks()
        stages = [("train", self.train_all), ("reference", self.references), ("fuse", self.fuse_all),
                  ("data-driven", self.data_driven), ("report", self.report)]
        bar = tqdm(stages, desc=f"experiment {self.config.name}", unit="stage", disable=not self.progress)
        results: dict[str, Any] = {}
        for name, stage in bar:
            bar.set_postfix_str(name)
            start = time.perf_counter()
            results = stage() or results
            self.state.stage_seconds[name] = round(time.perf_counter() - start, 2)
        from lorafuse.experiment.report import finalize_timings

        finalize_timings(self.out, self.state.stage_seconds)
        return results

    def train_all(self) -> None:
        for task in self._bar(self.config.tasks, "train"):
            self.state.adapters[task] = self._train(task)

    def references(self) -> None:
        """Each task's own adapter on its own task (the denominators of normalized accuracy), and the base."""
        own = self._cached("individual", {"adapters": self._adapter_ids()}, self._individual)
        self.state.reference = {split: own[split]["accuracy"] for split in ("validation", "test")}
        self.state.jobs.append(own)
        self.state.jobs.append(self._cached("base", {"adapters": self._adapter_ids()}, self._base))

    def fuse_all(self) -> None:
        for spec in self._bar(self.config.methods, "fuse"):
            key = {"spec": spec.model_dump(), "adapters": self._adapter_ids()}
            self.state.jobs.append(self._cached(f"fuse-{_slug(spec.name)}", key, lambda s=spec: self._fuse(s)))

    def data_driven(self) -> None:
        from lorafuse.experiment import data_driven

        for job_id, key, fn in data_driven.jobs(self):
            self.state.jobs.append(self._cached(job_id, key, fn))

    def report(self) -> dict[str, Any]:
        from lorafuse.experiment.report import write_report

        return write_report(self.out / "report", self.config, self.state)

    # -- units of work -----------------------------------------------------------------------------------
    def _train(self, task: str) -> Path:
        from lorafuse.tasks import get_task

        t = self.config.train
        key = stable_hash({"model": self.config.model, "formulation": self.config.formulation, "task": task,
                           "train": t.model_dump(), "version": __version__,
                           "data": get_task(task).data_fingerprint("train", self.config.data_dir)})
        path = self.out / "adapters" / f"{task}-{key[:10]}"
        if (path / "lorafuse_train.json").is_file():
            return path
        self.state.executed.append(f"train:{task}")
        from lorafuse.training import TrainConfig, train_adapter

        cfg = TrainConfig(task=task, model=self.config.model, output=str(path), formulation=self.config.formulation,
                          data_dir=self.config.data_dir, overwrite=True, resume=True, progress=self.progress,
                          max_eval_examples=self.config.eval.max_validation, **t.model_dump())
        return (self._trainer or train_adapter)(cfg)

    def evaluator(self, split: str) -> Any:
        if split not in self._evaluators:
            from lorafuse.evaluation import Evaluator

            e = self.config.eval
            self._evaluators[split] = Evaluator(
                self.config.model, self.config.tasks, split=split, formulation=self.config.formulation,
                data_dir=self.config.data_dir, max_examples=e.max_validation if split == "validation" else e.max_test,
                batch_size=e.batch_size, max_length=e.max_length or self.config.train.max_length, progress=False)
        return self._evaluators[split]

    def own_heads(self) -> dict[str, dict[str, Any]]:
        from lorafuse.evaluation import own_head

        return {t: h for t, p in self.state.adapters.items() if (h := own_head(p))}

    def _individual(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": "individual", "kind": "reference"}
        for split in ("validation", "test"):
            ev = self.evaluator(split)
            acc = {t: ev.subset([t]).evaluate(p).accuracy[t] for t, p in self.state.adapters.items()}
            out[split] = {"accuracy": acc, "normalized": {t: 100.0 for t in acc},
                          "average": sum(acc.values()) / len(acc), "normalized_average": 100.0}
        return out

    def _base(self) -> dict[str, Any]:
        """The base model without LoRA (classify: with each task's trained head, since the base has none)."""
        name = "base + task heads" if self._formulation() == "classify" else "base (zero-shot)"
        out: dict[str, Any] = {"name": name, "kind": "reference"}
        for split in ("validation", "test"):
            result = self.evaluator(split).evaluate(None, heads=self.own_heads())
            out[split] = result.normalize(self.state.reference.get(split, {})).to_dict()
        return out

    def _fuse(self, spec: MethodSpec) -> dict[str, Any]:
        """Grid search on validation (average normalized accuracy), the best setting on test, saved as PEFT."""
        from tqdm.auto import tqdm

        sweep = []
        start = time.perf_counter()
        for point in tqdm(spec.grid(), desc=spec.name, unit="setting", disable=not self.progress, leave=False):
            result = self._merge(spec, point)
            val = self.evaluator("validation").evaluate(result, heads=self.own_heads())
            val.normalize(self.state.reference["validation"])
            sweep.append({"params": point, "validation": val.to_dict()})
        best = max(sweep, key=lambda s: s["validation"]["normalized_average"])
        search_seconds = time.perf_counter() - start
        result = self._merge(spec, best["params"])
        test = self.evaluator("test").evaluate(result, heads=self.own_heads())
        test.normalize(self.state.reference["test"])
        fused_dir = result.save(self.out / "fused" / _slug(spec.name), overwrite=True)
        return {"name": spec.name, "kind": "static", "method": spec.method, "space": spec.space,
                "params": {**spec.params, **best["params"]}, "sweep": sweep, "validation": best["validation"],
                "test": test.to_dict(), "fused_dir": str(fused_dir), "search_seconds": round(search_seconds, 2),
                "settings_tried": len(sweep)}

    def _merge(self, spec: MethodSpec, point: dict[str, Any]) -> Any:
        from lorafuse.engine import merge

        tasks = list(self.state.adapters)
        return merge([self.state.adapters[t] for t in tasks], spec.method, names=tasks, space=spec.space,
                     rank=spec.rank, modules_to_save="per_task", progress=False, **{**spec.params, **point})

    # -- helpers -----------------------------------------------------------------------------------------
    def _cached(self, job_id: str, key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        job_id = f"{job_id}-{stable_hash({**key, 'eval': self.config.eval.model_dump()})[:8]}"
        done = self.store.get(job_id)
        if done is not None:
            return done
        self.state.executed.append(job_id)
        start = time.perf_counter()
        try:
            result = {**fn(), "status": "ok"}
        except Exception as exc:  # one failed job is reported; the others go on
            result = {"name": job_id, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=8)}
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["job_id"] = job_id
        self.store.put(job_id, result)
        return result

    def _adapter_ids(self) -> dict[str, str]:
        return {t: p.name for t, p in self.state.adapters.items()}

    def _formulation(self) -> str:
        from lorafuse.models import resolve_model

        return self.config.formulation or resolve_model(self.config.model).formulation

    def _bar(self, items: list[Any], desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False, disable=not self.progress)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
