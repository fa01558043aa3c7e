"""Where the jobs of an experiment stage run: `LocalExecutor` (one after another in this process, the default)
or `RayExecutor` (in parallel on a Ray cluster).

The runner plans a stage on the driver (which jobs are already in the job store) and hands the missing ones to an
executor. Every job runs through `ExperimentRunner.run_job`, which times it, isolates its failure and writes its
result atomically to the job store, so a Ray run and a local run leave the same files and resume each other.

The Ray executor follows mergekit-evolve's shape (an actor per GPU that merges and then evaluates): one
`EvalWorker` actor per GPU, or per CPU slot on a CPU cluster, holds a copy of the runner whose evaluators keep the
base model and the tokenized tasks loaded, so a search setting costs one merge and one evaluation on a worker. A
job with `parts` (the settings of a coefficient search) is spread over the workers setting by setting, then
finished on one (the best setting merged again, evaluated on test, saved). Jobs are handed out one per idle worker,
so results come back in the order the stage listed them whatever order they finish in. A worker that dies (a
killed process, a lost node) is restarted by Ray and its job run again (`max_retries`); a job whose retries are
spent is recorded as failed, like any other failed job. All workers must see the run directory at the same path
(a shared file system on a real cluster).
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from lorafuse.errors import ConfigError
from lorafuse.experiment.jobs import Call, ExperimentError, Job, resolve_call  # noqa: F401 (Call, Job re-exported)


class Executor(Protocol):
    def run_jobs(self, runner: Any, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Run `jobs` (none of them finished) and return their results in the same order."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """The jobs one after another in the runner's own process (today's behaviour, and the default)."""

    def run_jobs(self, runner: Any, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        results = []
        for job in jobs:
            runner.job_started(job)
            results.append(runner.run_job(job))
            runner.job_finished(job)
        return results

    def close(self) -> None:
        pass


def make_executor(settings: Any) -> Executor:
    """The executor an `executor:` config section (lorafuse.experiment.config.ExecutorSettings) asks for."""
    if settings.kind == "local":
        return LocalExecutor()
    if settings.kind == "ray":
        return RayExecutor(address=settings.address, workers=settings.workers,
                           cpus_per_worker=settings.cpus_per_worker, gpus_per_worker=settings.gpus_per_worker,
                           max_retries=settings.max_retries)
    raise ConfigError(f"executor.kind: unknown executor '{settings.kind}' (local, ray)")


def run_part(runner: Any, part: Call) -> dict[str, Any]:
    """One piece of a split job; its failure is returned (the job that owns it is then recorded as failed)."""
    start = time.perf_counter()
    try:
        out = {"ok": True, "value": resolve_call(runner, part[0])(*part[1])}
    except Exception as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
    return {**out, "seconds": time.perf_counter() - start}


# -- Ray ----------------------------------------------------------------------------------------------------
def portable_config(config: Any) -> Any:
    """The config with its local paths (data_dir, task_file, a model directory) made absolute, so that workers
    started in another directory read the same files. Job keys do not depend on these paths."""
    update = {}
    for name in ("data_dir", "task_file", "model"):
        value = getattr(config, name)
        if value and Path(value).exists():
            update[name] = str(Path(value).resolve())
    return config.model_copy(update=update)


@dataclass(frozen=True)
class Target:
    """The run a worker works for: enough to rebuild the runner there. Every call carries it (through Ray's
    object store, once per stage), so a restarted worker, or one kept from an earlier run, knows its run."""

    run_id: str
    config: Any
    out: str
    cache_dir: str
    stages: tuple[str, ...]
    trainer: Callable[..., Path] | None
    state: dict[str, Any]  # the adapters and reference accuracies of the stages before
    runner_type: Callable[..., Any]  # the driver's runner class, rebuilt on the worker


class EvalWorker:
    """The body of a Ray actor: a copy of the experiment runner on one worker slot. Its evaluators load the
    model and tokenize each split once, on the first job that needs them, and keep them for every later job
    of the same run."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.run_id: str | None = None
        self.runner: Any = None

    def pid(self) -> int:
        return os.getpid()

    def _runner(self, target: Target) -> Any:
        if target.run_id != self.run_id:
            target.config.check_tasks()  # registers the tasks of a task file in this process
            self.runner = target.runner_type(target.config, target.out, progress=False, cache_dir=target.cache_dir,
                                           stages=target.stages, trainer=target.trainer)
            self.run_id = target.run_id
        adapters = {t: Path(p) for t, p in target.state["adapters"].items()}
        if adapters != self.runner.state.adapters:
            self.runner.state.adapters, self.runner._heads = adapters, None
        self.runner.state.reference = target.state["reference"]
        return self.runner

    def run_job(self, target: Target, job: Job, parts: list[dict[str, Any]] | None = None) -> dict:
        return self._runner(target).run_job(job, parts=parts)

    def run_part(self, target: Target, part: Call) -> dict[str, Any]:
        return run_part(self._runner(target), part)


@dataclass
class _Pending:
    """A job in flight: either a whole job, or one of a split job's parts (index `part`)."""

    index: int
    part: int | None = None


