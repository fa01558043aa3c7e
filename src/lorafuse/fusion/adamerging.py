"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024) on LoRA updates.

The merged weight of layer l is W_l + Σ_t λ_{t,l}·ΔW_{t,l}; the coefficients are learned without labels by
minimising the entropy of the merged model's predictions on unlabelled inputs of every task:
min_λ Σ_t mean_{x ∈ batch_t} H(p_λ(x)), Adam (lr 1e-3, betas 0.9/0.999), λ clamped to [0, 1] and started at task
arithmetic's λ (the authors' prior 0.3), 500 steps (the paper's defaults, all settable). `granularity: layer`
learns one λ per task and adapted module (the paper's layer-wise AdaMerging: one per task and parameter tensor, and
only the adapted weights differ between tasks here); `task` one per task (task-wise AdaMerging).

The prediction whose entropy is minimised is the formulation's own: `classify`, each task's head on its own inputs
(a softmax over the task's label slots only); `chat`, the distribution over the task's label words' distinguishing
tokens at the answer position (renormalised over those K tokens: the K-way decision `predict` makes).

Where lorafuse differs from the authors' code (EnnengYang/AdaMerging, `main_layer_wise_adamerging.py`):
- inputs: the authors draw each step's batches from the test split (the paper's protocol, transductive); here the
  inputs are `examples` unlabelled inputs of whichever split is given, and an experiment runs the method once per
  input split (`inputs: [validation, test]`) so the report shows both; labels are replaced before encoding
  (`fusion.without_labels`), so none is ever read;
- a step takes one batch of `batch_size` inputs per task, cycling through a seeded shuffle of the sample; the authors'
  loop takes two batches of 16 per task per step (it breaks after the second), i.e. the default 32 inputs a step;
- the merged layer is applied without forming it: a forward hook adds Σ_t λ_{t,l}·B_t(A_t x) to the base layer's
  output (exactly (W + Σ_t λ_{t,l}ΔW_t)x, the gradient reaching λ only), so a step costs a forward and backward pass
  of the base model; it runs in fp32 (lorafuse.model.precision: bf16 rounds away small λ steps), whatever dtype the
  evaluation uses;
- the result is one PEFT adapter at rank Σr a module, exact: B = [λ_{1,l}B_1 … λ_{T,l}B_T], A = [A_1; …; A_T].
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lorafuse.errors import ConfigError, did_you_mean
from lorafuse.merging.algebra.lowrank import LowRank, stack_lowrank

PAPER = "Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024"
RECORD_FILE = "adamerging.json"
GRANULARITIES = ("layer", "task")
PAPER_PRIOR = 0.3  # the authors' initial λ: task arithmetic's in their setting


@dataclass(frozen=True)
class AdaMergingSettings:
    """The optimisation; defaults are the paper's (batch: see the module's docstring)."""

    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 32
    init: float = PAPER_PRIOR
    granularity: Literal["layer", "task"] = "layer"
    seed: int = 0

    def check(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity '{self.granularity}'{did_you_mean(self.granularity, GRANULARITIES)}")
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1 or not 0.0 <= self.init <= 1.0:
            raise ConfigError(f"AdaMerging settings: steps ≥ 0, lr > 0, batch_size ≥ 1 and init in [0, 1] (got {self})")


@dataclass
class AdaMergingResult:
    """The learned coefficients (task → module → λ), the mean entropy of the sampled inputs before and after, and
    the entropy of each step's batches."""

    coefficients: dict[str, dict[str, float]]
    entropy_before: float
    entropy_after: float
    trace: list[float] = field(default_factory=list)
    seconds: float = 0.0
    settings: AdaMergingSettings = field(default_factory=AdaMergingSettings)

    def to_dict(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients, "entropy_before": self.entropy_before,
                "entropy_after": self.entropy_after, "optimise_seconds": round(self.seconds, 3),
                "settings": asdict(self.settings), "paper": PAPER, "entropy_trace": self.trace}


# -- the merged model, differentiable in λ -------------------------------------------------------------------
class Coefficients(torch.nn.Module):
    """λ (tasks × modules; one column shared by every module when task-wise), clamped to [0, 1] as the authors do
    (a clamped λ gets no gradient until the others move it back)."""

    def __init__(self, tasks: int, modules: Sequence[str], init: float, granularity: str) -> None:
        super().__init__()
        self.module_names = list(modules)
        self.raw = torch.nn.Parameter(torch.full((tasks, len(modules) if granularity == "layer" else 1), float(init)))

    def values(self) -> torch.Tensor:
        lam = self.raw.clamp(0.0, 1.0)
        return lam.expand(-1, len(self.module_names)) if lam.shape[1] == 1 else lam

    def table(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        lam = self.values().detach().cpu()
        return {t: {m: float(lam[i, j]) for j, m in enumerate(self.module_names)} for i, t in enumerate(names)}


class _Module:
    """One adapted module's stacked factors: A (Σr×in), B (out×Σr) and the task of each rank column."""

    def __init__(self, terms: Sequence[LowRank], device: torch.device) -> None:
        self.A = torch.cat([t.A.float() for t in terms]).to(device)
        self.B = torch.cat([t.B.float() for t in terms], dim=1).to(device)
        self.task = torch.repeat_interleave(torch.arange(len(terms)), torch.tensor([t.rank for t in terms])).to(device)


@contextmanager
def merged_in(model: torch.nn.Module, factors: Mapping[str, Sequence[LowRank]], lam: Coefficients
              ) -> Iterator[None]:
    """Inside: every adapted layer computes (W + Σ_t λ_{t,l}·ΔW_t)x, as a forward hook adding Σ_t λ_{t,l}·B_t(A_t x)
    to its output, differentiable in λ; the model's own parameters are frozen meanwhile (flags restored)."""
    from lorafuse.model.apply import _submodule

    device = next(model.parameters()).device
    stacks = {m: _Module(terms, device) for m, terms in factors.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = []

    def hook_for(column: int, stack: _Module) -> Any:
        def hook(layer: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            scale = lam.values()[stack.task, column].to(x.dtype)
            return output + ((x @ stack.A.T.to(x.dtype)) * scale) @ stack.B.T.to(x.dtype)
        return hook

    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for j, module in enumerate(lam.module_names):
            handles.append(_submodule(model, module).register_forward_hook(hook_for(j, stacks[module])))
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


# -- the objective ----------------------------------------------------------------------------------------------
def label_logits(formulation: Any, model: Any, batch: Any, task: Any) -> torch.Tensor:
    """The logits of the task's K labels (batch × K), the distribution `predict` decides on: classify's head over the
    task's label slots, chat's distinguishing label tokens at the answer position."""
    if formulation.name == "classify":
        from lorafuse.model.formulations import label_slots

        logits = formulation.logits(model, batch, task)
        return logits[:, torch.tensor(label_slots(task), device=logits.device)]
    _, scored = formulation.scoring(task)
    logits = formulation.last_logits(model, batch, 1)[:, -1]
    return logits[:, torch.tensor(scored, device=logits.device)]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class _Cycle:
    """A task's batches in a seeded shuffled order, reshuffled at each pass."""

    def __init__(self, batches: Sequence[Any], seed: int) -> None:
        self.batches, self.gen, self.order = list(batches), torch.Generator().manual_seed(seed), []

    def next(self) -> Any:
        if not self.order:
            self.order = torch.randperm(len(self.batches), generator=self.gen).tolist()
        return self.batches[self.order.pop()]


def mean_entropy(evaluator: Any, tasks: Sequence[Any], batches: Mapping[str, Sequence[Any]],
                 heads: Mapping[str, Any]) -> float:
    """The mean over tasks of the mean entropy of every sampled input (the model as it stands)."""
    from lorafuse.model.apply import head_loaded

    values = []
    with torch.no_grad():
        for task in tasks:
            with head_loaded(evaluator.model, heads.get(task.name)):
                rows = [(entropy(label_logits(evaluator.formulation, evaluator.model, b, task)), len(b.targets))
                        for b in batches[task.name]]
            values.append(sum(float(h) * n for h, n in rows) / sum(n for _, n in rows))
    return sum(values) / len(values)


def optimise(evaluator: Any, factors: Mapping[str, Sequence[LowRank]], tasks: Sequence[Any],
             inputs: Mapping[str, Sequence[Any]], heads: Mapping[str, Any], settings: AdaMergingSettings
             ) -> tuple[Coefficients, list[float], float, float]:
    """Adam on Σ_t H(batch_t) over λ; returns λ, each step's summed entropy and the sampled inputs' mean entropy
    before and after."""
    from lorafuse.fusion import input_batches
    from lorafuse.model.apply import head_loaded

    torch.manual_seed(settings.seed)
    batches = {t.name: input_batches(evaluator.formulation, t, inputs[t.name], settings.batch_size) for t in tasks}
    cycles = {t.name: _Cycle(batches[t.name], settings.seed * 1_000 + i) for i, t in enumerate(tasks)}
    device = next(evaluator.model.parameters()).device  # λ beside the model: the hooks index it with its tensors
    lam = Coefficients(len(tasks), sorted(factors), settings.init, settings.granularity).to(device)
    optimiser = torch.optim.Adam(lam.parameters(), lr=settings.lr, betas=(0.9, 0.999))
    trace = []
    with merged_in(evaluator.model, factors, lam):
        before = mean_entropy(evaluator, tasks, batches, heads)
        for _ in range(settings.steps):
            optimiser.zero_grad()
            total = 0.0
            for task in tasks:  # one backward per task: the gradients add up, one graph in memory at a time
                with head_loaded(evaluator.model, heads.get(task.name)):
                    loss = entropy(label_logits(evaluator.formulation, evaluator.model, cycles[task.name].next(), task))
                    loss.backward()
                total += float(loss.detach())
            optimiser.step()
            trace.append(round(total, 6))
        after = mean_entropy(evaluator, tasks, batches, heads)
    return lam, trace, before, after


def load_task_factors(adapters: Sequence[str | Path]) -> dict[str, list[LowRank]]:
    """Every adapted module's factors of every adapter (scale folded into B; rank 0 where one lacks the module)."""
    from lorafuse.fusion.lorahub import load_factors

    factors, _ = load_factors(adapters)
    return factors


def adamerging(evaluator: Any, adapters: Sequence[str | Path], tasks: Sequence[str],
               inputs: Mapping[str, Sequence[Any]], heads: Mapping[str, Any] | None = None,
               settings: AdaMergingSettings = AdaMergingSettings()) -> tuple[AdaMergingResult, dict[str, LowRank]]:
    """AdaMerging of `adapters` (adapter i trained on `tasks[i]`) from each task's unlabelled `inputs`, on an
    Evaluator's loaded model (use an fp32 one; the model is left as it was). `heads`: each task's classification
    head (classify). Returns the result and the merged updates, exact at rank Σr."""
    from lorafuse.tasks import get_task

    settings.check()
    if len(adapters) != len(tasks):
        raise ConfigError(f"adamerging: {len(adapters)} adapters for {len(tasks)} tasks (one task per adapter)")
    heads = dict(heads or {})
    if evaluator.formulation.name == "classify" and any(t not in heads for t in tasks):
        missing = next(t for t in tasks if t not in heads)
        raise ConfigError(f"task '{missing}': the classify formulation needs each task's head (its own adapter's "
                          "modules_to_save) to score its inputs")
    empty = [t for t in tasks if not inputs.get(t)]
    if empty:
        raise ConfigError(f"task '{empty[0]}': AdaMerging needs at least one unlabelled input of each task")
    factors = load_task_factors(adapters)
    start = time.perf_counter()
    lam, trace, before, after = optimise(evaluator, factors, [get_task(t) for t in tasks], inputs, heads, settings)
    result = AdaMergingResult(lam.table(tasks), before, after, trace, time.perf_counter() - start, settings)
    return result, merged_updates(factors, tasks, result.coefficients)


def merged_updates(factors: Mapping[str, Sequence[LowRank]], tasks: Sequence[str],
                   coefficients: Mapping[str, Mapping[str, float]]) -> dict[str, LowRank]:
    """Σ_t λ_{t,l}·ΔW_{t,l} per module as the exact stack [λ_{1,l}B_1 … λ_{T,l}B_T]·[A_1; …; A_T]."""
    return {m: stack_lowrank(terms, [coefficients[t][m] for t in tasks]) for m, terms in factors.items()}


def record_of(result: AdaMergingResult, tasks: Sequence[str], split: str, inputs: Mapping[str, Sequence[Any]]
              ) -> dict[str, Any]:
    """What the saved adapter's adamerging.json holds: the coefficients, entropies, settings and the data seen."""
    return {"tasks": list(tasks), **result.to_dict(), "exact": True, "retained_energy": 1.0,
            "data": {"split": split, "examples_per_task": {t: len(inputs[t]) for t in tasks}, "labels": "none",
                     "transductive": split == "test"}}


def save_adamerging(result: AdaMergingResult, updates: Mapping[str, LowRank], adapters: Sequence[str | Path],
                    tasks: Sequence[str], split: str, inputs: Mapping[str, Sequence[Any]], out: str | Path,
                    overwrite: bool = False, modules_to_save: str = "auto") -> Path:
    """The merged adapter in PEFT's format (exact, rank Σr a module), its coefficients and trace in adamerging.json."""
    from lorafuse.fusion import save_fused_updates

    method = {"name": "adamerging", "paper": PAPER, "exact": True}
    return save_fused_updates(adapters, tasks, updates, out, method, record_of(result, tasks, split, inputs),
                              RECORD_FILE, overwrite, modules_to_save)


# -- inside an experiment --------------------------------------------------------------------------------------
def initial_lambda(runner: Any, init: float | str) -> float | None:
    """The starting λ: a number, or `task_arithmetic`: the λ the experiment's task-arithmetic job (full space)
    chose on validation, clamped into [0, 1] (AdaMerging's range); None while that job has no result."""
    if not isinstance(init, str):
        return float(init)
    chosen = [j for j in runner.state.jobs if j.get("method") == "task_arithmetic" and j.get("status") == "ok"
              and j.get("space", "full") == "full" and "lambda" in j.get("params", {})]
    return min(max(float(chosen[0]["params"]["lambda"]), 0.0), 1.0) if chosen else None


def experiment_job(runner: Any, split: str, init: float | None) -> dict[str, Any]:
    """AdaMerging inside an experiment on `examples` unlabelled inputs of each task's `split` (fp32 model), the
    merged adapter evaluated on test; once per seed (the sample and its order depend on it)."""
    from lorafuse.fusion import data_record, job_seeds, sample_examples
    from lorafuse.stats import over_seeds
    from lorafuse.tasks import get_task

    cfg = runner.config.adamerging
    if init is None:
        raise ConfigError("adamerging.init: task_arithmetic, but the experiment's `task_arithmetic` method (full "
                          "space, lambda searched) has no result: run its fuse stage first, or give a number")
    tasks = list(runner.state.adapters)
    paths = [runner.state.adapters[t] for t in tasks]
    model_ev, test_ev, heads = runner.fp32_evaluator("validation"), runner.evaluator("test"), runner.own_heads()
    runs, coefficients, seconds, entropies, saved = [], {}, 0.0, {}, None
    for seed in job_seeds(runner, cfg):
        settings = AdaMergingSettings(cfg.steps, cfg.lr, cfg.batch_size, init, cfg.granularity, seed)
        inputs = {t: sample_examples(get_task(t), split, runner.config.data_dir, cfg.examples, seed) for t in tasks}
        result, updates = adamerging(model_ev, paths, tasks, inputs, heads, settings)
        seconds += result.seconds
        coefficients[seed], entropies[seed] = result.coefficients, [result.entropy_before, result.entropy_after]
        test = test_ev.evaluate(updates, heads=heads).normalize(runner.state.reference["test"])
        runs.append((seed, test.to_dict()))
        if saved is None:
            saved = save_adamerging(result, updates, paths, tasks, split, inputs,
                                    runner.out / "fused" / f"adamerging-{split}", overwrite=True,
                                    modules_to_save="per_task")
    examples = {t: len(inputs[t]) for t in tasks}  # the same count every seed
    data = data_record(split, examples, "none", len(runs), seconds, transductive=split == "test")
    name = f"adamerging ({split} inputs)"
    return {"name": name, "kind": "data-driven", "method": "adamerging",
            "params": {"inputs": split, "examples": cfg.examples, "steps": cfg.steps, "init": init,
                       "granularity": cfg.granularity},
            **over_seeds(runs), "coefficients": coefficients[runs[0][0]], "coefficients_by_seed": coefficients,
            "entropy_by_seed": entropies, "fused_dir": str(saved),
            "saved_adapter": {"exact": True, "retained_energy": 1.0}, "search_seconds": round(seconds, 2),
            "data": data, "cost": {"optimise_seconds": round(seconds, 2), "steps": cfg.steps, "seeds": len(runs),
                                   "inference": "one merged adapter"},
            "problems": _problems(entropies)}


def _problems(entropies: Mapping[int, Sequence[float]]) -> list[str]:
    """A seed whose optimisation did not lower the entropy it minimises (too high an lr, or λ clamped throughout)."""
    return [f"seed {s}: the mean entropy of its inputs went from {b:.4f} to {a:.4f} (not lowered)"
            for s, (b, a) in entropies.items() if a > b + 1e-9]
