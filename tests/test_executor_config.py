"""The executor and sampler settings without a cluster: `executor:` in the config (full or shorthand), the
command line over it, clear errors, Ray imported only when a Ray run has work, the local executor by default."""

from __future__ import annotations

import argparse
import sys

import pytest

from lorafuse.commands.experiment import with_executor
from lorafuse.errors import ConfigError
from lorafuse.experiment.config import parse_config
from lorafuse.experiment.executors import LocalExecutor, RayExecutor, make_executor

BASE = {"name": "x", "model": "minilm", "tasks": ["rte"]}


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"executor": None, "address": None, "workers": None, **kw})


def test_executor_section_and_shorthand():
    assert parse_config(BASE, "c").executor.kind == "local"
    assert parse_config({**BASE, "executor": "ray"}, "c").executor.kind == "ray"
    full = parse_config({**BASE, "executor": {"kind": "ray", "address": "10.0.0.1:6379", "workers": 4,
                                              "gpus_per_worker": 1}}, "c").executor
    assert (full.address, full.workers, full.gpus_per_worker, full.max_retries) == ("10.0.0.1:6379", 4, 1, 2)
    with pytest.raises(ConfigError, match="c: executor.kind"):
        parse_config({**BASE, "executor": "dask"}, "c")
    with pytest.raises(ConfigError, match="unknown field 'executor.nodes'"):
        parse_config({**BASE, "executor": {"kind": "ray", "nodes": 2}}, "c")


def test_command_line_over_the_config():
    config = parse_config({**BASE, "executor": {"kind": "ray", "workers": 4}}, "c")
    assert with_executor(config, args()) is config
    changed = with_executor(config, args(address="auto", workers=2)).executor
    assert (changed.kind, changed.address, changed.workers) == ("ray", "auto", 2)
    assert with_executor(config, args(executor="local")).executor.kind == "local"
    with pytest.raises(ConfigError, match="--executor ray"):
        with_executor(parse_config(BASE, "c"), args(address="auto"))


def test_executors_are_made_lazily():
    assert isinstance(make_executor(parse_config(BASE, "c").executor), LocalExecutor)
    had_ray = "ray" in sys.modules
    ray_executor = make_executor(parse_config({**BASE, "executor": {"kind": "ray", "max_retries": 0}}, "c").executor)
    assert isinstance(ray_executor, RayExecutor) and ray_executor.max_retries == 0
    assert ray_executor.run_jobs(None, []) == [] and ray_executor.close() is None
    assert ("ray" in sys.modules) == had_ray  # nothing to run: Ray not even imported


def test_tpe_sampler_needs_trials():
    spec = {"method": "ties", "search": {"lambda": [0.5, 1.0]}, "sampler": "tpe"}
    with pytest.raises(ConfigError, match="sampler: tpe needs"):
        parse_config({**BASE, "methods": [spec]}, "c")
    assert parse_config({**BASE, "methods": [{**spec, "samples": 2}]}, "c").methods[0].sampler == "tpe"
