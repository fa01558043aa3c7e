"""RegMean in LoRA space (lorafuse.fusion.regmean) and Arrow routing (lorafuse.fusion.arrow), on tiny tensors and a
tiny BERT built in code."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_bert

from lorafuse.fusion.regmean import gram_matrices, regmean, regmean_updates
from lorafuse.merging.algebra.lowrank import LowRank

QUERY = "bert.encoder.layer.0.attention.self.query"


def lowrank(out: int, n: int, r: int, seed: int) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(out, r, generator=g), torch.randn(r, n, generator=g))


def gram(X: torch.Tensor) -> torch.Tensor:
    return X.T.double() @ X.double()


# -- RegMean -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.9, 1.0])
def test_one_task_gives_its_update_back(alpha):
    u = lowrank(6, 8, 2, 0)
    X = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(regmean([u], [gram(X)], alpha).dense(), u.dense(), atol=1e-5)


def test_identical_grams_give_the_mean_of_the_updates():
    """ΔW* = Σ_t ΔW_t G (T·G)⁻¹ = (1/T)·Σ_t ΔW_t: task arithmetic with λ = 1/T."""
    us = [lowrank(6, 8, 2, s) for s in range(3)]
    G = gram(torch.randn(30, 8, generator=torch.Generator().manual_seed(5)))
    merged = regmean(us, [G, G, G])
    assert torch.allclose(merged.dense(), sum(u.dense() for u in us) / 3, atol=1e-5)
    assert merged.rank == 6  # exact factorisation, rank Σr


def test_orientation_matches_least_squares_on_the_stacked_inputs():
    """α = 1: W* minimises Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖² (y = W·x, inputs as rows)."""
    gen = torch.Generator().manual_seed(2)
    us = [lowrank(5, 7, 3, s) for s in (10, 11)]
    Xs = [torch.randn(12, 7, generator=gen).double() * torch.linspace(0.2, 3, 7).double() for _ in us]
    X = torch.cat(Xs)
    Y = torch.cat([x @ u.dense(torch.float64).T for x, u in zip(Xs, us)])
    reference = torch.linalg.lstsq(X, Y).solution.T
    merged = regmean(us, [gram(x) for x in Xs], alpha=1.0).dense(torch.float64)
    assert torch.allclose(merged, reference, atol=1e-4)
    assert not torch.allclose(merged, (us[0].dense(torch.float64) + us[1].dense(torch.float64)) / 2, atol=1e-2)


def test_disjoint_input_subspaces_reproduce_each_task_better_than_the_average():
    gen = torch.Generator().manual_seed(3)
    us = [lowrank(6, 8, 2, s) for s in (20, 21)]
    Xs = [torch.cat([torch.randn(25, 4, generator=gen), torch.zeros(25, 4)], 1),
          torch.cat([torch.zeros(25, 4), torch.randn(25, 4, generator=gen)], 1)]
    merged = regmean(us, [gram(x) for x in Xs]).dense()
    mean = (us[0].dense() + us[1].dense()) / 2
    for x, u in zip(Xs, us):
        target = x @ u.dense().T
        err_regmean = (x @ merged.T - target).norm() / target.norm()
        err_mean = (x @ mean.T - target).norm() / target.norm()
        assert err_regmean < 1e-4 < err_mean  # the Grams are block-diagonal: exact even with shrinkage


def test_bad_inputs_are_refused():
    from lorafuse.errors import ConfigError

    u = lowrank(6, 8, 2, 0)
    with pytest.raises(ConfigError):
        regmean([u], [torch.eye(7)])
    with pytest.raises(ConfigError):
        regmean([u, u], [torch.eye(8)])
    with pytest.raises(ConfigError):
        regmean([u], [torch.eye(8)], alpha=1.5)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    path = tiny_bert(tmp_path_factory.mktemp("regmean_arrow") / "bert")
    return path, AutoModelForSequenceClassification.from_pretrained(str(path)).eval()


def test_gram_matrices_leave_padding_out_and_sum_over_batches(bert):
    _, model = bert
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(5, 30, (1, 6), generator=gen), torch.randint(5, 30, (1, 3), generator=gen)
    padded = {"input_ids": torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)]),
              "attention_mask": torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])}
    alone = [{"input_ids": a, "attention_mask": torch.ones_like(a)},
             {"input_ids": b, "attention_mask": torch.ones_like(b)}]
    modules = [QUERY, "bert.encoder.layer.1.attention.self.value"]
    together = gram_matrices(model, [padded], modules)
    apart = gram_matrices(model, alone, modules)
    for m in modules:
        assert together[m].shape == (32, 32) and torch.allclose(together[m], together[m].T)
        assert torch.allclose(together[m], apart[m], rtol=1e-4, atol=1e-4)
    # the hook saw exactly the query layer's input: XᵀX of the embeddings' output for layer 0
    with torch.no_grad():
        x = model.bert.embeddings(input_ids=a)[0].double()
    assert torch.allclose(apart[QUERY] - gram_matrices(model, alone[1:], [QUERY])[QUERY], x.T @ x, atol=1e-6)


def test_regmean_updates_on_model_grams_merge_every_module(bert):
    _, model = bert
    modules = [QUERY, "bert.encoder.layer.1.attention.self.value"]
    gen = torch.Generator().manual_seed(6)
    grams = [gram_matrices(model, [{"input_ids": torch.randint(5, 30, (2, 5), generator=gen)}], modules)
             for _ in range(2)]
    ups = [{m: lowrank(32, 32, 4, 30 + t) for m in modules} for t in range(2)]
    ups[1].pop(modules[1])  # task 1 does not adapt that module: ΔW = 0 there
    merged = regmean_updates(ups, grams)
    assert set(merged) == set(modules)
    one = regmean([ups[0][QUERY], ups[1][QUERY]], [grams[0][QUERY], grams[1][QUERY]])
    assert torch.allclose(merged[QUERY].dense(), one.dense())


# -- Arrow -----------------------------------------------------------------------------------------------------------
BERT_MODULES = {f"bert.encoder.layer.{i}.attention.self.{n}": (32, 32) for i in range(2) for n in ("query", "value")}


def gapped_adapters(root, base, n=3):
    """Random rank-4 adapters whose B columns are scaled 8, 1, 0.5, 0.25: a clear top singular value, so PEFT's
    15-step power iteration reaches the exact top right singular vector."""
    from adapter_factory import write_adapter
    from safetensors.torch import load_file, save_file

    paths = []
    for i in range(n):
        path = write_adapter(root / f"arrow{i}", BERT_MODULES, r=4, alpha=4, seed=40 + i, base_model=str(base),
                             task_type=None)
        state = load_file(str(path / "adapter_model.safetensors"))
        state = {k: v * torch.tensor([8.0, 1.0, 0.5, 0.25]) if "lora_B" in k else v for k, v in state.items()}
        save_file(state, str(path / "adapter_model.safetensors"))
        paths.append(path)
    return paths


def hidden(model, inputs):
    """The last hidden state: the tiny classifier's logits are too small to tell mixtures apart."""
    return model(**inputs, output_hidden_states=True).hidden_states[-1]


