"""The kinds of fused model an `Evaluator` accepts beyond a plain adapter: each registers how to recognise its
directory and load it, and its loaded form installs itself on the model (`installed(model)`, a context manager) and
brings its per-task heads (`heads`).

The router (lorafuse.fusion.router) registers itself here on import, so the evaluator never imports `fusion`;
whoever evaluates a router directory imports lorafuse.fusion.router first (`lorafuse eval`, `lorafuse router`, the
experiment runner do)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FusedKind:
    name: str
    detect: Callable[[Path], bool]  # is this directory one of the kind?
    load: Callable[[Path], Any]  # the loaded form: an instance of `type`
    type: type


_KINDS: dict[str, FusedKind] = {}
# files that mark a kind's directory, and the module that registers the kind: for a clear error, not an import
UNREGISTERED_HINTS = {"router_config.json": "lorafuse.fusion.router",
                      "arrow_config.json": "lorafuse.fusion.arrow",
                      "logo_config.json": "lorafuse.fusion.logo"}


def register_kind(name: str, detect: Callable[[Path], bool], load: Callable[[Path], Any], type_: type) -> None:
    """Register (or re-register, e.g. on a module reload) a kind of fused model."""
    _KINDS[name] = FusedKind(name, detect, load, type_)


def load_fused(path: str | Path) -> Any:
    """The loaded model of the first registered kind whose directory `path` is, else `path` unchanged (a plain
    adapter directory)."""
    for kind in _KINDS.values():
        if kind.detect(path):
            return kind.load(path)
    for marker, module in UNREGISTERED_HINTS.items():
        if (Path(path) / marker).is_file():  # never read a router's directory as a plain adapter
            from lorafuse.errors import ConfigError

            raise ConfigError(f"{path}: a directory of a kind not registered in this process ({marker}); "
                              f"import {module} first (lorafuse's commands and experiments do)")
    return path


def installable(adapter: Any) -> bool:
    """Whether `adapter` is a loaded fused model of a registered kind."""
    return any(isinstance(adapter, kind.type) for kind in _KINDS.values())
