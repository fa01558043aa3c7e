"""Fixtures for the task, training and evaluation tests: tiny random models (tests/tiny_models.py) and small
learnable tasks defined by YAML task files, built once per test module. Import the fixtures by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import tiny_bert, tiny_llama, write_task_files

from lorafuse.tasks import load_task_file


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert") / "model")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def yaml_tasks(tmp_path_factory) -> Path:
    """Tasks `cmp3` (3 labels) and `cmp2` (entailment / not_entailment), registered from YAML task files."""
    root = tmp_path_factory.mktemp("data")
    load_task_file(write_task_files(root, "cmp3", ["contradiction", "entailment", "neutral"]))
    load_task_file(write_task_files(root, "cmp2", ["entailment", "not_entailment"], seed=1))
    return root


@pytest.fixture(scope="module")
def classify_adapter(bert, yaml_tasks, tmp_path_factory) -> Path:
    """A classify adapter of the tiny BERT trained briefly on cmp3 (its head stored in modules_to_save)."""
    from lorafuse.model.training import TrainConfig, train_adapter

    return train_adapter(TrainConfig(task="cmp3", model=str(bert), formulation="classify", epochs=2, lr=5e-3,
                                     batch_size=8, rank=4, output=str(tmp_path_factory.mktemp("ad") / "cmp3"),
                                     target_modules=["query", "value"], progress=False))


def read_record(adapter: Path) -> dict:
    return json.loads((adapter / "lorafuse_train.json").read_text())