@pytest.fixture(scope="module")
def arrow_world(bert, tmp_path_factory):
    path, model = bert
    adapters = gapped_adapters(tmp_path_factory.mktemp("arrow_adapters"), path)
    gen = torch.Generator().manual_seed(9)
    inputs = {"input_ids": torch.randint(5, 30, (2, 7), generator=gen),
              "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    return path, model, adapters, inputs


def test_prototypes_are_the_top_right_singular_vectors(arrow_world):
    from adapter_factory import dense_update

    from lorafuse.fusion.arrow import ArrowRouter

    _, _, adapters, _ = arrow_world
    router = ArrowRouter.from_adapters(adapters)
    for t, a in enumerate(adapters):
        v = torch.linalg.svd(dense_update(a, QUERY).double())[2][0].float()
        assert abs(float(router.protos[QUERY][t] @ v)) == pytest.approx(1.0, abs=1e-5)


def test_all_adapters_at_infinite_temperature_is_the_uniform_mixture(arrow_world):
    from lorafuse.fusion.arrow import ArrowRouter
    from lorafuse.fusion.router import Router

    _, model, adapters, inputs = arrow_world
    arrow = ArrowRouter.from_adapters(adapters, top_k=3, temperature=1e12)
    uniform = Router.from_adapters(adapters, 32)
    uniform.fixed = torch.full((3,), 1 / 3)
    with torch.no_grad():
        with arrow.installed(model):
            a = hidden(model, inputs)
        with uniform.installed(model):
            b = hidden(model, inputs)
        plain = hidden(model, inputs)
    assert torch.allclose(a, b, atol=1e-5) and (a - plain).abs().max() > 0.1


def test_top_1_routes_an_input_along_a_prototype_to_its_adapter(arrow_world):
    from lorafuse.fusion.arrow import ArrowRouter

    _, _, adapters, _ = arrow_world
    router = ArrowRouter.from_adapters(adapters, top_k=1)
    for t in range(3):
        for sign in (1.0, -1.0):  # sign-free: a singular vector's sign is arbitrary
            w = router.weights(QUERY, sign * 5.0 * router.protos[QUERY][t][None])
            assert torch.equal(w, torch.nn.functional.one_hot(torch.tensor([t]), 3).float())
    x = torch.randn(10, 32)
    w = ArrowRouter.from_adapters(adapters, top_k=2).weights(QUERY, x)
    assert torch.allclose(w.sum(-1), torch.ones(10)) and bool(((w > 0).sum(-1) == 2).all())


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 0.5), (3, 2.0)])
def test_outputs_equal_peft_arrow(arrow_world, top_k, temperature):
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "ArrowConfig"):
        pytest.skip("this peft has no ArrowConfig")
    from peft.tuners.lora.arrow import create_arrow_model
    from transformers import AutoModelForSequenceClassification

    from lorafuse.fusion.arrow import ArrowRouter

    path, model, adapters, inputs = arrow_world
    reference = create_arrow_model(AutoModelForSequenceClassification.from_pretrained(str(path)),
                                   [str(a) for a in adapters],
                                   peft.ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)).eval()
    router = ArrowRouter.from_adapters(adapters, top_k=top_k, temperature=temperature)
    with torch.no_grad():
        expected = hidden(reference, inputs)
        with router.installed(model):
            routed = hidden(model, inputs)
        plain = hidden(model, inputs)
    assert torch.allclose(routed, expected, atol=1e-4) and (routed - plain).abs().max() > 0.1
    layer = reference.get_submodule(f"base_model.model.{QUERY}").lora_arrow["arrow_router"]
    cos = (layer.prototypes.float() * router.protos[QUERY]).sum(-1).abs()
    assert torch.allclose(cos, torch.ones(3), atol=1e-5)


