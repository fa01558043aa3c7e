"""Checks on untrusted input, the one place for them (merge, adapters, training, experiments, the CLI): names
that must never act as paths, paths that must stay inside (or apart from) others, values that must be finite and
of the right type, and YAML read strictly (duplicate keys refused).

Each check raises a one-line error naming the field, and the file when the caller puts it in `what`. Light to
import (no torch, no pydantic; PyYAML on first use): the CLI's argparse types live here."""

from __future__ import annotations

import enum
import functools
import json
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lorafuse.errors import ConfigError

# -- names ----------------------------------------------------------------------------------------------------
MAX_NAME_LENGTH = 120
# bytes, as file systems count a name (255 at most): an ASCII name of MAX_NAME_LENGTH characters fits with the
# suffixes and temporaries lorafuse adds (`.<name>.safetensors.tmp-<pid>@<host>-*`), and a name of multi-byte
# characters gets the same room instead of failing late with "File name too long"
MAX_NAME_BYTES = 120
_SEPARATOR = re.compile(r"[/\\]")
_CONTROL = re.compile(r"[\x00-\x1f]")
_UNSAFE_CHARS = re.compile(r"[/\\:\x00-\x1f]")


def name_problem(name: object) -> str | None:
    """Why `name` cannot name an adapter, a task, an experiment or a file lorafuse writes, or None when it can.

    Names become file names (`task_heads/<name>.safetensors`, `adapters/<task>-<hash>`, `runs/<name>`), so a name
    must be one path component of its own: no separator, no `:` (a drive or a stream), no control character, no
    leading `.` (`..`, hidden files, lorafuse's own temporaries), no `..`, not empty, at most 120 characters and
    120 bytes in UTF-8. Such
    names are refused rather than sanitised where the user gave them: two names must never map to one file."""
    if not isinstance(name, str):
        return f"expected a string, got {name!r}"
    shown = repr(name) if len(name) <= 40 else repr(name[:40] + "…")
    if not name.strip():
        reason = "is empty"
    elif _SEPARATOR.search(name):
        reason = "contains a path separator ('/' or '\\')"
    elif ":" in name:
        reason = "contains ':'"
    elif _CONTROL.search(name):
        reason = "contains a control character"
    elif name.startswith("."):
        reason = "starts with '.'"
    elif ".." in name:
        reason = "contains '..'"
    elif len(name) > MAX_NAME_LENGTH:
        reason = f"is longer than {MAX_NAME_LENGTH} characters"
    elif (size := len(name.encode("utf-8", "surrogatepass"))) > MAX_NAME_BYTES:
        reason = f"is {size} bytes in UTF-8, more than {MAX_NAME_BYTES} (file names hold at most 255)"
    else:
        return None
    return f"{shown} {reason}: not a plain name (names become file names)"


def is_safe_name(name: object) -> bool:
    """True for a name `name_problem` accepts: `dir / name` then always stays directly inside `dir`."""
    return name_problem(name) is None


def check_name(name: object, what: str, error: type[Exception] = ConfigError) -> str:
    """`name` unchanged when safe, else an error naming `what` (e.g. "--names", "a/lorafuse_train.json: task")."""
    problem = name_problem(name)
    if problem is not None:
        raise error(f"{what}: {problem}")
    return str(name)


def safe_name(text: str, fallback: str = "adapter") -> str:
    """A safe name derived from `text` (e.g. a directory's name, never refused): leading dots are dropped, every
    character or `..` that `name_problem` refuses becomes '_', and the result is cut to the length limit."""
    cleaned = cut_name(re.sub(r"\.{2,}", "_", _UNSAFE_CHARS.sub("_", text).lstrip("."))).strip()
    return cleaned if is_safe_name(cleaned) else fallback


def cut_name(text: str, room: int = 0) -> str:
    """`text` cut to the name limits less `room` (for a suffix to be added), in characters and in UTF-8 bytes,
    never inside a character."""
    text = text[:MAX_NAME_LENGTH - room]
    return text.encode("utf-8", "surrogatepass")[:MAX_NAME_BYTES - room].decode("utf-8", "ignore")


