"""LoGo routing (lorafuse.fusion.logo): on constructed factors whose LoRA branch outputs are known, the selected
adapters and their weights are what the paper's rule says (top-k by norm or inverse entropy, weights proportional
to the score); on a tiny BERT built in code the routed model equals, input by input, the fixed mixture computed
independently from one probe pass; `lorafuse router --kind logo` writes a directory `lorafuse eval` evaluates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from adapter_factory import dense_update, write_adapter
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert

from lorafuse.errors import AdapterError, ConfigError
from lorafuse.fusion.logo import LoGoRouter, default_probe_module, last_tokens, layer_index, select
from lorafuse.fusion.router import Router, _Module

BERT_MODULES = {f"bert.encoder.layer.{i}.attention.self.{n}": (32, 32) for i in range(2) for n in ("query", "value")}
PROBE = "bert.encoder.layer.1.attention.self.query"


def module(As: list[torch.Tensor], Bs: list[torch.Tensor], owners: list[int]) -> _Module:
    """Stacked factors A = [A_1; …], B = [B_1 …] with the adapter each rank column belongs to."""
    columns = torch.cat([torch.full((a.shape[0],), t) for a, t in zip(As, owners)])
    return _Module(torch.cat(As), torch.cat(Bs, 1), columns)


def router_over(mod: _Module, adapters: int, **settings) -> LoGoRouter:
    return LoGoRouter([f"a{t}" for t in range(adapters)], {"m": mod}, ["."] * adapters, ["0"] * adapters,
                      **settings)


def e(i: int, n: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), n).float()


# -- the rule on a constructed case --------------------------------------------------------------------------------
def test_top_k_by_branch_norm_with_weights_proportional_to_it():
    """Adapter t reads coordinate t of x and writes c_t times it to coordinate 0: ‖s_t·B_t·A_t·x‖ = c_t·|x_t|."""
    c = [3.0, 1.0, 2.0]
    mod = module([e(t)[None] for t in range(3)], [c[t] * e(0)[:, None] for t in range(3)], [0, 1, 2])
    x = torch.tensor([[1.0, 1.0, 1.0, 0.0],   # norms 3, 1, 2
                      [0.0, 5.0, 1.0, 7.0]])  # norms 0, 5, 2 (coordinate 3 is read by none)
    w = router_over(mod, 3, top_k=2).weights("m", x)
    assert torch.allclose(w, torch.tensor([[3 / 5, 0.0, 2 / 5], [0.0, 5 / 7, 2 / 7]]))
    assert torch.equal(router_over(mod, 3, top_k=1).weights("m", x), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    every = router_over(mod, 3, top_k=3).weights("m", x)
    assert torch.allclose(every, torch.tensor([[3 / 6, 1 / 6, 2 / 6], [0.0, 5 / 7, 2 / 7]]))
    assert router_over(mod, 3, top_k=9).top_k == 3  # at most every adapter


def test_inverse_entropy_prefers_the_peaked_branch():
    """Branch outputs [10, 0, 0, 0], [1, 1, 1, 1] and [1, 0, 0, 0] for x = 1: the more peaked the softmax of the
    output, the lower its entropy and the higher its score 1 / (H + 1e-6)."""
    outputs = [torch.tensor([10.0, 0, 0, 0]), torch.ones(4), torch.tensor([1.0, 0, 0, 0])]
    mod = module([torch.ones(1, 4) / 4] * 3, [o[:, None] for o in outputs], [0, 1, 2])

    def inverse_entropy(o: torch.Tensor) -> float:
        p = [math.exp(v) / sum(math.exp(u) for u in o.tolist()) for v in o.tolist()]
        return 1 / (-sum(q * math.log(q) for q in p) + 1e-6)

    s = [inverse_entropy(o) for o in outputs]
    assert s[0] > s[2] > s[1]
    w = router_over(mod, 3, top_k=2, signal="entropy").weights("m", torch.ones(1, 4))
    assert torch.allclose(w, torch.tensor([[s[0] / (s[0] + s[2]), 0.0, s[2] / (s[0] + s[2])]]), atol=1e-5)


def test_an_adapter_absent_from_the_probe_module_is_never_selected_and_zero_scores_share_equally():
    mod = module([e(0)[None], e(2)[None]], [e(0)[:, None], 4 * e(0)[:, None]], [0, 2])  # adapter 1 absent
    w = router_over(mod, 3, top_k=3).weights("m", torch.tensor([[1.0, 9.0, 1.0, 0.0], [0.0, 9.0, 0.0, 0.0]]))
    assert torch.allclose(w, torch.tensor([[1 / 5, 0.0, 4 / 5], [0.5, 0.0, 0.5]]))


def test_select_is_the_rule_on_scores():
    score = torch.tensor([[0.5, 2.0, 1.5, 0.1]])
    present = torch.tensor([True, True, True, True])
    assert torch.allclose(select(score, present, 2), torch.tensor([[0.0, 2 / 3.5, 1.5 / 3.5, 0.0]]))


def test_the_probe_token_is_the_last_real_one_on_either_padding_side():
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_tokens(x, right)[:, 0].tolist() == [2.0, 9.0]
    assert last_tokens(x, left)[:, 0].tolist() == [4.0, 9.0]
    assert last_tokens(x, None)[:, 0].tolist() == [4.0, 9.0]


def test_bad_settings_are_refused():
    mod = module([e(0)[None], e(1)[None]], [e(0)[:, None], e(0)[:, None]], [0, 1])
    for bad, match in (({"top_k": 0}, "top-k"), ({"signal": "loss"}, "signal"), ({"probe": "none"}, "probe"),
                       ({"probe_module": "other"}, "probe module")):
        with pytest.raises(ConfigError, match=match):
            router_over(mod, 2, **bad)
    assert layer_index("model.layers.11.self_attn.q_proj") == 11 and layer_index("lm_head") == -1


# -- on a tiny model -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BERT, three random adapters on query/value whose B is scaled 5, 6 and 7, and a padded batch."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("logo")
    path = tiny_bert(root / "bert")
    adapters = []
    for i, scale in enumerate((5.0, 6.0, 7.0)):
        a = write_adapter(root / f"a{i}", BERT_MODULES, r=4, alpha=4, seed=60 + i, base_model=str(path),
                          task_type=None)
        state = load_file(str(a / "adapter_model.safetensors"))
        save_file({k: v * scale if "lora_B" in k else v for k, v in state.items()}, str(a / "adapter_model.safetensors"))
        adapters.append(a)
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    gen = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(5, 30, (4, 7), generator=gen),
              "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4, [1] * 6 + [0]])}
    return path, model, adapters, inputs


def hidden(model, inputs):
    return model(**inputs, output_hidden_states=True).hidden_states[-1]


def reference_weights(model, adapters, inputs, top_k: int, probe: str, at: str = PROBE,
                      left_padded: bool = False) -> torch.Tensor:
    """Independently: the probe module's input in a forward with every adapter at weight 1 (or none), each
    adapter's dense ΔW_t (float64, from the files) applied to the last real token, top-k by norm, normalised."""
    seen = {}
    hook = model.get_submodule(at).register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach()))
    try:
        if probe == "adapters":
            every = Router.from_adapters(adapters, 32)
            every.fixed = torch.ones(len(adapters))
            with every.installed(model):
                model(**inputs)
        else:
            model(**inputs)
    finally:
        hook.remove()
    rows = len(inputs["attention_mask"])
    last = torch.full((rows,), inputs["attention_mask"].shape[1] - 1) if left_padded else \
        inputs["attention_mask"].sum(1) - 1
    token = seen["x"][torch.arange(rows), last].double()
    norms = torch.stack([(token @ dense_update(a, at).T).norm(dim=-1) for a in adapters], 1)
    top, idx = norms.topk(top_k, dim=-1)
    return torch.zeros_like(norms).scatter(-1, idx, top / top.sum(-1, keepdim=True)).float()


