"""The experiment end to end on tiny models built in code (offline): two tasks, three methods; a rerun does no
work; an interrupted run resumes with only the missing jobs; one failed job is isolated; adapters are shared
between run directories; the report's tables agree with results.json."""

from __future__ import annotations

import csv
import json
import random
import re

import pytest
import yaml
from tiny_models import tiny_bert

import lorafuse.merging.engine
import lorafuse.model.training
from lorafuse.experiment.config import parse_config
from lorafuse.experiment.runner import ExperimentError, ExperimentRunner

KEYWORDS = {"xa": {"not": "contradiction", "some": "neutral", "all": "entailment"},
            "xb": {"more": "entailment", "than": "not_entailment"}}


def write_keyword_task(root, name: str, seed: int) -> dict:
    """A task a tiny model learns in a few steps: the label is given by one keyword of the hypothesis."""
    rng = random.Random(seed)
    files = {}
    for split, size in (("train", 96), ("validation", 32), ("test", 32)):
        rows = []
        for i in range(size):
            word, label = rng.choice(sorted(KEYWORDS[name].items()))
            rows.append({"premise": f"the a has {rng.randrange(20)} .", "hypothesis": f"{word} a has {i % 20} .",
                         "label": label, "id": f"{split}-{i}"})
        path = root / name / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        files[split] = str(path)
    labels = sorted(set(KEYWORDS[name].values()))
    return {name: {"labels": labels if name == "xb" else ["contradiction", "entailment", "neutral"], "files": files}}


def tiny_experiment(root) -> dict:
    """A tiny BERT, two keyword tasks and three methods (one searched in the knots space): the raw config."""
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
    return raw


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    return root, tiny_experiment(root)


@pytest.fixture
def counts(monkeypatch):
    """How often training and merging really happen."""
    calls = {"train": 0, "merge": 0}
    train, merge = lorafuse.model.training.train_adapter, lorafuse.merging.engine.merge

    def counting_train(cfg):
        calls["train"] += 1
        return train(cfg)

    def counting_merge(*args, **kwargs):
        calls["merge"] += 1
        return merge(*args, **kwargs)

    monkeypatch.setattr(lorafuse.model.training, "train_adapter", counting_train)
    monkeypatch.setattr(lorafuse.merging.engine, "merge", counting_merge)
    return calls


def run(raw, out, **kw):
    runner = ExperimentRunner(parse_config(raw, "test"), out, progress=False, **kw)
    return runner, runner.run()


def md_row(md: str, name: str, table: int = 1) -> list[str]:
    """A method's row in the report's summary table (0) or per-task table (1)."""
    lines = [line for line in md.splitlines() if line.startswith(f"| {name} |")]
    return [c.strip() for c in lines[table].strip("|").split("|")]


def test_end_to_end_then_cached_rerun(setup, counts):
    root, raw = setup
    out = root / "run1"
    runner, results = run(raw, out, cache_dir=root / "cache")
    assert all(j["status"] == "ok" for j in results["jobs"]), [j.get("error") for j in results["jobs"]]
    assert [j["name"] for j in results["jobs"]] == ["individual", "base + task heads", "average",
                                                    "task_arithmetic", "ties@knots"]
    assert counts == {"train": 2, "merge": 1 + 2 + 2}  # one merge per grid point; the best is kept
    ta = next(j for j in results["jobs"] if j["name"] == "task_arithmetic")
    assert [s["params"]["lambda"] for s in ta["sweep"]] == [0.5, 1.0]
    selection = results["statistics"]["selection_tasks"]  # the tasks whose adapters beat their majority class
    # the best validation score; equal scores go to the smaller change from task arithmetic (λ nearer 1)
    best = max(ta["sweep"], key=lambda s: (round(sum(s["validation"]["normalized"][t] for t in selection), 9),
                                           -abs(s["params"]["lambda"] - 1.0)))
    assert ta["params"]["lambda"] == best["params"]["lambda"] and ta["validation"] == best["validation"]
    assert (out / "fused" / "task_arithmetic" / "adapter_config.json").is_file()
    assert (out / "fused" / "task_arithmetic" / "task_heads" / "xa.safetensors").is_file()
    assert sorted(p.name.split("-")[0] for p in (root / "cache" / "adapters").iterdir()) == ["xa", "xb"]

    counts.update(train=0, merge=0)
    rerun, again = run(raw, out, cache_dir=root / "cache")
    assert rerun.state.executed == [] and counts == {"train": 0, "merge": 0}
    assert [j["job_id"] for j in again["jobs"]] == [j["job_id"] for j in results["jobs"]]
    assert [j["test"] for j in again["jobs"]] == [j["test"] for j in results["jobs"]]


