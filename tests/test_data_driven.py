"""LoraHub and the routed mixture on tiny models: LoraHub finds the adapter that solves the task; the router sends
inputs to the right adapter and, routed one-hot, reproduces that adapter exactly."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_factory import write_adapter
from tiny_models import tiny_bert, write_task_files

from lorafuse.evaluation import Evaluator, adapter_updates, applied, head_loaded, own_head
from lorafuse.fusion.lorahub import FewShotObjective, LoraHubSettings, load_factors, lorahub
from lorafuse.fusion.router import Router, pooled_features, train_gate
from lorafuse.tasks import get_task, load_task_file
from lorafuse.training import TrainConfig, train_adapter

BERT_MODULES = {f"bert.encoder.layer.{i}.attention.self.{n}": (32, 32) for i in range(2) for n in ("query", "value")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dd")
    model = tiny_bert(root / "bert")
    load_task_file(write_task_files(root / "data", "hubtask", ["contradiction", "entailment", "neutral"], n=96))
    good = train_adapter(TrainConfig(task="hubtask", model=str(model), formulation="classify", output=str(root / "good"),
                                     epochs=8, lr=5e-3, batch_size=16, rank=4, target_modules=["query", "value"],
                                     progress=False))
    noise = [write_adapter(root / f"noise{i}", BERT_MODULES, r=4, alpha=4, seed=20 + i, base_model=str(model))
             for i in range(2)]
    for path in noise:  # make the noise adapters strong enough to hurt
        from safetensors.torch import load_file, save_file

        state = {k: v * (6.0 if "lora_B" in k else 1.0) for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
        save_file(state, str(path / "adapter_model.safetensors"))
    ev = Evaluator(str(model), ["hubtask"], split="validation", formulation="classify", data_dir=None, progress=False)
    return root, model, good, noise, ev


def test_lorahub_concentrates_on_the_solving_adapter(world):
    root, model, good, noise, ev = world
    examples = get_task("hubtask").load("train")[:24]
    head = own_head(good)
    settings = LoraHubSettings(budget=40, seed=0)
    result, updates = lorahub(ev, [noise[0], good, noise[1]], "hubtask", examples, settings, head)
    w = result.weights
    assert all(-1.5 <= x <= 1.5 for x in w) and all(-1.5 <= x <= 1.5 for s in result.trace for x in s["weights"])
    assert abs(w[1]) > max(abs(w[0]), abs(w[2]))
    factors, _ = load_factors([noise[0], good, noise[1]])
    objective = FewShotObjective(ev.model, ev.formulation, get_task("hubtask"), examples, factors, "factors", head=head)
    assert result.loss < objective([1 / 3] * 3)
    again, _ = lorahub(ev, [noise[0], good, noise[1]], "hubtask", examples, settings, head)
    assert again.weights == w


def test_lorahub_exact_update_composition(world):
    root, model, good, noise, ev = world
    examples = get_task("hubtask").load("train")[:16]
    result, updates = lorahub(ev, [good, noise[0]], "hubtask", examples,
                              LoraHubSettings(budget=8, composition="updates"), own_head(good))
    factors, _ = load_factors([good, noise[0]])
    module = next(iter(updates))
    ref = sum(w * t.dense() for w, t in zip(result.weights, factors[module]))
    assert torch.allclose(updates[module].dense(), ref, atol=1e-6)


def _texts(ev, words, n, seed):
    import random

    rng = random.Random(seed)
    rows = [{"input_ids": ev.formulation.tokenizer(" ".join(rng.choices(words, k=6)))["input_ids"], "target": 0}
            for _ in range(n)]
    return [ev.formulation.collate(rows[i:i + 8]) for i in range(0, n, 8)]


def test_router_sends_inputs_to_the_right_adapter_and_one_hot_equals_adapter(world, tmp_path):
    root, model, good, noise, ev = world
    router = Router.from_adapters([good, noise[0]], ev.model.config.hidden_size, ["good", "noise"])
    digits, words = [str(i) for i in range(20)], ["the", "a", "saw", "all", "some", "are", "in", "of", "and"]
    stats = train_gate(router, ev.model, [_texts(ev, digits, 48, 0), _texts(ev, words, 48, 1)], epochs=200)
    assert stats["gate_train_accuracy"] > 0.95
    with torch.no_grad():
        for batches, expected in ((_texts(ev, digits, 16, 7), 0), (_texts(ev, words, 16, 8), 1)):
            for b in batches:
                assert (router.weights(pooled_features(ev.model, b.inputs)).argmax(-1) == expected).all()

    batch = ev.batches["hubtask"][0]
    inputs = {k: v for k, v in batch.inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    head = own_head(good)
    router.fixed = torch.tensor([[1.0, 0.0]])
    updates, _ = adapter_updates(good)
    with torch.no_grad(), head_loaded(ev.model, head):
        with router.installed(ev.model):
            routed = ev.model(**inputs).logits
        with applied(ev.model, updates):
            merged = ev.model(**inputs).logits
        plain = ev.model(**inputs).logits
    assert torch.allclose(routed, merged, atol=1e-5) and not torch.allclose(routed, plain, atol=1e-3)

    router.fixed = None
    out = router.save(tmp_path / "router")
    assert json.loads((out / "router_config.json").read_text())["adapters"][0]["name"] == "good"
    loaded = Router.load(out)
    assert torch.allclose(loaded.gate.weight, router.gate.weight)
    result = ev.evaluate(out, heads={"hubtask": head})  # `lorafuse eval --adapter ROUTER_DIR`
    assert 0.0 <= result.accuracy["hubtask"] <= 1.0