@pytest.mark.parametrize("top_k,probe", [(1, "adapters"), (2, "adapters"), (2, "base")])
def test_the_routed_model_is_each_inputs_mixture_from_one_probe_pass(world, top_k, probe):
    _, model, adapters, inputs = world
    logo = LoGoRouter.from_adapters(adapters, top_k=top_k, probe=probe)
    assert default_probe_module(model, logo.modules) == PROBE  # the last layer's query, as LoGo's q_proj
    with torch.no_grad():
        expected_w = reference_weights(model, adapters, inputs, top_k, probe)
        with logo.installed(model):
            routed = hidden(model, inputs)
        assert torch.allclose(logo.last_weights, expected_w, atol=1e-5)
        assert len({tuple(row.nonzero().flatten().tolist()) for row in expected_w}) > 1  # inputs choose apart
        fixed = Router.from_adapters(adapters, 32)
        for b in range(len(expected_w)):
            fixed.fixed = expected_w[b]
            with fixed.installed(model):
                row = hidden(model, {k: v[b:b + 1] for k, v in inputs.items()})
            assert torch.allclose(routed[b:b + 1], row, atol=1e-4), b
        plain = hidden(model, inputs)
    assert (routed - plain).abs().max() > 0.1


def test_a_left_padded_causal_lm_probes_each_inputs_last_token(tmp_path):
    """The chat formulation's batches are left-padded: the probe token is each row's last position."""
    from tiny_models import tiny_llama

    from lorafuse.model.evaluation import Evaluator
    from test_lorahub import LLAMA_MODULES, noise_adapters

    path = tiny_llama(tmp_path / "llama")
    adapters = noise_adapters(tmp_path, LLAMA_MODULES, path, 3, 4.0, task_type="CAUSAL_LM")
    ev = Evaluator(str(path), [], formulation="chat", progress=False)
    rows = [{"prompt": ev.formulation.tokenizer(s)["input_ids"], "answer": [], "target": 0}
            for s in ("the a saw 3 .", "all some are in of and the 12 13 .", "one word 7 ?", "what relation 5")]
    inputs = ev.formulation.collate(rows).inputs
    assert not inputs["attention_mask"][:, 0].all()  # left-padded
    logo = LoGoRouter.from_adapters(adapters, top_k=2)
    q1 = "model.layers.1.self_attn.q_proj"
    assert default_probe_module(ev.model, logo.modules) == q1
    with torch.no_grad():
        expected = reference_weights(ev.model, adapters, inputs, 2, "adapters", at=q1, left_padded=True)
        with logo.installed(ev.model):
            routed = ev.model(**inputs).logits
        assert torch.allclose(logo.last_weights, expected, atol=1e-5)
        fixed = Router.from_adapters(adapters, 32)
        mask = inputs["attention_mask"].bool()
        for b in range(len(rows)):
            fixed.fixed = expected[b]
            with fixed.installed(ev.model):
                row = ev.model(**{k: v[b:b + 1] for k, v in inputs.items()}).logits
            assert torch.allclose(routed[b][mask[b]], row[0][mask[b]], atol=1e-4), b