def looks_like_hub_id(text: str, bare: bool = False) -> bool:
    """`org/name` as the Hub spells repository ids (with `bare`, also the legacy one-part ids of models such as
    `gpt2`); a path such as `./x`, `../x`, `/x` or `x/` never is one, so a missing local directory is reported as
    missing instead of being looked up on the Hub."""
    pattern = r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*" if bare else r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"
    return re.fullmatch(pattern, text) is not None and ".." not in text


# -- paths ----------------------------------------------------------------------------------------------------
def user_path(path: str | Path) -> Path:
    """A path the user gave, with `~` expanded as the shell does (os.path's: an unknown `~user` stays as written,
    where pathlib raises RuntimeError). Every reader and writer of a user's path goes through this, and so does
    every check on it: a quoted `'~/x'` must never be checked as $HOME/x but written as ./~/x."""
    return Path(os.path.expanduser(path))


def real(path: str | Path) -> Path:
    """An absolute path with symlinks resolved (also for a path that does not exist yet); `~` expanded as
    `user_path` does."""
    return Path(os.path.realpath(user_path(path)))


def check_inside(path: Path, root: Path, what: str) -> Path:
    """`path` unchanged when it resolves (symlinks followed) to `root` or inside it, else an error naming `what`:
    the defence in depth behind the name checks for every path built from user data."""
    resolved, base = real(path), real(root)
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{what} {path} would lie outside {root}")
    return path


def child_path(parent: Path, name: str, what: str, suffix: str = "") -> Path:
    """`parent / (name + suffix)` for an untrusted `name`: a plain name (`check_name`), and the path checked to
    stay inside `parent` (`check_inside`)."""
    return check_inside(parent / f"{check_name(name, what)}{suffix}", parent, what)


def overlaps(a: str | Path, b: str | Path) -> bool:
    """True when one of the two paths is the other or lies inside it."""
    ra, rb = real(a), real(b)
    return ra == rb or ra in rb.parents or rb in ra.parents


def check_apart(output: str | Path, inputs: Iterable[str | Path | tuple[str, str | Path]], what: str) -> None:
    """Refuse an output that is an input, contains one (replacing it would delete the input) or lies inside one
    (the output would be written into the user's data). `inputs` are paths, or (description, path) pairs for a
    message that says what the input is (a bare path is "the input"); `what` names the output ("-o", "run
    directory")."""
    for item in inputs:
        description, path = item if isinstance(item, tuple) else ("input", item)
        if overlaps(output, path):
            ro, ri = real(output), real(path)
            how = "is" if ro == ri else "contains" if ro in ri.parents else "lies inside"
            raise ConfigError(f"{what} {output} {how} the {description} {path}: choose another output")


