"""TSV-M, Iso-C and Iso-CTS (full and core space) against dense references of their papers' definitions, written
with full torch.linalg.svd's of the dense float64 ΔW_t (keeping the non-zero spectrum, as documented)."""

from __future__ import annotations

import math

import pytest
import torch
from adapter_factory import (
    MIXED_MODULES,
    core_bases,
    dense_stack,
    mixed_adapters,
)

from lorafuse.adapters.reader import LoraAdapter
from lorafuse.errors import ConfigError
from lorafuse.merging.engine import merge
from lorafuse.merging.methods.spectral import iso_cts_sizes, nearest_orthogonal

MODULES = MIXED_MODULES
FULL = 64
WEIGHTS = [1.0, 0.6, 1.5]


make_adapters = mixed_adapters


@pytest.fixture()
def mixed(tmp_path):
    return make_adapters(tmp_path)


def dense_tvs(paths, module, weights=None):
    return dense_stack(paths, module, weights)


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def svd_nonzero(x, limit=None):
    """Dense SVD of x keeping its numerically non-zero triplets (at most `limit`)."""
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    k = int((S > 1e-6 * S[0]).sum()) if S[0] > 0 else 0
    k = k if limit is None else min(k, limit)
    return U[:, :k], S[:k], Vh[:k].T