def test_logo_command_writes_a_router_that_lorafuse_eval_evaluates(tmp_path):
    """`lorafuse router --kind logo` over a trained adapter (with its head) and a noise adapter, then
    `lorafuse eval --adapter DIR`: the same accuracy as the Evaluator on the router built directly; the config
    names its adapters relative to itself; a changed adapter is refused."""
    from lorafuse.cli import main
    from lorafuse.model.evaluation import Evaluator
    from lorafuse.model.kinds import load_fused
    from test_lorahub import bert_world

    model, good, noise = bert_world(tmp_path, "logotask")
    out = tmp_path / "routers" / "logo"
    assert main(["router", "--kind", "logo", "--adapters", str(good), str(noise[0]), "--tasks", "logotask,noise",
                 "--top-k", "2", "--signal", "norm", "-o", str(out)]) == 0
    text = (out / "logo_config.json").read_text()
    config = json.loads(text)
    assert config["logo"] == {"top_k": 2, "signal": "norm", "probe": "adapters", "probe_module": None}
    assert [e["path"] for e in config["adapters"]] == ["../../good", "../../noise0"] and str(tmp_path) not in text
    assert isinstance(load_fused(out), LoGoRouter)
    task_file = str(tmp_path / "data" / "logotask.yaml")
    assert main(["eval", "--model", str(model), "--formulation", "classify", "--adapter", str(out), "--tasks",
                 "logotask", "--task-file", task_file, "--split", "validation", "--quiet",
                 "--output", str(tmp_path / "eval.json")]) == 0
    accuracy = json.loads((tmp_path / "eval.json").read_text())["accuracy"]["logotask"]
    ev = Evaluator(str(model), ["logotask"], split="validation", formulation="classify", progress=False)
    direct = ev.evaluate(LoGoRouter.from_adapters([good, noise[0]], ["logotask", "noise"], top_k=2))
    assert accuracy == pytest.approx(100 * direct.accuracy["logotask"])
    broken = tmp_path / "routers" / "broken"
    broken.mkdir()
    (broken / "logo_config.json").write_text(json.dumps({**config, "logo": {"top_k": 2}}))
    with pytest.raises(AdapterError, match="not a readable LoGo config"):
        LoGoRouter.load(broken)
    weights = noise[0] / "adapter_model.safetensors"
    original = load_file(str(weights))
    try:
        save_file({k: v * 2 for k, v in original.items()}, str(weights))
        with pytest.raises(AdapterError, match="changed since"):
            LoGoRouter.load(out)
    finally:
        save_file(original, str(weights))


