"""Classification merges keep task_type and every task's head: PEFT's own SEQ_CLS loading works, each head file
loads into a plain transformers model (its own keys, safetensors `format` metadata), and the model card's
head-loading snippet runs as written and gives the base model plus the fused update with that task's head."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from adapter_factory import write_adapter
from safetensors import safe_open

from lorafuse.merging.engine import merge

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SHAPES = {"attention.self.query": (32, 32), "attention.self.value": (32, 32), "intermediate.dense": (64, 32)}


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3)
    base = transformers.BertForSequenceClassification(cfg).eval()
    base.save_pretrained(root / "base")
    modules = {f"bert.encoder.layer.{i}.{n}": s for i in range(2) for n, s in SHAPES.items()}
    heads = {f"task{i}": {"base_model.model.classifier.weight": torch.randn(3, 32),
                          "base_model.model.classifier.bias": torch.randn(3)} for i in range(2)}
    paths = [write_adapter(root / name, modules if i == 0 else dict(list(modules.items())[:4]), r=4 + 2 * i,
                           alpha=8, seed=i, base_model=str(root / "base"), task_type="SEQ_CLS",
                           modules_to_save=["classifier"], extra=head)
             for i, (name, head) in enumerate(heads.items())]
    result = merge(paths, "task_arithmetic", progress=False, modules_to_save="per_task")
    return result, result.save(root / "fused"), base, heads


def _reference(base, result, head):
    """Independent: the base model with each fused dense update added and the task's head copied in."""
    ref = copy.deepcopy(base)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for module in result.modules:
            params[f"{module}.weight"] += result.delta(module)
        for key, value in head.items():
            params[key.removeprefix("base_model.model.")].copy_(value)
    return ref


def test_config_keeps_task_type_and_heads_carry_format(fused):
    result, out, _, heads = fused
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert cfg["rank_pattern"] == {} and cfg["r"] == 10  # Σr of 4 and 6, one rank
    for name in heads:
        with safe_open(str(out / "task_heads" / f"{name}.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert sorted(f.keys()) == ["classifier.bias", "classifier.weight"]
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(out.parent / "base")
    from safetensors.torch import load_file

    missing, unexpected = plain.load_state_dict(load_file(str(out / "task_heads" / "task1.safetensors")), strict=False)
    assert not unexpected and "classifier.weight" not in missing
    assert torch.equal(plain.classifier.weight, heads["task1"]["base_model.model.classifier.weight"])


def test_auto_peft_model_loads_the_classification_output(fused, monkeypatch):
    result, out, base, heads = fused
    monkeypatch.chdir(out.parent)  # the adapters named their base by its final name, `base`
    model = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(out)).eval()
    ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad():  # the stored head is the first task's (the card says so)
        want = _reference(base, result, heads["task0"])(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)


@pytest.mark.parametrize("task", ["task0", "task1"])
def test_model_card_snippet_loads_each_head(fused, task, monkeypatch):
    result, out, base, heads = fused
    card = (out / "README.md").read_text()
    assert "task_heads/task0.safetensors" in card and "task_heads/task1.safetensors" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = re.sub(r"^task = '[^']*'", f"task = {task!r}", code, flags=re.M)
    # the card names the base as the adapters recorded it (its final name, never this machine's path)
    assert re.search(r"^base_id = 'base'", code, re.M)
    code = re.sub(r"^base_id = '[^']*'", f"base_id = {str(out.parent / 'base')!r}", code, flags=re.M)
    monkeypatch.chdir(out)  # the snippet reads "a local copy of this directory"
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    ids = torch.randint(1, 100, (2, 7))
    with torch.no_grad():
        got = scope["model"](input_ids=ids).logits
        want = _reference(base, result, heads[task])(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base(input_ids=ids).logits, atol=1e-3)


def test_evaluation_reads_each_tasks_head_not_the_stored_one(fused):
    from lorafuse.model.evaluation import load_task_head

    _, out, _, heads = fused
    for name, head in heads.items():
        got = load_task_head(name, out)
        assert torch.equal(got["classifier.weight"], head["base_model.model.classifier.weight"])
    assert load_task_head("another_task", out) is None  # not the first task's head stored for PEFT