def test_a_widened_grid_evaluates_only_its_new_settings_and_reuses_the_test_of_an_unmoved_choice(setup, counts):
    root, raw = setup
    out = root / "widened"
    narrow = {**raw, "methods": [{"method": "task_arithmetic", "search": {"lambda": [0.5, 1.0]}}]}
    _, first = run(narrow, out, cache_dir=root / "cache")
    before = next(j for j in first["jobs"] if j["name"] == "task_arithmetic")
    settings = sorted((out / "jobs" / "settings").iterdir())
    assert len(settings) == 1 and len(list(settings[0].glob("setting-*.json"))) == 2

    counts.update(train=0, merge=0)
    wide = {**raw, "methods": [{"method": "task_arithmetic", "search": {"lambda": [0.5, 1.0, 0.25]}}]}
    rerun, second = run(wide, out, cache_dir=root / "cache")
    after = next(j for j in second["jobs"] if j["name"] == "task_arithmetic")
    assert after["job_id"] != before["job_id"] and rerun.state.executed == [after["job_id"]]
    assert after["sweep"][:2] == before["sweep"] and after["sweep"][2]["params"] == {"lambda": 0.25}
    if after["params"] == before["params"]:  # the new setting is evaluated, the chosen one merged again to save
        assert counts["merge"] == 2 and after["test"] == before["test"]
    else:  # the new setting won: it is the one merge, kept and evaluated on test
        assert counts["merge"] == 1 and after["params"] == {"lambda": 0.25}
    assert (out / "fused" / "task_arithmetic" / "adapter_config.json").is_file()


def assert_report_agrees(report) -> dict:
    """results.csv, report.md and report.html show exactly the numbers of results.json."""
    saved = json.loads((report / "results.json").read_text())
    rows = list(csv.DictReader(open(report / "results.csv")))
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    assert len(rows) == len(saved["tasks"]) * len(saved["jobs"])
    for job in (j for j in saved["jobs"] if j["status"] == "ok"):
        cells = md_row(md, job["name"])
        for i, task in enumerate(saved["tasks"]):
            row = next(r for r in rows if r["method"] == job["name"] and r["task"] == task)
            assert float(row["test_accuracy"]) == pytest.approx(job["test"]["accuracy"][task])
            assert float(row["test_normalized"]) == pytest.approx(job["test"]["normalized"][task])
            acc, norm = re.match(r"([\d.]+) \(([\d.]+)\)", cells[1 + i]).groups()
            assert float(acc) == pytest.approx(100 * job["test"]["accuracy"][task], abs=0.051)
            assert float(norm) == pytest.approx(job["test"]["normalized"][task], abs=0.051)
            low, high = (float(x) for x in re.search(r"\[([\d.]+)–([\d.]+)\]", cells[1 + i]).groups())
            assert low <= float(acc) <= high  # the accuracy's 95% interval
        n = len(saved["tasks"])
        navg = saved["statistics"]["methods"][job["name"]]["normalized_average"]
        assert float(cells[1 + n]) == pytest.approx(100 * job["test"]["average"], abs=0.051)
        shown = "–" if navg is None else f"{navg:.1f}"  # no normalized average when no adapter learned
        assert cells[2 + n] == shown and md_row(md, job["name"], 0)[2] == shown
        assert f"<td>{job['name']}</td>" in html
    for job in (j for j in saved["jobs"] if j["status"] != "ok"):
        assert job["error"] in md and all(r["error"] == job["error"] for r in rows if r["method"] == job["name"])
    assert html.count("<img") == 3 and "data:image/png;base64," in html
    for plot in ("per_task_accuracy.png", "normalized_accuracy.png", "coefficient_sweeps.png"):
        assert (report / plot).read_bytes()[:4] == b"\x89PNG"
    return saved


def test_report_agrees_with_results_json(setup):
    root, raw = setup
    report = root / "run1" / "report"
    if not (report / "results.json").is_file():
        run(raw, root / "run1", cache_dir=root / "cache")
    saved = assert_report_agrees(report)
    assert set(saved["stage_seconds"]) == {"train", "reference", "fuse", "data-driven", "report"}
    assert saved["stage_compute_seconds"]["fuse"] > 0 and saved["machine"]["cores"] >= 1


