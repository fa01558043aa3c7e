"""LoGo routing (Lee et al., "LoRA on the Go: Instance-level Dynamic LoRA Selection and Merging", ACL 2026,
arXiv 2511.07129; the authors' code: archon159/LoGo): a training-free, per-input mixture of LoRA adapters.

For each input, one probe pass runs the model with every adapter attached (each at weight 1, as the authors' code
does: all adapters of a PEFT mixed model active) up to one probe module, by default the first adapted module of
the last adapted layer (the authors probe the query projection of the last layer). At the input's last real token
x, every adapter's LoRA branch o_t = s_t·B_t·A_t·x is scored by its norm ‖o_t‖₂ (`signal="norm"`, the paper's
default) or by the inverse entropy 1 / (H(softmax(o_t)) + 1e-6) (`signal="entropy"`); the top-k adapters are
kept and weighted by their scores normalised to sum 1 (w_t = score_t / Σ_selected score). The input then runs with
Σ_t w_t·s_t·B_t·A_t·x added in every adapted layer, the mixture the authors get by rescaling each selected
adapter's PEFT scaling by w_t.

Where lorafuse differs, and why:
- the probe module's input is the one the module really receives (after its layer's normalisation); the authors'
  code projects the residual stream before the layer's norm (`hidden_states[layer]`), which is not what the
  module multiplies;
- the probe pass stops at the probe module (the rest of it cannot change the score);
- `probe="base"` probes with the adapters off, an ablation the paper does not run;
- an adapter that does not adapt the probe module cannot be scored there and is never selected; when every
  selected score is 0 the selected adapters share the weight equally (the normalisation is 0/0 there).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lorafuse.atomic import atomic_output_dir
from lorafuse.errors import AdapterError, ConfigError
from lorafuse.fusion.router import (
    _Module,
    adapter_entries,
    check_unchanged,
    forward_hooks,
    library,
    read_config,
    resolve_saved,
)
from lorafuse.model.kinds import register_kind
from lorafuse.provenance import stamp

LOGO_CONFIG = "logo_config.json"
SIGNALS = ("norm", "entropy")
PROBES = ("adapters", "base")
Signal = Literal["norm", "entropy"]
Probe = Literal["adapters", "base"]
ENTROPY_EPS = 1e-6  # the authors' 1 / (H + 1e-6)


# -- the rule ------------------------------------------------------------------------------------------------------
def branch_outputs(module: _Module, x: torch.Tensor, adapters: int) -> torch.Tensor:
    """[B, T, out]: every adapter's LoRA branch s_t·B_t·A_t·x for one token per input x [B, in], in fp32 (zeros
    for adapters that do not adapt the module)."""
    z = x.float() @ module.A.to(x.device).T
    B = module.B.to(x.device)
    out = torch.zeros(x.shape[0], adapters, B.shape[0], device=x.device)
    for t in range(adapters):
        cols = (module.columns == t).to(x.device)
        if bool(cols.any()):
            out[:, t] = z[:, cols] @ B[:, cols].T
    return out


def scores(branches: torch.Tensor, signal: Signal) -> torch.Tensor:
    """[B, T] LoGo's signal of each branch output [B, T, out]: its L2 norm, or its inverse entropy."""
    if signal == "norm":
        return branches.norm(dim=-1)
    p = torch.softmax(branches, dim=-1)
    entropy = -(p * torch.log(p + 1e-8)).sum(-1)
    return 1.0 / (entropy + ENTROPY_EPS)


def select(score: torch.Tensor, present: torch.Tensor, top_k: int) -> torch.Tensor:
    """[B, T] weights: the top-k present adapters by score, weighted by score / Σ selected score; 0 elsewhere."""
    k = min(top_k, int(present.sum()))
    top, idx = torch.topk(score.masked_fill(~present.to(score.device), float("-inf")), k, dim=-1)
    total = top.sum(-1, keepdim=True)
    weights = torch.where(total > 0, top / total.clamp(min=torch.finfo(top.dtype).tiny), torch.full_like(top, 1 / k))
    return torch.zeros_like(score).scatter(-1, idx, weights)


def last_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, in]: each input's last real token of x [B, L, in] (left or right padding, from the attention mask)."""
    if mask is None or mask.ndim != 2:
        return x[:, -1]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.to(torch.long) * positions).argmax(-1).to(x.device)
    return x[torch.arange(x.shape[0], device=x.device), last]


def layer_index(module: str) -> int:
    """The layer number in a module path (`model.layers.11.self_attn.q_proj` → 11), -1 without one."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return int(found.group(1)) if found else -1


def default_probe_module(model: Any, modules: Iterable[str]) -> str:
    """The first adapted module, in the model's module order, of the last adapted layer (LoGo's choice: the query
    projection of the last layer, where the query is adapted)."""
    from lorafuse.model.apply import _submodule

    order = {id(m): i for i, m in enumerate(model.modules())}
    names = list(modules)
    last = max(layer_index(n) for n in names)
    return min((n for n in names if layer_index(n) == last), key=lambda n: order.get(id(_submodule(model, n)), 0))


class _ProbeDone(Exception):
    """Raised from the probe module's hook: the probe pass has what it needs."""