class RayExecutor:
    """The jobs of a stage in parallel on a Ray cluster: `address` is `auto` or HOST:PORT of a running cluster
    (`ray start --head`); without one a local Ray instance is started on this machine. Ray is imported, and the
    workers started, only when a stage has work to do. The workers are kept until `close()`, so an executor
    passed to several runners serves them all without starting its workers again."""

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float | None = None, max_retries: int = 2,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        self.address, self.workers, self.cpus, self.gpus = address, workers, cpus_per_worker, gpus_per_worker
        self.max_retries, self.init_kwargs = max_retries, dict(init_kwargs or {})
        self._actors: list[Any] = []
        self._started_ray = False

    # -- workers ---------------------------------------------------------------------------------------------
    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise ConfigError("executor ray: Ray is not installed (pip install 'lorafuse[distributed]')") from None
        return ray

    def start(self) -> list[Any]:
        """Connect to (or start) the cluster and create the workers, once."""
        if self._actors:
            return self._actors
        ray = self._ray()
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
            ray.init(address=self.address, **kwargs)
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = self.gpus if self.gpus is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
        count = self.workers or max(1, int(resources.get("GPU", 0) // gpus if gpus else
                                           resources.get("CPU", 1) // self.cpus))
        actor = ray.remote(num_cpus=self.cpus, num_gpus=gpus, max_restarts=self.max_retries,
                           max_task_retries=self.max_retries)(EvalWorker)
        self._actors = [actor.remote(int(max(1, self.cpus))) for _ in range(count)]
        return self._actors

    @staticmethod
    def target(runner: Any) -> Target:
        """What a worker needs to act for `runner`, at the current stage."""
        state = {"adapters": {t: str(p) for t, p in runner.state.adapters.items()},
                 "reference": runner.state.reference}
        from lorafuse.experiment.cache import stable_hash

        config, out, cache = portable_config(runner.config), runner.out.resolve(), runner.adapter_root.parent.resolve()
        # a worker's loaded evaluators stay valid while these are the same (the trainer: the same object here)
        run_id = stable_hash([config.model_dump(), str(out), str(cache), runner.stages, id(runner._trainer)])
        return Target(run_id, config, str(out), str(cache), tuple(runner.stages), runner._trainer, state, type(runner))

    def pids(self) -> list[int]:
        """The process id of each worker (for tests and monitoring)."""
        ray = self._ray()
        return ray.get([a.pid.remote() for a in self._actors])

    def close(self) -> None:
        if not self._actors:
            return
        ray = self._ray()
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    # -- scheduling --------------------------------------------------------------------------------------------
    def run_jobs(self, runner: Any, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """One job (or one setting of a split job) per idle worker; a split job is finished once its last
        setting is back, ahead of the jobs still waiting."""
        if not jobs:
            return []
        ray = self._ray()
        idle = list(self.start())
        target = ray.put(self.target(runner))
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        split = {i: [None] * len(job.parts) for i, job in enumerate(jobs) if job.parts and job.finish}
        queue = [_Pending(i, k) for i, job in enumerate(jobs) for k in (range(len(job.parts)) if i in split
                                                                        else [None])]
        started: set[int] = set()
        in_flight: dict[Any, tuple[_Pending, Any]] = {}
        while queue or in_flight:
            if not idle and not in_flight:
                raise _all_workers_lost()
            while queue and idle:
                item, actor = queue.pop(0), idle.pop(0)
                job = jobs[item.index]
                if item.index not in started:
                    started.add(item.index)
                    runner.job_started(job)
                if item.part is not None:
                    ref = actor.run_part.remote(target, job.parts[item.part])
                else:  # a whole job, or a split one whose settings are all back
                    ref = actor.run_job.remote(target, _finishing(job) if item.index in split else job,
                                               split.get(item.index))
                in_flight[ref] = (item, actor)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            item, actor = in_flight.pop(ref)
            try:
                value = ray.get(ref)
                idle.append(actor)
            except ray.exceptions.RayActorError as exc:  # restarts spent: this worker is gone for good
                self._actors = [a for a in self._actors if a is not actor]
                value = self._lost(runner, jobs[item.index], item, exc)
            if item.part is None:
                results[item.index] = value
                runner.job_finished(jobs[item.index])
                continue
            parts = split[item.index]
            parts[item.part] = value
            if all(p is not None for p in parts):
                queue.insert(0, _Pending(item.index))
        return [r for r in results if r is not None]

    def _lost(self, runner: Any, job: Job, item: _Pending, exc: Exception) -> dict[str, Any]:
        error = (f"WorkerDied: the worker running this job died and was restarted {self.max_retries} time(s) "
                 f"({type(exc).__name__})")
        if item.part is not None:
            return {"ok": False, "error": error, "traceback": "", "seconds": 0.0}
        return runner.record_failure(job, error, "", 0.0)


def _finishing(job: Job) -> Job:
    """The job whose call is its `finish` step (receives the parts' values)."""
    return replace(job, call=job.finish or job.call, parts=(), finish=None)


def _all_workers_lost() -> Exception:
    return ExperimentError("every Ray worker died and none could be restarted (see the Ray logs)")
