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
