"""Hostile and careless input to `lorafuse merge` (and the counts of the other commands), as a user types it.

Every refused case asserts the exit code, a message naming the file or field, no traceback, and that the whole
tree (inputs, outputs, their parents, hidden leftovers) hashes the same before and after: nothing was written,
nothing deleted."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from adapter_factory import llama_modules, write_adapter
from safetensors.torch import save_file

from lorafuse.atomic import MARKER_NAME, atomic_outputs, is_lorafuse_output
from lorafuse.cli import main
from lorafuse.errors import OutputExistsError

MODULES = llama_modules(1, ("self_attn.q_proj",))
HEAD = {"base_model.model.classifier.weight": torch.ones(3, 32), "base_model.model.classifier.bias": torch.zeros(3)}


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under root (hidden ones too), files by sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def refused(args: list[str], capsys, root: Path, *expect: str, code: int = 1) -> str:
    """Run the CLI, expecting a refusal: exit `code`, the words `expect` in one error line, no traceback, and
    the tree under root unchanged."""
    before = tree(root)
    if code == 2:  # argparse: usage and one error line
        with pytest.raises(SystemExit) as exc:
            main(args)
        rc = exc.value.code
    else:
        rc = main(args)
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "error" in line and (code == 2 or len(err.strip().splitlines()) == 1), err
    for word in expect:
        assert word in line, (word, line)
    assert tree(root) == before
    return line


@pytest.fixture()
def pair(tmp_path: Path) -> list[Path]:
    return [write_adapter(tmp_path / "in" / f"a{i}", MODULES, seed=i) for i in range(2)]


def merge_args(pair: list[Path], out: Path | str, *extra: str) -> list[str]:
    return ["merge", "--adapters", *map(str, pair), "-o", str(out), "--quiet", *extra]


# -- names are never paths ---------------------------------------------------------------------------------
def _with_heads(root: Path, task: object) -> list[Path]:
    paths = []
    for i in range(2):
        path = write_adapter(root / f"h{i}", MODULES, seed=i, extra=HEAD, modules_to_save=["classifier"],
                             task_type="SEQ_CLS")
        (path / "lorafuse_train.json").write_text(json.dumps({"task": task if i == 0 else f"task{i}"}))
        paths.append(path)
    return paths


def test_a_training_record_task_never_becomes_a_path(tmp_path, capsys):
    victim = tmp_path / "model" / "model-00001-of-00002.safetensors"
    victim.parent.mkdir()
    victim.write_bytes(b"the user's weights")
    paths = _with_heads(tmp_path / "in", str(victim.with_suffix("")))
    before = tree(tmp_path)
    out = tmp_path / "fused"
    assert main(merge_args(paths, out, "--modules-to-save", "per_task")) == 0
    err = capsys.readouterr().err
    assert "lorafuse_train.json" in err and "not a plain name" in err
    assert victim.read_bytes() == b"the user's weights"
    assert sorted(p.name for p in (out / "task_heads").iterdir()) == ["h0.safetensors", "task1.safetensors"]
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("fused")} == before


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "..", ".hidden", "a\\b", "", pytest.param("日本" * 43, id="258-bytes")])
def test_names_from_the_command_line_are_refused(tmp_path, pair, capsys, name):
    refused(merge_args(pair, tmp_path / "out", "--names", name, "b"), capsys, tmp_path, "name", "not a plain name")


def test_names_from_a_merge_yaml_are_refused(tmp_path, pair, capsys):
    config = tmp_path / "m.yml"
    config.write_text("merge_method: linear\nmodels:\n  - {model: ./in/a0, name: ../../x}\n  - {model: ./in/a1}\n")
    refused(["merge", str(config), "-o", str(tmp_path / "out")], capsys, tmp_path, "m.yml", "name",
            "not a plain name")


# -- outputs apart from inputs; --overwrite only replaces lorafuse's own outputs ------------------------------
@pytest.mark.parametrize("where,how", [("in/a0", "is the input"), ("in", "contains the input"),
                                       ("in/a1/fused", "lies inside the input")])
def test_output_overlapping_an_input_is_refused(tmp_path, pair, capsys, where, how):
    refused(merge_args(pair, tmp_path / where, "--overwrite"), capsys, tmp_path, "-o", how)


def test_output_model_overlapping_the_output_or_base_is_refused(tmp_path, pair, capsys):
    base = _base_model(tmp_path / "tiny-llama")
    refused(merge_args(pair, tmp_path / "out", "--base-model", str(base), "--output-model", str(tmp_path / "out")),
            capsys, tmp_path, "--output-model", "is the input")
    refused(merge_args(pair, tmp_path / "out", "--base-model", str(base), "--output-model", str(base)),
            capsys, tmp_path, "--output-model", "is the input")


def test_overwrite_replaces_only_lorafuse_outputs(tmp_path, pair, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    refused(merge_args(pair, user, "--overwrite"), capsys, tmp_path, "mine", "not an output of lorafuse")
    out = tmp_path / "out"
    assert main(merge_args(pair, out)) == 0
    assert is_lorafuse_output(out) and json.loads((out / MARKER_NAME).read_text())["kind"] == "adapter"
    assert main(merge_args(pair, out, "--overwrite", "--method", "average")) == 0  # its own output: replaced
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]
    (out / "notes.txt").write_text("mine")
    refused(merge_args(pair, out, "--overwrite"), capsys, tmp_path, "notes.txt", "did not write")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(merge_args(pair, empty, "--overwrite")) == 0


# -- numbers: finite, of the right type, before any work -------------------------------------------------------
@pytest.mark.parametrize("field,value,words", [
    ("lora_alpha", float("nan"), ("lora_alpha", "not a finite number")),
    ("lora_alpha", float("inf"), ("lora_alpha", "not a finite number")),
    ("lora_alpha", "16", ("lora_alpha", "expected a number")),
    ("use_rslora", "false", ("use_rslora", "expected true or false")),
    ("fan_in_fan_out", 0, ("fan_in_fan_out", "expected true or false")),
    ("r", 4.5, ("r:", "expected an integer")),
    ("r", True, ("r:", "expected an integer")),
    ("r", 0, ("r:", "must be ≥ 1")),
    ("rank_pattern", {"(q_proj": 4}, ("rank_pattern", "regular expression")),
    ("alpha_pattern", {"(a|a)+$": 4}, ("alpha_pattern", "exponential time")),
    ("target_modules", "(q|q)*_proj", ("target_modules", "exponential time")),
    ("rank_pattern", {"q_proj": 2.5}, ("rank_pattern", "expected an integer")),
    ("alpha_pattern", {"q_proj": float("nan")}, ("alpha_pattern", "finite")),
    ("modules_to_save", "classifier", ("modules_to_save", "list")),
])
def test_adapter_config_types_are_strict(tmp_path, pair, capsys, field, value, words):
    path = pair[1] / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    refused(merge_args(pair, tmp_path / "out"), capsys, tmp_path, "a1/adapter_config.json", *words)


def test_adapter_config_in_bad_utf8(tmp_path, pair, capsys):
    (pair[0] / "adapter_config.json").write_bytes(b'{"r": 4, "lora_alpha": 8, "task_type": "\xff\xfe"}')
    refused(merge_args(pair, tmp_path / "out"), capsys, tmp_path, "a0/adapter_config.json", "not UTF-8")


def test_integer_lora_tensors_are_refused(tmp_path, pair, capsys):
    ints = write_adapter(tmp_path / "in" / "ints", MODULES, dtype=torch.int64)
    refused(merge_args([ints, pair[0]], tmp_path / "out"), capsys, tmp_path, "ints/adapter_model.safetensors",
            "torch.int64", "floating point")


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_fan_in_fan_out_compared_as_a_value(tmp_path, capsys, order):
    paths = [write_adapter(tmp_path / "in" / f"f{i}", MODULES, seed=i, fan_in_fan_out=bool(i)) for i in range(2)]
    refused(merge_args([paths[i] for i in order], tmp_path / "out"), capsys, tmp_path, "fan_in_fan_out", "differs")


@pytest.mark.parametrize("flags,words", [
    (["--method", "linear", "--weights", "nan", "1"], ("--weights", "not a finite number")),
    (["--lambda", "nan"], ("--lambda", "not a finite number")),
    (["--lambda", "inf"], ("--lambda", "not a finite number")),
    (["--method", "ties", "--densities", "0.5", "nan"], ("--densities", "not a finite number")),
    (["--method", "ties", "--density", "nan"], ("--density", "not a finite number")),
    (["--rank", "0"], ("--rank", "must be ≥ 1")),
])
def test_flags_out_of_range_are_usage_errors(tmp_path, pair, capsys, flags, words):
    refused(merge_args(pair, tmp_path / "out", *flags), capsys, tmp_path, *words, code=2)


@pytest.mark.parametrize("param,words", [
    ("lambda=.nan", ("parameter 'lambda'", "not a finite number")),
    ("lambda='0.5'", ("parameter 'lambda'", "expected a number")),
    ("adapters=./other", ("adapters", "not a method parameter")),
    ("method=linear", ("method", "not a method parameter")),
    ("seed=true", ("parameter 'seed'", "expected an integer")),
    ("rescale=yes please", ("parameter 'rescale'", "expected true or false")),
])
def test_param_flag_types(tmp_path, pair, capsys, param, words):
    refused(merge_args(pair, tmp_path / "out", "--method", "dare_ties", "--param", param), capsys, tmp_path, *words)


@pytest.mark.parametrize("body,words", [
    ("merge_method: ties\nrank: true\n", ("m.yml", "rank")),
    ("merge_method: ties\nexact_svd: 'false'\n", ("m.yml", "exact_svd")),
    ("merge_method: ties\nmerge_method: linear\n", ("m.yml", "duplicate key 'merge_method'")),
    ("merge_method: ties\nparameters: {method: linear}\n", ("m.yml", "'method' is not a method parameter")),
    ("merge_method: ties\nparameters: {lambda: .nan}\n", ("parameter 'lambda'", "not a finite number")),
    ("merge_method: ties\nparameters: {density: '0.5'}\n", ("parameter 'density'", "expected a number")),
    ("merge_method: linear\nparameters: {rank: 2.5}\n", ("rank", "expected an integer")),
])
def test_merge_yaml_types_are_strict(tmp_path, pair, capsys, body, words):
    config = tmp_path / "m.yml"
    config.write_text(body + "models:\n  - {model: ./in/a0}\n  - {model: ./in/a1, parameters: {weight: 1}}\n")
    refused(["merge", str(config), "-o", str(tmp_path / "out")], capsys, tmp_path, *words)


@pytest.mark.parametrize("weight", [".nan", ".inf", "'1'", "true"])
def test_merge_yaml_weights_are_finite_numbers(tmp_path, pair, capsys, weight):
    config = tmp_path / "m.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - {{model: ./in/a0, parameters: {{weight: {weight}}}}}\n"
                      "  - {model: ./in/a1}\n")
    refused(["merge", str(config), "-o", str(tmp_path / "out")], capsys, tmp_path, "m.yml", "weight")


def test_merge_yaml_in_bad_utf8(tmp_path, pair, capsys):
    config = tmp_path / "m.yml"
    config.write_bytes(b"merge_method: ties\nmodels:\n  - model: \xff\n")
    refused(["merge", str(config), "-o", str(tmp_path / "out")], capsys, tmp_path, "m.yml", "not UTF-8")


def test_python_api_refuses_nan_weights_and_lambda(pair):
    from lorafuse.errors import ConfigError
    from lorafuse.merging.engine import merge

    with pytest.raises(ConfigError, match="weights of .*a0: nan is not a finite number"):
        merge(pair, "linear", weights=[float("nan"), 1.0], progress=False)
    with pytest.raises(ConfigError, match="parameter 'lambda'.*not a finite number"):
        merge(pair, "task_arithmetic", progress=False, **{"lambda": float("inf")})
    with pytest.raises(ConfigError, match="rank: expected an integer"):
        merge(pair, rank=True, progress=False)
    with pytest.raises(ConfigError, match="adapters: expected a list"):
        merge(str(pair[0]), progress=False)


# -- paths that do not exist are not Hub ids ---------------------------------------------------------------
@pytest.mark.parametrize("source", ["./nope", "../nope", "in/nope/", "./in/../nope"])
def test_a_missing_relative_path_is_not_looked_up_on_the_hub(tmp_path, pair, capsys, monkeypatch, source):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    refused(merge_args([source, pair[0]], tmp_path / "out"), capsys, tmp_path, source, "no such adapter directory")


# -- --output-model: checked before anything is written, committed with -o --------------------------------------
def _base_model(path: Path, shape: tuple[int, int] = (32, 32), weights: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    if weights:
        save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(*shape),
                   "model.embed_tokens.weight": torch.randn(8, 32)}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("kind,words", [
    ("no-weights", ("tiny-llama", "no *.safetensors")),
    ("missing", ("./nobase", "no such base model directory")),
    ("shapes", ("model.safetensors", "has shape")),
])
def test_output_model_failures_write_nothing(tmp_path, pair, capsys, monkeypatch, kind, words):
    monkeypatch.chdir(tmp_path)
    base = "./nobase" if kind == "missing" else str(_base_model(tmp_path / "tiny-llama", (16, 32), kind == "shapes"))
    refused(merge_args(pair, tmp_path / "out", "--base-model", base, "--output-model", str(tmp_path / "model")),
            capsys, tmp_path, *words)


def test_after_a_refused_output_model_the_rerun_works(tmp_path, pair, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = merge_args(pair, tmp_path / "out", "--base-model", "./tiny-llama", "--output-model", "model")
    refused(args, capsys, tmp_path, "no such base model directory")
    _base_model(tmp_path / "tiny-llama")
    assert main(args) == 0  # nothing of the failed run is in the way
    assert (tmp_path / "out" / "adapter_config.json").is_file() and (tmp_path / "model" / "config.json").is_file()


def test_output_model_and_adapter_written_together(tmp_path, pair, capsys):
    base = _base_model(tmp_path / "tiny-llama")
    args = merge_args(pair, tmp_path / "out", "--base-model", str(base), "--output-model", str(tmp_path / "model"))
    assert main(args) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "model" / "model.safetensors").is_file() and is_lorafuse_output(tmp_path / "model")
    refused(args, capsys, tmp_path, "output exists")


def test_outputs_committed_together_or_not_at_all(tmp_path):
    """Something appearing at the second output during the work stops both (the first is not committed)."""
    first, second = tmp_path / "one", tmp_path / "two"
    with pytest.raises(OutputExistsError, match="two"):
        with atomic_outputs([first, second]) as (t1, t2):
            (t1 / "a").write_text("1")
            (t2 / "b").write_text("2")
            second.mkdir()
    assert not first.exists() and [p.name for p in tmp_path.iterdir()] == ["two"]


# -- the output disk -----------------------------------------------------------------------------------------
def test_output_under_a_file_is_refused_before_the_merge(tmp_path, pair, capsys):
    (tmp_path / "afile").write_text("x")
    refused(merge_args(pair, tmp_path / "afile" / "out"), capsys, tmp_path, "afile", "not a directory")


def test_full_disk_is_found_before_writing(tmp_path, pair, capsys, monkeypatch):
    import lorafuse.atomic

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(lorafuse.atomic.shutil, "disk_usage", lambda path: usage(100, 90, 10))
    refused(merge_args(pair, tmp_path / "out"), capsys, tmp_path, "out", "needs", "10 B free")


def test_a_disk_that_fills_during_the_write_leaves_nothing(tmp_path, pair, capsys, monkeypatch):
    import lorafuse.adapters.writer as writer

    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "save_safetensors", full)
    refused(merge_args(pair, tmp_path / "out"), capsys, tmp_path, "adapter_model.safetensors",
            "No space left on device", "nothing was written")


# -- leftovers of killed runs ------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(path: Path, pid: int) -> Path:
    path.mkdir()
    (path / MARKER_NAME).write_text(json.dumps({"kind": "adapter", "pid": pid, "host": socket.gethostname()}))
    (path / "adapter_model.safetensors").write_bytes(b"half")
    return path


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path, pair):
    out = tmp_path / "out"
    assert main(merge_args(pair, out)) == 0
    dead = _dead_pid()
    stale = [_leftover(tmp_path / ".out.tmp-dead1", dead), _leftover(tmp_path / ".out.old-dead2", dead)]
    running = _leftover(tmp_path / ".out.tmp-live", os.getppid())  # a process that is alive: left alone
    (tmp_path / ".out.tmp-users").mkdir()  # not marked by lorafuse: left alone
    assert main(merge_args(pair, out, "--overwrite")) == 0
    assert not any(p.exists() for p in stale) and running.exists() and (tmp_path / ".out.tmp-users").exists()


def test_an_output_set_aside_by_a_killed_replacement_is_restored(tmp_path, pair, capsys):
    out = tmp_path / "out"
    assert main(merge_args(pair, out)) == 0
    previous = tree(out)
    out.rename(tmp_path / ".out.old-abc")  # as a kill between the two renames of --overwrite leaves it
    refused(merge_args(pair, out), capsys, tmp_path / "in", "output exists")
    assert tree(out) == previous and not (tmp_path / ".out.old-abc").exists()


# -- the other commands ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["eval", "--tasks", "rte", "--batch-size", "0"],
    ["train", "--task", "rte", "-o", "x", "--batch-size", "0"],
    ["train", "--task", "rte", "-o", "x", "--lr", "nan"],
    ["eval", "--tasks", "rte", "--max-examples", "-3"],
])
def test_counts_and_rates_of_other_commands(tmp_path, capsys, args):
    refused(args, capsys, tmp_path, args[-2], code=2)


def test_bad_target_modules_regex_before_the_model_loads(tmp_path, capsys):
    refused(["train", "--task", "rte", "-o", str(tmp_path / "x"), "--target-modules", "(query"], capsys, tmp_path,
            "--target-modules", "regular expression")


def test_a_closed_pipe_is_not_a_traceback(tmp_path, pair):
    """`lorafuse inspect A | head`: the reader is gone before the output is written."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorafuse", "inspect", str(pair[0])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("command", [["lorahub", "--task", "rte"], ["router", "--tasks", "rte,scitail"],
                                     ["regmean", "--tasks", "rte,scitail"], ["adamerging", "--tasks", "rte,scitail"]])
