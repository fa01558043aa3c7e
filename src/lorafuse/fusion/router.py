"""An input-routed mixture of LoRA adapters, in the line of MoLE (Wu et al., "Mixture of LoRA Experts", ICLR 2024)
and LoRA-Flow (Wang et al., ACL 2024): the adapters stay separate and a small gate picks their weights per input.

The gate is a linear layer on the base model's last hidden state (adapters off): mean-pooled over the input
(`granularity="sentence"`, the default) or per token (`"token"`). Its softmax weights g over the T adapters enter
every adapted linear layer as W·x + Σ_t g_t·s_t·B_t·A_t·x, computed as one rank-Σr product with the gate applied
between the factors. It is trained on examples of each adapter's task with the task's identity as the target,
adapters and base frozen (`train_gate`), optionally then end to end on the tasks' own losses (`train_end_to_end`).
The price at inference: one extra base-model pass for the gate and rank Σr instead of one merged adapter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from lorafuse.adapters.reader import LoraAdapter
from lorafuse.atomic import atomic_output_dir
from lorafuse.errors import AdapterError, ConfigError
from lorafuse.model.kinds import register_kind
from lorafuse.provenance import stamp

ROUTER_CONFIG = "router_config.json"
GATE_FILE = "gate.safetensors"
GRANULARITIES = ("sentence", "token")
Granularity = Literal["sentence", "token"]


# -- features the gate reads -----------------------------------------------------------------------------------
def backbone_of(model: Any) -> Any:
    """The base network without its classification or LM head (BertModel, LlamaModel, ...)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, hf.base_model_prefix)


