"""Truncation of dense merged updates: the range finder started from the inputs' row space."""

from __future__ import annotations

import torch

from lorafuse.algebra.dense import dense_truncated_svd
from lorafuse.methods.primitives import disjoint_mean, elect_sign, kth_largest, magnitude_mask


def _ties_merge(m: int = 384, n: int = 256, r: int = 8, tasks: int = 4, density: float = 0.2):
    gen = torch.Generator().manual_seed(0)
    B = [torch.randn(m, r, generator=gen) for _ in range(tasks)]
    A = [torch.randn(r, n, generator=gen) for _ in range(tasks)]
    x = torch.stack([b @ a for b, a in zip(B, A)])
    limits = torch.tensor([kth_largest(t, density) for t in x])
    trimmed = magnitude_mask(x, limits).mul_(x)
    return disjoint_mean(trimmed, elect_sign(trimmed)), torch.cat(A)


def _optimal_energy(M: torch.Tensor, k: int) -> float:
    S = torch.linalg.svdvals(M.double())
    return float((S[:k] ** 2).sum() / (S**2).sum())


def test_row_space_start_is_near_optimal_on_a_ties_merge() -> None:
    M, row_space = _ties_merge()
    best = _optimal_energy(M, 8)
    _, kept = dense_truncated_svd(M, 8, row_space=row_space)
    assert best * 0.9999 <= kept <= best * (1 + 1e-6)


def test_row_space_start_is_exact_for_an_update_in_that_space() -> None:
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(6, 200, generator=gen)
    M = torch.randn(300, 6, generator=gen) @ A
    out, kept = dense_truncated_svd(M, 6, n_iter=0, row_space=A)
    assert kept > 1 - 1e-6
    assert float((out.dense() - M).norm() / M.norm()) < 1e-5


def test_small_row_space_is_completed_with_random_columns() -> None:
    M, row_space = _ties_merge()
    out, kept = dense_truncated_svd(M, 12, row_space=row_space[:2], seed=3)  # 2 rows, 20 columns needed
    assert out.rank == 12 and 0 < kept <= _optimal_energy(M, 12) * (1 + 1e-6)


def test_exact_flag_matches_full_svd() -> None:
    M, row_space = _ties_merge(m=64, n=48)
    _, kept = dense_truncated_svd(M, 5, exact=True, row_space=row_space)
    assert abs(kept - _optimal_energy(M, 5)) < 1e-6
