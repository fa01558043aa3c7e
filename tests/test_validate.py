"""lorafuse.validate on its own: the one name rule, the inside and apart checks, strict types and strict YAML
(the CLI-level cases are in tests/test_bad_input_*.py)."""

from __future__ import annotations

import argparse
import enum
import os
import re
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from lorafuse.errors import AdapterError, ConfigError
from lorafuse.validate import (
    MAX_NAME_BYTES,
    MAX_NAME_LENGTH,
    check_apart,
    check_inside,
    check_name,
    check_param_types,
    check_regex,
    child_path,
    finite_float,
    finite_number,
    is_safe_name,
    load_yaml,
    load_yaml_file,
    looks_like_hub_id,
    name_problem,
    positive_int,
    real,
    safe_name,
    strict_bool,
    strict_int,
)


# -- names ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,reason", [
    ("../x", "path separator"), ("a/b", "path separator"), ("/abs", "path separator"), ("a\\b", "path separator"),
    ("C:x", "':'"), ("x\x00y", "control character"), ("a\nb", "control character"), ("..", "starts with '.'"),
    (".hidden", "starts with '.'"), ("a..b", "contains '..'"), ("", "is empty"), ("   ", "is empty"),
    ("x" * (MAX_NAME_LENGTH + 1), "longer than"), (3, "expected a string"), (None, "expected a string"),
    ("日本" * 43, "258 bytes in UTF-8"), ("é" * 61, "122 bytes in UTF-8"),
])
def test_one_name_rule_refuses_every_path_like_name(name, reason):
    problem = name_problem(name)
    assert problem is not None and reason in problem and not is_safe_name(name)
    with pytest.raises(AdapterError, match=f"^--names: .*{reason}"):
        check_name(name, "--names", AdapterError)


