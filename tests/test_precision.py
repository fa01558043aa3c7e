"""Compute dtype (lorafuse.model.precision): `auto` follows the hardware (simulated through $LORAFUSE_CPU_FLAGS), bf16 and
fp32 evaluation agree, and every path that changes weights sees each change in bf16: evaluating A then B gives
bit for bit what B alone gives, in evaluation, LoraHub's objective and the router; each result records its dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_factory import write_adapter
from tiny_models import tiny_bert, tiny_llama, write_task_files

from lorafuse.errors import ConfigError
from lorafuse.model.evaluation import Evaluator, applied, own_head
from lorafuse.model.precision import FLAGS_ENV, resolve_precision
from lorafuse.tasks import get_task, load_task_file

BERT_MODULES = {f"bert.encoder.layer.{i}.attention.self.{n}": (32, 32) for i in range(2) for n in ("query", "value")}
LLAMA_MODULES = {f"model.layers.{i}.self_attn.{n}": (32 if n == "q_proj" else 16, 32)
                 for i in range(2) for n in ("q_proj", "v_proj")}


@pytest.mark.parametrize("flags, expected", [("fpu sse avx2 avx512f avx512_vnni", "float32"),
                                             ("avx2 avx512f avx512_bf16", "bfloat16"),
                                             ("avx2 amx_bf16 amx_tile", "bfloat16"), ("", "float32")])
def test_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setenv(FLAGS_ENV, flags)
    chosen = resolve_precision("auto", "cpu")
    assert chosen.dtype == expected and chosen.requested == "auto" and chosen.reason.startswith("auto:")
    assert resolve_precision("float32", "cpu").dtype == "float32"
    assert resolve_precision("bfloat16", "cpu").to_dict() == {"dtype": "bfloat16", "requested": "bfloat16",
                                                              "reason": "asked for"}


def test_unknown_dtype_is_refused():
    with pytest.raises(ConfigError, match="dtype: 'half' is not one of auto, float32, bfloat16"):
        resolve_precision("half")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    root = tmp_path_factory.mktemp("precision")
    model = tiny_bert(root / "bert")
    load_task_file(write_task_files(root / "data", "prec3", ["contradiction", "entailment", "neutral"], n=192))
    adapters = [write_adapter(root / f"a{i}", BERT_MODULES, r=4, alpha=8, seed=i, base_model=str(model))
                for i in range(2)]
    for path in adapters:  # large enough updates that A and B give visibly different outputs
        from safetensors.torch import load_file, save_file

        state = {k: v * (8.0 if "lora_B" in k else 1.0) for k, v in load_file(str(path / "adapter_model.safetensors"))
                 .items()}
        save_file(state, str(path / "adapter_model.safetensors"))
    return root, model, adapters


def _head(model: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)}


def test_bf16_and_fp32_evaluation_agree_and_record_their_dtype(world):
    _, model, adapters = world
    results = {}
    for dtype in ("float32", "bfloat16"):
        ev = Evaluator(str(model), ["prec3"], split="train", formulation="classify", progress=False, dtype=dtype)
        assert next(ev.model.parameters()).dtype == getattr(torch, dtype)
        results[dtype] = ev.evaluate(adapters[0], heads={"prec3": _head(model)})
        assert results[dtype].to_dict()["precision"]["dtype"] == dtype
    fp32, bf16 = (results[d].correct_flags("prec3") for d in ("float32", "bfloat16"))
    # correctness flags agree wherever predictions do; ≥ 99% of 192 examples
    assert (fp32 == bf16).mean() >= 0.99


def _weights(ev: Evaluator) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ev.model.named_parameters()}


def test_bf16_evaluation_a_then_b_equals_b_alone_bit_for_bit(world):
    from lorafuse.model.evaluation import adapter_updates

    _, model, (a, b) = world
    ev = Evaluator(str(model), ["prec3"], split="validation", formulation="classify", progress=False,
                   dtype="bfloat16")
    start = _weights(ev)
    ua, _ = adapter_updates(a)
    ub, _ = adapter_updates(b)
    inputs = ev.batches["prec3"][0].inputs
    with torch.no_grad():
        with applied(ev.model, ub, masters=ev.masters):
            alone = ev.model(**inputs).logits
        with applied(ev.model, ua, masters=ev.masters):
            with_a = ev.model(**inputs).logits
        with applied(ev.model, ub, masters=ev.masters):
            after_a = ev.model(**inputs).logits
    assert torch.equal(alone, after_a) and not torch.equal(alone, with_a)
    assert all(torch.equal(start[n], w) for n, w in _weights(ev).items())  # restored exactly
    first = ev.evaluate(b, heads={"prec3": _head(model)})
    ev.evaluate(a, heads={"prec3": _head(model)})
    assert ev.evaluate(b, heads={"prec3": _head(model)}).correct == first.correct


def test_bf16_merged_weight_is_formed_in_fp32_then_rounded(world):
    """A small update that bf16 weight arithmetic (W_bf16 + ΔW in bf16) would lose is kept: the weight equals
    round(W_fp32 + ΔW)."""
    from lorafuse.merging.algebra.lowrank import LowRank

    _, model, _ = world
    ev = Evaluator(str(model), ["prec3"], split="validation", formulation="classify", progress=False,
                   dtype="bfloat16")
    name = "bert.encoder.layer.0.attention.self.query"
    weight = ev.model.get_submodule(name).weight
    master = ev.masters.of(weight)
    update = LowRank(torch.full((32, 1), 1e-3), torch.ones(1, 32))
    with applied(ev.model, {name: update}, masters=ev.masters):
        assert torch.equal(weight, (master + 1e-3).to(torch.bfloat16))


def test_bf16_lorahub_objective_sees_every_weight_change(world):
    from lorafuse.fusion.lorahub import FewShotObjective, load_factors

    _, model, adapters = world
    ev = Evaluator(str(model), ["prec3"], split="validation", formulation="classify", progress=False,
                   dtype="bfloat16")
    examples = get_task("prec3").load("train")[:32]
    factors, _ = load_factors(adapters)
    with FewShotObjective(ev.model, ev.formulation, get_task("prec3"), examples, factors, "factors",
                          _head(model)) as objective:
        b_alone = objective([0.0, 1.0])
        a = objective([1.0, 0.0])
        small = objective([0.0, 0.98])
        b_again = objective([0.0, 1.0])
    assert a != b_alone and small != b_alone and b_again == b_alone


def test_bf16_router_sees_which_adapter_it_routes_to(tmp_path):
    from lorafuse.fusion.router import Router

    model = tiny_llama(tmp_path / "llama")
    load_task_file(write_task_files(tmp_path / "data", "precchat", ["entailment", "not_entailment"], n=32))
    adapters = [write_adapter(tmp_path / f"c{i}", LLAMA_MODULES, r=4, alpha=8, seed=i, base_model=str(model))
                for i in range(2)]
    ev = Evaluator(str(model), ["precchat"], split="validation", formulation="chat", progress=False, dtype="bfloat16")
    router = Router.from_adapters(adapters, 32, ["x", "y"])
    batch = ev.batches["precchat"][0]
    outputs = []
    for w in ([1.0, 0.0], [0.0, 1.0], [1.0, 0.0]):
        router.fixed = torch.tensor(w)
        with torch.no_grad(), router.installed(ev.model):
            outputs.append(ev.formulation.scores(ev.model, batch, ev.tasks[0]))
    assert not torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_head_swap_in_bf16_restores_the_model(world):
    from lorafuse.model.evaluation import head_loaded

    _, model, adapters = world
    ev = Evaluator(str(model), ["prec3"], split="validation", formulation="classify", progress=False,
                   dtype="bfloat16")
    start = _weights(ev)
    with head_loaded(ev.model, own_head(adapters[0]) or _head(model)):
        pass
    assert all(torch.equal(start[n], w) for n, w in _weights(ev).items())
