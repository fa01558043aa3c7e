"""Checks on what users type that lorafuse turns into paths or values: names that must never be paths, paths that
must stay inside an output, and YAML read strictly (duplicate keys refused). Light: no torch, no pydantic."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from lorafuse.errors import ConfigError

# -- names ----------------------------------------------------------------------------------------------------
_BAD_NAME_CHARS = re.compile(r"[/\\\x00-\x1f]")


def name_problem(name: Any) -> str | None:
    """Why `name` cannot name a task, an experiment or a file lorafuse writes (None when it can). Names become
    file names (`adapters/<task>-<hash>`, `jobs/train-<task>-…`, `runs/<name>`), so a separator, a leading `.`
    (`..`, hidden files, lorafuse's own temporaries) or a control character is refused rather than sanitised:
    two different names must never map to one file."""
    if not isinstance(name, str):
        return f"must be a string (got {name!r})"
    if not name.strip():
        return "must not be empty"
    if _BAD_NAME_CHARS.search(name):
        return f"'{name}' contains a path separator or control character (names are never paths)"
    if name.startswith(".") or ".." in name:
        return f"'{name}' starts with '.' or contains '..' (names are never paths)"
    if len(name) > 120:
        return f"'{name[:40]}…' is longer than 120 characters"
    return None


def check_name(name: Any, what: str) -> str:
    """`name` unchanged, or a ConfigError naming `what` (e.g. "task", "experiment name")."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"{what}: {problem}")
    return name


def check_inside(path: Path, root: Path, what: str) -> Path:
    """`path` when it resolves inside `root` (defence in depth behind the name checks)."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{what} '{path}' would lie outside {root}")
    return path


# -- YAML -------------------------------------------------------------------------------------------------------
class StrictLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (PyYAML keeps the last silently) and reads `1e-3` as a number, as
    YAML 1.2 does (PyYAML's YAML 1.1 reads it as the string '1e-3', which strict types would then refuse)."""


def _no_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (line {line}; first on line {seen[key]})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML strictly; errors name `source` and the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None


def check_apart(out: Path, inputs: Iterable[tuple[str, Path]], what: str = "run directory") -> None:
    """Refuse an output that is, or contains, an input (replacing the output would delete it) or lies inside an
    input directory (the output would be written into the user's data). `inputs` are (description, path)."""
    resolved = Path(out).resolve()
    for description, path in inputs:
        target = Path(path).resolve()
        if target == resolved or resolved in target.parents:
            raise ConfigError(f"{what} {out} contains the {description} {path}: choose another output")
        if target.is_dir() and target in resolved.parents:
            raise ConfigError(f"{what} {out} lies inside the {description} {path}: choose another output")
