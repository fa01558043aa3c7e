"""`lorafuse experiment`: train each task's adapter, fuse with every requested method and space, search each
method's coefficients on validation, evaluate the chosen setting on test, and write the report.

Every unit of work (an adapter, a reference evaluation, a fusion job with its search) is a job cached on disk by a
hash of what determines it, so a rerun skips finished work and an interrupted run resumes. One failed job is
recorded with its error and the others go on. Stages: train → reference → fuse → data-driven → report. The
missing jobs of a stage run through an executor (`lorafuse.experiment.executors`: local, or Ray workers).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorafuse.errors import ConfigError
from lorafuse.experiment.cache import JobStore, SettingCache, adapter_key, stable_hash
from lorafuse.experiment.config import ExperimentConfig, MethodSpec
from lorafuse.experiment.executors import Executor, make_executor
from lorafuse.experiment.jobs import ExperimentError, Job, resolve_call
from lorafuse.experiment.selection import NEUTRAL  # noqa: F401 (NEUTRAL re-exported)
from lorafuse.experiment.selection import point_score as _score
from lorafuse.validate import check_inside

STAGES = ("train", "reference", "fuse", "data-driven", "report")
TRAIN_RECORD = "lorafuse_train.json"
EVAL_PROTOCOL = 2  # 2: fused results evaluated exactly (dense element-wise results before the cut to rank Σr)  # written last by lorafuse.model.training, inside the atomic output directory


@dataclass
class RunState:
    adapters: dict[str, Path] = field(default_factory=dict)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> task -> own accuracy
    trusted: dict[str, list[str]] = field(default_factory=dict)  # split -> tasks whose adapter beat its majority
    training: list[dict[str, Any]] = field(default_factory=list)  # one record per task's adapter
    jobs: list[dict[str, Any]] = field(default_factory=list)  # reference, fused and data-driven results
    stage_seconds: dict[str, float] = field(default_factory=dict)  # this invocation's wall time per stage
    executed: list[str] = field(default_factory=list)  # what actually ran (not loaded from the cache)
    not_run: list[str] = field(default_factory=list)  # configured jobs of unselected stages with no result yet


class ExperimentRunner:
    """Runs one experiment config into a run directory (`jobs/`, `fused/`, `report/`; `adapters/` unless a
    shared `cache_dir` is given). `trainer` replaces `lorafuse.model.training.train_adapter` (tests, custom training).
    `stages` restricts the work to some stages; the others only read what earlier runs left in the cache.
    `executor` runs the missing jobs of each stage (default: the config's `executor:`, local unless it says ray)."""

    def __init__(self, config: ExperimentConfig, out: str | Path, progress: bool = True,
                 cache_dir: str | Path | None = None, stages: Sequence[str] | None = None,
                 trainer: Callable[..., Path] | None = None, executor: Executor | None = None) -> None:
        self.config, self.out, self.progress = config, Path(out), progress
        self.adapter_root = Path(cache_dir or self.out) / "adapters"
        self.stages = tuple(stages or STAGES)
        for stage in self.stages:
            if stage not in STAGES:
                raise ConfigError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
        self.store = JobStore(self.out / "jobs")
        self.state = RunState()
        self._trainer = trainer
        self.executor = executor
        self._evaluators: dict[str, Any] = {}
        self._heads: dict[str, dict[str, Any]] | None = None
        self._fingerprints: dict[str, dict[str, str]] = {}
        self._bar: Any = None
        self._prepared = False

    # -- stages ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """All stages up to the last requested one; returns the results (as in results.json) when the report
        stage ran, else {}."""
        from tqdm.auto import tqdm

        self.prepare()
        steps = {"train": self.train_all, "reference": self.references, "fuse": self.fuse_all,
                 "data-driven": self.data_driven, "report": self.report}
        last = max(STAGES.index(s) for s in self.stages)
        results: dict[str, Any] = {}
        own_executor = self.executor is None
        self.executor = self.executor or make_executor(self.config.executor)
        try:
            with tqdm(total=self._job_count(STAGES[:last + 1]), desc=f"experiment {self.config.name}",
                      unit="job", disable=not self.progress, position=0) as self._bar:
                for name in STAGES[:last + 1]:
                    start = time.perf_counter()
                    results = steps[name]() or results
                    self.state.stage_seconds[name] = round(time.perf_counter() - start, 2)
        finally:
            self._bar = None
            if own_executor:
                self.executor.close()
                self.executor = None
        if results:
            from lorafuse.experiment.report import finalize_timings

            finalize_timings(self.out / "report", self.state.stage_seconds)
        return results

    def prepare(self, fresh: bool = False) -> None:
        """Validate the whole config and every data split the stages will read, then open the run directory
        (lorafuse.experiment.rundir: refused unless it is a run or new; `fresh` empties it first) and remove a
        killed run's leftovers. Nothing is trained, created or deleted before the checks pass."""
        if self._prepared:
            return
        from lorafuse.experiment import rundir
        from lorafuse.experiment.validate import check_experiment

        check_experiment(self.config, STAGES[:max(STAGES.index(s) for s in self.stages) + 1], self._formulation)
        rundir.check_apart(self.out, rundir.experiment_inputs(self.config))
        cache = self.adapter_root.parent
        rundir.prepare(self.out, fresh, None if cache.resolve() == self.out.resolve() else cache)
        rundir.remove_leftovers(self.out, [self._adapter_path(t) for t in self.config.tasks])
        self._prepared = True

    def train_all(self) -> None:
        """One adapter per task; a failed task is recorded and the others still train, then the run stops."""
        self.state.training = self._run_stage([self._train_job(task) for task in self.config.tasks])
        failed = [r for r in self.state.training if r["status"] != "ok"]
        if failed:
            raise ExperimentError("training failed: " + "; ".join(f"{r['task']}: {r['error']}" for r in failed)
                                  + f" (records in {self.store.root})")
        self.state.adapters = {r["task"]: Path(r["adapter"]) for r in self.state.training}

    def references(self) -> None:
        """Each task's own adapter on its own task (the denominators of normalized accuracy), and the base."""
        key = {"adapters": self.adapter_ids()}
        own, = self._run_stage([self._job("individual", "reference", key, "_individual", required=True)])
        if own["status"] != "ok":  # every fused job is normalized by it: nothing later can be measured
            raise ExperimentError(f"the reference job '{own['job_id']}' failed: {own.get('error')}")
        self.state.reference = {split: own[split]["accuracy"] for split in ("validation", "test")}
        from lorafuse.experiment.analysis import trusted_tasks

        self.state.trusted = {split: trusted_tasks(own[split], self.config.tasks)[0] for split in own
                              if split in ("validation", "test")}
        base, = self._run_stage([self._job("base", "reference", key, "_base", required=True)])
        self.state.jobs += [own, base]

    def fuse_all(self) -> None:
        planned = []
        for spec in self.config.methods:
            job = self._job(*self._search_job(spec), "_fuse", (spec,), label=spec.name)
            if isinstance(job, Job):  # its settings, for an executor that spreads them over its workers
                job = replace(job, parts=self._search_parts(spec), finish="_finish_search")
            elif job is not None:
                self._remember_settings(spec, job)
            planned.append(job)
        for job in self._run_stage(planned):
            self._add(job)

    def data_driven(self) -> None:
        from lorafuse.experiment import data_driven

        planned = [self._job(job_id, "data-driven", key, call, args) for job_id, key, call, args
                   in data_driven.jobs(self)]
        for job in self._run_stage(planned):
            self._add(job)

    def report(self) -> dict[str, Any]:
        from lorafuse.experiment.report import write_report

        if self._bar is not None:
            self._bar.set_postfix_str("report")
        self._mark_floors()
        results = write_report(self.out / "report", self.config, self.state)
        self._advance()
        return results

    def _mark_floors(self) -> None:
        """Record in each fused job the parameters its chosen setting holds at the method's floor on these
        adapters (`at_floor`), so the report does not ask to widen a grid below what the method can express."""
        from lorafuse.adapters.reader import LoraAdapter
        from lorafuse.merging.methods.registry import get_method

        adapters = [LoraAdapter(p) for p in self.state.adapters.values()]
        if not adapters:
            return
        modules = sorted({m for a in adapters for m in a.modules})
        ranks = [a.module_rank(m) for a in adapters for m in a.modules]
        cores = [sum(a.module_rank(m) for a in adapters if m in a.modules) for m in modules]
        shapes = {"full": [next(a.module_shape(m) for a in adapters if m in a.modules) for m in modules],
                  "core": [(r, r) for r in cores if r]}  # a module's core is R×R, R = Σr over the adapters holding it
        for job in self.state.jobs:
            if job.get("kind") != "static" or job.get("space") not in shapes or not job.get("method"):
                continue
            try:
                params = get_method(job["method"]).parse_params(job.get("params") or {})
            except ConfigError:
                continue
            if floors := params.floors(shapes[job["space"]], ranks):
                job["at_floor"] = floors

    # -- units of work -----------------------------------------------------------------------------------
    def _train_job(self, task: str) -> dict[str, Any] | Job:
        """The record of a task's adapter found in the cache, or the job that trains it; a task given an existing
        adapter (`adapters:`) trains nothing."""
        if task in self.config.adapters:
            self._advance()
            return self._given(task, self.config.adapters[task])
        key = adapter_key(self.config, task, self.fingerprint(task, "train"))
        path = self._adapter_path(task)
        job_id = f"train-{task}-{key[:8]}"
        if (path / TRAIN_RECORD).is_file():
            record = self.store.get(job_id) or self._reused(job_id, task, path)
            self._advance()
            return record
        if "train" not in self.stages:
            raise ExperimentError(f"task '{task}': no trained adapter in {self.adapter_root} (run the train stage)")
        record = {"name": f"train {task}", "kind": "train", "task": task, "adapter": str(path)}
        return Job(job_id, "train", f"train {task}", "_train", (task, str(path)), record=record,
                   executed_as=f"train:{task}")

    def _given(self, task: str, source: str) -> dict[str, Any]:
        """A user's adapter for `task`: its record names it by path and sha256 (which enter every job key)."""
        from lorafuse.adapters.reader import LoraAdapter

        adapter = LoraAdapter(source)
        summary = self._train_summary(adapter.path) if (adapter.path / TRAIN_RECORD).is_file() else {}
        return {"name": f"adapter {task}", "kind": "train", "task": task, "adapter": str(adapter.path),
                "source": source, "sha256": adapter.sha256, "given": True, "stage": "train", "status": "ok",
                "job_id": f"given-{task}-{adapter.sha256[:8]}", **summary}

    def _train(self, task: str, path: str) -> dict[str, Any]:
        """Train one task's adapter (a failure is recorded by run_job; the other tasks still train)."""
        (self._trainer or _train_adapter)(self._train_config(task, Path(path)))
        return self._train_summary(Path(path))

    def _adapter_path(self, task: str) -> Path:
        key = adapter_key(self.config, task, self.fingerprint(task, "train"))
        return check_inside(self.adapter_root / f"{task}-{key[:10]}", self.adapter_root, "adapter directory")

    def _train_config(self, task: str, path: Path) -> Any:
        from lorafuse.model.training import TrainConfig

        return TrainConfig(task=task, model=self.config.model, output=str(path), formulation=self.config.formulation,
                           data_dir=self.config.data_dir, overwrite=True, resume=True, progress=self.progress,
                           max_eval_examples=self.config.eval.max_validation, **self.config.train_for(task).model_dump())

    def _reused(self, job_id: str, task: str, path: Path) -> dict[str, Any]:
        """An adapter found in a shared cache (trained by another run directory): recorded, not retrained."""
        summary = self._train_summary(path)
        record = {"name": f"train {task}", "kind": "train", "task": task, "adapter": str(path), "stage": "train",
                  "job_id": job_id, "status": "ok", "reused": True, **summary,
                  "seconds": summary.get("train_seconds")}
        self.store.put(job_id, record)
        return record

    @staticmethod
    def _train_summary(path: Path) -> dict[str, Any]:
        from lorafuse.experiment.cache import read_json_or_none

        data = read_json_or_none(path / TRAIN_RECORD) or {}  # an unreadable record loses its numbers, not the run
        keys = ("train_examples", "train_steps", "train_loss", "train_seconds", "validation_accuracy")
        return {k: data[k] for k in keys if k in data}

    def evaluator(self, split: str) -> Any:
        """One loaded model and tokenized split per run, shared by every job that evaluates on it."""
        if split not in self._evaluators:
            self._evaluators[split] = self._new_evaluator(split, self.config.eval.dtype)
        return self._evaluators[split]

    def fp32_evaluator(self, split: str) -> Any:
        """The evaluator of `split` computing in fp32: the shared one when evaluation runs in fp32, else one loaded
        for it (once). Gradient-based and statistical data-driven fusion (AdaMerging, RegMean) run here
        (lorafuse.model.precision)."""
        shared = self.evaluator(split)
        if not shared.precision.reduced:
            return shared
        if f"{split}@float32" not in self._evaluators:
            self._evaluators[f"{split}@float32"] = self._new_evaluator(split, "float32")
        return self._evaluators[f"{split}@float32"]

    def _new_evaluator(self, split: str, dtype: str) -> Any:
        import lorafuse.fusion.router  # noqa: F401 (registers the router kind with the evaluator)
        from lorafuse.model.evaluation import Evaluator

        e = self.config.eval
        return Evaluator(
            self.config.model, self.config.tasks, split=split, formulation=self.config.formulation,
            data_dir=self.config.data_dir, max_examples=e.max_validation if split == "validation" else e.max_test,
            batch_size=e.batch_size, max_length=e.max_length or self.config.train.max_length, progress=False,
            dtype=dtype)

    def own_heads(self) -> dict[str, dict[str, Any]]:
        """Each task's classification head from its own adapter (empty in the chat formulation)."""
        if self._heads is None:
            from lorafuse.model.evaluation import own_head

            self._heads = {t: h for t, p in self.state.adapters.items() if (h := own_head(p))}
        return self._heads

    def _individual(self) -> dict[str, Any]:
        from lorafuse.model.evaluation import EvalResult

        out: dict[str, Any] = {"name": "individual", "kind": "reference"}
        for split in ("validation", "test"):
            ev = self.evaluator(split)
            own = [ev.subset([t]).evaluate(p) for t, p in self.state.adapters.items()]
            merged = EvalResult.combine(own)
            out[split] = merged.normalize(merged.accuracy).to_dict()
        if self.evaluator("validation").precision.reduced:
            out["precision_check"] = self._precision_check(out["validation"])
        return out

    def _precision_check(self, reduced: dict[str, Any]) -> dict[str, Any]:
        """The individual adapters on validation in fp32 too: the share of predictions equal to the reduced
        dtype's and each task's accuracy difference (analysis warns below PRECISION_AGREEMENT)."""
        ev = self.evaluator("validation")
        reduced_predictions = {t: list(p) for t, p in ev.last_predictions.items()}
        fp32 = self._new_evaluator("validation", "float32")
        equal, total, difference = 0, 0, {}
        for task, path in self.state.adapters.items():
            accuracy = fp32.subset([task]).evaluate(path).accuracy[task]
            a, b = fp32.last_predictions[task], reduced_predictions[task]
            equal, total = equal + sum(x == y for x, y in zip(a, b)), total + len(a)
            difference[task] = reduced["accuracy"][task] - accuracy
        return {"dtype": ev.precision.dtype, "agreement": equal / max(total, 1), "examples": total,
                "accuracy_difference": difference}

    def _base(self) -> dict[str, Any]:
        """The base model without LoRA (classify: with each task's trained head, since the base has none)."""
        name = "base + task heads" if self._formulation() == "classify" else "base (zero-shot)"
        out: dict[str, Any] = {"name": name, "kind": "reference"}
        for split in ("validation", "test"):
            result = self.evaluator(split).evaluate(None, heads=self.own_heads())
            out[split] = result.normalize(self.state.reference.get(split, {})).to_dict()
        return out

    def seeds(self, base: int) -> list[int]:
        """The seeds of a stochastic method or data-driven job: `config.seeds` consecutive ones from `base`."""
        return [base + i for i in range(self.config.seeds)]

    def _fuse(self, spec: MethodSpec) -> dict[str, Any]:
        """Search on validation (average normalized accuracy over the tasks whose adapters learned; one setting
        for all tasks), the best on test, saved as a PEFT adapter. A stochastic method (DARE's random drop) is
        merged with each seed at every setting; the setting best on average over seeds is chosen, and its test
        results are the mean over seeds, each seed's kept in `seed_runs`."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        if spec.sampler == "tpe":
            from lorafuse.experiment import tuning

            for slot in tqdm(tuning.trial_slots(self, spec), desc=spec.name, unit="trial",
                             disable=not self.progress, leave=False, position=1):
                tuning.run_trial(self, spec, slot)
            return self._finish_search(spec, [], time.perf_counter() - start)
        sweep, best, result = [], None, None
        for point in tqdm(self.settings(spec), desc=spec.name, unit="setting", disable=not self.progress,
                          leave=False, position=1):
            merged, point_result = self._search_point(spec, point, keep=True)
            sweep.append(point_result)
            if best is None or _score(point_result) > _score(best):  # only the best's merges are kept
                best, result = point_result, merged
        return self._finish_search(spec, sweep, time.perf_counter() - start, merged=result)

    def _search_job(self, spec: MethodSpec) -> tuple[str, str, dict[str, Any]]:
        key = {"spec": _spec_key(spec), "adapters": self.adapter_ids()}
        if spec.stochastic:
            key["seeds"] = self.seeds(spec.params.get("seed", 0))
        return f"fuse-{_slug(spec.name)}", "fuse", key

    def search_id(self, spec: MethodSpec) -> str:
        """The job id of a method's search (its Optuna study is named after it)."""
        name, _, key = self._search_job(spec)
        return self._job_id(name, key)

    def _search_parts(self, spec: MethodSpec) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        """The independent pieces of a method's search, for executors that spread them over workers."""
        if spec.sampler == "tpe":
            from lorafuse.experiment import tuning

            return tuple(("lorafuse.experiment.tuning:run_trial", (spec, slot))
                         for slot in tuning.trial_slots(self, spec))
        return tuple(("_search_point", (spec, point)) for point in self.settings(spec))

    def _seeds_of(self, spec: MethodSpec) -> list[int | None]:
        return self.seeds(spec.params.get("seed", 0)) if spec.stochastic else [None]

    def _merges(self, spec: MethodSpec, point: dict[str, Any]) -> list[Any]:
        """The merges of one setting: one per seed for a stochastic method (DARE's random drop), else one."""
        return [self._merge(spec, point if seed is None else {**point, "seed": seed}) for seed in self._seeds_of(spec)]

    def _search_point(self, spec: MethodSpec, point: dict[str, Any], keep: bool = False) -> Any:
        """One setting of a search: its validation result, averaged over seeds for a stochastic method, with
        the score the choice compares (and the merges themselves when `keep`)."""
        from lorafuse.experiment.analysis import mean_split

        cache = self.setting_cache(spec)
        if (cached := cache.get(point)) is not None:
            return (None, cached) if keep else cached
        merged, vals = self._merges(spec, point), []
        for result in merged:
            val = self.evaluator("validation").evaluate(result, heads=self.own_heads())
            vals.append(_without_examples(val.normalize(self.state.reference["validation"]).to_dict()))
        point_result = {"params": point, "validation": mean_split(vals) if len(vals) > 1 else vals[0]}
        point_result["score"] = self._selection_score(point_result["validation"])
        if len(vals) > 1:
            point_result["seed_scores"] = [self._selection_score(v) for v in vals]
        cache.put(point, point_result)
        return (merged, point_result) if keep else point_result

    def setting_cache(self, spec: MethodSpec) -> SettingCache:
        """Where a method's evaluated settings are kept, keyed by its job key without the grid."""
        key = {"spec": spec.model_dump(exclude={"label", "search", "samples", "sample_seed", "sampler"}),
               "adapters": self.adapter_ids(), "eval": self._eval_key(), "data": self._eval_data()}
        if spec.stochastic:
            key["seeds"] = self.seeds(spec.params.get("seed", 0))
        name = _slug(spec.method if spec.space == "full" else f"{spec.method}-{spec.space}")
        return SettingCache(self.store.root / "settings" / f"{name}-{stable_hash(key)[:8]}")

    def _remember_settings(self, spec: MethodSpec, job: dict[str, Any]) -> None:
        """Store a finished search's settings (jobs that ran before settings were kept on their own)."""
        sweep = job.get("sweep") or []
        if job.get("status") != "ok" or not sweep or spec.sampler == "tpe":
            return
        cache = self.setting_cache(spec)
        best = max(sweep, key=_score)
        if cache.chosen_job(best["params"]) is not None:
            return
        for point in sweep:
            if cache.get(point["params"]) is None:
                cache.put(point["params"], point)
        cache.set_chosen(best["params"], job["job_id"])

    def _reused_test(self, spec: MethodSpec, params: dict[str, Any]) -> dict[str, Any] | None:
        """The test results, saved-adapter record and update sketch of a finished job of the same method that
        chose the same setting (a widened grid that did not move the choice), or None."""
        job_id = self.setting_cache(spec).chosen_job(params)
        job = self.store.get(job_id) if job_id is not None else None
        if job is None:
            return None
        return {k: job[k] for k in ("test", "seeds", "seed_runs", "saved_adapter", "update_sketch") if k in job}

    def _finish_search(self, spec: MethodSpec, sweep: list[dict[str, Any]], search_seconds: float,
                       merged: Any = None) -> dict[str, Any]:
        """The best setting of `sweep` (a TPE search: of its study) on test, saved as a PEFT adapter; the best
        is merged again when the search ran elsewhere. A stochastic method's test results are the mean over
        seeds, each seed's kept in `seed_runs`."""
        if spec.sampler == "tpe":
            from lorafuse.experiment import tuning

            sweep = tuning.completed(self, spec)
        best = max(sweep, key=_score, default=None)
        if best is None:
            raise ExperimentError(f"method '{spec.name}': no setting of its search was evaluated")
        results = merged if merged is not None else self._merges(spec, best["params"])
        fused_dir = results[0].save(self.out / "fused" / _slug(spec.name), overwrite=True)
        outcome = self._reused_test(spec, best["params"]) or self._test_outcome(spec, results, best["score"])
        params = {k: v for k, v in {**spec.params, **best["params"]}.items() if not (spec.stochastic and k == "seed")}
        self.setting_cache(spec).set_chosen(best["params"], self.search_id(spec))
        return {"name": spec.name, "kind": "static", "method": spec.method, "space": spec.space,
                "params": params, "sweep": sweep, "validation": best["validation"], **outcome,
                "fused_dir": str(fused_dir), "search_seconds": round(search_seconds, 2), "settings_tried": len(sweep)}

    def _test_outcome(self, spec: MethodSpec, results: list[Any], score: float) -> dict[str, Any]:
        """The chosen setting on test (the mean over seeds for a stochastic method, each seed's kept), with what
        its saved adapter keeps and its update sketch."""
        from lorafuse.experiment.analysis import over_seeds

        tests = [self.evaluator("test").evaluate(r, heads=self.own_heads()).normalize(self.state.reference["test"])
                 for r in results]
        seeds = self._seeds_of(spec)
        outcome = over_seeds([(s, t.to_dict()) for s, t in zip(seeds, tests)]) if spec.stochastic \
            else {"test": tests[0].to_dict()}
        return {**outcome, "update_sketch": update_sketch(results[0].modules),
                "saved_adapter": self._saved_adapter(results[0], score)}

    def _saved_adapter(self, result: Any, exact_score: float) -> dict[str, Any]:
        """What the saved adapter keeps of the evaluated (exact) result: nothing is cut for exact, aligned and
        spectral methods; a dense element-wise result is saved at rank min(Σr, m, n), so its retained energy and
        its own validation score are recorded beside the exact one's."""
        if not result.exact:
            return {"exact": True, "retained_energy": 1.0}
        energy = result.provenance["retained_energy"]
        val = self.evaluator("validation").evaluate(dict(result.modules), heads=self.own_heads() | result.heads,
                                                    fan_in_fan_out=bool(result.config.get("fan_in_fan_out")))
        split = val.normalize(self.state.reference["validation"]).to_dict()
        return {"exact": False, "retained_energy": energy["min"], "retained_energy_mean": energy["mean"],
                "truncated_modules": len(result.exact), "rank": max(u.rank for u in result.modules.values()),
                "validation_score": self._selection_score(split), "exact_validation_score": exact_score}

    def _selection_score(self, split: dict[str, Any]) -> float:
        """Validation score: average normalized accuracy over the tasks whose own adapters beat their majority
        class on validation (all tasks when none did)."""
        from lorafuse.experiment.analysis import normalized_over

        tasks = self.state.trusted.get("validation") or list(split["normalized"])
        return normalized_over(split, tasks) or 0.0

    @staticmethod
    def settings(spec: MethodSpec) -> list[dict[str, Any]]:
        """The grid, or `samples` points of it drawn without replacement (seeded) when the spec asks for a
        random search (`MethodSpec.points`)."""
        return spec.points()

    def _merge(self, spec: MethodSpec, point: dict[str, Any]) -> Any:
        from lorafuse.merging.engine import merge

        tasks = list(self.state.adapters)
        return merge([self.state.adapters[t] for t in tasks], spec.method, names=tasks, space=spec.space,
                     rank=spec.rank, modules_to_save="per_task", progress=False, keep_exact=True,
                     **{**spec.params, **point})

    # -- jobs and caching ---------------------------------------------------------------------------------
    def _job(self, name: str, stage: str, key: dict[str, Any], call: str, args: tuple[Any, ...] = (),
             required: bool = False, label: str | None = None, **split: Any) -> dict[str, Any] | Job | None:
        """A finished job from the store, the job to run (when its stage is selected), or None. The id hashes
        the key with the evaluation settings and the evaluation data."""
        job_id = self._job_id(name, key)
        done = self.store.get(job_id)
        if done is not None or stage not in self.stages:
            if done is None and required:
                raise ExperimentError(f"job '{job_id}' of stage '{stage}' has not run (select that stage)")
            if done is None:
                self.state.not_run.append(label or name)  # the report says it is partial
            self._advance(done is not None)
            return done
        return Job(job_id, stage, label or name, call, args, **split)

    def _job_id(self, name: str, key: dict[str, Any]) -> str:
        return f"{name}-{stable_hash({**key, 'eval': self._eval_key(), 'data': self._eval_data()})[:8]}"

    def _eval_key(self) -> dict[str, Any]:
        """The evaluation settings as they run here: the dtype resolved on this machine (an `auto` run on a bf16
        machine is not an fp32 result), and the protocol (fused results evaluated exactly, before any cut)."""
        from lorafuse.model.models import default_device
        from lorafuse.model.precision import resolve_precision

        settings = self.config.eval.model_dump()
        settings["dtype"] = resolve_precision(settings["dtype"], default_device()).dtype
        return {**settings, "protocol": EVAL_PROTOCOL}

    def _run_stage(self, planned: Sequence[dict[str, Any] | Job | None]) -> list[Any]:
        """The planned results in order: finished ones as they are, jobs run through the executor."""
        jobs = [p for p in planned if isinstance(p, Job)]
        ran = iter(self.executor.run_jobs(self, jobs) if jobs else [])
        return [next(ran) if isinstance(p, Job) else p for p in planned]

    def run_job(self, job: Job, parts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Run one job in this process (on whichever worker holds this runner), time it, isolate its failure and
        store its result. `parts`: the results of a split job's pieces, handed to its finish call."""
        start = time.perf_counter()
        part_seconds = sum(p["seconds"] for p in parts or [])
        failed = next((p for p in parts or [] if not p["ok"]), None)
        if failed is not None:
            return self.record_failure(job, failed["error"], failed["traceback"], part_seconds)
        args = job.args if parts is None else (*job.args, [p["value"] for p in parts], part_seconds)
        try:
            result = {**job.record, **resolve_call(self, job.call)(*args), "status": "ok"}
        except Exception as exc:  # one failed job is reported; the others go on
            return self.record_failure(job, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=8),
                                       part_seconds + time.perf_counter() - start)
        return self._store(job, result, part_seconds + time.perf_counter() - start)

    def record_failure(self, job: Job, error: str, trace: str, seconds: float) -> dict[str, Any]:
        result = {"name": job.label, **job.record, "status": "failed", "error": error, "traceback": trace}
        return self._store(job, result, seconds)

    def _store(self, job: Job, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        result.update(seconds=round(seconds, 2), job_id=job.job_id, stage=job.stage)
        self.store.put(job.job_id, result)
        return result

    def job_started(self, job: Job) -> None:
        """Called by the executor on this (driver) process when a job is handed out."""
        if self._bar is not None:
            self._bar.set_postfix_str(job.label)
        self.state.executed.append(job.trace_name)

    def job_finished(self, job: Job) -> None:
        self._advance()

    def _add(self, job: dict[str, Any] | None) -> None:
        if job is not None:
            self.state.jobs.append(job)

    def fingerprint(self, task: str, split: str) -> str:
        """sha256 of a task's split (files hashed once per run)."""
        cached = self._fingerprints.setdefault(task, {})
        if split not in cached:
            from lorafuse.tasks import get_task

            cached[split] = get_task(task).data_fingerprint(split, self.config.data_dir)
        return cached[split]

    def _eval_data(self) -> dict[str, list[str]]:
        return {t: [self.fingerprint(t, "validation"), self.fingerprint(t, "test")] for t in self.config.tasks}

    def adapter_ids(self) -> dict[str, str]:
        """What identifies each task's adapter in job keys: the cache directory's name (a hash of its training)
        for a trained one, the file hash for a given one."""
        given = {r["task"]: r["sha256"] for r in self.state.training if r.get("given")}
        return {t: f"given-{given[t]}" if t in given else p.name for t, p in self.state.adapters.items()}

    def _job_count(self, stages: Iterable[str]) -> int:
        cfg = self.config
        counts = {"train": len(cfg.tasks), "reference": 2, "fuse": len(cfg.methods), "report": 1,
                  "data-driven": (len(cfg.lorahub.shots) if cfg.lorahub else 0) + (1 if cfg.router else 0)
                  + (1 if cfg.arrow else 0) + (1 if cfg.logo else 0)
                  + (1 if cfg.regmean else 0) + (len(cfg.adamerging.inputs) if cfg.adamerging else 0)}
        return sum(counts[s] for s in stages)

    def _advance(self, counted: bool = True) -> None:
        if self._bar is not None and counted:
            self._bar.update(1)
        elif self._bar is not None:
            self._bar.total -= 1  # a job of an unselected stage that never ran
            self._bar.refresh()

    def _formulation(self) -> str:
        from lorafuse.model.models import resolve_model

        return self.config.formulation or resolve_model(self.config.model).formulation


def _train_adapter(cfg: Any) -> Path:
    from lorafuse.model.training import train_adapter

    return train_adapter(cfg)


def _without_examples(split: dict[str, Any]) -> dict[str, Any]:
    """A sweep point keeps its numbers, not per-example correctness (results.json stays compact)."""
    return {k: v for k, v in split.items() if k != "correct"}


def update_sketch(modules: dict[str, Any], probes: int = 2) -> list[float]:
    """uᵀ·ΔW·v for a few fixed random unit-scale vectors per module (from the factors, never ΔW itself): two
    fused updates are the same iff their sketches agree (up to rounding), with probability 1 otherwise."""
    import torch

    out: list[float] = []
    for name in sorted(modules):
        update = modules[name]
        m, n = update.shape
        gen = torch.Generator().manual_seed(m * 1_000_003 + n)  # the same probes for the same shape
        u = torch.randn(probes, m, generator=gen, dtype=torch.float64)
        v = torch.randn(n, probes, generator=gen, dtype=torch.float64)
        out += ((u @ update.B.double()) * (update.A.double() @ v).T).sum(1).tolist()
    return out


def _spec_key(spec: MethodSpec) -> dict[str, Any]:
    """A method's part of its job key; the default sampler is left out so that keys made before there was a
    choice of sampler still match."""
    return spec.model_dump(exclude={"sampler"} if spec.sampler == "random" else None)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
