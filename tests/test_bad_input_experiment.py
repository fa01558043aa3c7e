"""Bad input to `lorafuse experiment` and `lorafuse train` (issue 11, part B): each case exits non-zero with one
line naming the file or field, no traceback, nothing created or changed outside the output (the tree hashed before
and after), and before any training. Plus what keeps interrupted work resumable: broken checkpoints skipped, job
files that do not parse rerun, fsynced job files, leftovers removed, and kill -9 of training and of an experiment
followed by a rerun that completes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_bert, write_task_files

from lorafuse.atomic import host_tag
from lorafuse.cli import main
from lorafuse.errors import ConfigError
from lorafuse.experiment import rundir
from lorafuse.experiment.cache import JobStore, write_json_atomic
from lorafuse.experiment.config import parse_config
from lorafuse.validate import name_problem

SRC = Path(__file__).resolve().parents[1] / "src"
LABELS3 = ["contradiction", "entailment", "neutral"]


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under `root` with its content hash: equal before and after means untouched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as stop:  # argparse refuses a bad flag value with exit status 2
        code = stop.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BERT, two generated tasks (`bx3`: 3 labels, `bx2`: 2) in a data dir, and one task file for both."""
    root = tmp_path_factory.mktemp("world")
    tiny_bert(root / "bert")
    data = root / "data"
    write_task_files(data, "bx3", LABELS3, n=32)
    write_task_files(data, "bx2", ["entailment", "not_entailment"], n=32, seed=1)
    files = {t: {s: str(data / t / f"{s}.jsonl") for s in ("train", "validation", "test")} for t in ("bx3", "bx2")}
    (root / "tasks.yaml").write_text(yaml.safe_dump({
        "bx3": {"labels": LABELS3, "files": files["bx3"]},
        "bx2": {"labels": ["entailment", "not_entailment"], "files": files["bx2"]}}))
    return root


def base_config(world: Path, **changes) -> dict:
    raw = {"name": "bad", "model": str(world / "bert"), "formulation": "classify", "tasks": ["bx3", "bx2"],
           "task_file": str(world / "tasks.yaml"),
           "train": {"rank": 4, "epochs": 1, "batch_size": 8, "lr": 1.0e-2, "target_modules": ["query", "value"]},
           "eval": {"max_validation": 16, "max_test": 16, "batch_size": 16},
           "methods": [{"method": "average"}, {"method": "task_arithmetic", "search": {"lambda": [1.0]}}]}
    return {**raw, **changes}


def refused(capsys, world: Path, tmp_path: Path, config_text: str, expected: str, *extra: str) -> str:
    """Run the config; assert exit 1, the expected words on stderr, no run directory, nothing else changed."""
    config = tmp_path / "cfg.yaml"
    config.write_text(config_text)
    before, before_tmp = tree(world), tree(tmp_path)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "experiment", str(config), "--output", str(out), "--quiet", *extra)
    assert code == 1 and expected in err, err
    assert err.count("\n") == 1 and err.startswith("lorafuse experiment: error: "), err  # one line
    assert not out.exists() and tree(world) == before and tree(tmp_path) == before_tmp
    return err


# -- names that would become paths -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/b", "/abs/path", "..", ".hidden", "a\\b", "", "x\x00y"])
def test_names_that_are_paths_are_refused(name):
    assert name_problem(name) is not None
    assert name_problem("mnli") is None and name_problem("syn_negation") is None and name_problem("a.b-1") is None


@pytest.mark.parametrize("field,value,expected", [
    ("tasks", ["bx3", "../escape"], "tasks: task '../escape' contains a path separator"),
    ("tasks", ["/tmp/abs"], "tasks: task '/tmp/abs' contains a path separator"),
    ("name", "../../outside", "name: '../../outside' contains a path separator"),
    ("name", "..", "name: '..' starts with '.'"),
])
def test_experiment_names_are_never_paths(world, tmp_path, capsys, field, value, expected):
    refused(capsys, world, tmp_path, yaml.safe_dump(base_config(world, **{field: value})), expected)


def test_default_run_directory_from_a_bad_name_writes_nothing(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(base_config(world, name="../../evil")))
    before = tree(tmp_path.parent)
    code, _, err = cli(capsys, "experiment", str(config), "--quiet")
    assert code == 1 and "name: '../../evil'" in err and tree(tmp_path.parent) == before


