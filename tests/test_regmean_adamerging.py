"""RegMean and AdaMerging as fusion jobs (lorafuse.fusion.regmean, lorafuse.fusion.adamerging), their commands and
their experiment jobs, on tiny models built in code: RegMean of one task is that task's update and with identical
Grams it is task arithmetic at λ = 1/T; AdaMerging's hooked merge is the dense merge, its coefficients lower the
entropy it minimises, stay in [0, 1] and never depend on a label; saved adapters are the evaluated updates; the
experiment runs both and its report shows every data-driven job's data and time."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama, write_keyword_task

from lorafuse.adapters.reader import LoraAdapter
from lorafuse.cli import main
from lorafuse.fusion import sample_examples
from lorafuse.fusion.adamerging import (
    AdaMergingSettings,
    Coefficients,
    adamerging,
    label_logits,
    load_task_factors,
    merged_in,
    merged_updates,
    save_adamerging,
)
from lorafuse.fusion.regmean import RegMeanSettings, regmean_fusion, regmean_updates, save_regmean, task_grams
from lorafuse.model.apply import applied, head_loaded
from lorafuse.model.evaluation import Evaluator, adapter_heads, adapter_updates
from lorafuse.model.training import TrainConfig, train_adapter
from lorafuse.tasks import get_task, load_task_file

TASKS = {"regada_a": ["contradiction", "entailment", "neutral"], "regada_b": ["entailment", "not_entailment"]}


def dense(updates):
    return {m: u.dense(torch.float64) for m, u in updates.items()}


def assert_same_updates(a, b, atol=1e-5):
    assert set(a) == set(b)
    for m in a:
        assert torch.allclose(a[m].dense(torch.float64), b[m].dense(torch.float64), atol=atol), m


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BERT, two keyword tasks and an adapter trained on each (rank 4, α 8: scale 2), an fp32 evaluator."""
    root = tmp_path_factory.mktemp("regada")
    model = tiny_bert(root / "bert")
    adapters = []
    for i, (name, labels) in enumerate(TASKS.items()):
        load_task_file(write_keyword_task(root / "data", name, labels, n=64, seed=i))
        adapters.append(train_adapter(TrainConfig(
            task=name, model=str(model), formulation="classify", output=str(root / name), epochs=10, lr=2e-2,
            head_lr=2e-2, best_checkpoint=False, batch_size=16, rank=4, alpha=8, dropout=0.0,
            target_modules=["query", "value"], progress=False)))
    ev = Evaluator(str(model), list(TASKS), split="validation", formulation="classify", progress=False,
                   dtype="float32")
    inputs = {t: sample_examples(get_task(t), "validation", None, 16, 0) for t in TASKS}
    heads = {t: adapter_heads(a, [t])[t] for t, a in zip(TASKS, adapters)}
    return root, model, list(TASKS), adapters, ev, inputs, heads


# -- RegMean -----------------------------------------------------------------------------------------------------
def test_regmean_of_one_task_is_its_update(world):
    _, _, tasks, adapters, ev, inputs, _ = world
    merged, record = regmean_fusion(ev, adapters[:1], tasks[:1], inputs)
    assert_same_updates(merged, adapter_updates(adapters[0])[0], atol=1e-4)
    assert record["data"] == {"split": "train", "examples_per_task": {tasks[0]: 16}, "labels": "none"}


def test_regmean_with_identical_grams_is_task_arithmetic_at_one_over_t(world):
    from lorafuse.merging.engine import merge

    _, _, tasks, adapters, ev, inputs, _ = world
    updates = [adapter_updates(a)[0] for a in adapters]
    grams = task_grams(ev, adapters[0], get_task(tasks[0]), inputs[tasks[0]], sorted(updates[0]))
    merged = regmean_updates(updates, [grams, grams])
    assert_same_updates(merged, merge(adapters, "task_arithmetic", progress=False, **{"lambda": 0.5}).modules)


def test_grams_are_taken_in_each_tasks_own_model(world):
    """The paper's X_t: the layer's inputs in model t (base + ΔW_t), not in the base model."""
    from lorafuse.fusion import input_batches
    from lorafuse.fusion.regmean import gram_matrices

    _, _, tasks, adapters, ev, inputs, _ = world
    later = "bert.encoder.layer.1.attention.self.query"  # its input depends on layer 0's adapted weights
    own = task_grams(ev, adapters[0], get_task(tasks[0]), inputs[tasks[0]], [later])[later]
    batches = input_batches(ev.formulation, get_task(tasks[0]), inputs[tasks[0]], 32)
    base = gram_matrices(ev.model, batches, [later])[later]
    with applied(ev.model, adapter_updates(adapters[0])[0]):
        expected = gram_matrices(ev.model, batches, [later])[later]
    assert torch.allclose(own, expected) and not torch.allclose(own, base, rtol=1e-3)


