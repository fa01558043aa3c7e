"""LoraHub (Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition", COLM 2024):
one weight per adapter for a target task, found without gradients on a few labelled examples.

Objective: the few-shot cross-entropy + 0.05·mean|w|, w ∈ [-1.5, 1.5]^N, start 0, nevergrad NGOpt, budget 40 (the
paper's defaults, all settable). The cross-entropy is the formulation's training loss: classify's head, and for chat
the verbalizer loss over the label words' deciding tokens (a deviation: the paper scores every answer token, which
`chat_loss="generative"` gives). Two compositions:

- `factors` (the paper's): Â = Σ w_i A_i, B̂ = Σ w_i s_i B_i, cross terms w_i w_j s_j B_j A_i included; needs equal
  ranks per module. Each adapter's scale s_i = alpha_i/r_i (rsLoRA and rank_pattern included) is folded into its
  B before the sum, so adapters trained with equal alpha/r give exactly the paper's s·B̂Â and adapters with
  different scales keep their own.
- `updates`: the exact Σ w_i s_i B_i A_i, held at rank Σr as B = [w_1 s_1 B_1 … w_N s_N B_N], A = [A_1; …; A_N];
  only B depends on the weights.

Per candidate the cost is one forward pass over the few examples: the base model is loaded, wrapped with PEFT LoRA
layers (scaling 1) and the examples tokenized once; every adapter's factors are read once and stacked; a candidate
writes its composed factors into the existing LoRA parameters in place (`param.data.copy_`).

In the classify formulation the target task's classification head must be supplied (its own adapter's
modules_to_save): LoraHub composes LoRA updates, and a new task's label head cannot come from them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lorafuse.adapters.reader import LoraAdapter
from lorafuse.atomic import atomic_output_dir
from lorafuse.errors import AdapterError, ConfigError, did_you_mean
from lorafuse.fusion import loss_batches
from lorafuse.merging.algebra.lowrank import LowRank, stack_lowrank
from lorafuse.merging.methods.registry import MethodParams, register

PAPER = "Huang et al., LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition, COLM 2024"
SLOT_ADAPTER = "lorafuse_lorahub"
TRACE_FILE = "lorahub.json"
COMPOSITIONS = ("factors", "updates")


@dataclass(frozen=True)
class LoraHubSettings:
    """The search; defaults are the paper's."""

    budget: int = 40
    optimizer: str = "NGOpt"
    bound: float = 1.5
    l1: float = 0.05
    composition: Literal["factors", "updates"] = "factors"
    seed: int = 0

    def check(self) -> None:
        import nevergrad as ng

        if self.composition not in COMPOSITIONS:
            raise ConfigError(f"composition '{self.composition}'{did_you_mean(self.composition, COMPOSITIONS)}")
        if self.optimizer not in ng.optimizers.registry:
            raise ConfigError(f"unknown nevergrad optimizer '{self.optimizer}'"
                              f"{did_you_mean(self.optimizer, ng.optimizers.registry)}")
        if self.budget < 1 or self.bound <= 0 or self.l1 < 0:
            raise ConfigError(f"LoraHub settings: budget ≥ 1, bound > 0 and l1 ≥ 0 (got {self})")


@dataclass
class LoraHubResult:
    """The recommended weights, their few-shot loss (without the L1 term) and every candidate tried."""

    weights: list[float]
    loss: float
    trace: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)
    settings: LoraHubSettings = field(default_factory=LoraHubSettings)

    def problems(self) -> list[str]:
        """Why the result may be no composition at all: every weight zero (the base model), or a few-shot loss
        that did not change across the candidates (the search had nothing to go on)."""
        out = []
        losses = [s["loss"] for s in self.trace]
        if len(losses) > 1 and max(losses) - min(losses) <= 1e-9 * max(1.0, abs(losses[0])):
            out.append(f"the few-shot loss was {losses[0]:.6g} for all {len(losses)} candidates: the search could "
                       "not tell them apart (too few or too easy examples, or weights that do not reach the model)")
        if all(abs(w) < 1e-6 for w in self.weights):
            out.append("every weight is 0: the result is the base model without any adapter")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(zip(self.names, self.weights)) if self.names else self.weights,
                "few_shot_loss": self.loss, "search_seconds": round(self.seconds, 3),
                "settings": asdict(self.settings), "paper": PAPER, "problems": self.problems(), "trace": self.trace}


# -- composition ---------------------------------------------------------------------------------------------
class _NoParams(MethodParams):
    pass