def procrustes(M):
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def tsv_dense(x, fraction=None, alpha=1.0):
    """TSV-M (Gargiulo et al.): per task the top ⌊fraction·min(m, n)⌋ triplets, U's and V's concatenated and
    replaced by their nearest orthogonal matrices, rebuilt with the concatenated singular values."""
    T = x.shape[0]
    budget = math.floor((fraction or 1 / T) * min(x.shape[1:]))
    parts = [svd_nonzero(t, budget) for t in x if t.abs().max() > 0]
    Us, Ss, Vs = zip(*parts)
    return alpha * procrustes(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ procrustes(torch.cat(Vs, 1)).T


def iso_c_dense(x, alpha=1.0):
    """Iso-C (Marczak et al.): the SVD of the sum with every non-zero singular value set to their mean."""
    U, S, V = svd_nonzero(x.sum(0))
    return alpha * S.mean() * U @ V.T


def iso_cts_dense(x, common=0.8, alpha=1.0):
    """Iso-CTS: the sum's top k_c directions + each task's top s directions off the common left subspace,
    both sides orthogonalised, flat spectrum at the mean of the collected singular values. k_c and s as the
    authors' code sizes them, with the budget K = the sum's rank."""
    T = x.shape[0]
    U, S, V = svd_nonzero(x.sum(0))
    K = S.numel()
    kc = math.floor(common * K)
    s = round((K - kc) / T)
    kc = K - s * T
    Uc = U[:, :kc]
    parts = [(Uc, S[:kc], V[:, :kc])]
    for t in x:
        if s and t.abs().max() > 0:
            parts.append(svd_nonzero(t - Uc @ (Uc.T @ t), s))
    Us, Ss, Vs = zip(*parts)
    return alpha * torch.cat(Ss).mean() * procrustes(torch.cat(Us, 1)) @ procrustes(torch.cat(Vs, 1)).T


def core_dense(paths, module, weights):
    """Core Space: U_B, V_A from dense SVDs of the stacked (scaled) B's and A's; cores of the weighted updates."""
    UB, VA = core_bases(paths, module)
    return UB, VA, torch.stack([UB.T @ x @ VA.T for x in dense_tvs(paths, module, weights)])


# -- full space ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tsv_matches_dense_reference(tmp_path, dtype):
    paths = make_adapters(tmp_path, dtype)
    result = merge(paths, "tsv", alpha=0.9, weights=WEIGHTS, rank=FULL, progress=False)
    for module in MODULES:
        assert rel(result.delta(module), tsv_dense(dense_tvs(paths, module, WEIGHTS), alpha=0.9)) < 1e-4, module


def test_tsv_fraction_limits_the_directions_per_task(mixed):
    """fraction 1/16 of min(m, n) = 1 or 2 directions per task here, fewer than the ranks."""
    result = merge(mixed, "tsv", fraction=1 / 16, rank=FULL, progress=False)
    for module in MODULES:
        x = dense_tvs(mixed, module)
        assert rel(result.delta(module), tsv_dense(x, fraction=1 / 16)) < 1e-4, module
        budget = math.floor(min(x.shape[1:]) / 16)
        assert result.modules[module].rank == sum(min(budget, int(t.abs().max() > 0) * 6) for t in x)


def test_tsv_of_one_adapter_is_the_adapter(mixed):
    result = merge(mixed[:1], "tsv", rank=FULL, progress=False)
    for module in MODULES:
        assert rel(result.delta(module), dense_tvs(mixed[:1], module)[0]) < 1e-5


def test_iso_c_matches_dense_reference(mixed):
    result = merge(mixed, "iso_c", alpha=1.3, weights=WEIGHTS, rank=FULL, progress=False)
    for module in MODULES:
        ref = iso_c_dense(dense_tvs(mixed, module, WEIGHTS), 1.3)
        assert rel(result.delta(module), ref) < 1e-4, module
        S = torch.linalg.svdvals(result.delta(module).double())
        k = result.modules[module].rank
        assert torch.allclose(S[:k], S[:k].mean().expand(k), rtol=1e-4)  # flat spectrum


@pytest.mark.parametrize("common", [0.8, 0.5])
def test_iso_cts_matches_dense_reference(mixed, common):
    result = merge(mixed, "iso_cts", common=common, weights=WEIGHTS, rank=FULL, progress=False)
    for module in MODULES:
        ref = iso_cts_dense(dense_tvs(mixed, module, WEIGHTS), common)
        assert rel(result.delta(module), ref) < 1e-4, module


def test_iso_cts_sizes_follow_the_authors_rounding():
    assert iso_cts_sizes(10, 3, 0.8) == (7, 1)  # ⌊8⌋ common, 2 left → round(2/3) = 1 per task, common grows to 7
    assert iso_cts_sizes(64, 4, 0.8) == (52, 3)
    assert iso_cts_sizes(5, 6, 0.8) == (5, 0)  # fewer directions than tasks: all common
    assert iso_cts_sizes(4, 6, 0.1) == (4, 0)


def test_nearest_orthogonal_is_the_polar_factor():
    M = torch.randn(50, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Q = nearest_orthogonal(M).double()
    assert torch.allclose(Q, procrustes(M), atol=1e-5)
    assert torch.allclose(Q.T @ Q, torch.eye(7, dtype=torch.float64), atol=1e-5)


# -- core space ------------------------------------------------------------------------------------------------
def test_core_space_tsv_matches_dense_reference(mixed):
    """Core-Space TSV (Panariello et al.): TSV on the cores M_t with ⌊R/T⌋ directions per task, rebuilt."""
    result = merge(mixed, "tsv", space="core", weights=WEIGHTS, rank=FULL, progress=False)
    for module in MODULES:
        UB, VA, cores = core_dense(mixed, module, WEIGHTS)
        assert rel(result.delta(module), UB @ tsv_dense(cores) @ VA) < 1e-4, module


def test_core_space_tsv_equals_full_space_tsv_for_equal_ranks(tmp_path):
    """With r_t ≤ ⌊R/T⌋ both keep every direction of every task, and Procrustes commutes with the basis."""
    paths = make_adapters(tmp_path, equal_ranks=True)
    full = merge(paths, "tsv", rank=FULL, progress=False)
    core = merge(paths, "tsv", space="core", rank=FULL, progress=False)
    for module in MODULES:
        assert rel(core.delta(module), full.delta(module).double()) < 1e-5


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "task_arithmetic"])
def test_core_space_is_lossless_for_sum_based_methods(mixed, method):
    full = merge(mixed, method, weights=WEIGHTS, rank=FULL, progress=False)
    core = merge(mixed, method, weights=WEIGHTS, space="core", rank=FULL, progress=False)
    for module in MODULES:
        assert rel(core.delta(module), full.delta(module).double()) < 1e-4


def test_spectral_methods_do_not_run_in_knots_space(mixed):
    with pytest.raises(ConfigError, match="'full' or 'core'"):
        merge(mixed, "tsv", space="knots", progress=False)


def test_spectral_merge_saves_at_the_default_rank(mixed, tmp_path):
    """Without a rank nothing is cut: Iso-CTS keeps its whole budget K, the sum's numerical rank (Σr): q_proj of
    layer 0 has 6 + 2 + 3 = 11 directions; down_proj only a (r=4) and b (r=2), so K = 6 → 3 common + 1 per
    present task (c has none) = 5."""
    result = merge(mixed, "iso_cts", progress=False)
    loaded = LoraAdapter(result.save(tmp_path / "out"))
    assert result.modules["model.layers.0.self_attn.q_proj"].rank == 11
    assert result.modules["model.layers.0.mlp.down_proj"].rank == 5
    assert result.provenance["retained_energy"]["min"] is None
    assert len({loaded.module_rank(m) for m in MODULES}) == 1  # stored zero-padded to one rank
    for module in MODULES:
        assert rel(loaded.update(module).dense(), result.delta(module).double()) < 1e-5
