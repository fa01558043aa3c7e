"""LoraHub on tiny models built in code: with one adapter that solves the target task among noise adapters, the
search puts its weight there and beats the uniform average; weights stay in bounds; a seed fixes the result; the
PEFT slots reproduce the composition exactly and leave the model as it was; the saved adapter scores the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_factory import write_adapter
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert, tiny_llama, write_task_files

from lorafuse.errors import ConfigError
from lorafuse.fusion.lorahub import (
    FewShotObjective,
    LoraHubSettings,
    compose,
    load_factors,
    lora_slots,
    lorahub,
    save_lorahub,
)
from lorafuse.model.evaluation import Evaluator, adapter_updates, applied, head_loaded, own_head
from lorafuse.model.training import TrainConfig, train_adapter
from lorafuse.tasks import get_task, load_task_file

BERT_MODULES = {f"bert.encoder.layer.{i}.attention.self.{n}": (32, 32) for i in range(2) for n in ("query", "value")}
LLAMA_MODULES = {f"model.layers.{i}.self_attn.{n}": (32 if n == "q_proj" else 16, 32)
                 for i in range(2) for n in ("q_proj", "v_proj")}


def noise_adapters(root: Path, modules: dict, base: Path, n: int, scale: float, r: int = 4,
                   task_type: str | None = None) -> list[Path]:
    """Random adapters with B scaled up, so that they hurt the task when weighted in."""
    paths = []
    for i in range(n):
        path = write_adapter(root / f"noise{i}", modules, r=r, alpha=r, seed=20 + i, base_model=str(base),
                             task_type=task_type)
        state = {k: v * (scale if "lora_B" in k else 1.0)
                 for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
        save_file(state, str(path / "adapter_model.safetensors"))
        paths.append(path)
    return paths


def bert_world(root: Path, task: str = "hubtask") -> tuple[Path, Path, list[Path]]:
    """A tiny BERT, a learnable task, an adapter trained on it (rank 4, alpha 8: scale 2) and two noise ones."""
    model = tiny_bert(root / "bert")
    load_task_file(write_task_files(root / "data", task, ["contradiction", "entailment", "neutral"], n=96))
    good = train_adapter(TrainConfig(task=task, model=str(model), formulation="classify", output=str(root / "good"),
                                     epochs=8, lr=5e-3, head_lr=5e-3, best_checkpoint=False, batch_size=16, rank=4,
                                     alpha=8, dropout=0.0,
                                     target_modules=["query", "value"], progress=False))
    return model, good, noise_adapters(root, BERT_MODULES, model, 2, 6.0)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_bert")
    model, good, noise = bert_world(root)
    ev = Evaluator(str(model), ["hubtask"], split="validation", formulation="classify", progress=False)
    return root, model, good, noise, ev


def test_weights_concentrate_on_the_solving_adapter_and_beat_uniform(bert):
    root, model, good, noise, ev = bert
    adapters, head = [noise[0], good, noise[1]], own_head(good)
    examples = get_task("hubtask").load("train")[:24]
    result, _ = lorahub(ev, adapters, "hubtask", examples, LoraHubSettings(budget=40, seed=0), head)
    w = result.weights
    assert all(-1.5 <= x <= 1.5 for s in result.trace for x in s["weights"]) and len(result.trace) == 40
    assert abs(w[1]) > 2 * max(abs(w[0]), abs(w[2])), w
    factors, _ = load_factors(adapters)
    with FewShotObjective(ev.model, ev.formulation, get_task("hubtask"), examples, factors, "factors", head) as f:
        uniform, recomputed = f([1 / 3] * 3), f(w)
    assert result.loss < uniform and recomputed == pytest.approx(result.loss, abs=1e-6)
    with FewShotObjective(ev.model, ev.formulation, get_task("hubtask"), examples, factors, "factors", head) as f:
        base = f([0.0] * 3)
    assert abs(w[1]) > 0.3 and result.loss < base and result.problems() == []  # far from 0, beats the base
    again, _ = lorahub(ev, adapters, "hubtask", examples, LoraHubSettings(budget=40, seed=0), head)
    assert again.weights == w and [s["weights"] for s in again.trace] == [s["weights"] for s in result.trace]


@pytest.mark.parametrize("composition", ["factors", "updates"])
def test_slots_hold_the_composition_exactly_and_leave_the_model_unchanged(bert, composition):
    root, model, good, noise, ev = bert
    adapters, w = [good, noise[0]], [0.7, -0.4]
    factors, _ = load_factors(adapters)
    inputs = ev.batches["hubtask"][0].inputs
    with torch.no_grad(), head_loaded(ev.model, own_head(good)):
        before = ev.model(**inputs).logits
        with applied(ev.model, compose(factors, w, composition)):  # the reference: W + ΔW written densely
            expected = ev.model(**inputs).logits
        with lora_slots(ev.model, factors, composition) as slots:
            slots.write(w)
            got = ev.model(**inputs).logits
        after = ev.model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, before, atol=1e-3)
    assert torch.equal(after, before)
    assert not any("lora" in name for name, _ in ev.model.named_modules())


def test_update_composition_is_the_exact_weighted_sum(bert):
    root, model, good, noise, ev = bert
    factors, _ = load_factors([good, noise[0]])
    w = [1.2, -0.3]
    for module, update in compose(factors, w, "updates").items():
        ref = sum(x * t.dense().double() for x, t in zip(w, factors[module]))
        assert update.rank == 8 and torch.allclose(update.dense().double(), ref, atol=1e-6)


def test_saved_adapter_scores_like_the_search_and_records_provenance(bert, tmp_path):
    root, model, good, noise, ev = bert
    adapters, head = [good, noise[0]], own_head(good)
    examples = get_task("hubtask").load("train")[:16]
    for composition in ("factors", "updates"):
        settings = LoraHubSettings(budget=6, seed=1, composition=composition, optimizer="CMA")
        result, updates = lorahub(ev, adapters, "hubtask", examples, settings, head)
        out = save_lorahub(result, adapters, tmp_path / composition, "hubtask", head)
        record = json.loads((out / "lorahub.json").read_text())
        assert list(record["weights"].values()) == result.weights and len(record["trace"]) == 6
        assert json.loads((out / "lorafuse_merge.json").read_text())["lorahub"]["task"] == "hubtask"
        saved, _ = adapter_updates(out)
        for module, update in updates.items():
            assert torch.allclose(saved[module].dense(), update.dense(), atol=1e-5)
        batch = ev.formulation.collate(ev.formulation.encode(get_task("hubtask"), examples))
        with torch.no_grad(), applied(ev.model, saved), head_loaded(ev.model, load_file(
                str(out / "task_heads" / "hubtask.safetensors"))):
            loss = float(ev.formulation.loss(ev.model, batch, get_task("hubtask")))
        assert loss == pytest.approx(result.loss, abs=1e-4)


def test_bad_settings_and_inputs_are_refused(bert, tmp_path):
    root, model, good, noise, ev = bert
    examples = get_task("hubtask").load("train")[:4]
    with pytest.raises(ConfigError, match="did you mean 'NGOpt'"):
        lorahub(ev, [good], "hubtask", examples, LoraHubSettings(optimizer="NGopt"), own_head(good))
    with pytest.raises(ConfigError, match="classification head"):
        lorahub(ev, [good], "hubtask", examples, LoraHubSettings(budget=2))
    other_rank = write_adapter(tmp_path / "r8", BERT_MODULES, r=8, alpha=8, seed=3, base_model=str(model))
    with pytest.raises(ConfigError, match="equal ranks"):
        lorahub(ev, [good, other_rank], "hubtask", examples, LoraHubSettings(budget=2), own_head(good))
    result, _ = lorahub(ev, [good, other_rank], "hubtask", examples,
                        LoraHubSettings(budget=2, composition="updates"), own_head(good))
    assert len(result.weights) == 2


def test_chat_formulation_on_a_tiny_llama(tmp_path):
    """LoraHub's home ground: a causal LM scored on the answer tokens; no head needed."""
    model = tiny_llama(tmp_path / "llama")
    load_task_file(write_task_files(tmp_path / "data", "chattask", ["yes", "no", "neutral"], n=64, seed=3))
    good = train_adapter(TrainConfig(task="chattask", model=str(model), formulation="chat", output=str(tmp_path / "g"),
                                     epochs=4, lr=1e-2, batch_size=16, rank=4, alpha=4, dropout=0.0,
                                     target_modules=["q_proj", "v_proj"], max_eval_examples=8, best_checkpoint=False,
                                     progress=False))
    noise = noise_adapters(tmp_path, LLAMA_MODULES, model, 1, 8.0, task_type="CAUSAL_LM")
    ev = Evaluator(str(model), ["chattask"], split="validation", formulation="chat", max_examples=4, progress=False)
    examples = get_task("chattask").load("train")[:12]
    result, _ = lorahub(ev, [noise[0], good], "chattask", examples, LoraHubSettings(budget=30, seed=0))
    factors, _ = load_factors([noise[0], good])
    with FewShotObjective(ev.model, ev.formulation, get_task("chattask"), examples, factors, "factors") as f:
        assert result.loss < f([0.5, 0.5]) and result.loss < f([0.0, 0.0])
    assert abs(result.weights[1]) > abs(result.weights[0])