def test_saved_regmean_adapter_is_the_evaluated_update(world, tmp_path):
    _, _, tasks, adapters, ev, inputs, heads = world
    merged, record = regmean_fusion(ev, adapters, tasks, inputs, RegMeanSettings(alpha=0.5, split="validation"))
    out = save_regmean(merged, record, adapters, tmp_path / "rm")
    saved = LoraAdapter(out)
    assert_same_updates({m: saved.update(m) for m in saved.modules}, merged)
    provenance = json.loads((out / "lorafuse_merge.json").read_text())
    assert provenance["method"]["name"] == "regmean" and provenance["regmean"]["settings"]["alpha"] == 0.5
    assert json.loads((out / "regmean.json").read_text())["data"]["examples_per_task"] == {t: 16 for t in tasks}
    assert ev.evaluate(out).accuracy == ev.evaluate(merged, heads=heads).accuracy  # heads kept per task
    with pytest.raises(Exception, match="exists"):
        save_regmean(merged, record, adapters, out)


# -- AdaMerging ----------------------------------------------------------------------------------------------------
def test_the_hooked_merge_is_the_dense_merge(world):
    _, _, tasks, adapters, ev, inputs, heads = world
    factors = load_task_factors(adapters)
    lam = Coefficients(2, sorted(factors), 0.3, "layer")
    with torch.no_grad():
        lam.raw.copy_(torch.rand(lam.raw.shape, generator=torch.Generator().manual_seed(1)))
    updates = merged_updates(factors, tasks, lam.table(tasks))
    task = get_task(tasks[0])
    batch = ev.batches_for(task)[0]
    with torch.no_grad(), head_loaded(ev.model, heads[tasks[0]]):
        with merged_in(ev.model, factors, lam):
            hooked = label_logits(ev.formulation, ev.model, batch, task)
        with applied(ev.model, updates):
            reference = label_logits(ev.formulation, ev.model, batch, task)
    assert torch.allclose(hooked, reference, atol=1e-5)
    assert all(p.requires_grad for p in ev.model.parameters())  # flags restored


def test_adamerging_lowers_the_entropy_it_minimises(world):
    _, _, tasks, adapters, ev, inputs, heads = world
    settings = AdaMergingSettings(steps=25, lr=0.05, batch_size=8)
    result, updates = adamerging(ev, adapters, tasks, inputs, heads, settings)
    assert result.entropy_after < result.entropy_before - 1e-3
    assert len(result.trace) == 25
    values = [v for per_task in result.coefficients.values() for v in per_task.values()]
    assert all(0.0 <= v <= 1.0 for v in values) and len(set(values)) > 2  # layer-wise: one λ per task and module
    assert_same_updates(updates, merged_updates(load_task_factors(adapters), tasks, result.coefficients))


def test_task_wise_granularity_shares_one_coefficient_per_task(world):
    _, _, tasks, adapters, ev, inputs, heads = world
    result, _ = adamerging(ev, adapters, tasks, inputs, heads,
                           AdaMergingSettings(steps=5, lr=0.05, batch_size=8, granularity="task"))
    assert all(len(set(per_task.values())) == 1 for per_task in result.coefficients.values())


def test_adamerging_never_reads_a_label(world):
    """Poisoned labels (a word no task has) and shuffled ones give bit-identical coefficients."""
    _, _, tasks, adapters, ev, inputs, heads = world
    settings = AdaMergingSettings(steps=6, lr=0.05, batch_size=8)
    rng = random.Random(3)
    poisoned = {t: [replace(e, label="POISON") for e in ex] for t, ex in inputs.items()}
    shuffled = {t: [replace(e, label=rng.choice(TASKS[t])) for e in ex] for t, ex in inputs.items()}
    clean, _ = adamerging(ev, adapters, tasks, inputs, heads, settings)
    for variant in (poisoned, shuffled):
        result, _ = adamerging(ev, adapters, tasks, variant, heads, settings)
        assert result.coefficients == clean.coefficients and result.trace == clean.trace


