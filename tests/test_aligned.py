"""KnOTS and Core spaces from the factors, against dense references that form the concatenated / stacked matrices
and take full torch.linalg.svd's (float64), then apply the papers' element-wise merges to the blocks."""

from __future__ import annotations

import pytest
import torch
from adapter_factory import (
    MIXED_MODULES,
    core_bases,
    dense_stack,
    mixed_adapters,
)

from lorafuse.adapters.reader import LoraAdapter
from lorafuse.merging.algebra.lowrank import LowRank
from lorafuse.merging.aligned import core_space, knots_decomposition, knots_space, to_core
from lorafuse.merging.engine import merge
from lorafuse.merging.methods.registry import get_method

MODULES = MIXED_MODULES
FULL = 64  # an output rank above every Σr here: no truncation
WEIGHTS = [1.0, 0.7, -0.4]


make_adapters = mixed_adapters


@pytest.fixture()
def mixed(tmp_path):
    return make_adapters(tmp_path)


def dense_tvs(paths, module):
    return dense_stack(paths, module)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_terms(ranks=(4, 0, 2, 3), m=24, n=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(m, r, generator=g, dtype=dtype), torch.randn(r, n, generator=g, dtype=dtype))
            for r in ranks]


# -- the decompositions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knots_decomposition_is_the_svd_of_the_concatenation(dtype):
    terms = random_terms(dtype=dtype)
    U, S, Vt = knots_decomposition(terms)
    concat = torch.cat([t.dense(torch.float64) for t in terms], dim=1)
    assert torch.allclose(S, torch.linalg.svdvals(concat)[: S.numel()], rtol=1e-5)
    V = torch.cat(Vt, dim=1)
    eye = torch.eye(S.numel(), dtype=torch.float64)
    assert torch.allclose(V @ V.T, eye, atol=1e-10) and torch.allclose(U.T @ U, eye, atol=1e-10)
    for t, v in zip(terms, Vt):
        assert v.shape == (S.numel(), 20)
        assert float((U @ torch.diag(S) @ v - t.dense(torch.float64)).norm()) < 1e-10 * float(S[0])


def test_knots_projection_rebuilds_every_update_as_factors():
    terms = random_terms()
    proj = knots_space(terms)
    assert proj.blocks.shape == (4, 9, 20)
    for t, block in zip(terms, proj.blocks):
        rebuilt = proj.rebuild(block)
        assert isinstance(rebuilt, LowRank) and rebuilt.rank == 9  # no dense m×n
        if t.rank:
            assert rel(rebuilt.dense(), t.dense(torch.float64)) < 1e-5
        else:
            assert float(rebuilt.dense().abs().max()) < 1e-5


def test_knots_projection_is_float32_exact_on_ill_conditioned_factors():
    """Nearly dependent rows of A, overlapping B's: the rebuilt updates stay at float32 rounding."""
    g = torch.Generator().manual_seed(1)
    terms = []
    for r in (6, 6, 4):
        B, A = torch.randn(300, r, generator=g) * 0.02, torch.randn(r, 200, generator=g) / 200**0.5
        A[-1] = A[-2] + 1e-4 * A[-1]
        terms.append(LowRank(B, A))
    terms[1] = LowRank(terms[0].B + 1e-3 * terms[1].B, terms[1].A)
    proj = knots_space(terms)
    for t, block in zip(terms, proj.blocks):
        assert rel(proj.rebuild(block).dense(), t.dense(torch.float64)) < 1e-5
    assert rel(proj.rebuild(proj.blocks.sum(0)).dense(), sum(t.dense(torch.float64) for t in terms)) < 1e-5