@register(
    "lorahub_factors", kind="module", params=_NoParams, exact=True,
    summary="LoraHub's composition Â = Σ w_i A_i, B̂ = Σ w_i s_i B_i (cross terms included; equal ranks)",
    paper=PAPER,
)
def compose_factors(terms: Sequence[LowRank], weights: Sequence[float], params: _NoParams) -> LowRank:
    present = [(t, w) for t, w in zip(terms, weights) if t.rank > 0]
    ranks = sorted({t.rank for t, _ in present})
    if len(ranks) != 1:
        raise ConfigError(f"LoraHub's factor composition needs equal ranks (got {ranks}); use composition "
                          "'updates' (the exact weighted sum)")
    B = sum(w * t.B.float() for t, w in present)
    A = sum(w * t.A.float() for t, w in present)
    return LowRank(B, A)


def compose(factors: Mapping[str, Sequence[LowRank]], weights: Sequence[float], composition: str
            ) -> dict[str, LowRank]:
    """The composed update of every module for one weight vector."""
    if composition == "updates":
        return {m: stack_lowrank(terms, weights) for m, terms in factors.items()}
    return {m: compose_factors(terms, weights, _NoParams()) for m, terms in factors.items()}


def load_factors(adapters: Sequence[str | Path]) -> tuple[dict[str, list[LowRank]], bool]:
    """Every module's factors of every adapter (scale folded into B), read once; a missing module is rank 0."""
    loaded = [LoraAdapter(a) for a in adapters]
    if not loaded:
        raise ConfigError("LoraHub needs at least one adapter")
    modules = sorted({m for a in loaded for m in a.modules})
    shapes = {m: next(a.module_shape(m) for a in loaded if m in a.modules) for m in modules}
    factors = {m: [a.update(m) if m in a.modules else
                   LowRank(torch.zeros(shapes[m][0], 0), torch.zeros(0, shapes[m][1])) for a in loaded]
               for m in modules}
    embeddings = [f"{a.path}: {m}" for a in loaded for m, e in a.modules.items() if e.embedding]
    if embeddings:
        raise AdapterError(f"LoraHub composes linear LoRA layers only; embedding LoRA in {embeddings[0]}")
    return factors, loaded[0].settings.fan_in_fan_out


# -- LoRA slots in the loaded model -----------------------------------------------------------------------------
class _Slot:
    """One module's stacked factors and the LoRA parameters that receive a candidate's composition."""

    def __init__(self, terms: Sequence[LowRank], composition: str) -> None:
        self.composition = composition
        if composition == "factors":
            compose_factors(terms, [1.0] * len(terms), _NoParams())  # the equal-rank check
            r = max(t.rank for t in terms)
            out, inp = terms[0].shape
            self.A = torch.stack([t.A.float() if t.rank else torch.zeros(r, inp) for t in terms])  # T×r×in
            self.B = torch.stack([t.B.float() if t.rank else torch.zeros(out, r) for t in terms])  # T×out×r
            self.rank = r
        else:
            self.A = torch.cat([t.A.float() for t in terms])  # Σr×in, fixed
            self.B = torch.cat([t.B.float() for t in terms], dim=1)  # out×Σr, scaled per column
            self.columns = torch.repeat_interleave(torch.arange(len(terms)), torch.tensor([t.rank for t in terms]))
            self.rank = self.A.shape[0]
        self.lora_A: torch.nn.Parameter | None = None
        self.lora_B: torch.nn.Parameter | None = None

    def bind(self, layer: Any) -> None:
        # fp32 slots on a bf16 model too: PEFT then runs the LoRA path in fp32 and rounds only its output, and a
        # candidate's small weights are not lost to bf16's 8-bit mantissa
        layer.lora_A[SLOT_ADAPTER].float()
        layer.lora_B[SLOT_ADAPTER].float()
        self.lora_A, self.lora_B = layer.lora_A[SLOT_ADAPTER].weight, layer.lora_B[SLOT_ADAPTER].weight
        device = self.lora_A.device  # compose where the model lives (no host round trip per candidate)
        self.A, self.B = self.A.to(device), self.B.to(device)
        if self.composition == "updates":
            self.columns = self.columns.to(device)
            self.lora_A.data.copy_(self.A)

    def write(self, w: torch.Tensor) -> None:
        if self.lora_A is None or self.lora_B is None:
            raise RuntimeError("slot written before it was bound to a LoRA layer")
        if self.composition == "factors":
            self.lora_A.data.copy_(torch.einsum("t,tri->ri", w, self.A))
            self.lora_B.data.copy_(torch.einsum("t,tor->or", w, self.B))
        else:
            self.lora_B.data.copy_(self.B * w[self.columns])


