"""LoraHub (Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition", COLM 2024):
one weight per adapter for a target task, found without gradients on a few labelled examples.

Objective: the few-shot cross-entropy + 0.05·mean|w|, w ∈ [-1.5, 1.5]^N, start 0, nevergrad NGOpt, budget 40 (the
paper's defaults). Composition as in the paper, Â = Σ w_i A_i and B̂ = Σ w_i s_i B_i (cross terms included; needs
equal ranks), or, with `composition="updates"`, the exact Σ w_i ΔW_i. Everything that does not depend on the
weights — the base model, the tokenized examples, every adapter's factors — is prepared once; a candidate costs
one composition and one forward pass over the few examples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from lorafuse.adapters.reader import LoraAdapter
from lorafuse.algebra.lowrank import LowRank, stack_lowrank
from lorafuse.errors import ConfigError
from lorafuse.methods.registry import MethodParams, register


@dataclass(frozen=True)
class LoraHubSettings:
    budget: int = 40
    optimizer: str = "NGOpt"
    bound: float = 1.5
    l1: float = 0.05
    composition: Literal["factors", "updates"] = "factors"
    seed: int = 0


@dataclass
class LoraHubResult:
    weights: list[float]
    loss: float
    trace: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class _NoParams(MethodParams):
    pass


@register(
    "lorahub_factors", kind="module", params=_NoParams, exact=True,
    summary="LoraHub's composition Â = Σ w_i A_i, B̂ = Σ w_i s_i B_i (cross terms included; equal ranks)",
    paper="Huang et al., LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition, COLM 2024",
)
def compose_factors(terms: Sequence[LowRank], weights: Sequence[float], params: _NoParams) -> LowRank:
    present = [(t, w) for t, w in zip(terms, weights) if t.rank > 0]
    ranks = {t.rank for t, _ in present}
    if len(ranks) != 1:
        raise ConfigError(f"LoraHub's factor composition needs equal ranks (got {sorted(ranks)}); use "
                          "composition 'updates' (the exact weighted sum)")
    B = sum(w * t.B.float() for t, w in present)
    A = sum(w * t.A.float() for t, w in present)
    return LowRank(B, A)


def compose(factors: dict[str, list[LowRank]], weights: Sequence[float], composition: str) -> dict[str, LowRank]:
    """The composed update of every module for one candidate."""
    if composition == "updates":
        return {m: stack_lowrank(terms, weights) for m, terms in factors.items()}
    return {m: compose_factors(terms, weights, _NoParams()) for m, terms in factors.items()}


def load_factors(adapters: Sequence[str | Path]) -> tuple[dict[str, list[LowRank]], bool]:
    """Every module's factors of every adapter, read once (a missing module is a rank-0 zero)."""
    loaded = [LoraAdapter(a) for a in adapters]
    modules = sorted({m for a in loaded for m in a.modules})
    shapes = {m: next(a.module_shape(m) for a in loaded if m in a.modules) for m in modules}
    factors = {m: [a.update(m) if m in a.modules else LowRank(torch.zeros(shapes[m][0], 0),
                                                               torch.zeros(0, shapes[m][1])) for a in loaded]
               for m in modules}
    return factors, loaded[0].settings.fan_in_fan_out


def search(objective: Any, n: int, settings: LoraHubSettings) -> LoraHubResult:
    """Minimise objective(w) + l1·mean|w| over the box with nevergrad; returns the recommendation and trace."""
    import nevergrad as ng

    if settings.optimizer not in ng.optimizers.registry:
        from lorafuse.errors import did_you_mean

        raise ConfigError(f"unknown optimizer '{settings.optimizer}'{did_you_mean(settings.optimizer, ng.optimizers.registry)}")
    param = ng.p.Array(init=np.zeros(n)).set_bounds(-settings.bound, settings.bound)
    param.random_state = np.random.RandomState(settings.seed)
    opt = ng.optimizers.registry[settings.optimizer](parametrization=param, budget=settings.budget)
    trace = []
    start = time.perf_counter()
    for step in range(settings.budget):
        cand = opt.ask()
        w = [float(x) for x in cand.value]
        loss = float(objective(w))
        total = loss + settings.l1 * float(np.mean(np.abs(w)))
        opt.tell(cand, total)
        trace.append({"step": step, "weights": w, "loss": loss, "objective": total})
    best = [float(x) for x in opt.provide_recommendation().value]
    return LoraHubResult(best, float(objective(best)), trace, time.perf_counter() - start)


