"""Every shipped experiment config validates and states its command; config errors name the field; the demo's
generated tasks are deterministic, disjoint across splits, balanced enough, and test different skills."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from lorafuse.errors import ConfigError
from lorafuse.experiment.config import load_config, parse_config, shipped_configs
from lorafuse.tasks import get_task
from lorafuse.tasks.synthetic import GENERATORS, SIZES, generate

SHIPPED = {"demo", "nli5-minilm", "nli4-smollm2", "nli4-llama3-8b", "knots6-llama3-8b", "knots6-minilm"}


def test_every_shipped_config_validates():
    shipped = shipped_configs()
    assert SHIPPED <= set(shipped)
    for name, path in shipped.items():
        config = load_config(path)
        assert config.name == name and load_config(name) == config
        header = path.read_text().splitlines()[0]
        assert header.startswith("# lorafuse ") and (name in header or name == "demo"), header
        assert config.methods, name
        for task in config.tasks:
            get_task(task)
        for spec in config.methods:
            assert len(spec.grid()) >= 1


def test_the_seed_and_knots_configs():
    seed, knots = load_config("nli4-llama3-8b"), load_config("knots6-llama3-8b")
    assert seed.model == "meta-llama/Meta-Llama-3-8B-Instruct" and seed.formulation == "chat"
    assert seed.tasks == ["mnli", "fever", "rte", "scitail"] and seed.data_dir is None and seed.hardware == "gpu"
    assert knots.tasks == ["snli", "mnli", "sick", "qnli", "rte", "scitail"] and knots.formulation == "classify"
    assert knots.train.rank == 16 and set(knots.train.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {(m.method, m.space) for m in knots.methods} >= {("ties", "full"), ("ties", "knots")}


def test_cpu_configs_stay_within_their_budget():
    budgets = {"demo": 1000, "nli5-minilm": 5000, "nli4-smollm2": 5000, "knots6-minilm": 9000}  # training pairs
    for name, pairs in budgets.items():
        config = load_config(name)
        assert config.hardware == "cpu", name
        assert all(config.train_for(t).max_examples <= pairs for t in config.tasks), name
        assert config.eval.max_validation <= 500, name
    demo = load_config("demo")
    assert demo.tasks == list(GENERATORS) and demo.eval.max_test <= 1000 and demo.train.max_examples <= 1000


def test_the_real_data_reports_configs():
    """knots6-minilm and nli4-smollm2: the chosen settings on the complete test splits, every stochastic method
    over >= 3 seeds, LoraHub, the router, Arrow and LoGo; knots6-minilm runs every data-free method in every space it has."""
    from lorafuse.merging.methods.registry import list_methods

    knots, smol = load_config("knots6-minilm"), load_config("nli4-smollm2")
    assert knots.tasks == ["snli", "mnli", "sick", "qnli", "rte", "scitail"] and knots.formulation == "classify"
    assert smol.tasks == ["mnli", "fever", "rte", "scitail"] and smol.formulation == "chat"
    for config in (knots, smol):
        assert config.data_dir == "../shared/data/nli" and config.eval.max_test is None and config.seeds >= 3
        assert config.lorahub is not None and config.router is not None
        assert config.arrow is not None and config.logo is not None  # the training-free routers beside them
        assert any(m.stochastic for m in config.methods)
    ran = {(m.method, m.space) for m in knots.methods}
    for method in list_methods():
        if method.name in ("linear", "cat", "lorahub_factors"):  # fixed-weight task arithmetic; LoraHub's own
            continue
        spaces = method.spaces or (("full", "knots", "core") if method.kind == "elementwise" else
                                   ("full",) if method.exact else ("full", "core"))
        for space in spaces:
            assert (method.name, space) in ran, (method.name, space)


def test_default_seeds_and_stochastic_methods():
    config = parse_config({"name": "x", "model": "minilm", "tasks": ["rte"], "methods": [
        {"method": "dare_ties"}, {"method": "dare_linear", "space": "knots"}, {"method": "ties"}, {"method": "tsv"}]},
        "cfg")
    assert config.seeds == 3 and [m.stochastic for m in config.methods] == [True, True, False, False]
    with pytest.raises(ConfigError, match="seeds"):
        parse_config({"name": "x", "model": "minilm", "tasks": ["rte"], "seeds": 0}, "cfg")


def test_config_errors_are_named():
    base = {"name": "x", "model": "minilm", "tasks": ["rte"]}
    with pytest.raises(ConfigError, match="cfg.yaml: unknown field 'trian'"):
        parse_config({**base, "trian": {}}, "cfg.yaml")
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        parse_config({**base, "methods": [{"method": "tie"}]}, "cfg.yaml")
    with pytest.raises(ConfigError, match="densty"):
        parse_config({**base, "methods": [{"method": "ties", "search": {"densty": [0.1]}}]}, "cfg.yaml")
    with pytest.raises(ConfigError, match="train.lr"):
        parse_config({**base, "train": {"lr": -1}}, "cfg.yaml")
    with pytest.raises(ConfigError, match="search.lambda: give at least one value"):
        parse_config({**base, "methods": [{"method": "ties", "search": {"lambda": []}}]}, "cfg.yaml")
    with pytest.raises(ConfigError, match="two methods are named 'ties'"):
        parse_config({**base, "methods": [{"method": "ties"}, {"method": "ties", "params": {"density": 0.5}}]},
                     "cfg.yaml")
    with pytest.raises(ConfigError, match="did you mean 'nli5-minilm'"):
        load_config("nli5-minlm")
    with pytest.raises(ConfigError, match="unknown task 'rtee'"):
        parse_config({**base, "tasks": ["rtee"]}, "cfg.yaml").check_tasks()
    with pytest.raises(ConfigError, match="data_dir 'no/such/dir'"):
        parse_config({**base, "data_dir": "no/such/dir"}, "cfg.yaml").check_tasks()


def test_generated_tasks_are_deterministic_disjoint_and_balanced():
    for name, (_, labels, _) in GENERATORS.items():
        splits = {s: generate(name, s) for s in SIZES}
        assert splits["train"] == generate(name, "train")  # the same on every call (and machine)
        pairs = {s: {(e.premise, e.hypothesis) for e in ex} for s, ex in splits.items()}
        assert not pairs["train"] & pairs["validation"] and not pairs["train"] & pairs["test"]
        assert not pairs["validation"] & pairs["test"]
        for split, examples in splits.items():
            assert len(examples) == SIZES[split]
            counts = Counter(e.label for e in examples)
            assert set(counts) == set(labels) and min(counts.values()) >= 0.15 * len(examples), (name, split)
        assert get_task(name).load("test") == splits["test"]


def _negation_rule(e) -> str:
    return "contradiction" if e.premise.count(" not ") != e.hypothesis.count(" not ") else "entailment"


def _numbers_rule(e) -> str:
    a, b = re.findall(r"\d+", e.premise), re.findall(r"\d+", e.hypothesis)
    if not (a and b):
        return "neutral"
    return "entailment" if int(a[0]) > int(b[0]) else "contradiction"


def test_generated_tasks_test_different_skills():
    """The rule that solves one task does not solve another: the tasks are different problems."""
    for rule_task, rule in (("syn_negation", _negation_rule), ("syn_numbers", _numbers_rule)):
        for task in GENERATORS:
            examples = generate(task, "test")
            accuracy = sum(rule(e) == e.label for e in examples) / len(examples)
            assert accuracy == 1.0 if task == rule_task else accuracy < 0.75, (rule_task, task, accuracy)


def test_train_per_task_errors_name_the_task_and_field():
    raw = {"name": "x", "model": "minilm", "tasks": ["rte", "mnli"]}
    with pytest.raises(ConfigError, match=r"train_per_task.rtee: not one of the experiment's tasks \(did you mean 'rte'"):
        parse_config({**raw, "train_per_task": {"rtee": {"epochs": 2}}}, "cfg.yaml")
    with pytest.raises(ConfigError, match="unknown field 'train_per_task.rte.epoch'"):
        parse_config({**raw, "train_per_task": {"rte": {"epoch": 2}}}, "cfg.yaml")
    with pytest.raises(ConfigError, match="train_per_task.rte.epochs: Input should be a valid number"):
        parse_config({**raw, "train_per_task": {"rte": {"epochs": None}}}, "cfg.yaml")
    whole = parse_config({**raw, "train": {"max_examples": 800}, "train_per_task": {"rte": {"max_examples": None}}},
                         "cfg.yaml")
    assert whole.train_for("rte").max_examples is None and whole.train_for("mnli").max_examples == 800