def test_data_driven_outputs_never_replace_an_input(tmp_path, pair, capsys, command):
    refused([*command, "--adapters", *map(str, pair), "-o", str(pair[0]), "--overwrite"], capsys, tmp_path,
            "is the input")


def test_output_model_space_is_checked_before_the_merge(tmp_path, pair, capsys, monkeypatch):
    import lorafuse.atomic
    import lorafuse.merging.engine

    base = _base_model(tmp_path / "tiny-llama")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(lorafuse.atomic.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    monkeypatch.setattr(lorafuse.merging.engine._Engine, "run", lambda self: pytest.fail("merged before the check"))
    refused(merge_args(pair, tmp_path / "out", "--base-model", str(base), "--output-model", str(tmp_path / "model")),
            capsys, tmp_path, "model", "needs", "100 B free")


def test_every_lorafuse_output_can_be_replaced_by_its_own_command(tmp_path, pair):
    """Files a command writes belong to its output (the LoraHub trace too): --overwrite replaces it again."""
    from lorafuse.fusion.lorahub import LoraHubResult, save_lorahub

    result = LoraHubResult(weights=[0.5, 0.5], loss=1.0)
    out = tmp_path / "hub"
    for _ in range(2):
        save_lorahub(result, pair, out, "rte", overwrite=True)
    assert (out / "lorahub.json").is_file()
    assert json.loads((out / MARKER_NAME).read_text())["entries"] == sorted(p.name for p in out.iterdir()
                                                                           if p.name != MARKER_NAME)


def test_read_only_output_folder_is_found_before_the_merge(tmp_path, pair, capsys, monkeypatch):
    """As root, permissions cannot make a folder read-only here: the probe meets the error a read-only disk
    raises."""
    import lorafuse.atomic
    import lorafuse.merging.engine

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(lorafuse.atomic.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(lorafuse.merging.engine._Engine, "run", lambda self: pytest.fail("merged before the check"))
    refused(merge_args(pair, tmp_path / "out"), capsys, tmp_path, "out", "Read-only file system")


def test_eval_refuses_a_nan_adapter_before_the_model_loads(tmp_path, pair, capsys, monkeypatch):
    import lorafuse.model.evaluation

    path = pair[0] / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": float("nan")}))
    monkeypatch.setattr(lorafuse.model.evaluation, "Evaluator", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(["eval", "--tasks", "rte", "--adapter", str(pair[0])], capsys, tmp_path, "lora_alpha",
            "not a finite number")


@pytest.mark.parametrize("where,how", [("data", "is the input"), ("", "contains the input")])
def test_train_output_never_over_its_data(tmp_path, capsys, where, how):
    data = tmp_path / "data"
    (data / "rte").mkdir(parents=True)
    (data / "rte" / "train.jsonl").write_text("{}\n")
    refused(["train", "--task", "rte", "--data-dir", str(data), "-o", str(tmp_path / where), "--overwrite"], capsys,
            tmp_path, how)


@pytest.mark.parametrize("model", ["./nomodel", "../nomodel", "/no/such/model"])
def test_a_missing_model_path_is_not_a_hub_id(tmp_path, capsys, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    refused(["train", "--task", "rte", "--model", model, "-o", str(tmp_path / "x")], capsys, tmp_path,
            model, "no such model directory")


def test_a_failed_second_rename_puts_the_first_output_back(tmp_path, monkeypatch):
    first, second = tmp_path / "one", tmp_path / "two"
    with atomic_outputs([first]) as (t1,):
        (t1 / "a").write_text("previous")
    rename = Path.rename

    def fail_for_two(self, target):
        if self.name.startswith(".two.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", fail_for_two)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_outputs([first, second], overwrite=True) as (t1, t2):
            (t1 / "a").write_text("new")
            (t2 / "b").write_text("new")
    assert (first / "a").read_text() == "previous" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]


def test_an_empty_unmarked_temporary_directory_is_removed_once_old(tmp_path, pair):
    stale, fresh = tmp_path / ".out.tmp-abcd1234", tmp_path / ".out.tmp-efgh5678"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (0, 0))  # killed between creating it and writing its marker, long ago
    assert main(merge_args(pair, tmp_path / "out")) == 0
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a run starting right now


@pytest.mark.parametrize("flags", [["--method", "linear", "--weights", "1e39", "1"],
                                   ["--lambda", "1e6", "--dtype", "float16"]])
def test_an_overflowing_merge_writes_nothing(tmp_path, pair, capsys, flags):
    refused(merge_args(pair, tmp_path / "out", *flags), capsys, tmp_path, "model.layers.0.self_attn.q_proj",
            "NaN or Inf")


@pytest.mark.parametrize("head", [{"base_model.model.classifier.weight": torch.full((3, 32), float("nan"))},
                                  {"base_model.model.classifier.weight": torch.ones(3, 32, dtype=torch.int64)}])
def test_heads_must_be_finite_floats(tmp_path, capsys, head):
    paths = [write_adapter(tmp_path / "in" / f"h{i}", MODULES, seed=i, extra=head if i else HEAD,
                           modules_to_save=["classifier"], task_type="SEQ_CLS") for i in range(2)]
    refused(merge_args(paths, tmp_path / "out", "--modules-to-save", "average"), capsys, tmp_path,
            "h1/adapter_model.safetensors", "classifier.weight")


def test_exponent_numbers_are_numbers(tmp_path, pair):
    """Strict types must not refuse `1e-3`, which YAML 1.1 (PyYAML) would read as a string."""
    config = tmp_path / "m.yml"
    config.write_text("merge_method: ties\nparameters: {density: 5e-1, lambda: 1E0}\n"
                      "models:\n  - {model: ./in/a0, parameters: {weight: 1e0}}\n  - {model: ./in/a1}\n")
    assert main(["merge", str(config), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    prov = json.loads((tmp_path / "out" / "lorafuse_merge.json").read_text())
    assert prov["parameters"]["density"] == 0.5 and prov["inputs"][0]["weight"] == 1.0
    assert main(merge_args(pair, tmp_path / "out2", "--method", "ties", "--param", "lambda=2e-1")) == 0


# -- eval --output: an output as every other ------------------------------------------------------------------
class _FakeEvaluator:
    """Stands in for the model: eval's output handling is under test, not its accuracy."""

    formulation_name = "classify"

    def __init__(self, *args, **kwargs) -> None:
        pass

    def evaluate(self, adapter=None, heads=None, tasks=None):
        from lorafuse.model.evaluation import EvalResult

        return EvalResult(accuracy={"rte": 0.5}, examples={"rte": 2})


@pytest.fixture()
def fake_eval(tmp_path, monkeypatch) -> Path:
    import lorafuse.model.evaluation

    monkeypatch.setattr(lorafuse.model.evaluation, "Evaluator", _FakeEvaluator)
    data = tmp_path / "data"
    (data / "rte").mkdir(parents=True)
    (data / "rte" / "test.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n')
    return data


def eval_args(adapter: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--tasks", "rte", "--adapter", str(adapter), "--data-dir", str(data), "--output", str(out),
            "--quiet", *extra]


@pytest.mark.parametrize("target,words", [
    (lambda a, d: a / "adapter_config.json", ("--output", "lies inside the --adapter")),
    (lambda a, d: d / "rte" / "test.jsonl", ("--output", "lies inside the --data-dir")),
    (lambda a, d: d, ("--output", "is the --data-dir")),
])
def test_eval_output_never_replaces_an_input(tmp_path, pair, capsys, fake_eval, target, words):
    refused(eval_args(pair[0], fake_eval, target(pair[0], fake_eval), "--overwrite"), capsys, tmp_path, *words)


def test_eval_output_is_replaced_only_with_overwrite(tmp_path, pair, capsys, fake_eval):
    out = tmp_path / "results.json"
    assert main(eval_args(pair[0], fake_eval, out)) == 0
    assert json.loads(out.read_text())["accuracy"] == {"rte": 50.0}
    out.write_text('{"mine": 1}\n')
    refused(eval_args(pair[0], fake_eval, out), capsys, tmp_path, "results.json", "output exists")
    assert main(eval_args(pair[0], fake_eval, out, "--overwrite")) == 0
    assert json.loads(out.read_text())["accuracy"] == {"rte": 50.0}
    folder = tmp_path / "folder.json"
    folder.mkdir()
    refused(eval_args(pair[0], fake_eval, folder, "--overwrite"), capsys, tmp_path, "folder.json", "not a file")


def test_eval_output_killed_mid_write_keeps_the_previous_file(tmp_path, pair, capsys, fake_eval, monkeypatch):
    import lorafuse.atomic

    out = tmp_path / "results.json"
    out.write_text('{"previous": 1}\n')

    def killed(fd):
        raise KeyboardInterrupt  # as a kill between the write and the rename

    monkeypatch.setattr(lorafuse.atomic.os, "fsync", killed)
    assert main(eval_args(pair[0], fake_eval, out, "--overwrite")) == 130
    assert out.read_text() == '{"previous": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in", "results.json"]


# -- one path for the checks and the writer ----------------------------------------------------------------------
def test_a_quoted_tilde_output_is_checked_and_written_at_the_same_path(tmp_path, pair, monkeypatch):
    """`-o '~/x'` reaches lorafuse unexpanded: the overlap check and the writer must both read it as $HOME/x
    (as the readers of inputs do), never check $HOME/x and then replace ./~/x."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(merge_args(pair, "./~/x")) == 0  # an input that lorafuse wrote, in a folder named `~`
    before = tree(work)
    assert main(merge_args([work / "~" / "x", pair[1]], "~/x", "--overwrite")) == 0
    assert tree(work) == before and is_lorafuse_output(home / "x")


# -- modes come from the umask --------------------------------------------------------------------------------
def test_outputs_written_through_temporaries_follow_the_umask(tmp_path, pair, fake_eval):
    from lorafuse.experiment.cache import write_json_atomic

    old = os.umask(0o027)
    try:
        assert main(merge_args(pair, tmp_path / "out")) == 0
        assert main(eval_args(pair[0], fake_eval, tmp_path / "results.json")) == 0
        write_json_atomic(tmp_path / "jobs" / "a.json", {"status": "ok"})
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    for path in (tmp_path / "results.json", tmp_path / "jobs" / "a.json", tmp_path / "out" / MARKER_NAME):
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_files_a_library_writes_private_are_published_with_the_umask(tmp_path):
    """safetensors' save_file (so PEFT's save_pretrained, so every trained adapter) creates its file 0600."""
    old = os.umask(0o022)
    try:
        with atomic_outputs([tmp_path / "adapter"]) as (tmp,):
            (tmp / "sub").mkdir(mode=0o700)
            save_file({"a": torch.zeros(2)}, str(tmp / "sub" / "adapter_model.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "adapter" / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "adapter" / "sub" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644


# -- one adapter per weights file ---------------------------------------------------------------------------------
def test_a_weights_file_holding_two_adapters_is_refused(tmp_path, pair, capsys):
    """`...lora_A.default.weight` beside `...lora_A.other.weight`: one module's factors were silently taken from
    one of the two adapters."""
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    two = {f"{key}.lora_{half}.{name}.weight": torch.ones(4, 32) if half == "A" else torch.ones(32, 4)
           for name in ("default", "other") for half in "AB"}
    save_file(two, str(pair[1] / "adapter_model.safetensors"))
    refused(merge_args(pair, tmp_path / "out"), capsys, tmp_path, "a1/adapter_model.safetensors",
            "several adapters", "default, other")


# -- target_modules names every stored module ---------------------------------------------------------------------
TWO_MODULES = llama_modules(1, ("self_attn.q_proj", "self_attn.v_proj"))


@pytest.mark.parametrize("targets", [["q_proj"], ["model.layers.0.self_attn.q_proj"], r".*\.q_proj"])
def test_an_adapter_storing_modules_its_target_modules_omit_is_refused(tmp_path, capsys, targets):
    """PEFT loads only the modules target_modules names: the merge kept the short list, and PEFT then dropped
    the other adapter's v_proj too."""
    paths = [write_adapter(tmp_path / "in" / f"a{i}", TWO_MODULES, seed=i,
                           **({"target_modules": targets} if i == 0 else {})) for i in range(2)]
    refused(merge_args(paths, tmp_path / "out"), capsys, tmp_path, "a0/adapter_config.json", "target_modules",
            "model.layers.0.self_attn.v_proj")


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*_proj", "all-linear"])
def test_target_modules_of_the_merge_cover_every_stored_module(tmp_path, targets):
    from lorafuse.adapters.config import targeted

    paths = [write_adapter(tmp_path / "in" / f"a{i}", TWO_MODULES, seed=i, target_modules=targets)
             for i in range(2)]
    assert main(merge_args(paths, tmp_path / "out")) == 0
    merged = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"]
    assert all(targeted(merged, module) for module in TWO_MODULES)


# -- an overwrite deletes only what lorafuse wrote, at any depth, and only its own kind ------------------------------
def test_overwrite_refuses_a_users_file_inside_the_output(tmp_path, capsys):
    paths = _with_heads(tmp_path / "in", "task0")
    out = tmp_path / "out"
    assert main(merge_args(paths, out, "--modules-to-save", "per_task")) == 0
    assert "task_heads/task0.safetensors" in json.loads((out / MARKER_NAME).read_text())["files"]
    (out / "task_heads" / "notes.txt").write_text("mine")
    refused(merge_args(paths, out, "--modules-to-save", "per_task", "--overwrite"), capsys, tmp_path,
            "task_heads/notes.txt", "did not write")
    (out / "task_heads" / "notes.txt").unlink()
    assert main(merge_args(paths, out, "--modules-to-save", "per_task", "--overwrite")) == 0


def test_overwrite_never_replaces_a_run_directory(tmp_path, pair, capsys):
    from lorafuse.experiment import rundir

    run = tmp_path / "run"
    rundir.prepare(run, fresh=False)
    (run / "jobs").mkdir()
    (run / "jobs" / "train-x.json").write_text("{}")
    refused(merge_args(pair, run, "--overwrite"), capsys, tmp_path, "run", "is a lorafuse run output")


def test_a_users_folder_named_like_a_temporary_is_never_removed(tmp_path, pair):
    folder, file = tmp_path / ".out.tmp-mine", tmp_path / ".out.tmp-notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    file.write_text("mine")
    for path in (folder / "thesis.tex", folder, file):
        os.utime(path, (0, 0))  # untouched for decades: the age rule alone would delete them
    assert main(merge_args(pair, tmp_path / "out")) == 0
    assert (folder / "thesis.tex").read_text() == "years of work" and file.read_text() == "mine"


# -- round 3: inputs and environments that used to end in a traceback ----------------------------------------
BIG = "9" * 5000  # past Python's 4,300-digit int conversion limit: a ValueError inside json/yaml
DEEP = "[" * 100_000 + "]" * 100_000  # past the recursion limit: a RecursionError inside json


@pytest.mark.parametrize("body,words", [
    (f"merge_method: ties\nrank: {BIG}\n", ("m.yml", "4300 digits")),
    ("merge_method: ties\nrank: 1.0e400\n", ("m.yml", "rank")),
    (f"merge_method: ties\nparameters: {{lambda: {BIG[:4000]}}}\n", ("lambda", "not a finite number")),
    ("merge_method: ties\nx: " + "[" * 3000 + "]" * 3000 + "\n", ("m.yml", "nested too deeply")),
])
def test_huge_numbers_and_deep_nesting_in_a_merge_yaml(tmp_path, pair, capsys, body, words):
    config = tmp_path / "m.yml"
    config.write_text(body + "models:\n  - {model: ./in/a0}\n  - {model: ./in/a1}\n")
    line = refused(["merge", str(config), "-o", str(tmp_path / "out")], capsys, tmp_path, *words)
    assert len(line) < 400  # a 4,000-digit number is not printed whole


@pytest.mark.parametrize("value,words", [(BIG, "4300 digits"), (DEEP, "nested too deeply")])
def test_huge_numbers_and_deep_nesting_in_adapter_config(tmp_path, pair, capsys, value, words):
    config = pair[0] / "adapter_config.json"
    config.write_text(config.read_text().rstrip().rstrip("}") + f', "extra": {value}}}')
    for command in (merge_args(pair, tmp_path / "out"), ["inspect", str(pair[0])]):
        refused(command, capsys, tmp_path, "a0/adapter_config.json", words)


def _task_with_validation_line(tmp_path: Path, line: str) -> Path:
    from tiny_models import write_task_files

    task_file = write_task_files(tmp_path, "odd", ["entailment", "neutral"])
    (tmp_path / "odd" / "validation.jsonl").write_text(line + "\n")
    return task_file


@pytest.mark.parametrize("line,words", [
    ('{"premise": "\\ud800", "hypothesis": "h", "label": "neutral"}', ("field 'premise'", "lone surrogate")),
    ('{"premise": "p", "hypothesis": "h", "label": "neutral", "n": ' + BIG + "}", ("4300 digits",)),
    ('{"premise": ' + DEEP + "}", ("nested too deeply",)),
])
def test_unusable_data_lines_are_one_line_errors(tmp_path, capsys, line, words):
    task_file = _task_with_validation_line(tmp_path, line)
    refused(["train", "--task-file", str(task_file), "--task", "odd", "-o", str(tmp_path / "out")], capsys,
            tmp_path, "validation.jsonl:1", *words)


def test_max_length_above_the_models_limit_is_refused_up_front(tmp_path, capsys):
    from tiny_models import tiny_bert, write_task_files

    model = tiny_bert(tmp_path / "bert")  # max_position_embeddings 128
    task_file = write_task_files(tmp_path, "fits", ["entailment", "neutral"])
    common = ["--task-file", str(task_file), "--model", str(model), "--max-length", "1000"]
    capsys.readouterr()  # the model's own saving bar
    refused(["train", *common, "--task", "fits", "-o", str(tmp_path / "out")], capsys, tmp_path, "1000", "128",
            "max_position_embeddings")
    refused(["eval", *common, "--tasks", "fits"], capsys, tmp_path, "1000", "128")


def _cli(*args: str, encoding: str | None = None, close_stdout: bool = False) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    if encoding:
        env["PYTHONIOENCODING"] = encoding
    proc = subprocess.Popen([sys.executable, "-m", "lorafuse", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    if close_stdout:
        proc.stdout.close()
        return proc.wait(), "", proc.stderr.read().decode()
    out, err = proc.communicate()
    return proc.returncode, out.decode("ascii", "replace"), err.decode()


def test_an_ascii_stdout_gets_replaced_characters_and_a_closed_one_no_traceback():
    for args in (["--help"], ["merge", "--help"], ["merge", "--list-methods"]):
        code, out, err = _cli(*args, encoding="ascii")
        assert code == 0 and "Traceback" not in err and out.strip(), err
    code, out, _ = _cli("merge", "--list-methods", encoding="ascii")
    assert "?" in out  # Σ, λ and friends, replaced
    code, _, err = _cli("merge", "--list-methods", close_stdout=True)  # `... | head -1`
    assert code == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("broken", ["config.json", "model.safetensors"])
def test_a_truncated_cached_smollm2_copy_is_re_created(tmp_path, monkeypatch, capsys, broken):
    import lorafuse.model.models as models

    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path))
    copy = tmp_path / "smollm2-135m-instruct-fp32"
    copy.mkdir()
    save_file({"w": torch.ones(64, 64)}, str(copy / "model.safetensors"))
    (copy / "config.json").write_text('{"model_type": "llama"}')
    assert models.smollm2_fp32_dir() == copy  # whole: used as it is
    whole = (copy / broken).read_bytes()
    (copy / broken).write_bytes(whole[: len(whole) // 2])
    made = []
    import importlib.metadata

    gguf = namedtuple("Distribution", "locate_file")(lambda name: tmp_path / "m.gguf")  # no package needed
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: gguf)
    monkeypatch.setattr(models, "_dequantize", lambda gguf, out: made.append(out))
    assert models.smollm2_fp32_dir() == copy and made == [copy]
    err = capsys.readouterr().err
    assert "is broken" in err and broken in err and "re-creating" in err


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                 "data/0: file write failed"),  # torch.save's words for a full disk
])
def test_a_disk_that_fills_during_training(tmp_path, capsys, monkeypatch, failure):
    from tiny_models import tiny_bert, write_task_files
    from transformers import Trainer

    model = tiny_bert(tmp_path / "bert")
    task_file = write_task_files(tmp_path, "full", ["entailment", "neutral"])

    def full(self, *args, **kwargs):  # the Trainer's checkpoint save, cut short by the disk
        partial = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        partial.mkdir(parents=True)
        (partial / "optimizer.pt").write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(Trainer, "_save_checkpoint", full)
    out = tmp_path / "out"
    code = main(["train", "--task-file", str(task_file), "--task", "full", "--model", str(model), "-o", str(out),
                 "--target-modules", "query", "value", "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lorafuse train: error: ") and "checkpoint-" in line and "No space left" in line, err
    assert not out.exists() and not list((tmp_path / ".out.checkpoints").glob("checkpoint-*"))
    assert not list(tmp_path.glob(".out.tmp-*"))
