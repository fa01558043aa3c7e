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
from tiny_models import tiny_bert

from lorafuse.experiment.config import parse_config
from lorafuse.experiment.executors import LocalExecutor, RayExecutor
from lorafuse.experiment.runner import ExperimentRunner
from test_experiment import write_keyword_task

ray = pytest.importorskip("ray")
pytest.importorskip("optuna")

# what differs between two runs of the same work: wall times, the machine, the paths of the run directory
VOLATILE = {"seconds", "search_seconds", "train_seconds", "stage_seconds", "stage_compute_seconds", "machine",
            "fused_dir", "adapter", "created", "timestamp", "date"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("executors")
    model = tiny_bert(root / "bert")
    tasks = {**write_keyword_task(root / "data", "xa", 0), **write_keyword_task(root / "data", "xb", 1)}
    (root / "tasks.yaml").write_text(json.dumps(tasks))
    raw = {"name": "tiny", "model": str(model), "formulation": "classify", "tasks": ["xa", "xb"],
           "task_file": str(root / "tasks.yaml"),
           "train": {"rank": 4, "epochs": 1, "batch_size": 8, "lr": 1e-2, "target_modules": ["query", "value"]},
           "eval": {"max_validation": 32, "max_test": 32, "batch_size": 32},
           "methods": [{"method": "average"},
                       {"method": "task_arithmetic", "search": {"lambda": [0.5, 1.0]}},
                       {"method": "ties", "space": "knots", "search": {"density": [0.3, 1.0]}}]}
    return root, raw


def run(raw, out, executor=None, **kw):
    runner = ExperimentRunner(parse_config(raw, "test"), out, progress=False, executor=executor, **kw)
    return runner, runner.run()


def comparable(obj):
    """results.json without what legitimately differs between two runs (times, paths, the machine)."""
    if isinstance(obj, dict):
        return {k: {t: Path(d).name for t, d in v.items()} if k == "adapters" else comparable(v)
                for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def local_run(setup):
    root, raw = setup
    return run(raw, root / "local", LocalExecutor(), cache_dir=root / "cache-local")


def test_ray_run_equals_local_run(setup, local_run, cluster):
    root, raw = setup
    _, local = local_run
    executor = RayExecutor(workers=2)
    try:
        runner, distributed = run(raw, root / "ray", executor, cache_dir=root / "cache-ray")
        assert len(set(executor.pids())) == 2 and os.getpid() not in executor.pids()
    finally:
        executor.close()
    assert all(j["status"] == "ok" for j in distributed["jobs"]), [j.get("error") for j in distributed["jobs"]]
    assert runner._evaluators == {}  # the driver loaded no model: the workers trained, merged and evaluated
    assert comparable(distributed) == comparable(local)
    for name in ("average", "task_arithmetic", "ties-knots"):
        ours, theirs = tensors(root / "ray" / "fused" / name), tensors(root / "local" / "fused" / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    saved = json.loads((root / "ray" / "report" / "results.json").read_text())
    assert comparable(saved) == comparable(json.loads((root / "local" / "report" / "results.json").read_text()))


def test_local_and_ray_runs_resume_each_other(setup, local_run, cluster):
    root, raw = setup
    out = root / "resumed"
    first, _ = run(raw, out, LocalExecutor(), cache_dir=root / "cache-local", stages=["train", "reference"])
    assert [j.split("-")[0] for j in first.state.executed] == ["individual", "base"]  # adapters were cached
    executor = RayExecutor(workers=2)
    try:
        second, results = run(raw, out, executor, cache_dir=root / "cache-local")
    finally:
        executor.close()
    assert [j.rsplit("-", 1)[0] for j in second.state.executed] == ["fuse-average", "fuse-task_arithmetic",
                                                                      "fuse-ties-knots"]
    third, again = run(raw, out, LocalExecutor(), cache_dir=root / "cache-local")
    assert third.state.executed == [] and comparable(again) == comparable(results)
    assert comparable(results["jobs"]) == comparable(local_run[1]["jobs"])  # training here reused the adapters


def test_a_killed_worker_has_its_job_rerun(setup, cluster, tmp_path):
    """The worker training task xa dies (SIGKILL, as the OOM killer does) on the first attempt; Ray restarts
    it and runs the job again, and the run goes on as if nothing had happened."""
    root, raw = setup
    attempts = tmp_path / "attempts"

    def dies_once(cfg):
        import lorafuse.training

        if cfg.task == "xa":
            with open(attempts, "a") as fh:
                fh.write(f"{os.getpid()}\n")
            if len(Path(attempts).read_text().split()) == 1:
                os.kill(os.getpid(), 9)
        return lorafuse.training.train_adapter(cfg)

    fresh = {**raw, "train": {**raw["train"], "seed": 3}}
    executor = RayExecutor(workers=2, max_retries=1)
    try:
        runner, _ = run(fresh, tmp_path / "run", executor, trainer=dies_once, stages=["train"])
    finally:
        executor.close()
    pids = attempts.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # the second attempt ran in the restarted worker
    assert [r["status"] for r in runner.state.training] == ["ok", "ok"]
    assert runner.state.executed == ["train:xa", "train:xb"]
    record = json.loads(next((tmp_path / "run" / "jobs").glob("train-xa-*.json")).read_text())
    assert record["status"] == "ok" and record["train_steps"] > 0


def test_a_job_whose_worker_always_dies_is_recorded_as_failed(setup, cluster, tmp_path):
    """Retries spent: the job is a failed job like any other (the other task still trains), and the run stops
    at the end of the train stage, as it does when a training fails."""
    from lorafuse.experiment.runner import ExperimentError

    root, raw = setup

    def always_dies(cfg):
        import lorafuse.training

        if cfg.task == "xb":
            os.kill(os.getpid(), 9)
        return lorafuse.training.train_adapter(cfg)

    fresh = {**raw, "train": {**raw["train"], "seed": 4}}
    executor = RayExecutor(workers=2, max_retries=0)
    try:
        with pytest.raises(ExperimentError, match="xb: WorkerDied"):
            run(fresh, tmp_path / "run", executor, trainer=always_dies, stages=["train"])
    finally:
        executor.close()
    records = {p.name.split("-")[1]: json.loads(p.read_text()) for p in (tmp_path / "run" / "jobs").glob("*.json")}
    assert records["xa"]["status"] == "ok" and records["xb"]["status"] == "failed"


def tpe_config(raw: dict) -> dict:
    return {**raw, "methods": [{"method": "ties", "search": {"lambda": [0.5, 1.0], "density": [0.2, 0.5, 1.0]},
                                "samples": 4, "sampler": "tpe"}]}


def test_tpe_search_keeps_its_study_in_the_run_directory(setup, local_run, cluster):
    """4 TPE trials spread over 2 workers, all in one SQLite study; a local rerun of the interrupted job resumes
    from that study and runs no trial again."""
    import optuna

    root, raw = setup
    cfg = tpe_config(raw)
    spec = parse_config(cfg, "t").methods[0]
    out = root / "tpe"
    executor = RayExecutor(workers=2)
    try:
        runner, results = run(cfg, out, executor, cache_dir=root / "cache-local")
    finally:
        executor.close()
    job = results["jobs"][-1]
    assert job["status"] == "ok", job.get("error")
    assert job["settings_tried"] == 4 and all(s["params"] in spec.grid() for s in job["sweep"])
    best = max(job["sweep"], key=lambda s: s["validation"]["normalized_average"])
    assert job["validation"] == best["validation"] and job["params"]["lambda"] == best["params"]["lambda"]
    study = optuna.load_study(study_name=runner.search_id(spec), storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert study.best_value == best["validation"]["normalized_average"]

    next((out / "jobs").glob("fuse-ties-*.json")).unlink()  # as if the run had stopped before the job's end
    runner, again = run(cfg, out, LocalExecutor(), cache_dir=root / "cache-local")
    assert len(study.trials) == 4 and runner.state.executed == [job["job_id"]]
    assert comparable(again["jobs"][-1]) == comparable(job)