def test_a_task_file_naming_a_task_by_a_path_is_refused(world, tmp_path, capsys):
    bad_tasks = tmp_path / "evil_tasks.yaml"
    files = {s: str(world / "data" / "bx3" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    bad_tasks.write_text(yaml.safe_dump({"../../pwn": {"labels": LABELS3, "files": files}}))
    err = refused(capsys, world, tmp_path, yaml.safe_dump(base_config(world, task_file=str(bad_tasks))),
                  "evil_tasks.yaml: task name: '../../pwn' contains a path separator")
    assert "task name" in err
    code, _, err = cli(capsys, "train", "--task-file", str(bad_tasks), "--task", "x", "-o", str(tmp_path / "o"))
    assert code == 1 and "'../../pwn'" in err and not (tmp_path / "o").exists()


def test_method_labels_are_names_and_fused_directories_stay_distinct(world):
    with pytest.raises(ConfigError, match=r"methods.0.label: '../x' contains a path separator"):
        parse_config(base_config(world, methods=[{"method": "average", "label": "../x"}]), "cfg.yaml")
    with pytest.raises(ConfigError, match="fused/ties-knots"):
        parse_config(base_config(world, methods=[{"method": "ties", "space": "knots"},
                                                 {"method": "ties", "label": "ties-knots"}]), "cfg.yaml")


# -- strict types, spaces, YAML ----------------------------------------------------------------------------------
@pytest.mark.parametrize("change,expected", [
    ({"train": {"rank": 4.5}}, "train.rank: Input should be a valid integer (got 4.5)"),
    ({"train": {"rank": True}}, "train.rank: Input should be a valid integer (got True)"),
    ({"train": {"gradient_checkpointing": "false"}}, "train.gradient_checkpointing: Input should be a valid boolean"),
    ({"train": {"lr": float("nan")}}, "train.lr: Input should be a finite number"),
    ({"eval": {"batch_size": "64"}}, "eval.batch_size: Input should be a valid integer (got '64')"),
    ({"tasks": [True]}, "tasks.0: Input should be a valid string (got True)"),
    ({"methods": [{"method": "ties", "params": {"seed": "0"}}]}, "method 'ties': params.seed: expected an integer, got '0'"),
    ({"methods": [{"method": "ties", "search": {"density": [0.2, "x"]}}]},
     "method 'ties': search.density: expected a number, got 'x'"),
    ({"methods": [{"method": "dare_ties", "params": {"rescale": "no"}}]}, "params.rescale: expected true or false, got 'no'"),
    ({"methods": [{"method": "ties", "params": {"trim_scope": "globl"}}]}, "params.trim_scope: expected one of 'module', 'global', got 'globl'"),
    ({"methods": [{"method": "ties", "rank": 0}]}, "methods.0.rank: Input should be greater than or equal to 1"),
    ({"methods": [{"method": "ties", "space": "knotz"}]}, "unknown space 'knotz' (did you mean 'knots'?)"),
    ({"methods": [{"method": "tsv", "space": "knots"}]}, "method 'tsv' works on whole updates"),
    ({"lorahub": {"shots": [5, 0]}}, "lorahub.shots.1: Input should be greater than or equal to 1"),
    ({"regmean": {"alpha": 1.5}}, "regmean.alpha: Input should be less than or equal to 1"),
    ({"adamerging": {"inputs": ["test", "test"]}}, "adamerging.inputs: each split once"),
    ({"adamerging": {"init": "task_arithmetc"}}, "adamerging.init"),
])
def test_strict_types_and_spaces_before_any_training(world, tmp_path, capsys, change, expected):
    refused(capsys, world, tmp_path, yaml.safe_dump(base_config(world, **change)), expected)


def test_duplicate_yaml_keys_are_refused(world, tmp_path, capsys):
    text = yaml.safe_dump(base_config(world)) + "train: {rank: 2}\n"
    err = refused(capsys, world, tmp_path, text, "cfg.yaml: not valid YAML (duplicate key 'train'")
    assert "line" in err
    tasks = tmp_path / "dup_tasks.yaml"
    tasks.write_text("bx9:\n  labels: [a, b]\n  labels: [c, d]\n")
    refused(capsys, world, tmp_path, yaml.safe_dump(base_config(world, task_file=str(tasks))),
            "dup_tasks.yaml: not valid YAML (duplicate key 'labels'")


def test_yaml_12_floats_are_numbers():
    from lorafuse.validate import load_yaml

    assert load_yaml("lr: 1e-3\nx: 2E+2\nname: 1e3x\n", "t") == {"lr": 0.001, "x": 200.0, "name": "1e3x"}


# -- data checked before training ------------------------------------------------------------------------------
def _broken_copy(world: Path, tmp_path: Path, split: str, content: str) -> Path:
    """A task file for `bx3` whose `split` file has `content` (the other splits are the good ones)."""
    files = {s: str(world / "data" / "bx3" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    files[split] = str(tmp_path / f"broken_{split}.jsonl")
    Path(files[split]).write_text(content)
    task_file = tmp_path / "broken_tasks.yaml"
    task_file.write_text(yaml.safe_dump({"bxb": {"labels": LABELS3, "files": files}}))
    return task_file


GOOD_LINE = json.dumps({"premise": "the a has 1 .", "hypothesis": "the a has 2 .", "label": "neutral"})


@pytest.mark.parametrize("split,content,expected", [
    ("test", GOOD_LINE + "\n" + GOOD_LINE.replace("neutral", "entailed") + "\n",
     "broken_test.jsonl:2: unknown label 'entailed' (did you mean 'entailment'?)"),
    ("validation", "", "broken_validation.jsonl: empty data file"),
    ("validation", GOOD_LINE + "\n{\"premise\": \n", "broken_validation.jsonl:2: not valid JSON"),
    ("train", GOOD_LINE + "\n[1, 2]\n", "broken_train.jsonl:2: expected a JSON object"),
])
def test_every_split_is_checked_before_training(world, tmp_path, capsys, split, content, expected):
    task_file = _broken_copy(world, tmp_path, split, content)
    config = base_config(world, task_file=str(task_file), tasks=["bxb"])
    refused(capsys, world, tmp_path, yaml.safe_dump(config), expected)


def test_train_reports_a_malformed_validation_line_before_training(world, tmp_path, capsys):
    task_file = _broken_copy(world, tmp_path, "validation", GOOD_LINE + "\n" + GOOD_LINE + "\nnot json\n")
    before = tree(tmp_path)
    code, _, err = cli(capsys, "train", "--task-file", str(task_file), "--task", "bxb", "--model",
                       str(world / "bert"), "-o", str(tmp_path / "ad"), "--quiet")
    assert code == 1 and "broken_validation.jsonl:3: not valid JSON" in err and "no validation" not in err
    assert tree(tmp_path) == before  # no adapter, no checkpoint directory


@pytest.mark.parametrize("flag,value,field", [("--batch-size", "0", "batch_size"), ("--rank", "0", "rank"),
                                              ("--lr", "nan", "lr"), ("--epochs", "-1", "epochs"),
                                              ("--save-steps", "0", "save_steps")])
def test_train_refuses_bad_numbers_in_one_line(world, tmp_path, capsys, flag, value, field):
    code, _, err = cli(capsys, "train", "--task-file", str(world / "tasks.yaml"), "--task", "bx3", "--model",
                       str(world / "bert"), "-o", str(tmp_path / "ad"), flag, value)
    last = err.strip().splitlines()[-1]  # argparse prints its usage, then the one error line
    assert not (tmp_path / "ad").exists()
    assert (code == 2 and last.startswith(f"lorafuse train: error: argument {flag}:")) or (
        code == 1 and f"error: {field}: must be" in last), err


@pytest.mark.parametrize("model", ["./no_such_model", "../no/such", "/no/such/model"])
def test_a_missing_local_model_is_not_tried_on_the_hub(world, tmp_path, capsys, model):
    code, _, err = cli(capsys, "train", "--task-file", str(world / "tasks.yaml"), "--task", "bx3", "--model", model,
                       "-o", str(tmp_path / "ad"))
    assert code == 1 and f"model '{model}': no such model directory" in err and not (tmp_path / "ad").exists()
    refused(capsys, world, tmp_path, yaml.safe_dump(base_config(world, model=model)),
            f"model '{model}': no such model directory")


def test_train_output_may_not_hold_or_sit_inside_its_inputs(world, tmp_path, capsys):
    before = tree(world)
    for out in (world / "data", world / "bert" / "adapter", world):
        code, _, err = cli(capsys, "train", "--task-file", str(world / "tasks.yaml"), "--task", "bx3", "--model",
                           str(world / "bert"), "-o", str(out), "--overwrite", "--quiet")
        assert code == 1 and any(why in err for why in ("contains the", "lies inside the", "not an output of lorafuse")), err
    assert tree(world) == before


# -- the run directory ------------------------------------------------------------------------------------------
def test_fresh_deletes_only_a_run_directory(world, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(base_config(world)))
    mine = tmp_path / "my_folder"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub" / "notes.txt").write_text("more")
    before = tree(tmp_path)
    for extra in ([], ["--fresh"]):
        code, _, err = cli(capsys, "experiment", str(config), "--output", str(mine), "--quiet", *extra)
        assert code == 1 and "is not a lorafuse run" in err and tree(tmp_path) == before


@pytest.mark.parametrize("where", ["data", "data/bx3/run", "."])
def test_run_directory_may_not_hold_or_sit_inside_an_input(world, tmp_path, capsys, where):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(base_config(world, data_dir=str(world / "data"))))
    before = tree(world)
    code, _, err = cli(capsys, "experiment", str(config), "--output", str(world / where), "--fresh", "--quiet")
    assert code == 1 and any(how in err for how in ("is the data_dir", "contains the", "lies inside the")), err
    assert tree(world) == before


def test_prepare_marks_reuses_and_refreshes_runs(tmp_path):
    out = tmp_path / "run"
    rundir.prepare(out, fresh=False)
    assert rundir.is_run_dir(out) and sorted(p.name for p in out.iterdir()) == [rundir.MARKER]
    (out / "jobs").mkdir()
    (out / "jobs" / "x.json").write_text("{}")
    rundir.prepare(out, fresh=False)
    assert (out / "jobs" / "x.json").is_file()  # resumed, untouched
    rundir.prepare(out, fresh=True)
    assert sorted(p.name for p in out.iterdir()) == [rundir.MARKER]  # emptied, marked again
    empty = tmp_path / "empty"
    empty.mkdir()
    rundir.prepare(empty, fresh=True)  # an empty directory holds nothing to lose
    assert rundir.is_run_dir(empty)
    with pytest.raises(ConfigError, match="--fresh would delete the adapter cache"):
        rundir.prepare(out, fresh=True, cache_dir=out / "cache")
    with pytest.raises(ConfigError, match="lies inside the adapter cache"):
        rundir.prepare(tmp_path / "cache" / "adapters" / "xa-0123" / "run", fresh=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    old = tmp_path / "old"
    (old / "jobs").mkdir(parents=True)
    rundir.prepare(old, fresh=False)  # a run of an older lorafuse (jobs/ and nothing else) is adopted
    assert rundir.is_run_dir(old)
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(ConfigError, match="symbolic link"):
        rundir.prepare(link, fresh=True)
    assert rundir.is_run_dir(out)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # (root may write anywhere)
        with pytest.raises(ConfigError, match="cannot be written"):
            rundir.prepare(locked / "run", fresh=False)
    legacy = tmp_path / "legacy"
    (legacy / "jobs").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no .lorafuse-output.json marker"):
        rundir.prepare(legacy, fresh=True)
    assert (legacy / "jobs").is_dir()


def test_the_run_marker_is_the_output_marker_and_fresh_keeps_a_users_files(tmp_path):
    from lorafuse.atomic import MARKER_NAME, read_marker

    out = tmp_path / "run"
    rundir.prepare(out, fresh=False)
    marker = read_marker(out)
    assert marker["kind"] == "run" and marker["pid"] == os.getpid() and "jobs" in marker["entries"]
    (out / "jobs").mkdir()
    (out / "thesis.tex").write_text("mine")  # a user's file dropped into a run: --fresh must not delete it
    before = tree(out)
    with pytest.raises(ConfigError, match="--fresh: .*thesis.tex"):
        rundir.prepare(out, fresh=True)
    assert tree(out) == before
    earlier = tmp_path / "earlier"  # a run marked by an earlier build (`.lorafuse-run`): still a run
    (earlier / "jobs").mkdir(parents=True)
    (earlier / ".lorafuse-run").write_text("lorafuse experiment run directory\n")
    assert rundir.is_run_dir(earlier)
    rundir.prepare(earlier, fresh=True)
    assert sorted(p.name for p in earlier.iterdir()) == [MARKER_NAME] and rundir.is_run_dir(earlier)
    adapter = tmp_path / "adapter"  # another kind of lorafuse output is not a run
    adapter.mkdir()
    (adapter / MARKER_NAME).write_text(json.dumps({"kind": "adapter", "pid": 1, "host": "h", "entries": []}))
    with pytest.raises(ConfigError, match="is not a lorafuse run"):
        rundir.prepare(adapter, fresh=True)


@pytest.mark.parametrize("where", ["report/notes.txt", "report/my_plot.png", "jobs/notes.txt", "fused/ties/mine.txt",
                                   "adapters/mine"])
def test_fresh_keeps_a_users_file_anywhere_in_the_run(tmp_path, where):
    from lorafuse.atomic import atomic_output_dir

    out = tmp_path / "run"
    rundir.prepare(out, fresh=False)
    for folder in ("jobs", "report", "adapters", "fused"):
        (out / folder).mkdir()
    (out / "jobs" / "fuse-x.json").write_text("{}")
    (out / "report" / "results.json").write_text("{}")
    (out / "report" / "per_task_accuracy.png").write_bytes(b"png")
    with atomic_output_dir(out / "fused" / "ties", kind="adapter") as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    (out / where).parent.mkdir(parents=True, exist_ok=True)
    (out / where).write_text("mine")
    before = tree(out)
    with pytest.raises(ConfigError, match=f"--fresh: .*{where}"):
        rundir.prepare(out, fresh=True)
    assert tree(out) == before
    (out / where).unlink()
    rundir.prepare(out, fresh=True)
    assert sorted(p.name for p in out.iterdir()) == [".lorafuse-output.json"]


def test_a_refused_config_leaves_no_empty_jobs_directory(world, tmp_path):
    from lorafuse.experiment.runner import ExperimentRunner

    runner = ExperimentRunner(parse_config(base_config(world, data_dir=str(tmp_path / "nope")), "t"),
                              tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="data_dir"):
        runner.run()
    assert not (tmp_path / "run").exists()


# -- job files, checkpoints, leftovers ---------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", '{"status": "ok", "na', "[1]", "\xff\xfe"])
def test_an_unreadable_job_file_counts_as_missing_with_a_warning(tmp_path, capsys, content):
    store = JobStore(tmp_path / "jobs")
    store.put("fuse-x-1234", {"status": "ok", "value": 1})
    assert store.get("fuse-x-1234") == {"status": "ok", "value": 1}
    store.path("fuse-x-1234").write_bytes(content.encode("latin-1"))
    assert store.get("fuse-x-1234") is None
    err = capsys.readouterr().err
    assert f"{store.path('fuse-x-1234')}: unreadable job file" in err


def test_job_files_are_fsynced_file_and_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def recording(fd):
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    write_json_atomic(tmp_path / "jobs" / "a.json", {"status": "ok"})
    assert synced == ["file", "dir"]


def test_job_ids_cannot_leave_the_jobs_directory(tmp_path):
    with pytest.raises(ConfigError, match="outside"):
        JobStore(tmp_path / "jobs").path("../../escape")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _marked(path: Path, pid: int) -> Path:
    """A temporary directory as lorafuse's atomic writer leaves it: marked with its writer."""
    import socket

    path.mkdir(parents=True)
    (path / ".lorafuse-output.json").write_text(json.dumps({"kind": "adapter", "pid": pid,
                                                            "host": socket.gethostname()}))
    (path / "f").write_text("x")
    return path


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    from lorafuse.atomic import STALE_AFTER_S, temporary_file

    out, cache, dead = tmp_path / "run", tmp_path / "cache", _dead_pid()
    (out / "jobs").mkdir(parents=True)
    (out / "jobs" / "fuse-a.json").write_text("{}")
    fd, own_tmp = temporary_file(out / "jobs" / "fuse-b.json")  # this process is alive: its file is kept
    os.close(fd)
    dead_tmp = own_tmp.with_name(own_tmp.name.replace(f".tmp-{os.getpid()}@", f".tmp-{dead}@"))
    dead_tmp.write_text('{"status": "o')  # a killed writer's job file
    legacy, recent = out / "jobs" / ".fuse-c.json.x1.tmp", out / "jobs" / ".fuse-d.json.x2.tmp"
    legacy.write_text("x")  # an earlier build's temporary names no writer: removed once old
    recent.write_text("x")
    os.utime(legacy, (0, 0))
    (out / "fused" / "ties").mkdir(parents=True)
    (out / "fused" / "ties" / "adapter_config.json").write_text("{}")
    _marked(out / "fused" / ".ties.tmp-ab12", dead)
    _marked(out / "fused" / ".ties.old-ab12", dead)  # a replacement killed between its renames; ties exists
    _marked(out / "fused" / ".iso_c.old-cd34", dead)  # ... and here the output is missing: put back
    _marked(out / "fused" / ".live.tmp-ef56", os.getppid())  # a live writer: left alone
    _marked(cache / ".bx3-0123456789.tmp-zz", dead)
    unmarked = cache / ".bx3-0123456789.tmp-yy"  # no marker (killed before writing it, or not ours): age rule
    unmarked.mkdir()
    (unmarked / "f").write_text("x")
    old_unmarked = cache / ".bx3-0123456789.tmp-ww"
    old_unmarked.mkdir()
    os.utime(old_unmarked, (time.time() - STALE_AFTER_S - 60,) * 2)
    _marked(cache / ".other-999.tmp-vv", dead)  # another run's adapter: its own run cleans it
    elsewhere = _marked(out / "fused" / ".dare.tmp-gh78", dead)  # written on another host: age rule
    (elsewhere / ".lorafuse-output.json").write_text(json.dumps({"kind": "adapter", "pid": dead, "host": "x-y"}))
    abandoned = _marked(out / "fused" / ".tsv.tmp-ij90", dead)
    (abandoned / ".lorafuse-output.json").write_text(json.dumps({"kind": "adapter", "pid": dead, "host": "x-y"}))
    for path in (abandoned, *abandoned.iterdir()):
        os.utime(path, (time.time() - STALE_AFTER_S - 60,) * 2)
    (cache / ".bx3-0123456789.checkpoints" / "checkpoint-2").mkdir(parents=True)
    removed = rundir.remove_leftovers(out, [cache / "bx3-0123456789"])
    assert sorted(str(p.relative_to(tmp_path)) for p in removed) == sorted([
        str(dead_tmp.relative_to(tmp_path)), "run/jobs/.fuse-c.json.x1.tmp", "run/fused/.ties.tmp-ab12",
        "run/fused/.ties.old-ab12", "cache/.bx3-0123456789.tmp-zz", "cache/.bx3-0123456789.tmp-ww",
        "run/fused/.tsv.tmp-ij90"])
    assert not any(p.exists() for p in removed)
    for kept in (own_tmp, recent, out / "fused" / ".live.tmp-ef56", elsewhere, unmarked, cache / ".other-999.tmp-vv",
                 cache / ".bx3-0123456789.checkpoints" / "checkpoint-2", out / "jobs" / "fuse-a.json"):
        assert kept.exists(), kept
    assert (out / "fused" / "iso_c" / "f").is_file() and not (out / "fused" / ".iso_c.old-cd34").exists()


def _checkpoint(root: Path, step: int, state: str | None, weights: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"w" * 8)
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_broken_checkpoints_are_skipped_saying_so(tmp_path, capsys):
    from lorafuse.model.training import _last_checkpoint

    good = _checkpoint(tmp_path, 2, json.dumps({"global_step": 2}))
    _checkpoint(tmp_path, 4, None)  # killed during the save: no trainer_state.json yet
    _checkpoint(tmp_path, 6, '{"global_st')  # a full disk: truncated
    _checkpoint(tmp_path, 8, json.dumps({"global_step": 8}), weights=False)
    (tmp_path / "checkpoint-junk").mkdir()
    assert _last_checkpoint(tmp_path) == str(good)
    err = capsys.readouterr().err
    assert "checkpoint-4 (no trainer_state.json)" in err and "checkpoint-6 (trainer_state.json unreadable" in err
    assert "checkpoint-8 (no adapter weights)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-junk"]
    (good / "trainer_state.json").unlink()
    assert _last_checkpoint(tmp_path) is None and "training starts afresh" in capsys.readouterr().err


# -- failures and exit codes ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A finished run of the base config (adapters in a shared cache, reused by the tests below)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    config = world / "good.yaml"
    config.write_text(yaml.safe_dump(base_config(world)))
    assert main(["experiment", str(config), "--output", str(out), "--cache-dir", str(world / "cache"),
                 "--quiet", "--threads", "1"]) == 0
    return config, out


def test_a_failed_job_makes_the_experiment_exit_non_zero(world, trained, tmp_path, capsys, monkeypatch):
    from lorafuse.experiment.runner import ExperimentRunner

    config, _ = trained
    original = ExperimentRunner._fuse

    def failing(self, spec):
        if spec.method == "average":
            raise RuntimeError("boom")
        return original(self, spec)

    monkeypatch.setattr(ExperimentRunner, "_fuse", failing)
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "experiment", str(config), "--output", str(out), "--cache-dir",
                            str(world / "cache"), "--quiet")
    assert code == 1 and "1 job(s) failed" in err and "boom" in err
    assert "| task_arithmetic |" in stdout  # the others finished, and the report was written
    results = json.loads((out / "report" / "results.json").read_text())
    assert {j["name"]: j["status"] for j in results["jobs"]}["task_arithmetic"] == "ok"
    monkeypatch.setattr(ExperimentRunner, "_fuse", original)
    assert cli(capsys, "experiment", str(config), "--output", str(out), "--cache-dir", str(world / "cache"),
               "--quiet")[0] == 0  # the rerun retries the failed job


def test_fresh_recreates_a_run_and_keeps_the_cache(world, trained, capsys):
    config, out = trained
    (out / "report" / "coefficient_sweeps.png").write_bytes(b"a plot of an earlier run")  # a file runs write
    cache_before = tree(world / "cache")
    code, _, _ = cli(capsys, "experiment", str(config), "--output", str(out), "--cache-dir", str(world / "cache"),
                     "--fresh", "--quiet")
    assert code == 0 and rundir.is_run_dir(out), _
    stale = out / "report" / "coefficient_sweeps.png"
    assert not stale.exists() or stale.read_bytes() != b"a plot of an earlier run"  # deleted with the run
    assert tree(world / "cache") == cache_before  # adapters reused, nothing retrained


# -- kill -9 ------------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{Path(__file__).parent}", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _kill_when_ready(proc: subprocess.Popen, ready: Path, timeout: float = 240.0) -> None:
    """SIGKILL the process once it has written `ready` (it then waits, mid-run, to be killed)."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("never reached the kill point")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


TRAIN_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
import lorafuse.model.training as training
from lorafuse.cli import main

class Pause(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step >= 4:
            Path(sys.argv[1]).write_text(str(state.global_step))
            time.sleep(600)

make = training._trainer
def with_pause(*a):
    trainer = make(*a)
    trainer.add_callback(Pause())
    return trainer

training._trainer = with_pause
sys.exit(main(sys.argv[2:]))
"""


def test_training_killed_mid_run_resumes_past_a_broken_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "adapter"
    args = ["train", "--task-file", str(world / "tasks.yaml"), "--task", "bx3", "--model", str(world / "bert"),
            "-o", str(out), "--target-modules", "query", "value", "--epochs", "3", "--batch-size", "8",
            "--rank", "4", "--save-steps", "2", "--resume", "--quiet"]
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_UNTIL_KILLED, str(ready), *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when_ready(proc, ready)
    ckpts = tmp_path / ".adapter.checkpoints"
    step = int(ready.read_text())
    assert (ckpts / f"checkpoint-{step}" / "trainer_state.json").is_file() and not out.exists()
    broken = ckpts / f"checkpoint-{step + 2}"  # as if killed while saving the next one
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"partial")
    stale = tmp_path / ".adapter.tmp-k9"  # as if killed while writing the finished adapter: its writer is dead
    stale.mkdir()
    (stale / ".lorafuse-output.json").write_text(json.dumps({"kind": "output", "pid": proc.pid,
                                                             "host": socket.gethostname()}))
    live = tmp_path / ".adapter.tmp-live"  # another writer, still running (this process): left alone
    live.mkdir()
    (live / ".lorafuse-output.json").write_text(json.dumps({"kind": "output", "pid": os.getpid(),
                                                            "host": socket.gethostname()}))
    code, _, err = cli(capsys, *args)  # the rerun, in this process (a fresh interpreter costs seconds)
    assert code == 0 and f"skipping the broken checkpoint {broken}" in err, err
    record = json.loads((out / "lorafuse_train.json").read_text())
    assert record["train_steps"] == 12 and not ckpts.exists()  # 32 examples / 8 × 3 epochs
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".adapter.tmp-live", "adapter",
                                                                                 "ready"]