# -- the router ----------------------------------------------------------------------------------------------------
@dataclass
class LoGoRouter:
    """T adapters' factors per module; per input, weights from one probe pass (see the module docstring)."""

    names: list[str]
    modules: dict[str, _Module]
    paths: list[str]
    sha256: list[str]
    top_k: int = 1
    signal: Signal = "norm"
    probe: Probe = "adapters"
    probe_module: str | None = None  # None: `default_probe_module` of the model it is installed on
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    last_weights: torch.Tensor | None = None  # the weights of the last batch routed [B, T]

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"logo: top-k {self.top_k} must be at least 1")
        if self.signal not in SIGNALS:
            raise ConfigError(f"logo: signal '{self.signal}' is not one of {', '.join(SIGNALS)}")
        if self.probe not in PROBES:
            raise ConfigError(f"logo: probe '{self.probe}' is not one of {', '.join(PROBES)}")
        if self.probe_module is not None and self.probe_module not in self.modules:
            raise ConfigError(f"logo: probe module '{self.probe_module}' is adapted by none of the adapters")
        self.top_k = min(self.top_k, len(self.names))

    @classmethod
    def from_adapters(cls, adapters: Sequence[str | Path], names: Sequence[str] | None = None, top_k: int = 1,
                      signal: Signal = "norm", probe: Probe = "adapters", probe_module: str | None = None
                      ) -> LoGoRouter:
        lib = library(adapters, names, "logo")
        return cls(lib.names, lib.modules, lib.paths, lib.sha256, top_k, signal, probe, probe_module, lib.heads)

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """[B, T] routing weights of inputs whose probe token at `module` is x [B, in]."""
        branches = branch_outputs(self.modules[module], x, len(self.names))
        present = torch.bincount(self.modules[module].columns, minlength=len(self.names)) > 0
        return select(scores(branches, self.signal), present, self.top_k)

    @contextmanager
    def installed(self, model: Any) -> Iterator[LoGoRouter]:
        """Route every forward of `model`: a probe pass of its backbone up to the probe module, then the
        input's mixture in every adapted layer."""

        probe_at = self.probe_module or default_probe_module(model, self.modules)
        state: dict[str, Any] = {"probing": False, "x": None, "g": None}

        def probe_hook(backbone: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if state["probing"]:
                return
            state["probing"], state["x"] = True, None
            try:
                with torch.no_grad():
                    backbone(*args, **kwargs)
            except _ProbeDone:
                pass
            finally:
                state["probing"] = False
            if state["x"] is None:
                raise AdapterError(f"logo: the probe pass never reached module '{probe_at}'")
            token = last_tokens(state["x"], kwargs.get("attention_mask", args[1] if len(args) > 1 else None))
            state["g"] = self.last_weights = self.weights(probe_at, token)

        def layer_hook(name: str, module: _Module) -> Any:
            def hook(layer: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                x = args[0]
                if state["probing"]:
                    if name == probe_at:
                        state["x"] = x.detach()
                        raise _ProbeDone
                    if self.probe == "base":
                        return output
                    return output + module.delta(x, torch.ones(x.shape[0], len(self.names), device=x.device))
                return output if state["g"] is None else output + module.delta(x, state["g"])
            return hook

        with forward_hooks(model, {name: layer_hook(name, m) for name, m in self.modules.items()}, probe_hook):
            yield self

    def settings(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "signal": self.signal, "probe": self.probe, "probe_module": self.probe_module}

    def save(self, out: str | Path, overwrite: bool = False, extra: Mapping[str, Any] | None = None) -> Path:
        """logo_config.json: the adapters with their sha256 and the routing settings (nothing else is stored)."""
        config = {"adapters": adapter_entries(self.names, self.paths, self.sha256, out), "logo": self.settings(),
                  "method": "LoGo routing (Lee et al., ACL 2026): per input, top-k adapters by the "
                            f"{self.signal} of their LoRA branch at the last token of one probe pass, weights "
                            "proportional to it",
                  **dict(extra or {}), **stamp()}
        with atomic_output_dir(out, overwrite, kind="logo router") as tmp:
            (tmp / LOGO_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> LoGoRouter:
        path = Path(path)
        config = read_config(path / LOGO_CONFIG, "logo", "LoGo")
        entries, s = config["adapters"], config["logo"]
        try:
            router = cls.from_adapters([resolve_saved(e["path"], path) for e in entries], [e["name"] for e in entries],
                                       int(s["top_k"]), s["signal"], s["probe"], s.get("probe_module"))
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"{path / LOGO_CONFIG}: not a readable LoGo config ({type(exc).__name__}: {exc})"
                               ) from None
        check_unchanged(path / LOGO_CONFIG, entries, router.sha256, "the LoGo router was saved")
        return router


def is_logo(path: str | Path) -> bool:
    return (Path(path) / LOGO_CONFIG).is_file()


register_kind("logo", is_logo, LoGoRouter.load, LoGoRouter)