class FewShotObjective:
    """The few-shot loss of a composed adapter on a loaded model; the examples are tokenized once."""

    def __init__(self, model: Any, formulation: Any, task: Any, examples: Sequence[Any],
                 factors: dict[str, list[LowRank]], composition: str, fan_in_fan_out: bool = False,
                 head: dict[str, torch.Tensor] | None = None) -> None:
        rows = formulation.encode(task, examples)
        collate = formulation.collate
        self.batch = collate(rows, with_answer=True) if formulation.name == "chat" else collate(rows)
        self.model, self.formulation, self.task = model, formulation, task
        self.factors, self.composition, self.fan_in_fan_out, self.head = factors, composition, fan_in_fan_out, head

    def __call__(self, weights: Sequence[float]) -> float:
        from lorafuse.evaluation import applied, head_loaded

        updates = compose(self.factors, weights, self.composition)
        with applied(self.model, updates, self.fan_in_fan_out), head_loaded(self.model, self.head), \
                torch.no_grad():
            return float(self.formulation.loss(self.model, self.batch, self.task))


def lorahub(evaluator: Any, adapters: Sequence[str | Path], task: str, examples: Sequence[Any],
            settings: LoraHubSettings = LoraHubSettings(), head: dict[str, torch.Tensor] | None = None
            ) -> tuple[LoraHubResult, dict[str, LowRank]]:
    """Learn LoraHub weights for `task` from `examples` on an Evaluator's loaded model; returns the result and
    the composed updates (ready to evaluate or to save)."""
    from lorafuse.tasks import get_task

    factors, fan_in = load_factors(adapters)
    objective = FewShotObjective(evaluator.model, evaluator.formulation, get_task(task), examples, factors,
                                 settings.composition, fan_in, head)
    result = search(objective, len(adapters), settings)
    return result, compose(factors, result.weights, settings.composition)


def experiment_job(runner: Any, shots: int) -> dict[str, Any]:
    """LoraHub per task on a `shots`-example sample of its validation split; each task's test accuracy with its
    own learned weights (and its own head, in the classify formulation)."""
    import random

    from lorafuse.tasks import get_task

    cfg = runner.config.lorahub
    settings = LoraHubSettings(budget=cfg.budget, seed=cfg.seed)
    tasks = list(runner.state.adapters)
    paths = [runner.state.adapters[t] for t in tasks]
    heads = runner.own_heads()
    test_ev = runner.evaluator("test")
    accuracy, weights, seconds = {}, {}, 0.0
    for task in tasks:
        pool = get_task(task).load("validation", runner.config.data_dir)
        sample = random.Random(f"{cfg.seed}-{task}").sample(pool, min(shots, len(pool)))
        result, updates = lorahub(test_ev, paths, task, sample, settings, heads.get(task))
        seconds += result.seconds
        accuracy[task] = test_ev.subset([task]).evaluate(updates, heads=heads).accuracy[task]
        weights[task] = dict(zip(tasks, result.weights))
    ref = runner.state.reference["test"]
    normalized = {t: 100.0 * a / ref[t] for t, a in accuracy.items() if ref.get(t)}
    test = {"accuracy": accuracy, "normalized": normalized, "average": sum(accuracy.values()) / len(accuracy),
            "normalized_average": sum(normalized.values()) / len(normalized)}
    return {"name": f"lorahub ({shots}-shot)", "kind": "data-driven", "method": "lorahub", "params": {"shots": shots},
            "weights": weights, "test": test, "search_seconds": round(seconds, 2),
            "cost": {"search_seconds": round(seconds, 2), "candidates_per_task": settings.budget,
                     "inference": "one merged adapter per task"}}