def test_a_search_that_learns_nothing_says_so_and_scipy_stays_quiet():
    """A flat few-shot loss (what a bf16 autocast region that hides the weight changes produced) ends at the
    base model: the result names both problems, and COBYLA's RHOEND warning does not leak."""
    import warnings

    from lorafuse.fusion.lorahub import search

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flat = search(lambda w: 1.0, 2, LoraHubSettings(budget=40))
    assert not [w for w in caught if "RHOEND" in str(w.message)]
    assert flat.weights == [0.0, 0.0] and len(flat.problems()) == 2
    assert "could not tell them apart" in flat.problems()[0] and "base model" in flat.problems()[1]
    assert flat.to_dict()["problems"] == flat.problems()
    learned = search(lambda w: (w[0] - 0.8) ** 2 + 1, 2, LoraHubSettings(budget=40))
    assert learned.problems() == [] and abs(learned.weights[0] - 0.8) < 0.2


def test_experiment_warns_when_lorahub_returned_nothing():
    from lorafuse.experiment.analysis import _search_warnings

    job = {"name": "lorahub (5-shot)", "problems": ["rte (seed 0, 5 shots): every weight is 0: ..."]}
    (warning,) = _search_warnings([job, {"name": "ties"}])
    assert warning["kind"] == "search_returned_nothing" and "rte (seed 0" in warning["message"]
