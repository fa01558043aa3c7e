"""KnOTS and Core spaces, TSV-M, Iso-C and Iso-CTS against dense references of their papers' definitions."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_factory import dense_update, llama_modules, write_adapter

from lorafuse.algebra.lowrank import LowRank
from lorafuse.aligned import core_space, knots_decomposition
from lorafuse.engine import merge

MODULES = llama_modules(2, ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"))
FULL = 64


@pytest.fixture()
def mixed(tmp_path):
    """Three adapters of different ranks; the third lacks the MLP module."""
    attn = {m: s for m, s in MODULES.items() if "self_attn" in m}
    return [write_adapter(tmp_path / "a", MODULES, r=4, alpha=8, seed=1),
            write_adapter(tmp_path / "b", MODULES, r=2, alpha=4, seed=2, rslora=True),
            write_adapter(tmp_path / "c", attn, r=3, alpha=3, seed=3)]


def dense_tvs(paths, module):
    m, n = MODULES[module]
    return torch.stack([u if (u := dense_update(p, module)) is not None else torch.zeros(m, n, dtype=torch.float64)
                        for p in paths])


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def random_terms(ranks=(4, 2, 3), m=24, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)) for r in ranks]


def test_knots_decomposition_rebuilds_every_update_and_matches_dense_svd():
    terms = random_terms()
    U, S, Vt = knots_decomposition(terms)
    for t, v in zip(terms, Vt):
        assert rel(U @ torch.diag(S.float()) @ v, t.dense().double()) < 1e-5
    concat = torch.cat([t.dense().double() for t in terms], dim=1)
    assert torch.allclose(S, torch.linalg.svdvals(concat)[: S.numel()], rtol=1e-5)


def test_core_projection_rebuilds_every_update():
    terms = random_terms()
    proj = core_space(terms)
    assert proj.blocks.shape == (3, 9, 9)
    for t, block in zip(terms, proj.blocks):
        assert rel(proj.rebuild(block).dense(), t.dense().double()) < 1e-5


@pytest.mark.parametrize("space", ["knots", "core"])
def test_task_arithmetic_in_aligned_space_equals_ta(mixed, space):
    ta = merge(mixed, "task_arithmetic", progress=False)
    aligned = merge(mixed, "magnitude_prune", density=1.0, space=space, rank=FULL, progress=False)
    for module in MODULES:
        assert rel(aligned.delta(module), ta.delta(module).double()) < 1e-5


def _knots_blocks_dense(x):
    """KnOTS's own recipe: full SVD of the m×(T·n) concatenation, task blocks S·V_tᵀ."""
    T, m, n = x.shape
    U, S, Vh = torch.linalg.svd(torch.cat(list(x), dim=1), full_matrices=False)
    k = int((S > 1e-5 * S[0]).sum())
    return U[:, :k], torch.stack([S[:k, None] * Vh[:k, t * n:(t + 1) * n] for t in range(T)])


def _ties(x, density, lam=1.0):
    flat = x.reshape(x.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.abs().argsort(1, descending=True)[:, :k], True)
    trimmed = (flat * mask).reshape(x.shape)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_knots_ties_matches_dense_reference(mixed):
    """Equal up to the sign of each singular pair, which TIES's element-wise trim and election do not see
    (flipping u_i and v_i together flips a whole row of every block), so the fused update is the same."""
    result = merge(mixed, "ties", density=0.3, space="knots", rank=FULL, progress=False)
    for module in MODULES:
        U, blocks = _knots_blocks_dense(dense_tvs(mixed, module))
        assert rel(result.delta(module), U @ _ties(blocks, 0.3)) < 1e-4, module


def test_knots_ties_global_trim_matches_dense_reference(mixed):
    result = merge(mixed, "ties", density=0.3, space="knots", trim_scope="global", rank=FULL, progress=False)
    per_module = {m: _knots_blocks_dense(dense_tvs(mixed, m)) for m in MODULES}
    flat = torch.cat([b.reshape(3, -1) for _, b in per_module.values()], dim=1)
    k = int(0.3 * flat.shape[1])
    thr = flat.abs().sort(dim=1, descending=True).values[:, k - 1]
    for module, (U, blocks) in per_module.items():
        trimmed = blocks * (blocks.abs() >= thr[:, None, None])
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        ref = U @ ((trimmed * agree).sum(0) / agree.sum(0).clamp(min=1))
        assert rel(result.delta(module), ref) < 1e-4, module


