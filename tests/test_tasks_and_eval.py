"""Tasks, formulations, training and evaluation on tiny models built in code (offline)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama, write_task_files

from lorafuse.errors import AdapterError, ConfigError
from lorafuse.evaluation import EvalResult, Evaluator, applied, markdown_table
from lorafuse.tasks import DataError, Task, get_task, load_task_file
from lorafuse.training import TRAIN_RECORD, TrainConfig, train_adapter


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert") / "model")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def yaml_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    load_task_file(write_task_files(root, "cmp3", ["contradiction", "entailment", "neutral"]))
    load_task_file(write_task_files(root, "cmp2", ["entailment", "not_entailment"], seed=1))
    return root


def test_unknown_task_lists_known_ones():
    with pytest.raises(ConfigError, match="did you mean 'mnli'.*known: .*rte"):
        get_task("mnlii")


def test_bad_data_files_name_file_and_line(tmp_path):
    task = Task("t", ("entailment", "neutral"), files={"train": str(tmp_path / "train.jsonl")})
    (tmp_path / "train.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n'
                                          '{"premise": "a", "hypothesis": "b", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: unknown label 'maybe'"):
        task.load("train")
    (tmp_path / "train.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{oops\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        task.load("train")
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty data file"):
        task.load("train")
    with pytest.raises(DataError, match="no such data file"):
        Task("u", ("a", "b"), files={"test": str(tmp_path / "missing.jsonl")}).load("test")


def test_classify_refuses_labels_outside_shared_space(bert, tmp_path):
    four = Task("four", ("a", "b", "c", "d"), files={"test": str(tmp_path / "x.jsonl")})
    (tmp_path / "x.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "a"}\n')
    with pytest.raises(ConfigError, match="cannot be expressed in the classify"):
        Evaluator(str(bert), [four], formulation="classify", progress=False)


def test_generated_suite_is_deterministic_and_disjoint():
    task = get_task("syn_numbers")
    a, b = task.load("test"), task.load("test")
    assert a == b
    train = {(e.premise, e.hypothesis) for e in task.load("train")}
    assert not train & {(e.premise, e.hypothesis) for e in a}


def test_normalized_accuracy_and_averages():
    r = EvalResult({"a": 0.5, "b": 0.9}, {"a": 10, "b": 10}).normalize({"a": 0.8, "b": 0.9})
    assert r.average == pytest.approx(0.7)
    assert r.normalized == pytest.approx({"a": 62.5, "b": 100.0})
    assert r.normalized_average == pytest.approx(81.25)
    assert "62.5" in markdown_table({"fused": r}, ["a", "b"])


def test_classify_crafted_head_and_binary_mask(bert, yaml_task):
    """Head weights zero, bias prefers neutral, then entailment: a 3-way task predicts neutral everywhere; a
    binary entailment/not_entailment task keeps neutral's slot (not_entailment); contradiction-free masks work."""
    ev = Evaluator(str(bert), ["cmp3", "cmp2"], split="test", formulation="classify", data_dir=yaml_task,
                   progress=False)
    head = {"base_model.model.classifier.weight": torch.zeros(3, 32),
            "base_model.model.classifier.bias": torch.tensor([0.0, 1.0, 2.0])}
    result = ev.evaluate(None, heads={"cmp3": head, "cmp2": head})
    labels3 = [e.label for e in get_task("cmp3").load("test")]
    labels2 = [e.label for e in get_task("cmp2").load("test")]
    assert result.accuracy["cmp3"] == pytest.approx(labels3.count("neutral") / len(labels3))
    assert result.accuracy["cmp2"] == pytest.approx(labels2.count("not_entailment") / len(labels2))
    with pytest.raises(ConfigError, match="no classification head"):
        ev.evaluate(None)


def test_chat_crafted_model_predicts_first_label(llama, yaml_task):
    """With the final norm zeroed every label scores 0 and the first label wins: accuracy = its share."""
    ev = Evaluator(str(llama), ["cmp3"], split="test", data_dir=yaml_task, progress=False)
    with torch.no_grad():
        ev.model.model.norm.weight.zero_()
    labels = [e.label for e in get_task("cmp3").load("test")]
    assert ev.evaluate().accuracy["cmp3"] == pytest.approx(labels.count("contradiction") / len(labels))


@pytest.mark.parametrize("formulation,model_fixture", [("classify", "bert"), ("chat", "llama")])
def test_training_lowers_loss_and_evaluator_matches_peft(request, yaml_task, tmp_path, formulation, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    out = train_adapter(TrainConfig(task="cmp3", model=str(model_dir), formulation=formulation, output=str(tmp_path / "ad"),
                                    epochs=6, lr=5e-3, batch_size=8, rank=4, logging_steps=1, progress=False,
                                    target_modules=["query", "value"] if formulation == "classify" else None))
    record = json.loads((out / TRAIN_RECORD).read_text())
    losses = record["loss_history"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert record["task"] == "cmp3" and len(record["data_sha256"]["train"]) == 64

    # The evaluator's exact weight update gives PEFT's own outputs.
    from peft import PeftModel

    ev = Evaluator(str(model_dir), ["cmp3"], split="test", formulation=formulation, data_dir=yaml_task,
                   progress=False)
    batch = ev.batches["cmp3"][0]
    inputs = {k: v for k, v in batch.inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    from lorafuse.evaluation import adapter_heads, adapter_updates, head_loaded

    updates, _ = adapter_updates(out)
    with applied(ev.model, updates), head_loaded(ev.model, adapter_heads(out, ["cmp3"]).get("cmp3")):
        with torch.no_grad():
            ours = ev.model(**inputs).logits
    peft_model = PeftModel.from_pretrained(ev.model, str(out)).eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_adapter_for_another_base_is_refused(bert, yaml_task, tmp_path):
    from adapter_factory import write_adapter

    other = write_adapter(tmp_path / "other", {"bert.encoder.layer.0.attention.self.query": (64, 64)})
    ev = Evaluator(str(bert), ["cmp3"], formulation="classify", data_dir=yaml_task, progress=False)
    with pytest.raises(AdapterError, match="does not fit weight"):
        ev.evaluate(other, heads={"cmp3": {}})
