"""Dense fallbacks for element-wise methods: a module's merged update is a full m×n matrix that must come back
to rank k. Randomized SVD (Halko et al. 2011) with power iterations is the default; exact SVD on request."""

from __future__ import annotations

import torch

from lorafuse.algebra.lowrank import FactorSVD, LowRank


def dense_truncated_svd(
    M: torch.Tensor, rank: int, exact: bool = False, oversample: int = 8, n_iter: int = 4, seed: int = 0
) -> tuple[LowRank, float]:
    """Rank-`rank` approximation of a dense update and the fraction of its squared Frobenius norm kept."""
    M = M.to(torch.float32)
    rank = max(1, min(rank, *M.shape))
    total = float(torch.linalg.vector_norm(M)) ** 2  # float32 cascade sum: no float64 copy of M
    if exact or rank + oversample >= min(M.shape):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    else:
        U, S, Vh = _randomized_svd(M, rank + oversample, n_iter, seed)
    svd = FactorSVD(U[:, :rank], S[:rank].double(), Vh[:rank])
    kept = float((svd.S**2).sum())
    return svd.lowrank(rank), 1.0 if total == 0.0 else min(1.0, kept / total)


def _randomized_svd(M: torch.Tensor, k: int, n_iter: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Range finder with QR-stabilised power iterations, then an SVD of the small k×n projection."""
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(M.shape[1], k, generator=gen, dtype=M.dtype)
    Q, _ = torch.linalg.qr(M @ omega)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(M.T @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    Uh, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ Uh, S, Vh
