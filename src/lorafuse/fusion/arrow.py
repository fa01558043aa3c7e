"""Arrow routing (Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs", ICML 2024;
PEFT's `ArrowConfig`): a training-free, per-token, per-layer mixture of LoRA adapters.

Each adapter's prototype at a module is the top right singular vector v_t of its ΔW_t (from the factors: `factor_svd`,
never an m×n SVD). Each token x entering the module scores every adapter by |v_t·x| (sign-free, as a singular vector
has no sign); the top-k adapters get softmax(score / temperature) weights, the rest zero, and the module's output
gains Σ_t g_t·ΔW_t·x. As in the paper and PEFT's implementation, the score is the dot product with the unit
prototype, not the cosine: the top-k choice is the same, the softmax sees the token's norm.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafuse.atomic import atomic_output_dir
from lorafuse.errors import ConfigError
from lorafuse.fusion.router import (
    _Module,
    adapter_entries,
    check_unchanged,
    forward_hooks,
    library,
    read_config,
    resolve_saved,
)
from lorafuse.merging.algebra.lowrank import factor_svd
from lorafuse.model.kinds import register_kind
from lorafuse.provenance import stamp

ARROW_CONFIG = "arrow_config.json"


def prototypes(module: _Module, adapters: int) -> torch.Tensor:
    """[T, in] unit prototypes (top right singular vector of each adapter's ΔW), zero rows for adapters that do not
    adapt the module."""
    protos = torch.zeros(adapters, module.A.shape[1])
    for t in range(adapters):
        cols = module.columns == t
        if bool(cols.any()):
            protos[t] = factor_svd(module.B[:, cols], module.A[cols]).Vh[0].float()
    return protos


@dataclass
class ArrowRouter:
    """T adapters' factors per module and their prototypes; weights are computed in each layer from its input."""

    names: list[str]
    modules: dict[str, _Module]
    paths: list[str]
    sha256: list[str]
    top_k: int = 1
    temperature: float = 1.0
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    protos: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"arrow: top-k {self.top_k} must be at least 1")
        if not self.temperature > 0:
            raise ConfigError(f"arrow: temperature {self.temperature} must be positive")
        self.top_k = min(self.top_k, len(self.names))
        for name, module in self.modules.items():
            self.protos.setdefault(name, prototypes(module, len(self.names)))

    @classmethod
    def from_adapters(cls, adapters: Sequence[str | Path], names: Sequence[str] | None = None, top_k: int = 1,
                      temperature: float = 1.0) -> ArrowRouter:
        lib = library(adapters, names, "arrow")
        return cls(lib.names, lib.modules, lib.paths, lib.sha256, top_k, temperature, lib.heads)

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """[..., T] routing weights of the tokens x [..., in] at `module`."""
        protos = self.protos[module].to(device=x.device, dtype=torch.float32)
        present = protos.abs().sum(-1) > 0
        score = (x.float() @ protos.T).abs().masked_fill(~present, float("-inf"))
        top, idx = torch.topk(score, self.top_k, dim=-1)
        full = torch.full_like(score, float("-inf")).scatter(-1, idx, top)
        return torch.softmax(full / self.temperature, dim=-1)

    @contextmanager
    def installed(self, model: Any) -> Iterator[ArrowRouter]:
        """Route every adapted layer of `model` inside the context."""

        def hook_for(name: str, module: _Module) -> Any:
            def hook(layer: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                x = args[0]
                return output + module.delta(x, self.weights(name, x))
            return hook

        with forward_hooks(model, {name: hook_for(name, m) for name, m in self.modules.items()}):
            yield self

    def save(self, out: str | Path, overwrite: bool = False, extra: Mapping[str, Any] | None = None) -> Path:
        """arrow_config.json: the adapters with their sha256 and the routing settings (prototypes are recomputed)."""
        config = {"adapters": adapter_entries(self.names, self.paths, self.sha256, out),
                  "arrow": {"top_k": self.top_k, "temperature": self.temperature},
                  "method": "Arrow routing (Ostapenko et al., ICML 2024): per token and layer, top-k adapters by "
                            "|x·v_t| with v_t the top right singular vector of ΔW_t, softmax weights",
                  **dict(extra or {}), **stamp()}
        with atomic_output_dir(out, overwrite, kind="arrow router") as tmp:
            (tmp / ARROW_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> ArrowRouter:
        path = Path(path)
        config = read_config(path / ARROW_CONFIG, "arrow", "Arrow")
        entries, settings = config["adapters"], config["arrow"]
        router = cls.from_adapters([resolve_saved(e["path"], path) for e in entries], [e["name"] for e in entries],
                                   int(settings["top_k"]), float(settings["temperature"]))
        check_unchanged(path / ARROW_CONFIG, entries, router.sha256, "the Arrow router was saved")
        return router


def is_arrow(path: str | Path) -> bool:
    return (Path(path) / ARROW_CONFIG).is_file()


register_kind("arrow", is_arrow, ArrowRouter.load, ArrowRouter)
