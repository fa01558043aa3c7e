"""The Evaluator and `lorafuse eval` on tiny models: crafted predictions, heads, label spaces, normalized accuracy,
PEFT parity, in-memory adapters, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import write_task_files

from fixtures_models import bert, classify_adapter, llama, read_record, yaml_tasks  # noqa: F401
from lorafuse.cli import main
from lorafuse.errors import AdapterError, ConfigError
from lorafuse.model.evaluation import (
    EvalResult,
    Evaluator,
    InMemoryAdapter,
    adapter_heads,
    adapter_updates,
    applied,
    head_loaded,
    load_reference,
    load_task_head,
    markdown_table,
    own_head,
)
from lorafuse.tasks import Example, Task, get_task, load_task_file

HEAD = "base_model.model.classifier"


def _head(bias: list[float]) -> dict[str, torch.Tensor]:
    return {f"{HEAD}.weight": torch.zeros(3, 32), f"{HEAD}.bias": torch.tensor(bias)}


def _share(task: str, label: str, split: str = "test") -> float:
    labels = [e.label for e in get_task(task).load(split)]
    return labels.count(label) / len(labels)


def test_normalized_accuracy_and_averages(tmp_path):
    r = EvalResult({"a": 0.5, "b": 0.9}, {"a": 10, "b": 10}).normalize({"a": 0.8, "b": 0.9})
    assert r.average == pytest.approx(0.7)
    assert r.normalized == pytest.approx({"a": 62.5, "b": 100.0})
    assert r.normalized_average == pytest.approx(81.25)
    assert r.to_dict()["reference"] == {"a": 0.8, "b": 0.9}
    assert "50.0 [23.7, 76.3] (62.5)" in markdown_table({"fused": r}, ["a", "b"])  # 95% Wilson, 5 of 10
    (tmp_path / "r.json").write_text(json.dumps(r.to_dict()))
    assert load_reference(tmp_path / "r.json") == {"a": 0.8, "b": 0.9}  # its reference section
    (tmp_path / "p.json").write_text(json.dumps({"a": 80.0}))
    assert load_reference(tmp_path / "p.json") == {"a": 0.8}  # percentages become fractions
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ConfigError, match="bad.json: expected"):
        load_reference(tmp_path / "bad.json")


def test_collapse_needs_one_label_on_nearly_every_example():
    r = EvalResult({"a": 0.5, "b": 0.5}, {"a": 100, "b": 100},
                   predicted={"a": {"x": 96, "y": 4}, "b": {"x": 60, "y": 40}})
    assert r.collapsed("a") == "x" and r.collapsed("b") is None and r.collapsed("missing") is None


def test_classify_crafted_head_and_binary_mask(bert, yaml_tasks):  # noqa: F811
    """Zero weights, bias ordering neutral > entailment > contradiction: a 3-way task predicts neutral everywhere;
    the binary task's not_entailment sits in neutral's slot; with entailment on top, contradiction is masked."""
    ev = Evaluator(str(bert), ["cmp3", "cmp2"], formulation="classify", data_dir=yaml_tasks, progress=False)
    result = ev.evaluate(None, heads={"cmp3": _head([0.0, 1.0, 2.0]), "cmp2": _head([0.0, 1.0, 2.0])})
    assert result.accuracy["cmp3"] == pytest.approx(_share("cmp3", "neutral"))
    assert result.accuracy["cmp2"] == pytest.approx(_share("cmp2", "not_entailment"))
    assert result.predicted == {"cmp3": {"neutral": result.examples["cmp3"]},  # counted under the task's labels
                                "cmp2": {"not_entailment": result.examples["cmp2"]}}
    assert result.collapsed("cmp2") == "not_entailment" and result.to_dict()["predicted"] == result.predicted
    masked = ev.evaluate(None, heads={"cmp2": _head([9.0, 0.0, 1.0])}, tasks=["cmp2"])  # contradiction masked
    assert masked.accuracy == {"cmp2": pytest.approx(_share("cmp2", "not_entailment"))}
    with pytest.raises(ConfigError, match="no classification head"):
        ev.evaluate(None)


def test_other_splits_are_tokenized_once_on_demand(bert, yaml_tasks):  # noqa: F811
    ev = Evaluator(str(bert), ["cmp3"], formulation="classify", data_dir=yaml_tasks, progress=False)
    heads = {"cmp3": _head([0.0, 0.0, 5.0])}
    val = ev.evaluate(None, heads=heads, split="validation")
    assert val.accuracy["cmp3"] == pytest.approx(_share("cmp3", "neutral", "validation"))
    assert ev.batches_for(ev.tasks[0], "validation") is ev.batches_for(ev.tasks[0], "validation")


def test_classify_refuses_labels_outside_shared_space(bert, tmp_path):  # noqa: F811
    four = Task("four", ("a", "b", "c", "d"), files={"test": str(tmp_path / "x.jsonl")})
    (tmp_path / "x.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "a"}\n')
    with pytest.raises(ConfigError, match="cannot be expressed in the classify"):
        Evaluator(str(bert), [four], formulation="classify", progress=False)


def test_chat_crafted_model_predicts_first_label(llama, yaml_tasks):  # noqa: F811
    """With the final norm zeroed every label scores the same and the first label wins: accuracy = its share."""
    ev = Evaluator(str(llama), ["cmp3"], data_dir=yaml_tasks, progress=False)
    with torch.no_grad():
        ev.model.model.norm.weight.zero_()
    result = ev.evaluate()
    assert result.accuracy["cmp3"] == pytest.approx(_share("cmp3", "contradiction"))
    assert result.predicted["cmp3"] == {"contradiction": result.examples["cmp3"]}


def test_chat_multi_token_labels_scored_in_one_pass(llama, tmp_path):  # noqa: F811
    """`not entailment` / `not neutral`: the shared `not` ends the prompt; `entailment` vs `neutral` is scored.
    A crafted output layer that always prefers `neutral` predicts the second label everywhere."""
    load_task_file(write_task_files(tmp_path, "multi", ["not entailment", "not neutral"]))
    ev = Evaluator(str(llama), ["multi"], progress=False)
    tok = ev.formulation.tokenizer
    prefix, scored = ev.formulation.scoring(get_task("multi"))
    assert prefix == tok("not", add_special_tokens=False)["input_ids"]
    assert scored == [tok.convert_tokens_to_ids(w) for w in ("entailment", "neutral")]
    assert all(b.inputs["input_ids"][:, -1].eq(prefix[0]).all() for b in ev.batches["multi"])
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[scored[1]] = 5.0
    ev.model.lm_head = head
    assert ev.evaluate().accuracy["multi"] == pytest.approx(_share("multi", "not neutral"))


def test_chat_long_pair_loses_its_premise_end_not_the_template(llama):  # noqa: F811
    """A pair too long for max_length keeps the template's start, the hypothesis and the question whole and the
    longest start of the premise that fits; a short pair is untouched; a hypothesis too long on its own still
    fits (its start goes)."""
    from transformers import AutoTokenizer

    from lorafuse.model.formulations import Chat

    tok = AutoTokenizer.from_pretrained(str(llama))
    task = Task("long", ("entailment", "not_entailment"), files={})
    words = [str(i % 20) for i in range(60)]
    pair = Example(" ".join(words), "the premise has more than 7", "entailment")
    chat = Chat(tok, max_length=64)
    full = chat.fitted_prompt(task, pair, 10_000)
    room = len(full) - 25

    def with_premise(n: int) -> list[int]:
        return chat.fitted_prompt(task, Example(" ".join(words[:n]), pair.hypothesis, pair.label), 10_000)

    fitted = chat.fitted_prompt(task, pair, room)
    kept = max(n for n in range(len(words)) if len(with_premise(n)) <= room)
    assert fitted == with_premise(kept) and len(fitted) <= room and kept == len(words) - 25
    assert fitted[:3] == full[:3] and fitted[-12:] == full[-12:]
    assert chat.fitted_prompt(task, pair, len(full)) == full
    assert len(chat.fitted_prompt(task, Example("0", " ".join(words), "entailment"), 30)) == 30
    assert all(len(r["prompt"]) + len(r["answer"]) <= 64 for r in chat.encode(task, [pair]))


def test_chat_refuses_labels_one_token_cannot_separate(llama, tmp_path):  # noqa: F811
    for labels in (["not", "not entailment"], ["not entailment", "not neutral", "neutral"]):
        task = Task("sep", tuple(labels), files={"test": str(tmp_path / "s.jsonl")})
        (tmp_path / "s.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": labels[0]}) + "\n")
        with pytest.raises(ConfigError, match="cannot be told apart by one token"):
            Evaluator(str(llama), [task], progress=False)


def test_evaluator_matches_peft_and_in_memory_adapter(bert, yaml_tasks, classify_adapter):  # noqa: F811
    from peft import LoraConfig, PeftModel
    from safetensors.torch import load_file

    ev = Evaluator(str(bert), ["cmp3"], formulation="classify", data_dir=yaml_tasks, progress=False)
    inputs = {k: v for k, v in ev.batches["cmp3"][0].inputs.items()}
    updates, _ = adapter_updates(classify_adapter)
    with applied(ev.model, updates), head_loaded(ev.model, adapter_heads(classify_adapter, ["cmp3"])["cmp3"]):
        with torch.no_grad():
            ours = ev.model(**inputs).logits
    from_dir = ev.evaluate(classify_adapter).accuracy
    tensors = load_file(str(classify_adapter / "adapter_model.safetensors"))
    config = LoraConfig.from_pretrained(str(classify_adapter))
    assert ev.evaluate(InMemoryAdapter(tensors, config), heads={"cmp3": own_head(classify_adapter)}).accuracy \
        == from_dir
    assert ev.evaluate((tensors, config), heads={"cmp3": classify_adapter}).accuracy == from_dir  # head from dir
    peft_model = PeftModel.from_pretrained(ev.model, str(classify_adapter)).eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    peft_model.unload()


def test_task_head_resolution_order(classify_adapter, tmp_path):  # noqa: F811
    """(1) own head if trained on the task, (2) task_heads/<task>, (3) given heads, (4) heads_dir, (5) own head of
    an adapter without a training record."""
    from safetensors.torch import save_file

    own = own_head(classify_adapter)
    fused = tmp_path / "fused"
    shutil.copytree(classify_adapter, fused)
    (fused / "task_heads").mkdir()
    stored = {k: torch.full_like(v, 7.0) for k, v in own.items()}
    save_file(stored, str(fused / "task_heads" / "cmp3.safetensors"))
    _equal(load_task_head("cmp3", fused), own)  # (1): trained on cmp3 beats task_heads
    record = read_record(fused)
    (fused / "lorafuse_train.json").write_text(json.dumps({**record, "task": "other"}))
    _equal(load_task_head("cmp3", fused, {"cmp3": classify_adapter}), stored)  # (2) beats given heads
    (fused / "task_heads" / "cmp3.safetensors").unlink()
    _equal(load_task_head("cmp3", fused, {"cmp3": {"x": torch.ones(1)}}), {"x": torch.ones(1)})  # (3)
    heads_dir = tmp_path / "heads"
    heads_dir.mkdir()
    shutil.copytree(classify_adapter, heads_dir / "cmp3")
    _equal(load_task_head("cmp3", fused, heads_dir=heads_dir), own)  # (4)
    assert load_task_head("cmp3", fused) is None  # trained on another task: its head is not cmp3's
    (fused / "lorafuse_train.json").unlink()
    _equal(load_task_head("cmp3", fused), own)  # (5)


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_for_another_base_is_refused(bert, yaml_tasks, tmp_path):  # noqa: F811
    from adapter_factory import write_adapter

    other = write_adapter(tmp_path / "other", {"bert.encoder.layer.0.attention.self.query": (64, 64)})
    ev = Evaluator(str(bert), ["cmp3"], formulation="classify", data_dir=yaml_tasks, progress=False)
    with pytest.raises(AdapterError, match="does not fit weight"):
        ev.evaluate(other, heads={"cmp3": {}})
    missing = write_adapter(tmp_path / "missing", {"model.layers.0.self_attn.q_proj": (32, 32)})
    with pytest.raises(AdapterError, match="not in the model"):
        ev.evaluate(missing, heads={"cmp3": {}})


def test_eval_command_reference_and_results(bert, yaml_tasks, classify_adapter, tmp_path, capsys):  # noqa: F811
    base = ["eval", "--model", str(bert), "--formulation", "classify", "--tasks", "cmp3", "--quiet",
            "--adapter", str(classify_adapter)]
    assert main([*base, "--reference", f"cmp3={classify_adapter}", "--output", str(tmp_path / "own.json")]) == 0
    own = json.loads((tmp_path / "own.json").read_text())
    assert own["normalized"] == {"cmp3": pytest.approx(100.0)} and own["versions"]["torch"]
    assert "| cmp3 |" in capsys.readouterr().out
    assert main([*base, "--reference-results", str(tmp_path / "own.json"), "--output", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["normalized_average"] == pytest.approx(100.0)
    assert main(["eval", "--model", str(bert), "--tasks", "cmp3", "--heads", "cmp3"]) == 1
    assert "expected TASK=DIR" in capsys.readouterr().err
    assert main(["eval", "--model", str(bert), "--tasks", "cmp33"]) == 1
    assert "did you mean 'cmp3'" in capsys.readouterr().err


def test_device_choice_and_errors(monkeypatch):
    from lorafuse.model.models import default_device

    monkeypatch.delenv("LORAFUSE_DEVICE", raising=False)
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("LORAFUSE_DEVICE", "cpu")
    assert default_device() == "cpu"
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        default_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            default_device("cuda")


def test_batches_follow_the_model_to_its_device(bert, yaml_tasks):  # noqa: F811
    """Batches are collated on the host; the formulation moves them to wherever the model lives (here the meta
    device: a stand-in for a GPU on a CPU-only machine)."""
    from lorafuse.model.formulations import on_model_device

    ev = Evaluator(str(bert), ["cmp3"], formulation="classify", data_dir=yaml_tasks, progress=False, device="cpu")
    assert ev.device == "cpu" and next(ev.model.parameters()).device.type == "cpu"
    batch = ev.batches["cmp3"][0]
    assert on_model_device(ev.model, batch.inputs)["input_ids"] is batch.inputs["input_ids"]  # no copy on one device
    ev.model.to("meta")
    moved = on_model_device(ev.model, batch.inputs)
    assert {v.device.type for v in moved.values()} == {"meta"} and batch.inputs["input_ids"].device.type == "cpu"


def test_eval_json_and_table_agree_in_percent_and_a_reference_at_chance_is_flagged(
        bert, yaml_tasks, classify_adapter, tmp_path, capsys):  # noqa: F811
    """One unit everywhere a person reads (percent, said by `units`), the table's cells are the JSON's numbers
    with their Wilson intervals, and a reference adapter that always predicts one label is called at chance."""
    import re

    from safetensors.torch import load_file, save_file

    constant = tmp_path / "constant"
    shutil.copytree(classify_adapter, constant)
    tensors = load_file(str(constant / "adapter_model.safetensors"))
    for key in [k for k in tensors if "classifier" in k]:  # zero weights, one bias on top: one label always
        tensors[key] = torch.zeros_like(tensors[key]) if key.endswith("weight") else torch.tensor([5.0, 0.0, 0.0])
    save_file(tensors, str(constant / "adapter_model.safetensors"))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(bert), "--formulation", "classify", "--tasks", "cmp3", "--quiet",
                 "--adapter", str(classify_adapter), "--reference", f"cmp3={constant}", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    assert data["units"] == "percent" and 1.0 < data["average"] <= 100.0
    accuracy, (low, high) = data["accuracy"]["cmp3"], data["accuracy_interval"]["cmp3"]
    assert data["average"] == pytest.approx(accuracy) and low <= accuracy <= high <= 100.0
    assert f"{accuracy:.1f} [{low:.1f}, {high:.1f}] ({data['normalized']['cmp3']:.1f})" in captured.out
    assert data["normalized"]["cmp3"] == pytest.approx(100 * accuracy / data["reference"]["cmp3"])
    assert load_reference(out) == {"cmp3": pytest.approx(data["reference"]["cmp3"] / 100)}
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: reference adapter")]
    assert len(warning) == 1 and "at chance" in warning[0] and re.search(r"p = [\d.]+", warning[0]), captured.err
