"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023) on LoRA updates.

For a linear layer y = W·x whose task-t inputs are the rows of X_t, RegMean picks the W that best reproduces every
task's outputs on its own inputs: argmin_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖², solved by W* = (Σ_t W_t G_t)(Σ_t G_t)⁻¹ with the
Gram matrices G_t = X_tᵀX_t (n×n, of the layer's inputs). The paper shrinks their off-diagonal part for stability:
G̃_t = α·G_t + (1−α)·diag(G_t) (α = 0.9, the reference code's `reduce_non_diagonal_ratio`).

With W_t = W_0 + ΔW_t and one shared base, W* = W_0 + (Σ_t ΔW_t G̃_t)(Σ_t G̃_t)⁻¹, so only the updates are merged, and
as factors: ΔW* = Σ_t B_t·[A_t G̃_t M⁻¹] with M = Σ_t G̃_t — rank Σr, never an m×n product (only n×n solves).
Identical Grams give the mean of the updates; one task gives its update back.

As a fusion job (`regmean_fusion`, `lorafuse regmean`, an experiment's `regmean:`): each task's Grams come from
`examples` unlabelled inputs of its own split run through that task's own model (base + its adapter: the paper's
X_t are the inputs of layer l in the fine-tuned model t), labels replaced before encoding (`fusion.without_labels`).
Only the adapted linear modules are merged (everything else is the shared base). The result is exact at rank Σr, so
the saved adapter is the evaluated update itself: nothing is cut (retained energy 1).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lorafuse.errors import ConfigError
from lorafuse.merging.algebra.lowrank import CORE_DTYPE, WORK_DTYPE, LowRank

DEFAULT_ALPHA = 0.9
PAPER = "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023"
RECORD_FILE = "regmean.json"


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
        zero = LowRank(torch.zeros(ref.shape[0], 0), torch.zeros(0, ref.shape[1]))  # rank 0: the result stays Σr
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


# -- the fusion job ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegMeanSettings:
    """`alpha`: the off-diagonal shrinkage (the paper's 0.9); `examples`: unlabelled inputs per task from `split`
    (a few hundred suffice: the Gram is an n×n average); `batch_size`: rows per forward pass."""

    alpha: float = DEFAULT_ALPHA
    examples: int = 256
    split: str = "train"
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or self.examples < 1 or self.batch_size < 1:
            raise ConfigError(f"regmean settings: alpha in [0, 1], examples ≥ 1 and batch_size ≥ 1 (got {self})")


def predicted_inputs(formulation: Any, batch: Any) -> dict[str, Any]:
    """A batch's model inputs as prediction feeds them: chat's left-padded rows get their true positions and only
    the last position's logits (the layers see what they see when the label is scored)."""
    if formulation.name != "chat":
        return dict(batch.inputs)
    inputs = {k: batch.inputs[k] for k in ("input_ids", "attention_mask")}
    return {**inputs, "position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0), "logits_to_keep": 1}


def task_grams(evaluator: Any, adapter: str | Path, task: Any, examples: Sequence[Any], modules: Iterable[str],
               batch_size: int = 32) -> dict[str, torch.Tensor]:
    """The Gram of each module's input over a task's unlabelled examples, in that task's own model (the
    Evaluator's base with the adapter's exact update applied, undone afterwards)."""
    from lorafuse.fusion import input_batches
    from lorafuse.model.apply import applied
    from lorafuse.model.evaluation import adapter_updates

    updates, fan_in_fan_out = adapter_updates(adapter)
    batches = [predicted_inputs(evaluator.formulation, b)
               for b in input_batches(evaluator.formulation, task, examples, batch_size)]
    with applied(evaluator.model, updates, fan_in_fan_out, evaluator.masters):
        return gram_matrices(evaluator.model, batches, modules)


def regmean_fusion(evaluator: Any, adapters: Sequence[str | Path], tasks: Sequence[str],
                   inputs: Mapping[str, Sequence[Any]], settings: RegMeanSettings = RegMeanSettings()
                   ) -> tuple[dict[str, LowRank], dict[str, Any]]:
    """RegMean of `adapters` (adapter i trained on `tasks[i]`) from each task's unlabelled `inputs`, on an
    Evaluator's loaded model (left as it was). Returns the merged updates and the record of what it saw and took."""
    from lorafuse.model.evaluation import adapter_updates
    from lorafuse.tasks import get_task

    settings.check()
    if len(adapters) != len(tasks):
        raise ConfigError(f"regmean: {len(adapters)} adapters for {len(tasks)} tasks (one task per adapter)")
    start = time.perf_counter()
    updates = [adapter_updates(a)[0] for a in adapters]
    modules = sorted({m for u in updates for m in u})
    grams = [task_grams(evaluator, a, get_task(t), inputs[t], modules, settings.batch_size)
             for a, t in zip(adapters, tasks)]
    merged = regmean_updates(updates, grams, settings.alpha)
    seconds = time.perf_counter() - start
    record = {"tasks": list(tasks), "settings": asdict(settings), "paper": PAPER, "seconds": round(seconds, 3),
              "data": {"split": settings.split, "examples_per_task": {t: len(inputs[t]) for t in tasks},
                       "labels": "none"},
              "exact": True, "retained_energy": 1.0}
    return merged, record


def save_regmean(updates: Mapping[str, LowRank], record: Mapping[str, Any], adapters: Sequence[str | Path],
                 out: str | Path, overwrite: bool = False, modules_to_save: str = "auto") -> Path:
    """The merged adapter in PEFT's format (exact, rank Σr a module), its record in regmean.json."""
    from lorafuse.fusion import save_fused_updates

    method = {"name": "regmean", "paper": PAPER, "exact": True}
    return save_fused_updates(adapters, record["tasks"], updates, out, method, record, RECORD_FILE, overwrite,
                              modules_to_save)


def experiment_job(runner: Any) -> dict[str, Any]:
    """RegMean inside an experiment: each task's Grams from `examples` unlabelled inputs of its `split` (fp32 model),
    the merge evaluated on test; once per seed (the sample depends on it): `test` the mean over seeds."""
    from lorafuse.fusion import data_record, job_seeds, sample_examples
    from lorafuse.stats import over_seeds
    from lorafuse.tasks import get_task

    cfg = runner.config.regmean
    tasks = list(runner.state.adapters)
    paths = [runner.state.adapters[t] for t in tasks]
    model_ev, test_ev, heads = runner.fp32_evaluator("validation"), runner.evaluator("test"), runner.own_heads()
    runs, seconds, out, seen = [], 0.0, None, {}
    for seed in job_seeds(runner, cfg):
        settings = RegMeanSettings(cfg.alpha, cfg.examples, cfg.split, cfg.batch_size, seed)
        inputs = {t: sample_examples(get_task(t), cfg.split, runner.config.data_dir, cfg.examples, seed)
                  for t in tasks}
        merged, record = regmean_fusion(model_ev, paths, tasks, inputs, settings)
        seconds, seen = seconds + record["seconds"], record["data"]["examples_per_task"]
        result = test_ev.evaluate(merged, heads=heads).normalize(runner.state.reference["test"])
        runs.append((seed, result.to_dict()))
        if out is None:  # the first seed's adapter is the one saved (as for the static methods)
            out = save_regmean(merged, record, paths, runner.out / "fused" / "regmean", overwrite=True,
                               modules_to_save="per_task")
    data = data_record(cfg.split, seen, "none", len(runs), seconds)
    return {"name": "regmean", "kind": "data-driven", "method": "regmean",
            "params": {"alpha": cfg.alpha, "examples": cfg.examples, "split": cfg.split}, **over_seeds(runs),
            "fused_dir": str(out), "saved_adapter": {"exact": True, "retained_energy": 1.0},
            "search_seconds": round(seconds, 2), "data": data,
            "cost": {"gram_seconds": round(seconds, 2), "seeds": len(runs), "inference": "one merged adapter"}}