@contextmanager
def forward_hooks(model: Any, hooks: Mapping[str, Any], pre_hook: Any = None) -> Iterator[None]:
    """`hooks[name]` as a forward hook on each named submodule (and `pre_hook` on the backbone, with kwargs) while
    the block runs; every hook is removed on exit, whatever happens inside."""
    from lorafuse.model.apply import _submodule

    handles = [] if pre_hook is None else [backbone_of(model).register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        for name, hook in hooks.items():
            handles.append(_submodule(model, name).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _features(backbone: Any, inputs: Mapping[str, Any], granularity: str) -> torch.Tensor:
    """Last hidden state, mean-pooled over real tokens ([B, H]) or per token ([B, L, H]). Positions come from the
    attention mask so left- and right-padded batches give the same features."""
    from lorafuse.model.formulations import on_model_device

    keep = on_model_device(backbone, {k: v for k, v in inputs.items()
                                      if k in ("input_ids", "attention_mask", "token_type_ids") and v is not None})
    if "attention_mask" not in keep:
        keep["attention_mask"] = torch.ones_like(keep["input_ids"])
    mask = keep["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(**keep, position_ids=positions).last_hidden_state.float()
    if granularity == "token":
        return hidden
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def pooled_features(model: Any, inputs: Mapping[str, Any], granularity: str = "sentence") -> torch.Tensor:
    """The gate's input for a batch, with the base model alone (call it without a router installed)."""
    return _features(backbone_of(model), inputs, granularity)


# -- the mixture --------------------------------------------------------------------------------------------------
@dataclass
class _Module:
    """One adapted module: every adapter's factors side by side, A = [A_1; …] and B = [s_1 B_1 … ], and the
    adapter each rank column belongs to."""

    A: torch.Tensor
    B: torch.Tensor
    columns: torch.Tensor
    cache: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def factors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.dtype, like.device)
        if key not in self.cache:
            self.cache[key] = (self.A.to(like), self.B.to(like))
        return self.cache[key]

    def delta(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Σ_t g_t·s_t·B_t·A_t·x for x [B, ..., in] and gate weights g [B, T] or [B, L, T]."""
        A, B = self.factors(x)
        gc = g[..., self.columns.to(g.device)].to(x.dtype)
        if gc.ndim == 2:
            gc = gc.reshape(gc.shape[0], *([1] * (x.ndim - 2)), gc.shape[-1])
        return ((x @ A.T) * gc) @ B.T


@dataclass
class Router:
    """A gate (linear layer on the base model's last hidden state) over T adapters' factors."""

    gate: torch.nn.Linear
    names: list[str]
    modules: dict[str, _Module]
    paths: list[str]
    sha256: list[str]
    granularity: Granularity = "sentence"
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # task -> its adapter's head
    fixed: torch.Tensor | None = None  # force these weights [T] (tests, ablations, one-hot routing)

    @classmethod
    def from_adapters(cls, adapters: Sequence[str | Path], hidden: int, names: Sequence[str] | None = None,
                      granularity: Granularity = "sentence") -> Router:
        if granularity not in GRANULARITIES:
            raise ConfigError(f"router granularity '{granularity}' is not one of {', '.join(GRANULARITIES)}")
        lib = library(adapters, names, "router")
        return cls(torch.nn.Linear(hidden, len(lib.names)), lib.names, lib.modules, lib.paths, lib.sha256,
                   granularity, lib.heads)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """Softmax gate weights over the adapters: [B, T] (sentence) or [B, L, T] (token)."""
        if self.fixed is not None:
            return self.fixed.to(features.device).expand(*features.shape[:-1], -1)
        return torch.softmax(self.gate.to(features.device)(features.float()), dim=-1)

    @contextmanager
    def installed(self, model: Any) -> Iterator[Router]:
        """Route every forward of `model`: a gate pass of the backbone with the mixture off, then the mixture in
        each adapted layer. Gradients reach the gate when enabled (end-to-end training), never the features."""

        state: dict[str, Any] = {"g": None, "off": False}

        def gate_hook(backbone: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if state["off"]:
                return
            inputs = dict(kwargs)
            if args:
                inputs.setdefault("input_ids", args[0])
            state["off"] = True
            try:
                with torch.no_grad():
                    feats = _features(backbone, inputs, self.granularity)
            finally:
                state["off"] = False
            state["g"] = self.weights(feats)

        def layer_hook(module: _Module) -> Any:
            def hook(layer: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                if state["off"] or state["g"] is None:
                    return output
                return output + module.delta(args[0], state["g"])
            return hook

        with forward_hooks(model, {name: layer_hook(m) for name, m in self.modules.items()}, gate_hook):
            yield self

    def save(self, out: str | Path, overwrite: bool = False, extra: Mapping[str, Any] | None = None) -> Path:
        """router_config.json (adapters with their sha256, gate settings, provenance) + gate.safetensors."""
        from safetensors.torch import save_file

        config = {"adapters": adapter_entries(self.names, self.paths, self.sha256, out),
                  "gate": {"in_features": self.gate.in_features, "granularity": self.granularity,
                           "features": "last hidden state of the base model (adapters off)"
                                       + (", mean-pooled" if self.granularity == "sentence" else ", per token")},
                  "method": "input-routed mixture of LoRA adapters (MoLE, Wu et al., ICLR 2024)",
                  **dict(extra or {}), **stamp()}
        with atomic_output_dir(out, overwrite, kind="router") as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.gate.state_dict().items()}, str(tmp / GATE_FILE))
            (tmp / ROUTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> Router:
        """A saved router; refuses adapters that changed since its gate was trained."""
        from safetensors.torch import load_file

        path = Path(path)
        config = read_config(path / ROUTER_CONFIG, "gate", "router")
        entries, gate = config["adapters"], config["gate"]
        router = cls.from_adapters([resolve_saved(e["path"], path) for e in entries], gate["in_features"],
                                   [e["name"] for e in entries], gate.get("granularity", "sentence"))
        check_unchanged(path / ROUTER_CONFIG, entries, router.sha256, "the router was trained")
        router.gate.load_state_dict(load_file(str(path / GATE_FILE)))
        return router


class Library(NamedTuple):
    """T adapters as every router holds them: names, stacked factors per module, paths, sha256 and heads."""

    names: list[str]
    modules: dict[str, _Module]
    paths: list[str]
    sha256: list[str]
    heads: dict[str, dict[str, torch.Tensor]]  # task -> its adapter's head


def library(adapters: Sequence[str | Path], names: Sequence[str] | None, what: str) -> Library:
    """Load two or more adapters for a router of kind `what` (named in errors)."""
    loaded = [LoraAdapter(a) for a in adapters]
    if len(loaded) < 2:
        raise ConfigError(f"{what}: needs at least two adapters")
    if names is not None and len(names) != len(loaded):
        raise ConfigError(f"{what}: {len(names)} names for {len(loaded)} adapters")
    names = list(names or [a.name for a in loaded])
    modules = {m: _stack(loaded, m) for m in sorted({m for a in loaded for m in a.modules})}
    heads = {a.train_record.get("task") or n: {k: a.tensor(k) for k in a.extra_keys}
             for a, n in zip(loaded, names) if a.extra_keys}
    return Library(names, modules, [str(a.path) for a in loaded], [a.sha256 for a in loaded], heads)


def _stack(adapters: Sequence[LoraAdapter], module: str) -> _Module:
    present = [(t, a.update(module)) for t, a in enumerate(adapters) if module in a.modules]
    if any(a.modules[module].embedding for a in adapters if module in a.modules):
        raise AdapterError(f"module '{module}': the router mixes linear LoRA layers only (embedding LoRA found)")
    columns = torch.cat([torch.full((u.rank,), t) for t, u in present])
    return _Module(torch.cat([u.A.float() for _, u in present]), torch.cat([u.B.float() for _, u in present], 1),
                   columns)


def is_router(path: str | Path) -> bool:
    return (Path(path) / ROUTER_CONFIG).is_file()


def adapter_entries(names: Sequence[str], paths: Sequence[str], digests: Sequence[str],
                    out: str | Path) -> list[dict[str, str]]:
    """The `adapters` list of a saved router's config: name, path relative to the router, sha256."""
    return [{"name": n, "path": relative_to_output(p, out), "sha256": h} for n, p, h in zip(names, paths, digests)]


def read_config(file: Path, section: str, what: str) -> dict[str, Any]:
    """A saved router's config with its `adapters` list and its own `section`; one error for anything unreadable."""
    try:
        config = json.loads(file.read_text())
        missing = sorted({"adapters", section} - set(config))
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        raise AdapterError(f"{file}: not a readable {what} config ({type(exc).__name__})") from None
    if missing:
        raise AdapterError(f"{file}: not a readable {what} config (no {', '.join(missing)})")
    return config


def check_unchanged(file: Path, entries: Sequence[Mapping[str, str]], digests: Sequence[str], since: str) -> None:
    """Refuse a saved router whose adapters changed since it was made (their sha256 differs)."""
    for entry, digest in zip(entries, digests):
        if digest != entry["sha256"]:
            raise AdapterError(f"{file}: adapter '{entry['name']}' at {entry['path']} changed since {since} "
                               "(sha256 differs)")


def relative_to_output(adapter: str | Path, out: str | Path) -> str:
    """An adapter's path as a router stores it: relative to the router's own directory, so a router and its
    adapters move together and the config names no directory of the machine that wrote it."""
    import os

    return os.path.relpath(Path(adapter).absolute(), Path(out).absolute())


def resolve_saved(stored: str, router_dir: Path) -> str:
    """A stored adapter path: relative to the router's directory (this build), else as stored (earlier builds
    stored it as given, relative to their working directory)."""
    beside = router_dir / stored
    return str(beside) if not Path(stored).is_absolute() and beside.exists() else stored


@contextmanager
def load_router(model: Any, router_dir: str | Path) -> Iterator[Router]:
    """Load a saved router and route `model`'s forwards through it inside the context (used by the Evaluator
    for `lorafuse eval --adapter ROUTER_DIR`)."""
    with Router.load(router_dir).installed(model) as router:
        yield router


register_kind("router", is_router, Router.load, Router)  # the Evaluator takes a router (or its directory) this way


# -- training ------------------------------------------------------------------------------------------------------
def train_gate(router: Router, model: Any, batches_per_task: Sequence[Sequence[Any]], epochs: int = 200,
               lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Fit the gate to predict each input's task (cross-entropy) from base-model features computed once;
    full-batch Adam on standardised features, folded back into the gate so it applies to raw features."""
    torch.manual_seed(seed)
    X, y = _task_features(router, model, batches_per_task)
    mean, std = X.mean(0), X.std(0).clamp(min=1e-6)
    layer = torch.nn.Linear(X.shape[1], len(batches_per_task))
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    Z = (X - mean) / std
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(Z), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        router.gate.weight.copy_(layer.weight / std)
        router.gate.bias.copy_(layer.bias - (layer.weight / std) @ mean)
        accuracy = float((layer(Z).argmax(-1) == y).float().mean())
    return {"gate_loss": loss.item(), "gate_train_accuracy": accuracy, "examples": int(len(y))}


def _task_features(router: Router, model: Any, batches_per_task: Sequence[Sequence[Any]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every input (every real token, at token granularity) and its task index."""
    if len(batches_per_task) != len(router.names):
        raise ConfigError(f"router: examples for {len(batches_per_task)} tasks, {len(router.names)} adapters")
    feats, labels = [], []
    with torch.no_grad():
        for t, batches in enumerate(batches_per_task):
            for batch in batches:
                f = pooled_features(model, batch.inputs, router.granularity)
                if router.granularity == "token":
                    f = f[batch.inputs["attention_mask"].bool().to(f.device)]
                feats.append(f.cpu())  # the gate is fitted on the host: a few thousand rows
                labels.append(torch.full((f.shape[0],), t))
    if not feats:
        raise ConfigError("router: no training examples")
    return torch.cat(feats).float(), torch.cat(labels)


def train_end_to_end(router: Router, model: Any, formulation: Any, tasks: Sequence[Any],
                     batches_per_task: Sequence[Sequence[Any]], heads: Mapping[str, Any] | None = None,
                     epochs: int = 1, lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Fine-tune the gate on the tasks' own losses through the routed model (base and adapters frozen), one
    task's batch at a time with its head loaded; start from `train_gate`'s solution."""
    import random

    from lorafuse.model.apply import head_loaded

    steps = [(t, b) for t, batches in enumerate(batches_per_task) for b in batches]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    opt = torch.optim.Adam(router.gate.parameters(), lr=lr)
    losses: list[float] = []
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with router.installed(model):
            for epoch in range(epochs):
                random.Random(seed + epoch).shuffle(steps)
                for t, batch in steps:
                    with head_loaded(model, (heads or {}).get(tasks[t].name)):
                        opt.zero_grad()
                        loss = formulation.loss(model, batch, tasks[t])
                        loss.backward()
                        opt.step()
                    losses.append(float(loss.detach()))
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    n = len(steps)
    return {"e2e_first_epoch_loss": sum(losses[:n]) / n, "e2e_last_epoch_loss": sum(losses[-n:]) / n,
            "e2e_steps": len(losses)}


# -- cost ------------------------------------------------------------------------------------------------------------
def latency(evaluator: Any, adapter: Any, heads: Mapping[str, Any] | None = None, repeats: int = 1
            ) -> float:
    """Seconds per example of evaluating `adapter` (a directory, updates or a Router) on the evaluator's
    batches, best of `repeats` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = evaluator.evaluate(adapter, heads=heads)
        best = min(best, time.perf_counter() - start)
    return best / sum(result.examples.values())


def experiment_job(runner: Any) -> dict[str, Any]:
    """Train the gate on each task's train split, evaluate the routed mixture on test, and time it against one
    merged adapter; once per seed of the experiment (`test`: the mean over seeds, `seed_runs`: each seed's)."""
    from lorafuse.stats import over_seeds

    runs, costs, dirs = [], [], []
    for i, seed in enumerate(runner.seeds(runner.config.router.seed)):
        # the first seed's router at the run's top (router/); the others among the fused outputs, where a run's
        # own outputs may lie (rundir.unexpected_in_run)
        test, cost, out = _experiment_run(runner, seed, "router" if i == 0 else f"fused/router-seed{seed}")
        runs.append((seed, test))
        costs.append(cost)
        dirs.append(str(out))
    train_seconds = sum(c["gate_train_seconds"] for c in costs)
    return {"name": "router", "kind": "data-driven", "method": "router", "params": {}, **over_seeds(runs),
            "router_dir": dirs[0], "router_dirs": dirs, "search_seconds": round(train_seconds, 2),
            "cost": {**costs[0], "gate_train_seconds": round(train_seconds, 2), "seeds": len(runs)}}


def _experiment_run(runner: Any, seed: int, name: str) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """One seed: the routed mixture's test results, its cost, and where it was saved."""
    from lorafuse.tasks import get_task

    cfg = runner.config.router
    tasks = list(runner.state.adapters)
    ev = runner.evaluator("test")
    router = Router.from_adapters([runner.state.adapters[t] for t in tasks], int(ev.model.config.hidden_size), tasks)
    batches = []
    for t in tasks:
        task = get_task(t)
        rows = ev.formulation.encode(task, task.load("train", runner.config.data_dir, cfg.examples_per_task))
        batches.append([ev.formulation.collate(rows[i:i + 32]) for i in range(0, len(rows), 32)])
    start = time.perf_counter()
    stats = train_gate(router, ev.model, batches, epochs=cfg.epochs * 10, seed=seed)
    train_seconds = time.perf_counter() - start
    out = router.save(runner.out / name, overwrite=True, extra={"tasks": tasks, "training": stats, "seed": seed})
    heads = runner.own_heads()
    start = time.perf_counter()
    result = ev.evaluate(router, heads=heads)
    routed_seconds = time.perf_counter() - start
    merged = latency(ev, runner.state.adapters[tasks[0]], heads)  # one adapter's cost, same batches
    n = sum(result.examples.values())
    result.normalize(runner.state.reference["test"])
    cost = {"gate_train_seconds": round(train_seconds, 2), "routed_ms_per_example": round(1000 * routed_seconds / n, 3),
            "merged_ms_per_example": round(1000 * merged, 3),
            "latency_ratio": round(routed_seconds / n / merged, 2), **stats}
    return result.to_dict(), cost, out
