"""Checks on untrusted input, shared by every command: names that must never act as paths, paths that must stay
inside (or outside) others, numbers that must be finite and of the right type, and YAML without duplicate keys.

Each check raises a one-line error naming the field, and the file when the caller puts it in `what`."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lorafuse.errors import ConfigError, LorafuseError

_FORBIDDEN_IN_NAMES = re.compile(r"[/\\:\x00-\x1f]")


def is_safe_name(name: object) -> bool:
    """A name that is one path component of its own: no separator, no drive, no control character, not empty,
    not `.`/`..` and not hidden (a leading dot), so `dir / name` always stays directly inside `dir`."""
    return (isinstance(name, str) and bool(name.strip()) and not name.startswith(".")
            and _FORBIDDEN_IN_NAMES.search(name) is None and len(name) <= 200)


def check_name(name: object, what: str, error: type[LorafuseError] = ConfigError) -> str:
    """`name` unchanged when safe, else an error naming `what` (e.g. "--names", "a/lorafuse_train.json: task")."""
    if not is_safe_name(name):
        raise error(f"{what}: {name!r} is not a plain name (no '/', '\\', ':', leading '.', '..' or empty names: "
                    "names become file names)")
    return str(name)


def safe_name(text: str, fallback: str = "adapter") -> str:
    """A safe name derived from `text` (e.g. a directory name): forbidden characters become '_'."""
    cleaned = _FORBIDDEN_IN_NAMES.sub("_", text).lstrip(".").strip()[:200]
    return cleaned or fallback


def looks_like_hub_id(text: str, bare: bool = False) -> bool:
    """`org/name` as the Hub spells repository ids (with `bare`, also the legacy one-part ids of models such as
    `gpt2`); a path such as `./x`, `../x`, `/x` or `x/` never is one, so a missing local directory is reported as
    missing instead of being looked up on the Hub."""
    pattern = r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*" if bare else r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"
    return re.fullmatch(pattern, text) is not None and ".." not in text


def child_path(parent: Path, name: str, what: str) -> Path:
    """`parent / name`, checked to stay directly inside `parent` (defence in depth behind `check_name`)."""
    path = parent / check_name(name, what)
    if path.resolve().parent != parent.resolve():
        raise ConfigError(f"{what}: {name!r} would leave {parent}")
    return path


def real(path: str | Path) -> Path:
    """An absolute path with symlinks resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def overlaps(a: str | Path, b: str | Path) -> bool:
    """True when one of the two paths is the other or lies inside it."""
    ra, rb = real(a), real(b)
    return ra == rb or ra in rb.parents or rb in ra.parents


def check_output_apart(output: str | Path, inputs: Iterable[str | Path], flag: str = "-o") -> None:
    """Refuse an output that is an input, contains one or lies inside one: replacing it would delete (or
    write into) the user's inputs."""
    for item in inputs:
        if overlaps(output, item):
            ro, ri = real(output), real(item)
            how = "is" if ro == ri else "contains" if ro in ri.parents else "lies inside"
            raise ConfigError(f"{flag} {output}: the output {how} the input {item}; choose another output directory")


def finite_number(value: object, what: str, error: type[LorafuseError] = ConfigError) -> float:
    """A real number (int or float, never bool or str) that is finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{what}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise error(f"{what}: {value!r} is not a finite number")
    return float(value)


def finite_numbers(values: Sequence[object], what: str) -> list[float]:
    return [finite_number(v, f"{what}[{i}]") for i, v in enumerate(values)]


def strict_int(value: object, what: str, minimum: int | None = None,
               error: type[LorafuseError] = ConfigError) -> int:
    """An int (never bool, never a float such as 4.5 or 4.0), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{what}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise error(f"{what}: must be ≥ {minimum} (got {value})")
    return int(value)


def strict_bool(value: object, what: str, error: type[LorafuseError] = ConfigError) -> bool:
    """true or false only: the string "false" is not a boolean (bool("false") is True)."""
    if not isinstance(value, bool):
        raise error(f"{what}: expected true or false, got {value!r}")
    return value


def check_regex(pattern: object, what: str, error: type[LorafuseError] = ConfigError) -> str:
    if not isinstance(pattern, str):
        raise error(f"{what}: expected a string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise error(f"{what}: {pattern!r} is not a valid regular expression ({exc})") from None
    return pattern


def read_text(path: Path, error: type[LorafuseError] = ConfigError) -> str:
    """A text file as UTF-8, with unreadable or undecodable files reported in one line naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None


def load_yaml(text: str, source: str) -> Any:
    """YAML (safe subset) that refuses duplicate mapping keys: PyYAML keeps the last one silently."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                raise ConfigError(f"{source}: duplicate key '{key}' (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return loader.construct_mapping(node)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    # `1e-3` is a number, as in YAML 1.2 (PyYAML's YAML 1.1 reads it as a string, which strict types refuse)
    _Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None


def positive_int(text: str) -> int:
    """argparse type of counts such as --batch-size: an integer ≥ 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1 (got {value})")
    return value


def finite_float(text: str) -> float:
    """argparse type of real-valued flags: `nan`, `inf` and `1e999` are refused, not carried into the work."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value