def test_dare_in_knots_space_is_seeded_and_rank_bounded(mixed):
    a = merge(mixed, "dare_ties", drop_rate=0.5, space="knots", seed=4, progress=False)
    b = merge(mixed, "dare_ties", drop_rate=0.5, space="knots", seed=4, progress=False)
    m = next(iter(MODULES))
    assert torch.equal(a.delta(m), b.delta(m)) and a.modules[m].rank <= 4


def _procrustes(M):
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def test_tsv_matches_dense_reference(mixed):
    result = merge(mixed, "tsv", alpha=0.9, rank=FULL, progress=False)
    for module in MODULES:
        x = dense_tvs(mixed, module)
        budget = math.floor(min(x.shape[1:]) / 3)
        Us, Ss, Vs = [], [], []
        for t in x:
            U, S, Vh = torch.linalg.svd(t, full_matrices=False)
            k = min(budget, int((S > 1e-6 * S[0]).sum())) if S[0] > 0 else 0
            Us.append(U[:, :k]), Ss.append(S[:k]), Vs.append(Vh[:k].T)
        ref = 0.9 * _procrustes(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ _procrustes(torch.cat(Vs, 1)).T
        assert rel(result.delta(module), ref) < 1e-4, module


def test_iso_c_matches_dense_reference(mixed):
    result = merge(mixed, "iso_c", alpha=1.3, rank=FULL, progress=False)
    for module in MODULES:
        U, S, Vh = torch.linalg.svd(dense_tvs(mixed, module).sum(0), full_matrices=False)
        k = int((S > 1e-6 * S[0]).sum())
        assert rel(result.delta(module), 1.3 * S[:k].mean() * U[:, :k] @ Vh[:k]) < 1e-4


def test_iso_cts_matches_dense_reference(mixed):
    result = merge(mixed, "iso_cts", common=0.5, rank=FULL, progress=False)
    for module in MODULES:
        x = dense_tvs(mixed, module)
        U, S, Vh = torch.linalg.svd(x.sum(0), full_matrices=False)
        K = int((S > 1e-6 * S[0]).sum())
        kc = math.ceil(0.5 * K)
        s = (K - kc) // 3
        Uc = U[:, :kc]
        Us, Vs, Ss = [Uc], [Vh[:kc].T], [S[:kc]]
        for t in x:
            if s == 0 or t.abs().max() == 0:
                continue
            Ut, St, Vth = torch.linalg.svd(t - Uc @ (Uc.T @ t), full_matrices=False)
            Us.append(Ut[:, :s]), Vs.append(Vth[:s].T), Ss.append(St[:s])
        ref = torch.cat(Ss).mean() * _procrustes(torch.cat(Us, 1)) @ _procrustes(torch.cat(Vs, 1)).T
        assert rel(result.delta(module), ref) < 1e-4, module


def test_tsv_in_core_space_is_exact_rebuild(mixed):
    """Core-space TSV: the method runs on the cores and the result is rebuilt exactly as U_B·M·V_A."""
    result = merge(mixed, "tsv", space="core", rank=FULL, progress=False)
    from lorafuse.aligned import to_core
    from lorafuse.methods.spectral import TSVParams, tsv

    for module in MODULES:
        from lorafuse.adapters.reader import LoraAdapter

        terms = [LoraAdapter(p).update(module) if module in LoraAdapter(p).modules else
                 LowRank(torch.zeros(MODULES[module][0], 0), torch.zeros(0, MODULES[module][1])) for p in mixed]
        cores, UB, VA = to_core(terms)
        core = tsv(cores, [1.0] * 3, TSVParams()).dense()
        assert rel(result.delta(module), (UB @ core @ VA).double()) < 1e-4
