"""The input-routed mixture on tiny models built in code: the gate sends inputs of two clearly different
distributions to their adapters; routed one-hot the model equals PEFT's model with that adapter alone; constant
weights equal the weighted sum of updates; a saved router loads, refuses changed adapters, and evaluates through
`Evaluator.evaluate(ROUTER_DIR)` and `lorafuse eval --adapter ROUTER_DIR`."""

from __future__ import annotations

import json
import random

import pytest
import torch
from adapter_factory import write_adapter
from tiny_models import tiny_llama, write_task_files

from lorafuse.cli import main
from lorafuse.errors import AdapterError, ConfigError
from lorafuse.fusion.lorahub import compose, load_factors
from lorafuse.fusion.router import Router, load_router, pooled_features, train_end_to_end, train_gate
from lorafuse.model.evaluation import Evaluator, adapter_updates, applied, head_loaded, own_head
from lorafuse.tasks import get_task, load_task_file
from test_lorahub import LLAMA_MODULES, bert_world, noise_adapters

DIGITS = [str(i) for i in range(20)]
WORDS = ["the", "a", "saw", "all", "some", "are", "in", "of", "and", "what", "relation", "answer"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("router_bert")
    model, good, noise = bert_world(root, "routetask")
    ev = Evaluator(str(model), ["routetask"], split="validation", formulation="classify", progress=False)
    return root, model, good, noise, ev


def texts(ev, words, n, seed, batch=8):
    """Batches of random 3-8 word sentences drawn from one vocabulary."""
    rng = random.Random(seed)
    rows = [{"input_ids": ev.formulation.tokenizer(" ".join(rng.choices(words, k=rng.randint(3, 8))))["input_ids"],
             "target": 0} for _ in range(n)]
    return [ev.formulation.collate(rows[i:i + batch]) for i in range(0, n, batch)]


def peft_logits(model_dir, adapter, inputs, causal=False):
    """Independent reference: PEFT's own model with one adapter loaded (fresh base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = PeftModel.from_pretrained(cls.from_pretrained(str(model_dir)), str(adapter)).eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("granularity", ["sentence", "token"])
def test_gate_sends_each_distribution_to_its_adapter(bert, granularity):
    root, model, good, noise, ev = bert
    router = Router.from_adapters([good, noise[0]], 32, ["digits", "words"], granularity)
    stats = train_gate(router, ev.model, [texts(ev, DIGITS, 48, 0), texts(ev, WORDS, 48, 1)], epochs=200)
    # per token, [CLS] and [SEP] occur in both distributions: judge the words themselves
    assert stats["gate_train_accuracy"] > (0.95 if granularity == "sentence" else 0.8)
    specials = torch.tensor(ev.formulation.tokenizer.all_special_ids)
    with torch.no_grad():
        for batches, expected in ((texts(ev, DIGITS, 16, 7), 0), (texts(ev, WORDS, 16, 8), 1)):
            for b in batches:
                w = router.weights(pooled_features(ev.model, b.inputs, granularity))
                if granularity == "token":
                    w = w[b.inputs["attention_mask"].bool() & ~torch.isin(b.inputs["input_ids"], specials)]
                assert (w.argmax(-1) == expected).float().mean() > 0.9


@pytest.mark.parametrize("granularity", ["sentence", "token"])
def test_one_hot_routing_equals_peft_with_that_adapter(bert, granularity):
    root, model, good, noise, ev = bert
    router = Router.from_adapters([good, noise[0]], 32, granularity=granularity)
    inputs = ev.batches["routetask"][0].inputs
    for index, adapter, head in ((0, good, own_head(good)), (1, noise[0], None)):
        router.fixed = torch.nn.functional.one_hot(torch.tensor(index), 2).float()
        with torch.no_grad(), head_loaded(ev.model, head), router.installed(ev.model):
            routed = ev.model(**inputs).logits
        assert torch.allclose(routed, peft_logits(model, adapter, inputs), atol=1e-5)
    with torch.no_grad():
        plain = ev.model(**inputs).logits
    assert not torch.allclose(routed, plain, atol=1e-3)  # the hooks are gone after the context


def test_constant_weights_equal_the_weighted_sum_of_updates(bert):
    root, model, good, noise, ev = bert
    adapters, w = [good, noise[0], noise[1]], [0.2, 0.5, 0.3]
    router = Router.from_adapters(adapters, 32)
    router.fixed = torch.tensor(w)
    factors, _ = load_factors(adapters)
    inputs = ev.batches["routetask"][0].inputs
    with torch.no_grad(), head_loaded(ev.model, own_head(good)):
        with router.installed(ev.model):
            routed = ev.model(**inputs).logits
        with applied(ev.model, compose(factors, w, "updates")):
            summed = ev.model(**inputs).logits
    assert torch.allclose(routed, summed, atol=1e-5)


def test_one_hot_routing_on_a_causal_lm_with_left_padding(tmp_path):
    model = tiny_llama(tmp_path / "llama")
    adapters = noise_adapters(tmp_path, LLAMA_MODULES, model, 2, 4.0, task_type="CAUSAL_LM")
    ev = Evaluator(str(model), [], formulation="chat", progress=False)
    rows = [{"prompt": ev.formulation.tokenizer(s)["input_ids"], "answer": [], "target": 0}
            for s in ("the a saw 3 .", "all some are in of and the 12 13 .")]
    inputs = ev.formulation.collate(rows).inputs  # left-padded
    router = Router.from_adapters(adapters, 32, granularity="token")
    router.fixed = torch.tensor([0.0, 1.0])
    with torch.no_grad(), router.installed(ev.model):
        routed = ev.model(**inputs).logits
    ref = peft_logits(model, adapters[1], inputs, causal=True)
    mask = inputs["attention_mask"].bool()
    assert torch.allclose(routed[mask], ref[mask], atol=1e-5)


def test_saved_router_loads_evaluates_and_refuses_changed_adapters(bert, tmp_path):
    root, model, good, noise, ev = bert
    router = Router.from_adapters([good, noise[0]], 32, ["good", "noise"])
    train_gate(router, ev.model, [texts(ev, DIGITS, 24, 0), texts(ev, WORDS, 24, 1)], epochs=50)
    out = router.save(tmp_path / "router")
    config = json.loads((out / "router_config.json").read_text())
    assert [a["name"] for a in config["adapters"]] == ["good", "noise"] and "versions" in config
    loaded = Router.load(out)
    assert torch.equal(loaded.gate.weight, router.gate.weight) and loaded.granularity == "sentence"
    heads = {"routetask": own_head(good)}
    assert list(loaded.heads) == ["routetask"]  # the trained adapter's head, under its task
    from_dir = ev.evaluate(out)  # what `lorafuse eval --adapter ROUTER_DIR` runs; no --heads needed
    assert from_dir.accuracy == ev.evaluate(router, heads=heads).accuracy
    inputs = ev.batches["routetask"][0].inputs
    with torch.no_grad(), head_loaded(ev.model, heads["routetask"]):
        with load_router(ev.model, out):
            a = ev.model(**inputs).logits
        with router.installed(ev.model):
            b = ev.model(**inputs).logits
    assert torch.equal(a, b)

    changed = write_adapter(tmp_path / "changed", {m: (32, 32) for m in adapter_updates(good)[0]}, r=4, seed=1)
    moved = Router.from_adapters([good, changed], 32)
    moved.save(tmp_path / "r2")
    write_adapter(changed, {m: (32, 32) for m in adapter_updates(good)[0]}, r=4, seed=2)
    with pytest.raises(AdapterError, match="changed since the router was trained"):
        Router.load(tmp_path / "r2")
    with pytest.raises(ConfigError, match="granularity"):
        Router.from_adapters([good, changed], 32, granularity="layer")


def test_end_to_end_training_moves_the_gate_to_the_useful_adapter(bert):
    root, model, good, noise, ev = bert
    router = Router.from_adapters([noise[0], good], 32)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.zero_()
    task, head = get_task("routetask"), own_head(good)
    batches = [ev.formulation.collate(ev.formulation.encode(task, task.load("train")[i:i + 16]))
               for i in range(0, 64, 16)]

    def routed_loss() -> float:
        with torch.no_grad(), head_loaded(ev.model, head), router.installed(ev.model):
            return sum(float(ev.formulation.loss(ev.model, b, task)) for b in batches) / len(batches)

    before = routed_loss()
    stats = train_end_to_end(router, ev.model, ev.formulation, [task], [batches], {"routetask": head}, epochs=4,
                             lr=5e-2)
    with torch.no_grad():
        weights = router.weights(pooled_features(ev.model, batches[0].inputs)).mean(0)
    assert routed_loss() < before and stats["e2e_steps"] == 16
    assert weights[1] > 0.9  # from 0.5: the noise adapter only hurts this task
    assert all(p.requires_grad for p in ev.model.parameters())  # the model's flags are restored


def test_router_and_lorahub_commands(bert, tmp_path, capsys):
    root, model, good, noise, ev = bert
    task_file = str(root / "data" / "routetask.yaml")
    assert main(["router", "--model", str(model), "--formulation", "classify", "--adapters", str(good), str(noise[0]), "--tasks",
                 "routetask,routetask", "--task-file", task_file, "--examples-per-task", "16", "--epochs", "5",
                 "--e2e-epochs", "1", "-o", str(tmp_path / "r")]) == 0
    assert "e2e_steps" in json.loads((tmp_path / "r" / "router_config.json").read_text())["training"]
    assert main(["eval", "--model", str(model), "--formulation", "classify", "--adapter", str(tmp_path / "r"), "--tasks", "routetask",
                 "--task-file", task_file, "--max-examples", "8", "--quiet",
                 "--output", str(tmp_path / "eval.json")]) == 0
    assert 0.0 <= json.loads((tmp_path / "eval.json").read_text())["accuracy"]["routetask"] <= 100.0  # percent
    assert main(["lorahub", "--model", str(model), "--formulation", "classify", "--adapters", str(good), str(noise[0]), "--task", "routetask",
                 "--task-file", task_file, "--head", str(good), "--shots", "8", "--budget", "5",
                 "--split", "train", "-o", str(tmp_path / "hub")]) == 0
    assert json.loads((tmp_path / "hub" / "lorahub.json").read_text())["task"] == "routetask"
    assert main(["lorahub", "--model", str(model), "--adapters", str(good), "--task", "routetask",
                 "--task-file", task_file, "--optimizer", "nope", "-o", str(tmp_path / "bad")]) == 1
    assert "unknown nevergrad optimizer" in capsys.readouterr().err


def test_experiment_jobs_with_a_runner_stand_in(bert, tmp_path):
    """The hooks the experiment runner calls: LoraHub per task and the router, on two tasks' adapters."""
    from types import SimpleNamespace

    from lorafuse.fusion import lorahub as hub
    from lorafuse.fusion import router as routed

    root, model, good, noise, ev = bert
    second = write_task_files(root / "data", "routetask2", ["contradiction", "entailment", "neutral"], n=32, seed=5)
    load_task_file(second)
    test_ev = Evaluator(str(model), ["routetask", "routetask2"], split="test", formulation="classify", progress=False)
    adapters = {"routetask": good, "routetask2": noise[0]}
    runner = SimpleNamespace(
        config=SimpleNamespace(lorahub=SimpleNamespace(budget=4, seed=0), data_dir=None,
                               router=SimpleNamespace(examples_per_task=16, epochs=2, seed=0)),
        state=SimpleNamespace(adapters=adapters, reference={"test": {"routetask": 0.5, "routetask2": 0.5}}),
        own_heads=lambda: {"routetask": own_head(good), "routetask2": own_head(good)},
        evaluator=lambda split: test_ev, out=tmp_path, seeds=lambda base: [base, base + 1])
    hub_job = hub.experiment_job(runner, 4)
    assert set(hub_job["weights"]) == {"routetask", "routetask2"} and hub_job["cost"]["candidates_per_task"] == 4
    assert hub_job["seeds"] == [0, 1] and set(hub_job["weights_by_seed"]) == {0, 1}
    for name, job in (("lorahub", hub_job), ("router", routed.experiment_job(runner))):
        assert set(job["test"]["accuracy"]) == {"routetask", "routetask2"}, name
        assert [r["seed"] for r in job["seed_runs"]] == [0, 1] and job["seeds"] == [0, 1], name
        for task in ("routetask", "routetask2"):  # the mean over seeds, each seed's per-example record kept
            seeds = [r["test"]["accuracy"][task] for r in job["seed_runs"]]
            assert job["test"]["accuracy"][task] == pytest.approx(sum(seeds) / 2), name
            assert all(r["test"]["correct"][task] for r in job["seed_runs"]), name
    assert job["cost"]["latency_ratio"] > 0 and job["cost"]["seeds"] == 2
    assert (tmp_path / "router" / "router_config.json").is_file()
    assert (tmp_path / "fused" / "router-seed1" / "router_config.json").is_file()


def test_a_saved_router_names_its_adapters_relative_to_itself_and_moves_with_them(tmp_path):
    """router_config.json stores each adapter's path relative to the router's directory: no directory of the
    machine that wrote it, and the router still loads after the whole tree moves."""
    import shutil

    from adapter_factory import write_adapter

    from lorafuse.fusion.router import Router

    tree = tmp_path / "tree"
    modules = {"model.layers.0.self_attn.q_proj": (16, 16)}
    adapters = [write_adapter(tree / "adapters" / f"a{i}", modules, r=2, alpha=2, seed=i) for i in range(2)]
    Router.from_adapters(adapters, 16, ["a", "b"]).save(tree / "routers" / "r")
    stored = json.loads((tree / "routers" / "r" / "router_config.json").read_text())["adapters"]
    assert [e["path"] for e in stored] == ["../../adapters/a0", "../../adapters/a1"]
    assert str(tmp_path) not in (tree / "routers" / "r" / "router_config.json").read_text()
    shutil.move(str(tree), str(tmp_path / "elsewhere"))
    assert Router.load(tmp_path / "elsewhere" / "routers" / "r").names == ["a", "b"]
