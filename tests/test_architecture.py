"""The house's architecture, checked on the source: an AST walk over src/lorafuse collects every import (module
level, inside functions and under TYPE_CHECKING; relative imports resolved; `from pkg import sub` counts as an import
of the submodule `pkg.sub`, `from pkg import name` as one of `pkg`).

Rules (docs/architecture.md):

1. No import cycle: the import graph has no strongly connected component of more than one module.
2. Layers, top to bottom: `cli` and `commands` (the CLI); `experiment` (runs, reports); `fusion` (data-driven fusion:
   LoraHub, the router); the core below them (`merging`, `model`, `adapters`, `tasks` and the leaf modules `errors`,
   `validate`, `atomic`, `provenance`, `stats`). A module imports its own layer or lower ones only:
   - only `cli`/`commands` import `lorafuse.commands`;
   - only `cli`/`commands`/`experiment` import `lorafuse.experiment`;
   - only `cli`/`commands`/`experiment`/`fusion` import `lorafuse.fusion`.
   The deprecation shims at the old paths (lorafuse/engine.py, lorafuse/methods/, ... : see CHANGELOG.md) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "lorafuse"
# the old paths, aliases of the moved modules for one release (lorafuse._moved)
SHIMS = {"engine", "mergeconfig", "spaces", "aligned", "methods", "algebra", "formulations", "training", "evaluation",
         "models", "precision", "train_progress"}
# layer of each top-level part of the package: a module may import a part whose layer is not above its own
TOP = {"cli": 3, "__main__": 3, "commands": 3, "experiment": 2, "fusion": 1}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, package)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, (path, package) in modules.items():
        here = name if package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target == "lorafuse" or target.startswith("lorafuse."):
                    resolved = known(target)
                    if resolved and resolved != name:
                        graph[name].add(resolved)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each a strongly connected component): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_module_imports_a_layer_above_its_own():
    wrong = [f"{m} imports {t}" for m, targets in _graph().items() if _part(m) not in SHIMS
             for t in sorted(targets) if TOP.get(_part(t), 0) > TOP.get(_part(m), 0)]
    assert not wrong, "imports upward: " + "; ".join(wrong)


def test_the_walk_sees_imports_inside_functions_and_a_made_up_cycle():
    graph = _graph()
    assert "lorafuse.adapters.live" in graph["lorafuse.adapters.check"]  # imported inside check_adapter
    assert "lorafuse.fusion.router" in graph["lorafuse.commands.eval"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_old_paths_are_warning_aliases_and_methods_register_once():
    import os
    import subprocess
    import sys

    code = """if True:
        import importlib, warnings
        from lorafuse.merging.methods.registry import list_methods
        before = [m.name for m in list_methods()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import lorafuse.methods.linear, lorafuse.algebra.lowrank, lorafuse.engine, lorafuse.training
        assert lorafuse.engine is importlib.import_module("lorafuse.merging.engine")
        assert lorafuse.methods.linear is importlib.import_module("lorafuse.merging.methods.linear")
        assert lorafuse.algebra.lowrank is importlib.import_module("lorafuse.merging.algebra.lowrank")
        assert lorafuse.training is importlib.import_module("lorafuse.model.training")
        assert [m.name for m in list_methods()] == before
        assert len([w for w in caught if issubclass(w.category, DeprecationWarning)]) == 4, caught
        import lorafuse
        assert callable(lorafuse.merge)
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parents[1], env=env)
    assert out.returncode == 0, out.stderr


def test_a_router_directory_is_never_read_as_a_plain_adapter(tmp_path, monkeypatch):
    """Without the router's kind registered, evaluating its directory is a clear error, not a silent misread."""
    import pytest

    from lorafuse.errors import ConfigError
    from lorafuse.model import kinds

    monkeypatch.setattr(kinds, "_KINDS", {})
    (tmp_path / "router_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="import lorafuse.fusion.router first"):
        kinds.load_fused(tmp_path)
    assert kinds.load_fused(tmp_path / "plain") == tmp_path / "plain"
