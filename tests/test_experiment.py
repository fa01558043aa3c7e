"""The experiment end to end on tiny models: caching, resuming, failure isolation, report consistency, and every
shipped config validates."""

from __future__ import annotations

import csv
import json

import pytest
from tiny_models import tiny_bert, write_task_files

from lorafuse.errors import ConfigError
from lorafuse.experiment.config import load_config, parse_config, shipped_configs
from lorafuse.experiment.runner import ExperimentRunner


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    model = tiny_bert(root / "bert")
    files = [write_task_files(root / "data", name, labels, seed=i) for i, (name, labels) in
             enumerate([("xa", ["contradiction", "entailment", "neutral"]), ("xb", ["entailment", "not_entailment"])])]
    tasks_yaml = root / "tasks.yaml"
    merged = {}
    for f in files:
        merged.update(json.loads(f.read_text()))
    for spec in merged.values():
        spec["files"] = {s: str(root / "data" / p) for s, p in spec["files"].items()}
    tasks_yaml.write_text(json.dumps(merged))
    raw = {"name": "tiny", "model": str(model), "formulation": "classify", "tasks": ["xa", "xb"],
           "task_file": str(tasks_yaml),
           "train": {"rank": 2, "epochs": 1, "batch_size": 8, "lr": 1e-3, "target_modules": ["query", "value"]},
           "eval": {"max_validation": 16, "max_test": 16, "batch_size": 16},
           "methods": [{"method": "average"},
                       {"method": "task_arithmetic", "search": {"lambda": [0.5, 1.0]}},
                       {"method": "ties", "space": "knots", "search": {"density": [0.3, 1.0]}}]}
    return root, raw


def run(raw, out, **kw):
    runner = ExperimentRunner(parse_config(raw, "test"), out, progress=False, **kw)
    return runner, runner.run()


def test_end_to_end_then_cached_rerun(setup):
    root, raw = setup
    out = root / "run1"
    runner, results = run(raw, out)
    names = [j["name"] for j in results["jobs"]]
    assert {"individual", "average", "task_arithmetic", "ties@knots"} <= set(names)
    assert all(j["status"] == "ok" for j in results["jobs"]), [j.get("error") for j in results["jobs"]]
    assert {"train:xa", "train:xb"} <= set(runner.state.executed)
    ta = next(j for j in results["jobs"] if j["name"] == "task_arithmetic")
    assert len(ta["sweep"]) == 2 and ta["params"]["lambda"] in (0.5, 1.0)
    best = max(s["validation"]["normalized_average"] for s in ta["sweep"])
    assert ta["validation"]["normalized_average"] == best

    # the report agrees with results.json
    report = out / "report"
    saved = json.loads((report / "results.json").read_text())
    rows = list(csv.DictReader(open(report / "results.csv")))
    for job in (j for j in saved["jobs"] if "test" in j):
        for task in ("xa", "xb"):
            row = next(r for r in rows if r["method"] == job["name"] and r["task"] == task)
            assert float(row["test_accuracy"]) == pytest.approx(job["test"]["accuracy"][task])
        assert f"{100 * job['test']['average']:.1f}" in (report / "report.md").read_text()
    assert (report / "report.html").read_text().count("<img") >= 2
    assert (report / "per_task_accuracy.png").stat().st_size > 1000
    assert (out / "fused" / "task_arithmetic" / "adapter_config.json").is_file()

    rerun, again = run(raw, out)
    assert rerun.state.executed == []  # nothing trained, fused or evaluated again
    assert [j["job_id"] for j in again["jobs"]] == [j["job_id"] for j in results["jobs"]]


def test_interrupted_run_resumes_and_failures_are_isolated(setup, monkeypatch):
    root, raw = setup
    out = root / "run2"
    original = ExperimentRunner._fuse
    calls = []

    def dying(self, spec):
        calls.append(spec.name)
        if spec.name == "task_arithmetic":
            raise KeyboardInterrupt  # the process is killed in the middle of the fuse stage
        return original(self, spec)

    monkeypatch.setattr(ExperimentRunner, "_fuse", dying)
    with pytest.raises(KeyboardInterrupt):
        run(raw, out)
    monkeypatch.setattr(ExperimentRunner, "_fuse", original)

    def failing_merge(self, spec, point):
        if spec.method == "ties":
            raise RuntimeError("boom")
        return original_merge(self, spec, point)

    original_merge = ExperimentRunner._merge
    monkeypatch.setattr(ExperimentRunner, "_merge", failing_merge)
    runner, results = run(raw, out)
    executed = [j.split("-")[1] if j.startswith("fuse-") else j.split("-")[0] for j in runner.state.executed]
    assert "train:xa" not in runner.state.executed and "average" not in executed
    assert "task_arithmetic" in executed
    failed = [j for j in results["jobs"] if j["status"] == "failed"]
    assert len(failed) == 1 and "boom" in failed[0]["error"]
    assert "boom" in (out / "report" / "report.md").read_text()
    monkeypatch.setattr(ExperimentRunner, "_merge", original_merge)
    runner, results = run(raw, out)  # the failed job is retried, the rest is cached
    assert len(runner.state.executed) == 1 and all(j["status"] == "ok" for j in results["jobs"])


def test_every_shipped_config_validates():
    shipped = shipped_configs()
    assert {"demo", "nli5-minilm", "nli4-smollm2", "nli4-llama3-8b", "knots6-llama3-8b"} <= set(shipped)
    for name, path in shipped.items():
        config = load_config(path)
        assert path.read_text().startswith("# lorafuse "), f"{name}: header must state the command"
        assert config.methods, name


def test_config_errors_are_named():
    base = {"name": "x", "model": "minilm", "tasks": ["rte"]}
    with pytest.raises(ConfigError, match="unknown field 'trian'"):
        parse_config({**base, "trian": {}}, "cfg.yaml")
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        parse_config({**base, "methods": [{"method": "tie"}]}, "cfg.yaml")
    with pytest.raises(ConfigError, match="densty"):
        parse_config({**base, "methods": [{"method": "ties", "search": {"densty": [0.1]}}]}, "cfg.yaml")