# -- inside an experiment ------------------------------------------------------------------------------------------
def test_arrow_and_logo_run_as_experiment_jobs_beside_lorahub_and_the_router(tmp_path):
    """A tiny experiment with one static method, LoraHub, the trained router, Arrow and LoGo: the two training-free
    routers choose top-k on validation, run on test, save router directories that evaluate to the same numbers,
    record their data and time, appear in every table of the report, and are cached on a rerun."""
    from lorafuse.model.kinds import load_fused
    from test_experiment import assert_report_agrees, md_row, run, tiny_experiment

    raw = {**tiny_experiment(tmp_path), "methods": [{"method": "task_arithmetic", "search": {"lambda": [0.5, 1.0]}}],
           "seeds": 1, "lorahub": {"shots": [4], "budget": 3}, "router": {"examples_per_task": 16, "epochs": 1},
           "arrow": {"top_k": [1, 2], "temperature": [1.0]}, "logo": {"top_k": [1, 2]}}
    runner, results = run(raw, tmp_path / "run", cache_dir=tmp_path / "cache")
    jobs = {j["name"]: j for j in results["jobs"]}
    assert all(j["status"] == "ok" for j in jobs.values()), [j.get("error") for j in jobs.values()]
    assert {"task_arithmetic", "lorahub (4-shot)", "router", "arrow", "logo"} <= set(jobs)
    selection = results["statistics"]["selection_tasks"]
    for kind in ("arrow", "logo"):
        job = jobs[kind]
        assert job["kind"] == "data-driven" and job["training_free"] and job["settings_tried"] == 2
        assert [p["params"]["top_k"] for p in job["sweep"]] == [1, 2]
        scores = [sum(p["validation"]["normalized"][t] for t in selection) / len(selection) for p in job["sweep"]]
        assert job["params"]["top_k"] == [1, 2][scores.index(max(scores))]  # chosen on validation, first of equals
        assert job["validation"] == job["sweep"][scores.index(max(scores))]["validation"]
        assert job["examples_seen"] == 64 and job["data_split"] == "validation"  # 32 validation examples a task
        assert isinstance(job["seconds"], float) and job["seconds"] >= job["search_seconds"] > 0
        config = next(Path(job["router_dir"]).glob("*_config.json"))
        assert str(tmp_path) not in config.read_text()  # adapters named relative to the router's directory
        again = runner.evaluator("test").evaluate(load_fused(job["router_dir"]), heads=runner.own_heads())
        assert again.accuracy == job["test"]["accuracy"]
    assert jobs["logo"]["params"]["signal"] == "norm" and jobs["logo"]["params"]["probe"] == "adapters"
    report = tmp_path / "run" / "report"
    assert_report_agrees(report)
    md = (report / "report.md").read_text()
    for name in ("arrow", "logo", "router", "lorahub (4-shot)", "task_arithmetic"):
        assert md_row(md, name, 0)[1] in ("data-driven", "static"), name
    from lorafuse.experiment.report import _cost_cell

    cost = _cost_cell(jobs["logo"]["cost"])
    assert "test" in cost and "ms/example" in cost
    assert any(line.startswith("| logo | ") and line.endswith(f"| {cost} |")
               for line in md.splitlines())  # the data-and-time table: its cost record, in words, in the last cell
    rerun, _ = run(raw, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert rerun.state.executed == []


def test_a_single_setting_reads_no_labelled_data():
    from lorafuse.experiment.config import parse_config

    config = parse_config({"name": "x", "model": "minilm", "tasks": ["rte"], "arrow": {"top_k": [2]},
                           "logo": {"top_k": [1, 3], "signal": "entropy"}}, "cfg")
    assert config.arrow.grid() == [{"top_k": 2, "temperature": 1.0}]
    assert config.logo.grid() == [{"top_k": 1}, {"top_k": 3}] and config.logo.probe == "adapters"
    for bad in ({"arrow": {"top_k": [0]}}, {"arrow": {"temperature": [0.0]}}, {"logo": {"top_k": []}},
                {"logo": {"signal": "loss"}}, {"logo": {"temprature": [1.0]}}):
        with pytest.raises(ConfigError):
            parse_config({"name": "x", "model": "minilm", "tasks": ["rte"], **bad}, "cfg")


def test_the_findings_put_the_routers_beside_the_best_static_fusion():
    from lorafuse.experiment.report import findings

    def method(kind, value):
        return {"kind": kind, "normalized_average": value}

    methods = {"ties": method("static", 90.0), "average": method("static", 85.0), "router": method("data-driven", 93.5),
               "arrow": method("data-driven", 80.25), "logo": method("data-driven", 88.0)}
    jobs = [{"name": n, "status": "ok", "test": {}} for n in methods]
    line = next(f for f in findings(jobs, {"methods": methods}) if "best static fusion" in f)
    assert line.endswith("ties, keeps 90.0% of the individual adapters' accuracy on average; the router "
                         "reaches 93.5 (+3.5), Arrow (training-free) 80.2 (-9.8), LoGo (training-free) 88.0 (-2.0).")
    del methods["router"]
    jobs = [j for j in jobs if j["name"] != "router"]
    line = next(f for f in findings(jobs, {"methods": methods}) if "best static fusion" in f)
    assert "average; Arrow (training-free) reaches 80.2 (-9.8), LoGo" in line