def test_saved_adamerging_adapter_records_its_coefficients_and_data(world, tmp_path):
    _, _, tasks, adapters, ev, inputs, heads = world
    result, updates = adamerging(ev, adapters, tasks, inputs, heads, AdaMergingSettings(steps=2, batch_size=8))
    out = save_adamerging(result, updates, adapters, tasks, "test", inputs, tmp_path / "am")
    saved = LoraAdapter(out)
    assert_same_updates({m: saved.update(m) for m in saved.modules}, updates)
    record = json.loads((out / "adamerging.json").read_text())
    assert record["coefficients"] == result.coefficients and record["data"]["transductive"] is True
    assert record["data"]["labels"] == "none"


def test_bad_adamerging_inputs_are_refused(world):
    from lorafuse.errors import ConfigError

    _, _, tasks, adapters, ev, inputs, heads = world
    with pytest.raises(ConfigError, match="head"):
        adamerging(ev, adapters, tasks, inputs, {}, AdaMergingSettings(steps=1))
    with pytest.raises(ConfigError, match="init"):
        adamerging(ev, adapters, tasks, inputs, heads, AdaMergingSettings(init=1.5))
    with pytest.raises(ConfigError, match="granularity"):
        adamerging(ev, adapters, tasks, inputs, heads, AdaMergingSettings(granularity="row"))  # type: ignore[arg-type]


def test_chat_formulation_scores_the_label_tokens(tmp_path):
    from adapter_factory import write_adapter

    from test_lorahub import LLAMA_MODULES

    model = tiny_llama(tmp_path / "llama")
    names = []
    for i, labels in enumerate((["yes", "no"], ["all", "some"])):
        load_task_file(write_keyword_task(tmp_path / "data", f"regada_chat{i}", labels, n=16, seed=i))
        names.append(f"regada_chat{i}")
    adapters = [write_adapter(tmp_path / f"a{i}", LLAMA_MODULES, r=4, alpha=4, seed=60 + i, base_model=str(model))
                for i in range(2)]
    ev = Evaluator(str(model), names, split="validation", formulation="chat", progress=False, dtype="float32")
    inputs = {t: sample_examples(get_task(t), "validation", None, 8, 0) for t in names}
    result, updates = adamerging(ev, adapters, names, inputs, None, AdaMergingSettings(steps=3, lr=0.05, batch_size=4))
    assert label_logits(ev.formulation, ev.model, ev.batches_for(get_task(names[0]))[0], get_task(names[0])).shape[1] == 2
    assert result.entropy_before > 0 and len(result.trace) == 3
    regmean, _ = regmean_fusion(ev, adapters, names, inputs)
    assert set(regmean) == set(updates) == set(LLAMA_MODULES)


# -- the commands --------------------------------------------------------------------------------------------------
def test_regmean_and_adamerging_commands(world, tmp_path, capsys):
    root, model, tasks, adapters, *_ = world
    common = ["--model", str(model), "--formulation", "classify", "--adapters", *map(str, adapters),
              "--tasks", ",".join(tasks), "--task-file", str(root / "data" / f"{tasks[0]}.yaml"), "--examples", "8"]
    load_task_file(root / "data" / f"{tasks[1]}.yaml")
    assert main(["regmean", *common, "--split", "validation", "-o", str(tmp_path / "rm")]) == 0
    assert json.loads((tmp_path / "rm" / "regmean.json").read_text())["data"]["split"] == "validation"
    assert main(["adamerging", *common, "--steps", "2", "--split", "test", "-o", str(tmp_path / "am")]) == 0
    err = capsys.readouterr().err
    assert "transductive" in err
    assert (tmp_path / "am" / "task_heads" / f"{tasks[1]}.safetensors").is_file()
    assert main(["adamerging", *common, "--steps", "2", "-o", str(tmp_path / "am")]) == 1  # no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["adamerging", *common, "--steps", "1", "--overwrite", "-o", str(tmp_path / "am")]) == 0
    assert main(["regmean", *common[:-2], "--tasks", tasks[0], "-o", str(tmp_path / "x")]) == 1
    assert "2 adapters" in capsys.readouterr().err


