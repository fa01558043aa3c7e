"""The Ray executor on a local Ray cluster (2 CPU slots, loopback only, one cluster for the module): the tiny
experiment (2 tasks, 3 methods) gives the same results.json and fused adapters as the local executor; local and
Ray runs resume each other; a worker killed in the middle of a job has that job run again; the Optuna TPE search
keeps its study in the run directory, shared by the workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafuse.experiment.config import parse_config
from lorafuse.experiment.executors import LocalExecutor, RayExecutor
from lorafuse.experiment.report import comparable_results
from lorafuse.experiment.runner import ExperimentRunner
from test_experiment import tiny_experiment

ray = pytest.importorskip("ray")
pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def executor(cluster):
    """Two workers kept for the module: each run reuses them (and their loaded models, for the same config)."""
    ray_executor = RayExecutor(workers=2)
    yield ray_executor
    ray_executor.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("executors")
    return root, tiny_experiment(root)


def run(raw, out, executor=None, **kw):
    runner = ExperimentRunner(parse_config(raw, "test"), out, progress=False, executor=executor, **kw)
    return runner, runner.run()


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def local_run(setup):
    root, raw = setup
    return run(raw, root / "local", LocalExecutor(), cache_dir=root / "cache-local")


def test_ray_run_equals_local_run(setup, local_run, executor):
    root, raw = setup
    _, local = local_run
    runner, distributed = run(raw, root / "ray", executor, cache_dir=root / "cache-ray")
    assert len(set(executor.pids())) == 2 and os.getpid() not in executor.pids()
    assert all(j["status"] == "ok" for j in distributed["jobs"]), [j.get("error") for j in distributed["jobs"]]
    assert runner._evaluators == {}  # the driver loaded no model: the workers trained, merged and evaluated
    assert comparable_results(distributed) == comparable_results(local)
    for name in ("average", "task_arithmetic", "ties-knots"):
        ours, theirs = tensors(root / "ray" / "fused" / name), tensors(root / "local" / "fused" / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    saved = json.loads((root / "ray" / "report" / "results.json").read_text())
    theirs = json.loads((root / "local" / "report" / "results.json").read_text())
    assert comparable_results(saved) == comparable_results(theirs)


def test_local_and_ray_runs_resume_each_other(setup, local_run, executor):
    root, raw = setup
    out = root / "resumed"
    first, _ = run(raw, out, LocalExecutor(), cache_dir=root / "cache-local", stages=["train", "reference"])
    assert [j.split("-")[0] for j in first.state.executed] == ["individual", "base"]  # adapters were cached
    second, results = run(raw, out, executor, cache_dir=root / "cache-local")
    assert [j.rsplit("-", 1)[0] for j in second.state.executed] == ["fuse-average", "fuse-task_arithmetic",
                                                                      "fuse-ties-knots"]
    third, again = run(raw, out, LocalExecutor(), cache_dir=root / "cache-local")
    assert third.state.executed == [] and comparable_results(again) == comparable_results(results)
    # training here reused the adapters
    assert comparable_results(results["jobs"]) == comparable_results(local_run[1]["jobs"])


def tpe_config(raw: dict) -> dict:
    return {**raw, "methods": [{"method": "ties", "search": {"lambda": [0.5, 1.0], "density": [0.2, 0.5, 1.0]},
                                "samples": 4, "sampler": "tpe"}]}


def test_tpe_search_keeps_its_study_in_the_run_directory(setup, local_run, executor):
    """4 TPE trials spread over 2 workers, all in one SQLite study; a local rerun of the interrupted job resumes
    from that study and runs no trial again."""
    import optuna

    root, raw = setup
    cfg = tpe_config(raw)
    spec = parse_config(cfg, "t").methods[0]
    out = root / "tpe"
    runner, results = run(cfg, out, executor, cache_dir=root / "cache-local")
    job = results["jobs"][-1]
    assert job["status"] == "ok", job.get("error")
    assert job["settings_tried"] == 4 and all(s["params"] in spec.grid() for s in job["sweep"])
    from lorafuse.experiment.runner import _score

    best = max(job["sweep"], key=_score)  # equal scores go to the smaller change from task arithmetic
    assert job["validation"] == best["validation"] and job["params"]["lambda"] == best["params"]["lambda"]
    study = optuna.load_study(study_name=runner.search_id(spec), storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert study.best_value == best["validation"]["normalized_average"]

    next((out / "jobs").glob("fuse-ties-*.json")).unlink()  # as if the run had stopped before the job's end
    runner, again = run(cfg, out, LocalExecutor(), cache_dir=root / "cache-local")
    assert len(study.trials) == 4 and runner.state.executed == [job["job_id"]]
    assert comparable_results(again["jobs"][-1]) == comparable_results(job)


def test_a_killed_worker_has_its_job_rerun(setup, executor, tmp_path):
    """The worker training task xa dies (SIGKILL, as the OOM killer does) on its first attempt: Ray restarts it
    and runs the job again. The worker training xb dies on every attempt: once its retries are spent the job is
    recorded as failed like any other, xa still trains, and the run stops after the train stage, as it does when
    a training fails."""
    from lorafuse.experiment.runner import ExperimentError

    root, raw = setup

    def dies(cfg):
        import lorafuse.model.training

        log = tmp_path / f"attempts-{cfg.task}"
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        if cfg.task == "xb" or len(log.read_text().split()) == 1:
            os.kill(os.getpid(), 9)
        return lorafuse.model.training.train_adapter(cfg)

    fresh = {**raw, "train": {**raw["train"], "seed": 3}}
    executor.close()  # frees the cluster's 2 CPU slots (the module's executor starts its workers again if asked)
    dying = RayExecutor(workers=2, max_retries=1)
    try:
        with pytest.raises(ExperimentError, match="xb: WorkerDied"):
            run(fresh, tmp_path / "run", dying, trainer=dies, stages=["train"])
        assert len(dying._actors) == 1  # the worker that died for good is not handed later jobs
    finally:
        dying.close()
    for task in ("xa", "xb"):
        pids = (tmp_path / f"attempts-{task}").read_text().split()
        assert len(pids) == 2 and pids[0] != pids[1]  # the second attempt ran in the restarted worker
    records = {p.name.split("-")[1]: json.loads(p.read_text()) for p in (tmp_path / "run" / "jobs").glob("*.json")}
    assert records["xa"]["status"] == "ok" and records["xa"]["train_steps"] > 0
    assert records["xb"]["status"] == "failed" and "WorkerDied" in records["xb"]["error"]
    assert (Path(records["xa"]["adapter"]) / "adapter_model.safetensors").is_file()
