"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023) on LoRA updates.

For a linear layer y = W·x whose task-t inputs are the rows of X_t, RegMean picks the W that best reproduces every
task's outputs on its own inputs: argmin_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖², solved by W* = (Σ_t W_t G_t)(Σ_t G_t)⁻¹ with the
Gram matrices G_t = X_tᵀX_t (n×n, of the layer's inputs). The paper shrinks their off-diagonal part for stability:
G̃_t = α·G_t + (1−α)·diag(G_t) (α = 0.9, the reference code's `reduce_non_diagonal_ratio`).

With W_t = W_0 + ΔW_t and one shared base, W* = W_0 + (Σ_t ΔW_t G̃_t)(Σ_t G̃_t)⁻¹, so only the updates are merged, and
as factors: ΔW* = Σ_t B_t·[A_t G̃_t M⁻¹] with M = Σ_t G̃_t — rank Σr, never an m×n product (only n×n solves).
Identical Grams give the mean of the updates; one task gives its update back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lorafuse.errors import ConfigError
from lorafuse.merging.algebra.lowrank import CORE_DTYPE, WORK_DTYPE, LowRank

DEFAULT_ALPHA = 0.9


def shrink(gram: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """G̃ = α·G + (1−α)·diag(G)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"regmean: alpha {alpha} is not in [0, 1]")
    g = gram.to(CORE_DTYPE)
    return alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))


def regmean(updates: Sequence[LowRank], grams: Sequence[torch.Tensor], alpha: float = DEFAULT_ALPHA) -> LowRank:
    """One module's RegMean update (Σ_t ΔW_t G̃_t)(Σ_t G̃_t)⁻¹ from each task's ΔW_t (out×in) and the Gram G_t (in×in)
    of that task's inputs to the layer, as the exact rank-Σr factorisation [B_1 … B_T]·[A_1G̃_1M⁻¹; …]."""
    if not updates or len(updates) != len(grams):
        raise ConfigError(f"regmean: {len(updates)} updates for {len(grams)} Gram matrices")
    n = updates[0].shape[1]
    for u, g in zip(updates, grams):
        if u.shape[1] != n or u.shape[0] != updates[0].shape[0] or tuple(g.shape) != (n, n):
            raise ConfigError(f"regmean: update {tuple(u.shape)} and Gram {tuple(g.shape)} do not fit")
    shrunk = [shrink(g, alpha) for g in grams]
    total = sum(shrunk)
    # A_t G̃_t M⁻¹ = (M⁻¹ G̃_t A_tᵀ)ᵀ (M, G̃_t symmetric); lstsq-free: M is PD whenever some input reached every
    # coordinate; a tiny ridge keeps coordinates no task's input touched (zero rows and columns) solvable.
    ridge = 1e-12 * float(torch.diagonal(total).abs().max().clamp(min=1e-300))
    total = total + ridge * torch.eye(n, dtype=CORE_DTYPE, device=total.device)
    rhs = torch.cat([g @ u.A.to(device=g.device, dtype=CORE_DTYPE).T for u, g in zip(updates, shrunk)], dim=1)
    A = torch.linalg.solve(total, rhs).T
    B = torch.cat([u.B.to(WORK_DTYPE) for u in updates], dim=1)
    return LowRank(B, A.to(device=B.device, dtype=WORK_DTYPE))


def regmean_updates(updates: Sequence[Mapping[str, LowRank]], grams: Sequence[Mapping[str, torch.Tensor]],
                    alpha: float = DEFAULT_ALPHA) -> dict[str, LowRank]:
    """RegMean per module over T tasks' updates; a module some task does not adapt counts as ΔW_t = 0 there (its
    inputs still enter M, as in the paper where every model has every layer)."""
    if len(updates) != len(grams):
        raise ConfigError(f"regmean: {len(updates)} tasks' updates for {len(grams)} tasks' Gram matrices")
    merged = {}
    for module in sorted({m for u in updates for m in u}):
        if any(module not in g for g in grams):
            raise ConfigError(f"regmean: no Gram matrix of module '{module}' for some task")
        ref = next(u[module] for u in updates if module in u)
        zero = LowRank(torch.zeros(ref.shape[0], 1), torch.zeros(1, ref.shape[1]))  # rank 1, the right shape
        terms = [u.get(module, zero) for u in updates]
        merged[module] = regmean(terms, [g[module] for g in grams], alpha)
    return merged


def gram_matrices(model: Any, batches: Iterable[Any], modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """Σ XᵀX of each named module's input (float64, on the host) over `batches` (objects with `.inputs`, or input
    mappings), run through `model` as it is (the base model: no adapter applied). Padding positions are left out
    wherever the input has the attention mask's [batch, length] leading shape."""
    from lorafuse.model.apply import _submodule
    from lorafuse.model.formulations import on_model_device

    names = list(modules)
    grams: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"mask": None}

    def hook_for(name: str) -> Any:
        def hook(layer: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = state["mask"]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(x.device)]
            x = x.reshape(-1, x.shape[-1]).to(CORE_DTYPE)
            g = (x.T @ x).cpu()
            grams[name] = g if name not in grams else grams[name] + g
        return hook

    handles = [_submodule(model, n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = dict(getattr(batch, "inputs", batch))
                mask = inputs.get("attention_mask")
                state["mask"] = None if mask is None else mask.bool()
                model(**on_model_device(model, inputs))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in grams]
    if missing:
        raise ConfigError(f"regmean: no input reached module(s) {', '.join(missing)}")
    return grams
