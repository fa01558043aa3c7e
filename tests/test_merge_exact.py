"""Exact methods against a dense float64 reference of every module's update."""

from __future__ import annotations

import pytest
import torch
from adapter_factory import dense_update, llama_modules, write_adapter

from lorafuse.merging.algebra.lowrank import LowRank, factor_svd, stack_lowrank, truncate
from lorafuse.merging.engine import merge

MODULES = llama_modules(layers=2)


@pytest.fixture()
def three(tmp_path):
    return [write_adapter(tmp_path / f"a{i}", MODULES, r=4, alpha=8.0 * (i + 1), seed=i) for i in range(3)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def reference(paths, module, coefs):
    return sum(c * dense_update(p, module) for p, c in zip(paths, coefs) if dense_update(p, module) is not None)


@pytest.mark.parametrize(
    "method,params,coefs",
    [
        ("average", {}, [1 / 3] * 3),
        ("linear", {"weights": [0.5, -1.0, 2.0]}, [0.5, -1.0, 2.0]),
        ("linear", {"weights": [1.0, 1.0, 2.0], "normalize": True}, [0.25, 0.25, 0.5]),
        ("task_arithmetic", {"lambda": 0.7}, [0.7] * 3),
        ("task_arithmetic", {"lambda": 0.5, "weights": [1.0, 0.0, -1.0]}, [0.5, 0.0, -0.5]),
        ("cat", {}, [1.0] * 3),
    ],
)
def test_exact_methods_match_dense_reference(three, method, params, coefs):
    result = merge(three, method, progress=False, **params)
    for module in MODULES:
        assert rel_err(result.delta(module), reference(three, module, coefs)) < 1e-5, module


def test_cat_has_rank_sum(three):
    result = merge(three, "cat", progress=False)
    assert {u.rank for u in result.modules.values()} == {12}


def test_single_adapter_weight_one_returns_it(tmp_path):
    path = write_adapter(tmp_path / "a", MODULES, r=4, alpha=16, seed=3)
    for method in ("task_arithmetic", "linear", "average", "cat"):
        result = merge([path], method, progress=False)
        for module in MODULES:
            assert rel_err(result.delta(module), dense_update(path, module)) < 1e-6


def test_adapter_order_does_not_matter(three):
    a = merge(three, "task_arithmetic", progress=False, rank=6)
    b = merge(three[::-1], "task_arithmetic", progress=False, rank=6)
    for module in MODULES:
        assert rel_err(a.delta(module), b.delta(module).double()) < 1e-5


def test_truncation_is_best_rank_k(three):
    """Rank-k output equals the dense SVD truncation (Eckart–Young), and the energy recorded is right."""
    result = merge(three, "task_arithmetic", progress=False, rank=3)
    module = "model.layers.1.mlp.down_proj"
    ref = reference(three, module, [1.0] * 3)
    U, S, Vh = torch.linalg.svd(ref)
    best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    assert rel_err(result.delta(module), best) < 1e-5
    energy = result.provenance["retained_energy"]["per_module"][module]
    assert energy == pytest.approx(float((S[:3] ** 2).sum() / (S**2).sum()), rel=1e-6)


def test_factor_svd_matches_dense_svd():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(50, 6, generator=gen), torch.randn(6, 40, generator=gen)
    svd = factor_svd(B, A)
    assert torch.allclose(svd.S, torch.linalg.svdvals((B @ A).double())[:6], rtol=1e-5)
    assert torch.allclose(svd.U.T @ svd.U, torch.eye(6), atol=1e-5)
    assert rel_err(svd.lowrank().dense(), (B @ A).double()) < 1e-5


def test_stack_and_truncate_primitives():
    gen = torch.Generator().manual_seed(1)
    terms = [LowRank(torch.randn(20, 2, generator=gen), torch.randn(2, 30, generator=gen)) for _ in range(3)]
    stacked = stack_lowrank(terms, [1.0, -2.0, 0.5])
    ref = sum(w * t.dense().double() for t, w in zip(terms, [1.0, -2.0, 0.5]))
    assert stacked.rank == 6 and rel_err(stacked.dense(), ref) < 1e-6
    full, energy = truncate(stacked, None)
    assert full.rank == 6 and energy == pytest.approx(1.0) and rel_err(full.dense(), ref) < 1e-5


def test_mixed_ranks_mixed_modules_and_rslora(tmp_path):
    attn = llama_modules(2, ("self_attn.q_proj", "self_attn.v_proj"))
    mlp = llama_modules(2, ("self_attn.q_proj", "mlp.up_proj"))
    paths = [
        write_adapter(tmp_path / "a", attn, r=4, alpha=8, seed=0,
                      rank_pattern={"model.layers.1.self_attn.q_proj": 2},
                      alpha_pattern={"model.layers.1.self_attn.q_proj": 7}),
        write_adapter(tmp_path / "b", mlp, r=8, alpha=16, seed=1, rslora=True),
    ]
    result = merge(paths, "task_arithmetic", progress=False)
    assert set(result.modules) == set(attn) | set(mlp)
    for module in result.modules:
        assert rel_err(result.delta(module), reference(paths, module, [1.0, 1.0])) < 1e-5, module
    assert result.modules["model.layers.1.self_attn.q_proj"].rank == 10
    assert result.modules["model.layers.0.self_attn.v_proj"].rank == 4  # only in the first adapter
