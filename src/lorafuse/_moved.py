"""Deprecated import paths (kept for one release): each old module is an alias of the module it moved to.

`moved(old, new)` imports `new`, installs it in `sys.modules` under `old` (one module object under both names: no
module runs twice, so a registry fills once and a monkeypatch through either name reaches the code) and warns. For a
package the submodules are aliased too, so `import lorafuse.methods.registry` finds the moved module instead of
loading its file again. CHANGELOG.md lists the moves.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from types import ModuleType

REMOVED_IN = "0.3.0"


def moved(old: str, new: str) -> ModuleType:
    warnings.warn(f"{old} has moved to {new}; the old import path goes in lorafuse {REMOVED_IN}",
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    if hasattr(module, "__path__"):  # a package: alias each submodule too
        for info in pkgutil.iter_modules(module.__path__):
            sys.modules[f"{old}.{info.name}"] = importlib.import_module(f"{new}.{info.name}")
    return module