def test_report_of_a_known_state(tmp_path):
    """Distinct numbers (the tiny models learn little), a sweep over two coefficients and a failed job."""
    from lorafuse.experiment.report import write_report
    from lorafuse.experiment.runner import RunState

    config = parse_config({"name": "known", "model": "minilm", "tasks": ["rte", "mnli"],
                           "methods": [{"method": "ties", "search": {"lambda": [0.5, 1.0], "density": [0.2]}}]}, "t")

    def split(rte, mnli, ref=(0.8, 0.6)):
        norm = {"rte": 100 * rte / ref[0], "mnli": 100 * mnli / ref[1]}
        return {"accuracy": {"rte": rte, "mnli": mnli}, "examples": {"rte": 250, "mnli": 500}, "normalized": norm,
                "average": (rte + mnli) / 2, "normalized_average": sum(norm.values()) / 2}

    sweep = [{"params": {"lambda": lam, "density": 0.2}, "validation": split(0.5 * lam + 0.2, 0.4)}
             for lam in (0.5, 1.0)]
    state = RunState(jobs=[
        {"name": "individual", "kind": "reference", "status": "ok", "test": split(0.8, 0.6), "stage": "reference",
         "seconds": 1.0},
        {"name": "ties", "kind": "static", "status": "ok", "params": {"lambda": 1.0, "density": 0.2},
         "sweep": sweep, "validation": sweep[1]["validation"], "test": split(0.72, 0.36), "stage": "fuse",
         "settings_tried": 2, "search_seconds": 3.5, "seconds": 4.0},
        {"name": "tsv@core", "status": "failed", "error": "RuntimeError: boom", "stage": "fuse", "seconds": 0.1}])
    results = write_report(tmp_path, config, state)
    saved = assert_report_agrees(tmp_path)
    assert saved == json.loads(json.dumps(results, default=str))
    md = (tmp_path / "report.md").read_text()
    # no per-example correctness or label counts recorded (an older run): every task counts, no bootstrap
    assert ("| ties | 72.0 (90.0) [66.1–77.2] | 36.0 (60.0) [31.9–40.3] | 54.0 | 75.0 | lambda=1.0, density=0.2 |"
            in md)
    assert "| ties | static | 75.0 |  | best |" in md
    assert saved["stage_compute_seconds"] == {"reference": 1.0, "fuse": 4.1}


def test_interrupted_run_resumes_and_failures_are_isolated(setup, counts, monkeypatch):
    root, raw = setup
    out = root / "run2"
    original = ExperimentRunner._fuse

    def dying(self, spec):
        if spec.name == "task_arithmetic":
            raise KeyboardInterrupt  # the process is killed in the middle of the fuse stage
        return original(self, spec)

    monkeypatch.setattr(ExperimentRunner, "_fuse", dying)
    with pytest.raises(KeyboardInterrupt):
        run(raw, out, cache_dir=root / "cache")
    finished = sorted(p.name.split("-")[0] for p in (out / "jobs").glob("*.json"))
    assert finished == ["base", "fuse", "individual", "train", "train"]  # average fused; nothing half-written
    assert not list((out / "jobs").glob(".*"))

    def failing_fuse(self, spec):
        if spec.method == "ties":
            raise RuntimeError("boom")
        return original(self, spec)

    monkeypatch.setattr(ExperimentRunner, "_fuse", failing_fuse)
    counts.update(train=0, merge=0)
    runner, results = run(raw, out, cache_dir=root / "cache")
    assert [j.rsplit("-", 1)[0] for j in runner.state.executed] == ["fuse-task_arithmetic", "fuse-ties-knots"]
    assert counts == {"train": 0, "merge": 2}  # only task_arithmetic's grid
    failed = [j for j in results["jobs"] if j["status"] == "failed"]
    assert [j["name"] for j in failed] == ["ties@knots"] and "boom" in failed[0]["error"]
    assert "boom" in (out / "report" / "report.md").read_text()
    assert next(r for r in csv.DictReader(open(out / "report" / "results.csv"))
                if r["status"] == "failed")["error"].endswith("boom")

    monkeypatch.setattr(ExperimentRunner, "_fuse", original)
    runner, results = run(raw, out, cache_dir=root / "cache")  # the failed job is retried, the rest is cached
    assert [j.rsplit("-", 1)[0] for j in runner.state.executed] == ["fuse-ties-knots"]
    assert all(j["status"] == "ok" for j in results["jobs"])