def test_arrow_saves_loads_and_evaluates_from_the_cli(arrow_world, tmp_path):
    import json

    from lorafuse.cli import main
    from lorafuse.errors import AdapterError
    from lorafuse.fusion.arrow import ArrowRouter
    from lorafuse.model.kinds import load_fused

    path, model, adapters, inputs = arrow_world
    out = tmp_path / "arrow"
    assert main(["router", "--kind", "arrow", "--adapters", str(adapters[0]), str(adapters[1]), "--tasks", "a,b",
                 "--top-k", "2", "--temperature", "0.5", "-o", str(out)]) == 0
    config = json.loads((out / "arrow_config.json").read_text())
    assert config["arrow"] == {"top_k": 2, "temperature": 0.5} and config["tasks"] == ["a", "b"]
    loaded = load_fused(out)
    assert isinstance(loaded, ArrowRouter) and loaded.names == ["a", "b"]
    direct = ArrowRouter.from_adapters(adapters[:2], top_k=2, temperature=0.5)
    with torch.no_grad():
        with loaded.installed(model):
            a = model(**inputs).logits
        with direct.installed(model):
            b = model(**inputs).logits
    assert torch.equal(a, b)
    from tiny_models import write_task_files

    from lorafuse.model.evaluation import Evaluator
    from lorafuse.tasks import load_task_file

    load_task_file(write_task_files(tmp_path / "data", "arrowtask", ["contradiction", "entailment", "neutral"], n=16))
    ev = Evaluator(str(path), ["arrowtask"], split="validation", formulation="classify", progress=False)
    heads = {"arrowtask": {k: v.clone() for k, v in ev.model.named_parameters() if k.startswith("classifier.")}}
    from_dir = ev.evaluate(out, heads=heads)  # what `lorafuse eval --adapter ARROW_DIR` runs
    assert from_dir.accuracy == ev.evaluate(direct, heads=heads).accuracy
    from safetensors.torch import load_file, save_file

    weights = adapters[1] / "adapter_model.safetensors"
    original = load_file(str(weights))
    try:
        save_file({k: v * 2 for k, v in original.items()}, str(weights))
        with pytest.raises(AdapterError, match="changed since"):
            ArrowRouter.load(out)
    finally:
        save_file(original, str(weights))
