"""What lorafuse writes works outside lorafuse: no output names an absolute path of the machine that wrote it,
embedded models are recorded by their Hub ids (and accepted by short name, Hub id or local path), a trained
adapter ships a real model card, and a classify adapter (trained or fused) gives `lorafuse eval`'s predictions
in plain transformers + PEFT: through the card's snippet and through AutoPeftModelForSequenceClassification."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_sentence_bert, write_keyword_task

from lorafuse.tasks import load_task_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TASKS = {"outside3": ["contradiction", "entailment", "neutral"], "outside2": ["entailment", "not_entailment"]}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """From a working directory under tmp: a tiny sentence-transformers BERT given as a relative path, two
    classify adapters trained on it, and their per_task fusion."""
    from lorafuse.merging.engine import merge
    from lorafuse.model.training import TrainConfig, train_adapter

    root = tmp_path_factory.mktemp("outside")
    before = os.getcwd()
    os.chdir(root)
    try:
        tiny_sentence_bert(root / "stbert")
        for i, (name, labels) in enumerate(TASKS.items()):
            load_task_file(write_keyword_task(root / "data", name, labels, seed=i))
            train_adapter(TrainConfig(task=name, model="stbert", output=f"adapters/{name}", epochs=3, lr=5e-3,
                                      batch_size=8, rank=4, target_modules=["query", "value"], progress=False,
                                      dropout=0.0))
        # the default modules_to_save (auto) keeps each lorafuse-trained classify adapter's head: per_task
        result = merge([f"adapters/{n}" for n in TASKS], "task_arithmetic", progress=False)
        result.save("fused")
        yield root
    finally:
        os.chdir(before)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_output_names_an_absolute_path(outputs, tmp_path_factory):
    prefixes = {str(tmp_path_factory.getbasetemp()), str(tmp_path_factory.getbasetemp().resolve())}
    written = _files(outputs / "adapters") + _files(outputs / "fused")
    assert len(written) > 8
    offending = [str(p.relative_to(outputs)) for p in written
                 if any(x.encode() in p.read_bytes() for x in prefixes)]
    assert not offending
    config = json.loads((outputs / "adapters/outside3/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "stbert"  # as given (relative)
    record = json.loads((outputs / "adapters/outside3/lorafuse_train.json").read_text())
    assert record["model_path"] == "stbert" and record["pooling"] == "mean"
    fused = json.loads((outputs / "fused/lorafuse_merge.json").read_text())
    assert [i["path"] for i in fused["inputs"]] == ["adapters/outside3", "adapters/outside2"]
    assert "base_model: stbert" in (outputs / "fused/README.md").read_text()
    assert fused["options"]["modules_to_save"] == "auto" and fused["options"]["modules_to_save_applied"] == "per_task"
    assert sorted(p.name for p in (outputs / "fused/task_heads").iterdir()) == [f"{n}.safetensors" for n in
                                                                               sorted(TASKS)]


def test_merge_yaml_names_embedded_base_by_short_name_and_paths_resolve_next_to_it(tmp_path, monkeypatch, capsys):
    from adapter_factory import write_adapter

    from lorafuse.cli import main
    from lorafuse.model.models import HUB_IDS

    modules = {"bert.encoder.layer.0.attention.self.query": (8, 8)}
    for i in range(2):
        write_adapter(tmp_path / "cfg" / f"a{i}", modules, seed=i, base_model=HUB_IDS["minilm"])
    config = tmp_path / "cfg" / "merge.yml"
    config.write_text("merge_method: average\nbase_model: minilm\nmodels:\n  - model: a0\n  - model: ./a1\n")
    monkeypatch.chdir(tmp_path)
    assert main(["merge", str(config), "-o", "fused"]) == 0
    assert json.loads((tmp_path / "fused/adapter_config.json").read_text())["base_model_name_or_path"] == \
        HUB_IDS["minilm"]
    # mergekit resolves against the working directory: a path that exists only from there is refused, saying so
    config.write_text("merge_method: average\nmodels:\n  - model: cfg/a0\n  - model: cfg/a1\n")
    assert main(["merge", str(config), "-o", "fused2"]) == 1
    assert "resolves a merge YAML's relative paths against the YAML's folder" in capsys.readouterr().err


def test_embedded_models_are_named_by_hub_id_and_accepted_by_any_name(tmp_path):
    from adapter_factory import write_adapter

    from lorafuse.merging.engine import merge
    from lorafuse.model.models import HUB_IDS, portable_name, resolve_model, same_model

    assert portable_name("minilm") == HUB_IDS["minilm"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_name("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("/somewhere/on/this/machine/my-model/") == "my-model"
    assert portable_name("../models/x") == "../models/x" and portable_name("org/name") == "org/name"
    assert same_model("minilm", "sentence-transformers/all-MiniLM-L6-v2")
    assert same_model("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2") and not same_model("minilm", "smollm2")
    try:
        info = resolve_model("minilm")
    except Exception:  # the embedded package is absent here
        info = None
    if info is not None:
        assert info.recorded_name == HUB_IDS["minilm"] and same_model(info.path, "minilm")
        assert resolve_model("sentence-transformers/all-MiniLM-L6-v2").path == info.path
    modules = {"bert.encoder.layer.0.attention.self.query": (8, 8)}
    adapters = [write_adapter(tmp_path / f"a{i}", modules, seed=i, base_model=HUB_IDS["minilm"]) for i in range(2)]
    for given in ("minilm", HUB_IDS["minilm"], *([info.path] if info is not None else [])):
        merged = merge(adapters, "average", base_model=given, progress=False)
        assert merged.config["base_model_name_or_path"] == HUB_IDS["minilm"]
    with pytest.raises(Exception, match="differs"):
        merge(adapters, "average", base_model="smollm2", progress=False)


def test_trained_adapter_ships_a_real_model_card(outputs):
    card = (outputs / "adapters/outside3/README.md").read_text()
    assert "More Information Needed" not in card
    record = json.loads((outputs / "adapters/outside3/lorafuse_train.json").read_text())
    assert record["data_sha256"]["train"] in card and "base_model: stbert" in card
    assert "validation accuracy:" in card and "Wilson interval" in card and '"rank": 4' in card


def _test_pairs(root: Path, task: str) -> tuple[list[str], list[str], list[str]]:
    rows = [json.loads(line) for line in (root / "data" / task / "test.jsonl").read_text().splitlines()]
    return [r["premise"] for r in rows], [r["hypothesis"] for r in rows], [r["label"] for r in rows]


def _eval_labels(root: Path, adapter: str, task: str) -> list[str]:
    """`lorafuse eval`'s predictions (its Evaluator, fp32) as label words."""
    from lorafuse.model.evaluation import Evaluator
    from lorafuse.model.formulations import SLOT

    ev = Evaluator("stbert", [task], split="test", dtype="float32", progress=False)
    ev.evaluate(adapter)
    names = {SLOT[lab]: lab for lab in TASKS[task]}
    return [names[s] for s in ev.last_predictions[task]]