class LoraSlots:
    """PEFT LoRA layers (scaling 1) injected once into a loaded model for every module of the adapters; `write`
    puts a candidate's composition into them in place; `remove` restores the model's original modules."""

    def __init__(self, model: torch.nn.Module, factors: Mapping[str, Sequence[LowRank]], composition: str) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        from lorafuse.model.apply import _submodule

        self.model = model
        self.slots = {m: _Slot(terms, composition) for m, terms in factors.items()}
        names = {id(mod): name for name, mod in model.named_modules()}
        self.targets = {names[id(_submodule(model, m))]: m for m in factors}
        ranks = {name: self.slots[m].rank for name, m in self.targets.items()}
        config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), lora_dropout=0.0,
                            target_modules=sorted(ranks), rank_pattern={re.escape(k): v for k, v in ranks.items()},
                            alpha_pattern={re.escape(k): v for k, v in ranks.items()}, init_lora_weights=False)
        self.had_config = hasattr(model, "peft_config")
        inject_adapter_in_model(config, model, adapter_name=SLOT_ADAPTER)
        for name, module in self.targets.items():
            self.slots[module].bind(model.get_submodule(name))

    def write(self, weights: Sequence[float]) -> None:
        w = torch.tensor(weights, dtype=torch.float32)
        on: dict[torch.device, torch.Tensor] = {}
        for slot in self.slots.values():
            slot.write(on.setdefault(slot.A.device, w.to(slot.A.device)))

    def remove(self) -> None:
        """Put every wrapped module's original layer back (no merge: the base weights were never touched)."""
        for name in self.targets:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, getattr(parent, child).get_base_layer())
        if not self.had_config and hasattr(self.model, "peft_config"):
            del self.model.peft_config


@contextmanager
def lora_slots(model: torch.nn.Module, factors: Mapping[str, Sequence[LowRank]], composition: str
               ) -> Iterator[LoraSlots]:
    slots = LoraSlots(model, factors, composition)
    try:
        yield slots
    finally:
        slots.remove()


# -- the objective and the search ----------------------------------------------------------------------------
class FewShotObjective:
    """The few-shot loss of a composition on a loaded model: examples tokenized once, factors written into the
    PEFT slots in place per call. Use as a context manager (the slots exist only inside it)."""

    def __init__(self, model: Any, formulation: Any, task: Any, examples: Sequence[Any],
                 factors: Mapping[str, Sequence[LowRank]], composition: str,
                 head: Mapping[str, torch.Tensor] | None = None) -> None:
        if formulation.name == "classify" and not head:
            raise ConfigError(f"task '{task.name}': the classify formulation needs the target task's classification "
                              "head (the modules_to_save of an adapter trained on it: --head ADAPTER)")
        if not examples:
            raise ConfigError(f"task '{task.name}': LoraHub needs at least one labelled example")
        self.batch = loss_batches(formulation, task, examples)[0]
        self.model, self.formulation, self.task, self.head = model, formulation, task, head
        self.factors, self.composition = factors, composition
        self._slots: LoraSlots | None = None
        self._stack: Any = None

    def __enter__(self) -> FewShotObjective:
        from contextlib import ExitStack

        from lorafuse.model.apply import head_loaded

        self._stack = ExitStack()
        self._slots = self._stack.enter_context(lora_slots(self.model, self.factors, self.composition))
        self._stack.enter_context(head_loaded(self.model, self.head))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self._slots = None

    def __call__(self, weights: Sequence[float]) -> float:
        if self._slots is None:
            raise RuntimeError("FewShotObjective is called inside `with objective:` (its LoRA slots live there)")
        self._slots.write(weights)
        with torch.no_grad():
            return float(self.formulation.loss(self.model, self.batch, self.task))


def search(objective: Any, n: int, settings: LoraHubSettings) -> LoraHubResult:
    """Minimise objective(w) + l1·mean|w| over [-bound, bound]^n from w = 0 with a nevergrad optimizer."""
    import warnings

    import nevergrad as ng

    settings.check()
    param = ng.p.Array(init=np.zeros(n)).set_bounds(-settings.bound, settings.bound)
    param.random_state = np.random.RandomState(settings.seed)
    opt = ng.optimizers.registry[settings.optimizer](parametrization=param, budget=settings.budget)
    trace = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        # NGOpt's COBYLA stage (scipy) warns about its own trust-region radius and evaluation budget at every call
        # on a small budget: its settings, not the user's (the budget they gave is the one spent)
        warnings.filterwarnings("ignore", message=".*COBYLA: Invalid (RHOEND|MAXFUN).*")
        for step in range(settings.budget):
            cand = opt.ask()
            w = [float(x) for x in cand.value]
            loss = float(objective(w))
            total = loss + settings.l1 * float(np.mean(np.abs(w)))
            opt.tell(cand, total)
            trace.append({"step": step, "weights": w, "loss": loss, "objective": total})
        best = [float(x) for x in opt.provide_recommendation().value]
    loss = next((s["loss"] for s in trace if s["weights"] == best), None)
    loss = float(objective(best)) if loss is None else loss
    return LoraHubResult(best, loss, trace, time.perf_counter() - start, settings=settings)