def test_only_stage_and_a_failed_training(setup, counts, tmp_path):
    root, raw = setup
    runner, results = run(raw, tmp_path / "a", cache_dir=root / "cache", stages=["train"])
    assert results == {} and counts["train"] == 0  # adapters come from the shared cache
    assert [r["reused"] for r in runner.state.training] == [True, True]
    with pytest.raises(ExperimentError, match="stage 'reference' has not run"):
        run(raw, tmp_path / "a", cache_dir=root / "cache", stages=["report"])

    def trainer(cfg):
        if cfg.task == "xb":
            raise RuntimeError("out of memory")
        return lorafuse.model.training.train_adapter(cfg)

    fresh = {**raw, "train": {**raw["train"], "seed": 1}}
    with pytest.raises(ExperimentError, match="xb: RuntimeError: out of memory"):
        run(fresh, tmp_path / "b", trainer=trainer)
    assert counts["train"] == 1  # xa still trained
    runner, _ = run(fresh, tmp_path / "b", stages=["train"])
    assert runner.state.executed == ["train:xb"]


def test_cli_reuses_the_run_and_prints_the_table(setup, capsys):
    from lorafuse.cli import main

    root, raw = setup
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    if not (root / "run1" / "report").is_dir():
        run(raw, root / "run1", cache_dir=root / "cache")
    assert main(["experiment", str(config), "--output", str(root / "run1"), "--cache-dir", str(root / "cache"),
                 "--quiet", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| task_arithmetic |" in printed and str(root / "run1" / "report" / "report.html") in printed

    from lorafuse.commands import experiment
    from lorafuse.experiment import STAGES

    assert experiment.STAGES == STAGES  # kept apart so that `lorafuse --help` imports no pydantic


def test_random_search_samples_the_grid():
    spec = parse_config({"name": "x", "model": "minilm", "tasks": ["rte"], "methods": [
        {"method": "ties", "search": {"lambda": [0.5, 1.0], "density": [0.1, 0.2, 0.5]}, "samples": 4}]},
        "cfg").methods[0]
    points = ExperimentRunner.settings(spec)
    assert len(points) == 4 and len({json.dumps(p, sort_keys=True) for p in points}) == 4
    assert all(p in spec.grid() for p in points) and points == ExperimentRunner.settings(spec)


def test_a_stochastic_method_runs_over_seeds(setup, counts, tmp_path):
    """DARE over two seeds: each grid point merged per seed, the point best on the mean over seeds chosen, its
    test results the mean of the seeds' (each kept, with per-example correctness for the statistics)."""
    root, raw = setup
    dare = {**raw, "seeds": 2, "methods": [{"method": "dare_ties", "params": {"seed": 5},
                                            "search": {"drop_rate": [0.3, 0.6]}}]}
    runner, results = run(dare, tmp_path / "dare", cache_dir=root / "cache")
    job = next(j for j in results["jobs"] if j["name"] == "dare_ties")
    assert counts["merge"] == 2 * 2 and job["seeds"] == [5, 6] and len(job["seed_runs"]) == 2
    for point in job["sweep"]:
        assert len(point["seed_scores"]) == 2 and point["score"] == pytest.approx(sum(point["seed_scores"]) / 2)
    assert job["params"]["drop_rate"] == max(job["sweep"], key=lambda p: p["score"])["params"]["drop_rate"]
    for task in raw["tasks"]:
        seeds = [r["test"]["accuracy"][task] for r in job["seed_runs"]]
        assert job["test"]["accuracy"][task] == pytest.approx(sum(seeds) / 2)
        assert all(len(r["test"]["correct"][task]) > 0 for r in job["seed_runs"])
    assert results["statistics"]["methods"]["dare_ties"]["seeds"] == 2

    counts.update(merge=0)
    runner, results = run({**dare, "seeds": 1}, tmp_path / "dare", cache_dir=root / "cache")
    job = next(j for j in results["jobs"] if j["name"] == "dare_ties")
    assert counts["merge"] == 2 and "seed_runs" not in job  # the number of seeds is part of the job's key


def test_train_per_task_changes_only_its_task(setup, tmp_path):
    """A task's `train_per_task` entry reaches its TrainConfig and its cache key; the other task keeps both."""
    from lorafuse.experiment.cache import adapter_key

    root, raw = setup
    base = parse_config(raw, "test")
    tuned = parse_config({**raw, "train_per_task": {"xb": {"epochs": 2, "max_examples": 48}}}, "test")
    assert tuned.train_for("xa") == base.train and tuned.train_for("xb").rank == base.train.rank == 4
    runner = ExperimentRunner(tuned, tmp_path / "run", progress=False)
    xa, xb = (runner._train_config(t, tmp_path / t) for t in ("xa", "xb"))
    assert (xa.epochs, xa.max_examples, xb.epochs, xb.max_examples) == (1, None, 2, 48)
    assert adapter_key(tuned, "xa", "d") == adapter_key(base, "xa", "d")
    assert adapter_key(tuned, "xb", "d") != adapter_key(base, "xb", "d")


def test_equal_validation_scores_go_to_the_smaller_change_from_task_arithmetic():
    from lorafuse.experiment.runner import _score

    sweep = [{"params": {"lambda": 0.5, "density": 0.2}, "score": 90.0},
             {"params": {"lambda": 1.0, "density": 0.7}, "score": 90.0},
             {"params": {"lambda": 1.5, "density": 1.0}, "score": 89.0}]
    assert max(sweep, key=_score)["params"] == {"lambda": 1.0, "density": 0.7}
    assert max(reversed(sweep), key=_score)["params"] == {"lambda": 1.0, "density": 0.7}  # not by grid order
    assert max(sweep[:1] + [{"params": {"lambda": 1.5}, "score": 90.5}], key=_score)["score"] == 90.5


def test_a_bf16_experiment_checks_its_predictions_against_fp32_and_records_its_dtype(setup):
    """eval dtype bfloat16: every result records it, the reference job compares the individual adapters'
    validation predictions with fp32's, and the report states both; fp32 jobs are keyed apart from bf16 ones."""
    root, raw = setup
    raw = {**raw, "eval": {**raw["eval"], "dtype": "bfloat16"}, "methods": raw["methods"][:2]}
    runner, results = run(raw, root / "bf16", cache_dir=root / "cache")
    individual = next(j for j in results["jobs"] if j["name"] == "individual")
    check = individual["precision_check"]
    assert check["dtype"] == "bfloat16" and check["examples"] == 64 and 0.9 <= check["agreement"] <= 1.0
    assert set(check["accuracy_difference"]) == {"xa", "xb"}
    assert all(j["test"]["precision"]["dtype"] == "bfloat16" for j in results["jobs"])
    md = (root / "bf16" / "report" / "report.md").read_text()
    assert "Evaluation dtype: **bfloat16** (requested `bfloat16`: asked for)" in md and "equal fp32's on" in md
    fp32_ids = {p.name for p in (root / "run1" / "jobs").glob("fuse-*")} if (root / "run1").exists() else set()
    assert not fp32_ids & {p.name for p in (root / "bf16" / "jobs").glob("fuse-*")}


def test_an_experiment_on_given_adapters_trains_nothing_and_names_them_by_hash(setup, counts, tmp_path):
    """`adapters: {task: DIR}`: "here are my PEFT adapters, which fusion is best?" runs without training; the
    adapters' sha256 enter the job keys and the report."""
    import shutil

    root, raw = setup
    trained = ExperimentRunner(parse_config(raw, "test"), root / "given-src", progress=False, cache_dir=root / "cache")
    trained.run()
    given = {}
    for task, path in trained.state.adapters.items():
        given[task] = str(shutil.copytree(path, tmp_path / f"my-{task}"))
    counts["train"] = 0
    raw = {**raw, "adapters": given, "methods": raw["methods"][:2]}
    runner, results = run(raw, tmp_path / "run")
    assert counts["train"] == 0 and all(j["status"] == "ok" for j in results["jobs"])
    records = {r["task"]: r for r in results["training"]}
    from lorafuse.adapters.reader import LoraAdapter

    assert all(r["given"] and r["sha256"] == LoraAdapter(given[t]).sha256 for t, r in records.items())
    assert runner.adapter_ids() == {t: f"given-{records[t]['sha256']}" for t in given}
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert f"given: `{given['xa']}` (sha256 {records['xa']['sha256'][:12]})" in md
    from lorafuse.errors import ConfigError

    with pytest.raises(ConfigError, match=r"adapters\.nope: not one of the experiment's tasks"):
        parse_config({**raw, "adapters": {"nope": given["xa"]}}, "test")


def test_a_report_of_a_run_in_progress_says_what_has_not_run(setup):
    """`--only-stage report` over a run whose fuse stage has not finished: a partial report naming the missing
    jobs (a run that spans sessions commits one)."""
    root, raw = setup
    out = root / "partial"
    run({**raw, "methods": raw["methods"][:1]}, out, cache_dir=root / "cache")
    runner, results = run(raw, out, cache_dir=root / "cache", stages=["report"])
    assert results["not_run"] == ["task_arithmetic", "ties@knots"]
    assert [j["name"] for j in results["jobs"]][-1] == "average"
    md = (out / "report" / "report.md").read_text()
    assert "**A partial report**: 2 configured job(s) have not run yet (task_arithmetic, ties@knots)" in md