@pytest.mark.parametrize("space", [knots_space, core_space])
def test_all_zero_updates_project_to_zero(space):
    """Untrained adapters (B = 0) give an empty joint spectrum in KnOTS and zero cores, not NaNs."""
    terms = [LowRank(torch.zeros(8, 2), torch.randn(2, 6)), LowRank(torch.zeros(8, 0), torch.zeros(0, 6))]
    proj = space(terms)
    merged = proj.rebuild(proj.blocks.sum(0))
    assert torch.equal(merged.dense(), torch.zeros(8, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_core_projection_rebuilds_every_update(dtype):
    terms = random_terms(dtype=dtype)
    proj = core_space(terms)
    assert proj.blocks.shape == (4, 9, 9)
    for t, block in zip(terms, proj.blocks):
        rebuilt = proj.rebuild(block)
        assert isinstance(rebuilt, LowRank)
        if t.rank:
            assert rel(rebuilt.dense(), t.dense(torch.float64)) < 1e-5


def test_core_bases_are_the_singular_bases_of_the_stacked_factors():
    terms = random_terms()
    cores, UB, VA = to_core(terms)
    Bs = torch.cat([t.B for t in terms], 1).double()
    As = torch.cat([t.A for t in terms]).double()
    U_ref = torch.linalg.svd(Bs, full_matrices=False)[0]
    V_ref = torch.linalg.svd(As, full_matrices=False)[2]
    assert torch.allclose((UB.double().T @ U_ref).abs(), torch.eye(9, dtype=torch.float64), atol=1e-4)
    assert torch.allclose((VA.double() @ V_ref.T).abs(), torch.eye(9, dtype=torch.float64), atol=1e-4)
    for t, c in zip(terms, cores):
        ref = U_ref.T @ t.dense(torch.float64) @ V_ref.T
        signs_u, signs_v = torch.sign(torch.diag(UB.double().T @ U_ref)), torch.sign(torch.diag(VA.double() @ V_ref.T))
        assert torch.allclose(signs_u[:, None] * c.dense(torch.float64) * signs_v[None], ref, atol=1e-4)


# -- task arithmetic in the spaces is task arithmetic ---------------------------------------------------------
@pytest.mark.parametrize("space", ["knots", "core"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_task_arithmetic_in_aligned_space_equals_ta(tmp_path, space, dtype):
    paths = make_adapters(tmp_path, dtype)
    ta = merge(paths, "task_arithmetic", weights=WEIGHTS, progress=False)
    aligned = merge(paths, "magnitude_prune", density=1.0, weights=WEIGHTS, space=space, rank=FULL, progress=False)
    for module in MODULES:
        ref = sum(w * x for w, x in zip(WEIGHTS, dense_tvs(paths, module)))
        assert rel(aligned.delta(module), ref) < 1e-5, module
        assert rel(ta.delta(module), ref) < 1e-5, module


# -- dense references -----------------------------------------------------------------------------------------
def knots_dense(x):
    """KnOTS as its code computes it: full float64 SVD of the m×(T·n) concatenation, task blocks S·V_tᵀ."""
    T, m, n = x.shape
    U, S, Vh = torch.linalg.svd(torch.cat(list(x), dim=1), full_matrices=False)
    k = int((S > 1e-5 * S[0]).sum())
    return U[:, :k], torch.stack([S[:k, None] * Vh[:k, t * n:(t + 1) * n] for t in range(T)])


def core_dense(paths, module):
    """Core Space as its code computes it: SVDs of the stacked B's and A's, M_t = U_Bᵀ ΔW_t V_Aᵀ."""
    UB, VA = core_bases(paths, module)
    return UB, VA, torch.stack([UB.T @ x @ VA.T for x in dense_tvs(paths, module)])


def ties_blocks(trimmed, weights=None, lam=1.0):
    """TIES's elect + disjoint mean (Yadav et al.) on already trimmed blocks, sign by the (weighted) sum."""
    w = torch.ones(trimmed.shape[0], dtype=trimmed.dtype) if weights is None else torch.tensor(weights).double()
    wx = trimmed * w.reshape(-1, 1, 1)
    sign = torch.where(wx.sum(0) >= 0, 1.0, -1.0).double()  # ties elect +1 (PEFT, mergekit)
    agree = (torch.sign(wx) == sign) & (wx != 0)  # agreement of the weighted values, as the election
    return lam * (wx * agree).sum(0) / (w.abs().reshape(-1, 1, 1) * agree).sum(0).clamp(min=1e-300)


def trim(x, density):
    flat = x.reshape(x.shape[0], -1)
    k = int(density * flat.shape[1])
    thr = flat.abs().sort(dim=1, descending=True).values[:, k - 1]
    return x * (x.abs() >= thr.reshape(-1, 1, 1))


def test_knots_ties_matches_dense_reference(mixed):
    """Per-module trim. Singular vectors are unique up to the sign of each pair, which TIES does not see."""
    result = merge(mixed, "ties", density=0.3, weights=WEIGHTS, space="knots", trim_scope="module", rank=FULL,
                   progress=False, **{"lambda": 0.8})
    for module in MODULES:
        U, blocks = knots_dense(dense_tvs(mixed, module))
        assert rel(result.delta(module), U @ ties_blocks(trim(blocks, 0.3), WEIGHTS, 0.8)) < 1e-4, module


def test_knots_ties_global_trim_matches_dense_reference(mixed):
    """KnOTS's own setting: one threshold per task over all modules' blocks."""
    result = merge(mixed, "ties", density=0.3, space="knots", trim_scope="global", rank=FULL, progress=False)
    per_module = {m: knots_dense(dense_tvs(mixed, m)) for m in MODULES}
    flat = torch.cat([b.reshape(3, -1) for _, b in per_module.values()], dim=1)
    thr = flat.abs().sort(dim=1, descending=True).values[:, int(0.3 * flat.shape[1]) - 1]
    for module, (U, blocks) in per_module.items():
        ref = U @ ties_blocks(blocks * (blocks.abs() >= thr.reshape(-1, 1, 1)))
        assert rel(result.delta(module), ref) < 1e-4, module


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_knots_dare_matches_dense_reference(mixed, method):
    """DARE on the KnOTS blocks: the same seeded masks applied to the dense-SVD blocks give the same update."""
    spec = get_method(method)
    params = spec.parse_params({"drop_rate": 0.5})
    module = "model.layers.0.self_attn.q_proj"
    terms = [LoraAdapter(p).update(module) for p in mixed]
    proj = knots_space(terms)
    from dare_reference import keep_mask
    from lorafuse.merging.methods.primitives import Draws

    merged = spec.fn(proj.blocks, torch.ones(3), torch.zeros(3, 0), params, Draws((10, 11, 12)))
    U, blocks = knots_dense(dense_tvs(mixed, module))
    masks = torch.stack([keep_mask(10 + t, tuple(b.shape), 0.5).double() for t, b in enumerate(blocks)])
    dropped = blocks * masks / 0.5
    ref = ties_blocks(dropped) if method == "dare_ties" else dropped.sum(0)
    assert rel(proj.rebuild(merged).dense(), U @ ref) < 1e-4


def test_core_ties_matches_dense_reference(mixed):
    result = merge(mixed, "ties", density=0.4, space="core", rank=FULL, progress=False)
    for module in MODULES:
        UB, VA, cores = core_dense(mixed, module)
        assert rel(result.delta(module), UB @ ties_blocks(trim(cores, 0.4)) @ VA) < 1e-4, module


def test_dare_in_knots_space_is_seeded_and_bounded_by_the_joint_rank(mixed):
    a = merge(mixed, "dare_ties", drop_rate=0.5, space="knots", seed=4, rank=FULL, progress=False)
    b = merge(mixed, "dare_ties", drop_rate=0.5, space="knots", seed=4, rank=FULL, progress=False)
    c = merge(mixed, "dare_ties", drop_rate=0.5, space="knots", seed=5, rank=FULL, progress=False)
    m = "model.layers.0.self_attn.q_proj"
    assert torch.equal(a.delta(m), b.delta(m)) and not torch.equal(a.delta(m), c.delta(m))
    assert a.modules[m].rank <= 6 + 2 + 3


@pytest.mark.parametrize("space", ["knots", "core"])
def test_aligned_merge_saves_through_the_writer(mixed, tmp_path, space):
    """Default output rank (the natural one: nothing cut, ≤ Σr) and PEFT round trip of a mixed-rank aligned merge."""
    result = merge(mixed, "ties", density=0.5, space=space, progress=False)
    out = result.save(tmp_path / f"out-{space}")
    loaded = LoraAdapter(out)
    assert result.provenance["options"]["space"] == space
    assert result.provenance["options"]["trim_scope"] == {"knots": "global", "core": "module"}[space]
    assert result.provenance["retained_energy"]["min"] is None  # nothing was truncated
    for module in MODULES:
        inputs = [LoraAdapter(p) for p in mixed]
        assert result.modules[module].rank == sum(a.module_rank(module) for a in inputs if module in a.modules)
        assert rel(loaded.update(module).dense(), result.delta(module)) < 1e-5
