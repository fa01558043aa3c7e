"""An input-routed mixture of LoRA adapters (in the line of MoLE, LoRA-Flow and X-LoRA).

A small gate reads the base model's mean-pooled last hidden state of the input (adapters off) and outputs softmax
weights g(x) over the T adapters; every adapted linear layer then computes W·x + Σ_t g_t(x)·s_t·B_t·A_t·x. The gate
is trained on examples of each adapter's task with the task's identity as the target, adapters frozen. The price:
a second (gate) pass of the base model and T low-rank products per adapted layer, instead of one merged adapter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafuse.adapters.reader import LoraAdapter
from lorafuse.atomic import atomic_output_dir
from lorafuse.errors import AdapterError
from lorafuse.provenance import stamp

ROUTER_CONFIG = "router_config.json"
GATE_FILE = "gate.safetensors"


def backbone_of(model: Any) -> Any:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, hf.base_model_prefix)


def pooled_features(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Mean-pooled last hidden state of the base network (no classification or LM head)."""
    return _pool(backbone_of(model), inputs)


def _pool(backbone: Any, inputs: dict[str, Any]) -> torch.Tensor:
    keep = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            and v is not None}
    if "attention_mask" not in keep:
        keep["attention_mask"] = torch.ones_like(keep["input_ids"])
    hidden = backbone(**keep).last_hidden_state
    mask = keep["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


@dataclass
class Router:
    """Gate (a linear layer on pooled features) plus every adapter's factors per module."""

    gate: torch.nn.Linear
    names: list[str]
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]  # module -> [(A_t, s_t·B_t)]
    paths: list[str]
    fan_in_fan_out: bool = False
    fixed: torch.Tensor | None = None  # force these weights (tests, ablations)

    @classmethod
    def from_adapters(cls, adapters: Sequence[str | Path], hidden: int, names: Sequence[str] | None = None) -> Router:
        loaded = [LoraAdapter(a) for a in adapters]
        factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for module in sorted({m for a in loaded for m in a.modules}):
            pairs = []
            for a in loaded:
                if module in a.modules:
                    u = a.update(module)
                    pairs.append((u.A.float(), u.B.float()))
                else:
                    pairs.append((None, None))
            factors[module] = pairs
        return cls(torch.nn.Linear(hidden, len(loaded)), list(names or [a.name for a in loaded]), factors,
                   [str(a.path) for a in loaded], loaded[0].settings.fan_in_fan_out)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed.expand(features.shape[0], -1)
        return torch.softmax(self.gate(features.float()), dim=-1)

    @contextmanager
    def installed(self, model: Any) -> Iterator[None]:
        """Route every forward of `model`: a gate pass with adapters off, then the mixture in each layer."""
        from lorafuse.evaluation import _submodule

        state: dict[str, Any] = {"g": None, "off": False}
        handles = []

        def gate_hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            """Runs before every backbone pass (both formulations go through it); its own pass is unrouted."""
            if state["off"]:
                return
            inputs = dict(kwargs)
            if args:
                inputs.setdefault("input_ids", args[0])
            state["off"] = True
            try:
                with torch.no_grad():
                    state["g"] = self.weights(_pool(module, inputs))
            finally:
                state["off"] = False

        def layer_hook(name: str) -> Any:
            pairs = self.factors[name]

            def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
                if state["off"] or state["g"] is None:
                    return output
                x = args[0]
                g = state["g"].to(x.dtype)
                extra = torch.zeros_like(output)
                for t, (A, B) in enumerate(pairs):
                    if A is None:
                        continue
                    y = (x @ A.T.to(x.dtype)) @ B.T.to(x.dtype)
                    extra = extra + g[:, t].reshape(-1, *([1] * (y.ndim - 1))) * y
                return output + extra

            return hook

        try:
            handles.append(backbone_of(model).register_forward_pre_hook(gate_hook, with_kwargs=True))
            for name in self.factors:
                handles.append(_submodule(model, name).register_forward_hook(layer_hook(name)))
            yield
        finally:
            for h in handles:
                h.remove()

    def save(self, out: str | Path, overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        from lorafuse.adapters.reader import sha256_file

        config = {"adapters": [{"name": n, "path": p, "sha256": sha256_file(Path(p) / "adapter_model.safetensors")}
                               for n, p in zip(self.names, self.paths)],
                  "gate": {"in_features": self.gate.in_features, "pooling": "mean last hidden state, adapters off"},
                  **(extra or {}), **stamp()}
        with atomic_output_dir(out, overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in self.gate.state_dict().items()}, str(tmp / GATE_FILE))
            (tmp / ROUTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> Router:
        from safetensors.torch import load_file

        path = Path(path)
        config = json.loads((path / ROUTER_CONFIG).read_text())
        entries = config["adapters"]
        router = cls.from_adapters([e["path"] for e in entries], config["gate"]["in_features"],
                                   [e["name"] for e in entries])
        for entry in entries:
            from lorafuse.adapters.reader import sha256_file

            if sha256_file(Path(entry["path"]) / "adapter_model.safetensors") != entry["sha256"]:
                raise AdapterError(f"{path / ROUTER_CONFIG}: adapter '{entry['name']}' at {entry['path']} changed "
                                   "since the router was trained (sha256 differs)")
        router.gate.load_state_dict(load_file(str(path / GATE_FILE)))
        return router


def is_router(path: str | Path) -> bool:
    return (Path(path) / ROUTER_CONFIG).is_file()


def train_gate(router: Router, model: Any, batches_per_task: Sequence[Sequence[Any]], epochs: int = 50,
               lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Fit the gate to predict each example's task from its pooled features (computed once, adapters off)."""
    torch.manual_seed(seed)
    feats, labels = [], []
    with torch.no_grad():
        for t, batches in enumerate(batches_per_task):
            for batch in batches:
                f = pooled_features(model, batch.inputs)
                feats.append(f)
                labels.append(torch.full((f.shape[0],), t))
    X, y = torch.cat(feats).float(), torch.cat(labels)
    mean, std = X.mean(0), X.std(0).clamp(min=1e-6)
    with torch.no_grad():  # standardise inside the gate so that saved weights apply to raw features
        router.gate.weight.zero_()
        router.gate.bias.zero_()
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
    return {"gate_loss": float(loss), "gate_train_accuracy": accuracy, "examples": int(len(y))}


def experiment_job(runner: Any) -> dict[str, Any]:
    """Train the gate on each task's train split, evaluate the routed mixture on test, and time it against one
    merged adapter."""
    cfg = runner.config.router
    tasks = list(runner.state.adapters)
    ev = runner.evaluator("test")
    model = ev.model
    router = Router.from_adapters([runner.state.adapters[t] for t in tasks], _hidden_size(model), tasks)
    batches = []
    for t in tasks:
        from lorafuse.tasks import get_task

        task = get_task(t)
        rows = ev.formulation.encode(task, task.load("train", runner.config.data_dir, cfg.examples_per_task))
        batches.append([ev.formulation.collate(rows[i:i + 32]) for i in range(0, len(rows), 32)])
    start = time.perf_counter()
    stats = train_gate(router, model, batches, epochs=cfg.epochs * 10, seed=cfg.seed)
    train_seconds = time.perf_counter() - start
    out = router.save(runner.out / "router", overwrite=True, extra={"tasks": tasks, "training": stats})
    heads = runner.own_heads()
    start = time.perf_counter()
    with router.installed(model):
        result = ev.evaluate(None, heads=heads)
    routed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ev.evaluate(runner.state.adapters[tasks[0]], heads=heads)  # one merged adapter, same batches
    merged_seconds = time.perf_counter() - start
    n = sum(result.examples.values())
    result.normalize(runner.state.reference["test"])
    cost = {"gate_train_seconds": round(train_seconds, 2), "routed_ms_per_example": round(1000 * routed_seconds / n, 3),
            "merged_ms_per_example": round(1000 * merged_seconds / n, 3),
            "latency_ratio": round(routed_seconds / merged_seconds, 2), **stats}
    return {"name": "router", "kind": "data-driven", "method": "router", "params": {}, "test": result.to_dict(),
            "router_dir": str(out), "search_seconds": round(train_seconds, 2), "cost": cost}


def _hidden_size(model: Any) -> int:
    return int(model.config.hidden_size)