# -- numbers and types ----------------------------------------------------------------------------------------
def finite_number(value: object, what: str, error: type[Exception] = ConfigError) -> float:
    """A real number (int or float, never bool or str) that is finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{what}: expected a number, got {value!r}")
    if not _finite(value):
        raise error(f"{what}: {_short(value)} is not a finite number")
    return float(value)


def _finite(value: numbers.Real) -> bool:
    """math.isfinite, for an int too large for a float too (OverflowError there): not finite as a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value: object) -> str:
    """A value for an error line: a 4,000-digit integer is not printed whole."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"


def strict_int(value: object, what: str, minimum: int | None = None,
               error: type[Exception] = ConfigError, maximum: int | None = None) -> int:
    """An int (never bool, never a float such as 4.5 or 4.0), at least `minimum` and at most `maximum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{what}: expected an integer, got {_short(value)}")
    if minimum is not None and value < minimum:
        raise error(f"{what}: must be ≥ {minimum} (got {_short(value)})")
    if maximum is not None and value > maximum:
        raise error(f"{what}: must be ≤ {maximum} (got {_short(value)})")
    return int(value)


def strict_bool(value: object, what: str, error: type[Exception] = ConfigError) -> bool:
    """true or false only: the string "false" is not a boolean (bool("false") is True)."""
    if not isinstance(value, bool):
        raise error(f"{what}: expected true or false, got {value!r}")
    return value


def check_param_types(method: Any, values: Mapping[str, Any], where: str, field: str = "parameter '{}'") -> None:
    """Each value of a method's parameters has the type its pydantic model declares, without pydantic's lax
    coercion (`"false"` → False, `4.5` → 4, `true` → 1, `"0.5"` → 0.5) and, for numbers, finite (pydantic lets
    NaN and Inf through). `method` is a registry MergeMethod; errors read `<where>: <field>: ...`, `field` formatted
    with the key. Unknown keys and None are left to the model (`parse_params`), which names them."""
    fields = {**method.params.model_fields, **{f.alias: f for f in method.params.model_fields.values() if f.alias}}
    for key, value in values.items():
        if key in fields and value is not None:
            check_type(value, fields[key].annotation, f"{where}: {field.format(key)}")


def check_type(value: object, annotation: Any, what: str, error: type[Exception] = ConfigError) -> None:
    """`value` is of the type `annotation` (bool, int, float, str, a Literal, a str Enum, or a union of these),
    strictly: a bool is no number, an int a float, a float never an int, and floats are finite. Richer
    annotations are left to the caller's model."""
    if _matches(value, annotation):
        return
    kinds = _alternatives(annotation)
    if float in kinds and isinstance(value, numbers.Real) and not isinstance(value, bool):
        finite_number(value, what, error)  # the one way a real number fails a float field: not finite
    raise error(f"{what}: expected {' or '.join(_describe(k) for k in kinds)}, got {value!r}")


def _alternatives(annotation: Any) -> list[Any]:
    """The members of a union other than None (the annotation itself when it is not a union)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) if arg is not type(None) for a in _alternatives(arg)]
    return [annotation]


def _matches(value: object, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and _finite(value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {m.value for m in annotation}
    if annotation is str:
        return isinstance(value, str)
    return True


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation))


# a pattern of a config (rank_pattern, alpha_pattern, target_modules) names modules: a few dozen characters
MAX_PATTERN_LENGTH = 256


def check_regex(pattern: object, what: str, error: type[Exception] = ConfigError) -> str:
    """A regular expression that compiles and matches module names in bounded time: at most MAX_PATTERN_LENGTH
    characters, and no repetition of something that can itself match in several ways (`(a|a)+`, `(a+)+`), the
    shape whose backtracking grows exponentially with the name (`(a|a)+$` took 38 s on a module name)."""
    if not isinstance(pattern, str):
        raise error(f"{what}: expected a string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise error(f"{what}: {pattern[:40]!r}… is {len(pattern)} characters, more than {MAX_PATTERN_LENGTH}")
    try:
        parsed = _sre_parser().parse(pattern)
        re.compile(pattern)
    except re.error as exc:
        raise error(f"{what}: {pattern!r} is not a valid regular expression ({exc})") from None
    if _ambiguous_repeat(list(parsed), inside_repeat=False):
        raise error(f"{what}: {pattern!r} repeats a group holding a repetition or an alternative (as `(a|b)+` or "
                    "`(a+)*`), which can take exponential time to match: write it without the outer repetition")
    return pattern


def _sre_parser() -> Any:
    """The `re` module's own parser (private: `re._parser` from Python 3.11, `sre_parse` before)."""
    try:
        from re import _parser  # type: ignore[attr-defined]
    except ImportError:  # Python 3.10
        import sre_parse as _parser
    return _parser


def _ambiguous_repeat(items: list[Any], inside_repeat: bool) -> bool:
    """Whether parsed pattern `items` hold an unbounded repetition of a repetition or an alternation."""
    constants = _sre_parser()  # it re-exports the opcodes
    repeats = {constants.MAX_REPEAT, constants.MIN_REPEAT, getattr(constants, "POSSESSIVE_REPEAT", None)}
    for op, av in items:
        if op in repeats:
            if inside_repeat:
                return True
            if _ambiguous_repeat(list(av[2]), inside_repeat or av[1] == constants.MAXREPEAT):
                return True
        elif op == constants.BRANCH:
            if inside_repeat or any(_ambiguous_repeat(list(branch), False) for branch in av[1]):
                return True
        elif op == constants.SUBPATTERN and _ambiguous_repeat(list(av[-1]), inside_repeat):
            return True
        elif op in (constants.ASSERT, constants.ASSERT_NOT) and _ambiguous_repeat(list(av[1]), inside_repeat):
            return True
    return False


def read_text(path: Path, error: type[Exception] = ConfigError) -> str:
    """A text file as UTF-8, with unreadable or undecodable files reported in one line naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None


def load_json(text: str | bytes, source: str, error: type[Exception] = ConfigError) -> Any:
    """JSON whose every failure is one line naming `source`: a syntax error, an integer longer than Python's
    4,300-digit conversion limit (a ValueError, not a JSONDecodeError) and nesting deeper than the recursion
    limit (a RecursionError) alike."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON ({exc})") from None
    except ValueError as exc:  # int("1" * 5000)
        raise error(f"{source}: not usable JSON ({_first_sentence(exc)})") from None
    except RecursionError:
        raise error(f"{source}: not usable JSON (nested too deeply)") from None


def _first_sentence(exc: Exception) -> str:
    return str(exc).split(";")[0]


def load_yaml(text: str, source: str) -> Any:
    """YAML (safe subset) read strictly: duplicate mapping keys are refused (PyYAML keeps the last one silently)
    and `1e-3` is a number, as in YAML 1.2. Errors name `source` and the line; so do integers past Python's
    4,300-digit conversion limit and nesting past the recursion limit (no traceback)."""
    import yaml

    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    except ValueError as exc:  # the int constructor's digit limit
        raise ConfigError(f"{source}: not usable YAML ({_first_sentence(exc)})") from None
    except RecursionError:
        raise ConfigError(f"{source}: not usable YAML (nested too deeply)") from None


def load_yaml_file(path: Path, error: type[Exception] = ConfigError) -> Any:
    """A YAML file read with `load_yaml`; an unreadable or non-UTF-8 file is an error naming it."""
    return load_yaml(read_text(path, error), str(path))


# nodes of a YAML document once its aliases are expanded: a config has hundreds; a "billion laughs" document
# (nine aliases of nine aliases of ...) billions, which the checks and their error messages would walk for minutes
MAX_YAML_NODES = 100_000


def _expanded_size(node: Any, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes under `node` with every alias expanded, counted once per distinct node (memoised in `sizes`);
    a YAML error when over MAX_YAML_NODES, or when an alias lies inside its own anchor (`open_nodes`)."""
    import yaml

    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise yaml.composer.ComposerError(None, None, "an alias used inside its own anchor (a recursive "
                                          "structure)", node.start_mark)
    open_nodes.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    if size > MAX_YAML_NODES:
        raise yaml.composer.ComposerError(None, None, f"its aliases expand to more than {MAX_YAML_NODES:,} values "
                                          "(an alias bomb?): write the values out", node.start_mark)
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


@functools.cache
def _strict_loader() -> type:
    """The SafeLoader subclass of `load_yaml`, built on first use (PyYAML stays out of `lorafuse --help`)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def get_single_node(self) -> Any:
            node = super().get_single_node()
            if node is not None:  # before anything is built from it: aliases share nodes, not their expansion
                _expanded_size(node, {}, set())
            return node

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = loader.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key '{key}' (line {line}; first on line {first_line[key]})")
            first_line[key] = line
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    # PyYAML's YAML 1.1 reads `1e-3` (no dot) as a string, which strict types would then refuse
    StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                       re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                       list("-+0123456789"))
    return StrictLoader


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