@pytest.mark.parametrize("name", ["mnli", "syn_negation", "a.b-1", "ties@knots", "x" * MAX_NAME_LENGTH, "v1.0",
                                  "é" * (MAX_NAME_BYTES // 2)])
def test_plain_names_pass_unchanged(name):
    assert name_problem(name) is None and check_name(name, "task") == name


@pytest.mark.parametrize("text", ["../../etc", "a..b", "x/y:z", ".hidden", "..", "", "ok\x00", "é" * 300])
def test_safe_name_always_gives_a_plain_name(text):
    assert is_safe_name(safe_name(text))


def test_multibyte_names_are_cut_by_bytes_not_refused_late(tmp_path):
    """A name of fewer than 120 characters but over 255 bytes used to pass and fail at the first file it named."""
    from types import SimpleNamespace

    from lorafuse.merging.engine import _make_names_unique

    assert safe_name("日本" * 43) == "日本" * 20
    adapters = [SimpleNamespace(name="é" * (MAX_NAME_BYTES // 2)) for _ in range(2)]
    _make_names_unique(adapters)
    assert adapters[1].name.endswith("-2") and all(is_safe_name(a.name) for a in adapters)
    with pytest.raises(ConfigError, match="^task: .*258 bytes in UTF-8"):
        child_path(tmp_path, "日本" * 43, "task")


def test_safe_name_keeps_plain_names_and_falls_back():
    assert safe_name("mnli-lora") == "mnli-lora" and safe_name("a..b") == "a_b" and safe_name("..") == "adapter"


def test_names_made_unique_stay_plain_names():
    from types import SimpleNamespace

    from lorafuse.merging.engine import _make_names_unique

    adapters = [SimpleNamespace(name="x" * MAX_NAME_LENGTH) for _ in range(3)] + [SimpleNamespace(name="a")]
    _make_names_unique(adapters)
    names = [a.name for a in adapters]
    assert len(set(names)) == 4 and names[1].endswith("-2") and names[2].endswith("-3") and names[3] == "a"
    assert all(is_safe_name(n) for n in names)


# -- paths ----------------------------------------------------------------------------------------------------
def test_check_inside_follows_symlinks(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert check_inside(root / "a" / "b", root, "job file") == root / "a" / "b"
    assert check_inside(root, root, "job file") == root
    with pytest.raises(ConfigError, match="job file .* would lie outside"):
        check_inside(root / ".." / "x", root, "job file")
    os.symlink(tmp_path, root / "link")
    with pytest.raises(ConfigError, match="would lie outside"):
        check_inside(root / "link" / "x", root, "job file")


def test_real_expands_home_and_leaves_unknown_users(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert real("~/x") == real(tmp_path / "x") and real("~no_such_user_xyz/x") == real(Path("~no_such_user_xyz/x"))


def test_child_path_checks_the_name_not_the_suffix(tmp_path):
    name = "x" * MAX_NAME_LENGTH  # the file name is longer than a name may be: the limit is on the name
    assert child_path(tmp_path, name, "task head name", ".safetensors") == tmp_path / f"{name}.safetensors"
    with pytest.raises(ConfigError, match="task head name: '../x' contains a path separator"):
        child_path(tmp_path, "../x", "task head name", ".safetensors")
    os.symlink(tmp_path.parent, tmp_path / "up")
    with pytest.raises(ConfigError, match="would lie outside"):
        child_path(tmp_path, "up", "task head name")


@pytest.mark.parametrize("output,how", [("in/a", "is"), ("in", "contains"), ("in/a/sub", "lies inside"),
                                        ("in/data.jsonl/x", "lies inside")])
def test_check_apart_refuses_overlaps(tmp_path, output, how):
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "data.jsonl").write_text("{}\n")
    inputs = [tmp_path / "in" / "a", ("data file", tmp_path / "in" / "data.jsonl")]
    with pytest.raises(ConfigError, match=f"^-o {tmp_path / output} {how} the (input|data file) "):
        check_apart(tmp_path / output, inputs, "-o")
    check_apart(tmp_path / "elsewhere", inputs, "-o")
    check_apart(tmp_path / "in" / "b", inputs, "-o")  # a sibling of the inputs is apart from them


# -- types ----------------------------------------------------------------------------------------------------
class Scope(str, enum.Enum):
    MODULE = "module"
    GLOBAL = "global"


class _Params(BaseModel):
    lambda_: float = Field(1.0, alias="lambda")
    seed: int = 0
    rescale: bool = True
    scope: Scope | None = None
    rule: Literal["a", "b"] = "a"
    either: int | float = 1
    name: str = "x"


class _Method:
    name, params = "demo", _Params


@pytest.mark.parametrize("values,words", [
    ({"lambda": "0.5"}, "parameter 'lambda': expected a number, got '0.5'"),
    ({"lambda": float("nan")}, "parameter 'lambda': nan is not a finite number"),
    ({"lambda": True}, "parameter 'lambda': expected a number, got True"),
    ({"seed": 1.0}, "parameter 'seed': expected an integer, got 1.0"),
    ({"seed": True}, "parameter 'seed': expected an integer, got True"),
    ({"rescale": "false"}, "parameter 'rescale': expected true or false, got 'false'"),
    ({"scope": "globl"}, "parameter 'scope': expected one of 'module', 'global', got 'globl'"),
    ({"rule": "c"}, "parameter 'rule': expected one of 'a', 'b', got 'c'"),
    ({"either": "1"}, "parameter 'either': expected an integer or a number, got '1'"),
    ({"name": 3}, "parameter 'name': expected a string, got 3"),
])
def test_param_types_are_strict(values, words):
    with pytest.raises(ConfigError, match="^" + re.escape(f"method 'demo': {words}")):
        check_param_types(_Method, values, "method 'demo'")


def test_param_types_accept_their_values_and_leave_unknowns_to_the_model():
    check_param_types(_Method, {"lambda": 2, "seed": 3, "rescale": False, "scope": "global", "rule": "b",
                                "either": 0.5, "name": "n", "unknown": object(), "seed_": None}, "m")
    with pytest.raises(ConfigError, match=r"^m: params\.seed: expected an integer"):
        check_param_types(_Method, {"seed": "1"}, "m", "params.{}")


def test_scalar_checks():
    assert finite_number(2, "w") == 2.0 and strict_int(3, "r", minimum=1) == 3 and strict_bool(False, "b") is False
    for bad, check in ((float("inf"), finite_number), ("1", finite_number), (4.5, strict_int), ("false", strict_bool)):
        with pytest.raises(ConfigError, match="^x: "):
            check(bad, "x")
    with pytest.raises(ConfigError, match="must be ≥ 1"):
        strict_int(0, "r", minimum=1)
    with pytest.raises(ValueError, match="^weight: nan is not a finite number"):
        finite_number(float("nan"), "weight", ValueError)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        check_regex("q_proj(", "target_modules")


def test_argparse_types():
    assert positive_int("3") == 3 and finite_float("1e-3") == 0.001
    for bad, kind in (("0", positive_int), ("x", positive_int), ("nan", finite_float), ("1e999", finite_float)):
        with pytest.raises(argparse.ArgumentTypeError):
            kind(bad)


def test_hub_ids_are_never_paths():
    assert looks_like_hub_id("org/name") and looks_like_hub_id("gpt2", bare=True) and not looks_like_hub_id("gpt2")
    assert not any(looks_like_hub_id(p, bare=True) for p in ("./x", "../x", "/x", "x/", "a/../b", "~/x"))


# -- YAML -----------------------------------------------------------------------------------------------------
def test_yaml_refuses_duplicate_keys_at_any_depth_naming_the_lines():
    assert load_yaml("a: {b: 1, c: 2}\nd: [1, 2]\n", "s") == {"a": {"b": 1, "c": 2}, "d": [1, 2]}
    with pytest.raises(ConfigError, match=r"^f\.yml: not valid YAML \(duplicate key 'a' \(line 3; first on line 1\)"):
        load_yaml("a: 1\nb: 2\na: 3\n", "f.yml")
    with pytest.raises(ConfigError, match="duplicate key 'x'"):
        load_yaml("top:\n  - {x: 1, x: 2}\n", "f.yml")
    with pytest.raises(ConfigError, match=r"^f\.yml: not valid YAML"):
        load_yaml("a: [1, 2\n", "f.yml")


def test_yaml_12_exponents_are_numbers():
    assert load_yaml("lr: 1e-3\nx: 2E+2\ny: -1.5e2\nname: 1e3x\nv: '1e-3'\n", "t") == {
        "lr": 0.001, "x": 200.0, "y": -150.0, "name": "1e3x", "v": "1e-3"}


def test_yaml_file_errors_name_the_file(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("a: 1\n")
    bad.write_bytes(b"a: \xff\n")
    assert load_yaml_file(good) == {"a": 1}
    with pytest.raises(ConfigError, match="bad.yaml: not UTF-8 text"):
        load_yaml_file(bad)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_yaml_file(tmp_path / "missing.yaml")


# -- bounded work on hostile input -----------------------------------------------------------------------------
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "notes: *i\n"


def test_yaml_alias_bombs_are_refused_at_once():
    import time

    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: not valid YAML \(.*aliases expand to more than 100,000"):
        load_yaml(BILLION_LAUGHS, "cfg.yaml")
    assert time.perf_counter() - start < 2
    with pytest.raises(ConfigError, match="recursive"):
        load_yaml("a: &a [1, *a]\n", "cfg.yaml")
    assert load_yaml("base: &b {r: 4}\none: *b\ntwo: *b\n", "t") == {"base": {"r": 4}, "one": {"r": 4}, "two": {"r": 4}}


@pytest.mark.parametrize("pattern", [r"(a|a)+$", r"(a+)+", r"(\d{1,2}\.)*x", r"(?=(a|a)+)q", "x" * 257])
def test_regexes_that_can_take_exponential_time_are_refused(pattern):
    with pytest.raises(ConfigError, match="^rank_pattern key: .*(exponential time|more than 256)"):
        check_regex(pattern, "rank_pattern key")


@pytest.mark.parametrize("pattern", [r".*\.q_proj", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", "q_proj",
                                     r"layers\.(0|1)\.", r"[ab]+c*", r"(ab)+", re.escape("model.layers.0.mlp.up_proj")])
def test_ordinary_module_patterns_pass(pattern):
    assert check_regex(pattern, "rank_pattern key") == pattern