# -- in an experiment ----------------------------------------------------------------------------------------------
def test_experiment_jobs_run_and_the_report_shows_their_data_and_time(tmp_path):
    from test_experiment import assert_report_agrees, run, tiny_experiment

    raw = tiny_experiment(tmp_path)
    raw.update(seeds=2, lorahub={"shots": [2], "budget": 4}, arrow={"top_k": [1, 2]},
               regmean={"split": "validation", "examples": 12, "seeds": 1},
               adamerging={"inputs": ["validation", "test"], "examples": 8, "steps": 3, "batch_size": 4,
                           "init": "task_arithmetic"})
    runner, results = run(raw, tmp_path / "run")
    jobs = {j["name"]: j for j in results["jobs"]}
    assert all(j["status"] == "ok" for j in jobs.values()), [j.get("error") for j in jobs.values()]
    ta_lambda = jobs["task_arithmetic"]["params"]["lambda"]
    for split in ("validation", "test"):
        job = jobs[f"adamerging ({split} inputs)"]
        assert job["params"]["init"] == min(ta_lambda, 1.0) and job["seeds"] == [0, 1]
        assert job["data"]["split"] == split and job["data"]["labels"] == "none"
        assert job["data"]["transductive"] is (split == "test") and job["data"]["seconds"] > 0
        assert (tmp_path / "run" / "fused" / f"adamerging-{split}" / "adamerging.json").is_file()
    assert jobs["regmean"]["data"]["examples_per_task"] == {"xa": 12, "xb": 12} and jobs["regmean"]["seeds"] == [0]
    assert jobs["lorahub (2-shot)"]["data"]["labels"] == "class labels"
    saved = assert_report_agrees(tmp_path / "run" / "report")
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    table = md.split("## Data-driven methods: data and time")[1].split("\n\n")[1]
    for name in ("regmean", "adamerging (validation inputs)", "adamerging (test inputs)", "lorahub (2-shot)"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        data = jobs[name]["data"]
        assert cells[2].startswith(data["split"]) and float(cells[6]) == data["seconds"], name
    arrow = next(line for line in table.splitlines() if line.startswith("| arrow |"))
    assert f"| validation | {jobs['arrow']['examples_seen']} in all | class labels" in arrow  # its top-k choice
    assert "transductive" in table and "held-out result" in md
    assert [j["data"] for j in saved["jobs"] if "data" in j] == [j["data"] for j in results["jobs"] if "data" in j]
    rerun, _ = run(raw, tmp_path / "run")
    assert rerun.state.executed == []  # cached: the job ids do not change


def test_cost_of_jobs_recorded_before_they_carried_their_data():
    from lorafuse.experiment.analysis import data_cost

    router = {"kind": "data-driven", "method": "router", "seeds": [0, 1], "cost": {"gate_train_seconds": 4.5}}
    assert data_cost(router, {"router": {"examples_per_task": 200}}) == {
        "split": "train", "examples_per_task": 200, "labels": "task identity (which task an input is from)",
        "seeds": 2, "seconds": 4.5, "derived": True}
    hub = {"kind": "data-driven", "method": "lorahub", "params": {"shots": 5}, "search_seconds": 3.0}
    assert data_cost(hub, {})["examples_per_task"] == 5 and data_cost({"kind": "static"}, {}) is None
    arrow = {"kind": "data-driven", "method": "arrow", "examples_seen": 600, "data_split": "validation",
             "search_seconds": 12.0}
    assert data_cost(arrow, {}) == {"split": "validation", "examples_total": 600, "seeds": 1, "seconds": 12.0,
                                    "labels": "class labels (choosing its settings)"}


def test_adamerging_init_from_task_arithmetic_needs_that_method():
    from lorafuse.errors import ConfigError
    from lorafuse.experiment.config import parse_config

    raw = {"name": "x", "model": "minilm", "tasks": ["mnli"], "methods": [{"method": "average"}],
           "adamerging": {"init": "task_arithmetic"}}
    with pytest.raises(ConfigError, match="adamerging.init"):
        parse_config(raw, "x.yaml")
    with pytest.raises(ConfigError, match="inputs"):
        parse_config({**raw, "adamerging": {"inputs": ["test", "test"]}}, "x.yaml")
    assert parse_config({**raw, "adamerging": {"init": 0.4}}, "x.yaml").adamerging.steps == 500


def test_the_other_costs_read_as_words_not_json():
    from lorafuse.experiment.report import _cost_cell

    cell = _cost_cell({"gate_train_seconds": 91.23, "routed_ms_per_example": 38.592, "latency_ratio": 2.51,
                       "seeds": 3, "inference": "one merged adapter", "method": "Arrow (…)", "examples": 1200})
    assert cell == ("gate train 91.2 s; routed 38.6 ms/example; latency ratio 2.51; inference: one merged adapter; "
                    "examples 1200")
    assert "{" not in cell and _cost_cell({}) == "" and "|" not in _cost_cell({"note": "a | b"})