def _card_predict(card: Path, adapter: Path, task: str, premises: list[str], hypotheses: list[str]) -> list[str]:
    """Run the card's Python block as written, pointed at this adapter copy and task."""
    code = re.search(r"```python\n(.*?)```", card.read_text(), re.S).group(1)
    code = re.sub(r'^adapter = "\."', f"adapter = {str(adapter)!r}", code, flags=re.M)
    code = re.sub(r"^task = '[^']*'", f"task = {task!r}", code, flags=re.M)
    scope: dict = {}
    exec(compile(code, str(card), "exec"), scope)
    return scope["predict"](premises, hypotheses)


def _auto_peft_predict(adapter: Path, task: str, premises: list[str], hypotheses: list[str]) -> list[str]:
    """AutoPeftModelForSequenceClassification plus the card's documented pooling and label-mask step."""
    from lorafuse.adapters.cards import MEAN_POOLING, PREDICT, slot_labels

    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(adapter), num_labels=3).eval()
    scope = {"torch": torch, "model": model, "task": task, "LABELS": {task: slot_labels(TASKS[task])},
             "tokenizer": transformers.AutoTokenizer.from_pretrained("stbert")}
    exec(MEAN_POOLING + PREDICT.format(max_length=128), scope)
    return scope["predict"](premises, hypotheses)


@pytest.mark.parametrize("task", list(TASKS))
def test_trained_adapter_predicts_as_lorafuse_eval_outside_lorafuse(outputs, task):
    premises, hypotheses, gold = _test_pairs(outputs, task)
    adapter = outputs / "adapters" / task
    want = _eval_labels(outputs, f"adapters/{task}", task)
    assert sum(w == g for w, g in zip(want, gold)) > len(gold) / len(TASKS[task])  # it learned something
    assert _card_predict(adapter / "README.md", adapter, task, premises, hypotheses) == want
    assert _auto_peft_predict(adapter, task, premises, hypotheses) == want


@pytest.mark.parametrize("task", list(TASKS))
def test_fused_adapter_predicts_as_lorafuse_eval_outside_lorafuse(outputs, task):
    premises, hypotheses, _ = _test_pairs(outputs, task)
    fused = outputs / "fused"
    want = _eval_labels(outputs, "fused", task)
    assert _card_predict(fused / "README.md", fused, task, premises, hypotheses) == want
    if task == next(iter(TASKS)):  # the adapter file carries the first task's head (PEFT's SEQ_CLS format)
        assert _auto_peft_predict(fused, task, premises, hypotheses) == want


def test_mean_pooling_matters_here(outputs):
    """The comparison above is not vacuous: BERT's [CLS] pooler predicts differently on this model."""
    task = "outside3"
    premises, hypotheses, _ = _test_pairs(outputs, task)
    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        str(outputs / "adapters" / task), num_labels=3).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained("stbert")
    enc = tokenizer(premises, hypotheses, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls_pooled = model(**enc).logits.argmax(-1).tolist()
    names = {i: lab for i, lab in enumerate(TASKS[task])}
    assert [names[s] for s in cls_pooled] != _eval_labels(outputs, f"adapters/{task}", task)