def lorahub(evaluator: Any, adapters: Sequence[str | Path], task: str, examples: Sequence[Any],
            settings: LoraHubSettings = LoraHubSettings(), head: Mapping[str, torch.Tensor] | None = None
            ) -> tuple[LoraHubResult, dict[str, LowRank]]:
    """LoraHub weights for `task` from labelled `examples`, on an Evaluator's loaded model (its model and
    formulation are reused; the model is left as it was). Returns the result and the composed updates."""
    from lorafuse.tasks import get_task

    settings.check()
    factors, _ = load_factors(adapters)
    objective = FewShotObjective(evaluator.model, evaluator.formulation, get_task(task), examples, factors,
                                 settings.composition, head)
    with objective:
        result = search(objective, len(adapters), settings)
    result.names = [LoraAdapter(a).name for a in adapters]
    return result, compose(factors, result.weights, settings.composition)


def save_lorahub(result: LoraHubResult, adapters: Sequence[str | Path], out: str | Path, task: str,
                 head: Mapping[str, torch.Tensor] | None = None, overwrite: bool = False) -> Path:
    """The composed adapter in PEFT's format through the merge engine (provenance recorded), with the target
    task's head in task_heads/ and the weights and search trace in lorahub.json."""
    from lorafuse.merging.engine import merge

    method = "lorahub_factors" if result.settings.composition == "factors" else "linear"
    fused = merge(adapters, method, weights=result.weights, modules_to_save="drop", progress=False)
    fused.provenance["lorahub"] = {"task": task, **{k: v for k, v in result.to_dict().items() if k != "trace"}}
    if head:
        fused.heads = {task: dict(head)}
    with atomic_output_dir(out, overwrite, kind="adapter") as tmp:  # the trace is part of the output
        fused.write_files(tmp)
        (tmp / TRACE_FILE).write_text(json.dumps({"task": task, **result.to_dict()}, indent=2) + "\n")
    return Path(out)


def experiment_job(runner: Any, shots: int) -> dict[str, Any]:
    """LoraHub per task on a `shots`-example sample of its validation split; each task's test accuracy with its
    own learned weights (and its own head, in the classify formulation). Runs once per seed of the experiment
    (the sample and the search both depend on it): `test` is the mean over seeds, `seed_runs` each seed's."""
    from lorafuse.fusion import data_record
    from lorafuse.stats import over_seeds

    runs, weights, seconds, problems, seen = [], {}, 0.0, [], {}
    for seed in runner.seeds(runner.config.lorahub.seed):
        test, weights[seed], spent, found, seen = _experiment_run(runner, shots, seed)
        runs.append((seed, test))
        seconds += spent
        problems += found
    settings = LoraHubSettings(budget=runner.config.lorahub.budget)
    return {"name": f"lorahub ({shots}-shot)", "kind": "data-driven", "method": "lorahub", "params": {"shots": shots},
            "weights": weights[runs[0][0]], "weights_by_seed": weights, **over_seeds(runs),
            "search_seconds": round(seconds, 2), "problems": problems,
            "data": data_record("validation", seen, "class labels", len(runs), seconds),
            "cost": {"search_seconds": round(seconds, 2), "candidates_per_task": settings.budget,
                     "seeds": len(runs), "inference": "one merged adapter per task"}}


def _experiment_run(runner: Any, shots: int, seed: int
                    ) -> tuple[dict[str, Any], dict[str, Any], float, list[str], dict[str, int]]:
    """One seed of the experiment job: the test results, each task's weights, the search seconds, any task
    whose search returned no composition (`LoraHubResult.problems`) and the labelled examples each task's search saw."""
    import random

    from lorafuse.model.evaluation import EvalResult
    from lorafuse.tasks import get_task

    cfg = runner.config.lorahub
    settings = LoraHubSettings(budget=cfg.budget, seed=seed)
    tasks = list(runner.state.adapters)
    paths = [runner.state.adapters[t] for t in tasks]
    heads = runner.own_heads()
    test_ev = runner.evaluator("test")
    results, weights, seconds, problems, seen = [], {}, 0.0, [], {}
    for task in tasks:
        pool = get_task(task).load("validation", runner.config.data_dir)
        sample = random.Random(f"{seed}-{task}").sample(pool, min(shots, len(pool)))
        seen[task] = len(sample)
        result, updates = lorahub(test_ev, paths, task, sample, settings, heads.get(task))
        seconds += result.seconds
        problems += [f"{task} (seed {seed}, {len(sample)} shots): {p}" for p in result.problems()]
        results.append(test_ev.subset([task]).evaluate(updates, heads=heads))
        weights[task] = dict(zip(tasks, result.weights))
    merged = EvalResult.combine(results)
    return merged.normalize(runner.state.reference["test"]).to_dict(), weights, seconds, problems, seen