EXPERIMENT_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from lorafuse.experiment.runner import ExperimentRunner
from lorafuse.cli import main

original = ExperimentRunner._fuse
def pausing(self, spec):
    if spec.method == "task_arithmetic":
        Path(sys.argv[1]).write_text("fusing")
        time.sleep(600)
    return original(self, spec)

ExperimentRunner._fuse = pausing
sys.exit(main(sys.argv[2:]))
"""


def test_experiment_killed_mid_run_resumes_and_completes(world, trained, tmp_path, capsys):
    config, _ = trained
    out = tmp_path / "run"
    args = ["experiment", str(config), "--output", str(out), "--cache-dir", str(world / "cache"), "--quiet",
            "--threads", "1"]
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", EXPERIMENT_UNTIL_KILLED, str(ready), *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when_ready(proc, ready)
    done = sorted(p.name.rsplit("-", 1)[0] for p in (out / "jobs").glob("*.json"))
    assert done == ["base", "fuse-average", "individual", "train-bx2", "train-bx3"] and not (out / "report").exists()
    # what a kill (or a full disk) can leave besides: a temporary file and a truncated job file
    (out / "jobs" / f".fuse-task_arithmetic-0.json.tmp-{proc.pid}@{host_tag()}-abc").write_text('{"status": "o')
    average = next((out / "jobs").glob("fuse-average-*.json"))
    average.write_text('{"status": "ok", "name": "aver')
    code, _, err = cli(capsys, *args)
    assert code == 0 and f"{average}: unreadable job file" in err, err
    assert "removed 1 leftover(s)" in err and not list((out / "jobs").glob(".*"))
    results = json.loads((out / "report" / "results.json").read_text())
    assert [j["name"] for j in results["jobs"]] == ["individual", "base + task heads", "average", "task_arithmetic"]
    assert all(j["status"] == "ok" for j in results["jobs"])


# -- bounded work on hostile configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["tasks", "notes"])
def test_a_yaml_alias_bomb_is_refused_at_once(world, tmp_path, capsys, field):
    """Nine aliases of nine aliases ...: it used to hang for minutes at GBs while the error printed the expansion."""
    laughs = "".join(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9) if i else 'lol'}]\n" for i in range(9))
    text = laughs + yaml.safe_dump({k: v for k, v in base_config(world).items() if k != field}) + f"{field}: *x8\n"
    start = time.perf_counter()
    err = refused(capsys, world, tmp_path, text, "cfg.yaml: not valid YAML (its aliases expand to more than")
    assert time.perf_counter() - start < 5 and len(err) < 400, err


def test_error_messages_show_a_cut_input(world, tmp_path, capsys):
    err = refused(capsys, world, tmp_path, yaml.safe_dump(base_config(world, notes=[["x" * 50] * 50] * 50)),
                  "notes: Input should be a valid string")
    assert len(err) < 300, err


SEARCH = {"lambda": [0.1 * i for i in range(1, 100)], "seed": list(range(99)),
          "drop_rate": [i / 100 for i in range(99)], "trim_density": [(i + 1) / 100 for i in range(99)]}


def test_samples_of_a_huge_grid_are_drawn_without_building_it(world):
    spec = parse_config(base_config(world, methods=[{"method": "dare_ties", "search": SEARCH, "samples": 4}]),
                        "cfg").methods[0]
    points = spec.points()
    assert spec.grid_size() == 99**4 and len(points) == 4
    assert all(p[k] in SEARCH[k] for p in points for k in SEARCH) and points == spec.points()
    small = parse_config(base_config(world, methods=[{"method": "ties", "samples": 3, "search": {
        "lambda": [0.5, 1.0], "density": [0.1, 0.2, 0.5]}}]), "cfg").methods[0]
    import random

    assert small.points() == random.Random(0).sample(small.grid(), 3)  # the points drawn from the built grid


def test_a_huge_grid_without_samples_is_refused(world, tmp_path, capsys):
    refused(capsys, world, tmp_path, yaml.safe_dump(base_config(world, methods=[{"method": "dare_ties",
                                                                                 "search": SEARCH}])),
            "search: 96,059,601 grid points (more than 10,000); give `samples:`")
