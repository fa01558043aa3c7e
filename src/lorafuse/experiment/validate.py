"""Checks an experiment makes before it trains anything: spaces, file names of methods, and every data split the
selected stages will read (names, strict YAML and the types of method parameters are checked with lorafuse.validate).

Why up front: a bad label in `test.jsonl`, an empty validation split or an unknown space used to surface only after
every adapter had trained (minutes to hours), and a task called `../x` put files outside the run directory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorafuse.errors import ConfigError

__all__ = ["check_data", "check_disjoint", "check_experiment", "check_space", "file_slug", "splits_for"]


def check_space(method: Any, space: str) -> None:
    """The space exists and the method can run in it (the rule of lorafuse.merging.engine._check_options)."""
    from lorafuse.merging.spaces import get_space

    get_space(space)
    method.check_space(space)


# -- data ---------------------------------------------------------------------------------------------------------
STAGE_SPLITS = {"train": ("train",), "reference": ("validation", "test"), "fuse": ("validation", "test"),
                "data-driven": ("train", "validation", "test"), "report": ()}


def splits_for(stages: Sequence[str]) -> list[str]:
    """The data splits the given stages read (in the order train, validation, test)."""
    wanted = {s for stage in stages for s in STAGE_SPLITS[stage]}
    return [s for s in ("train", "validation", "test") if s in wanted]


def check_data(tasks: Sequence[str], data_dir: str | None, splits: Sequence[str]) -> None:
    """Read every split once: each file exists, parses, is non-empty and has only the task's labels. Errors
    (lorafuse.tasks.DataError) name the file and line."""
    from lorafuse.tasks import get_task

    for name in tasks:
        task = get_task(name)
        loaded = {split: task.load(split, data_dir) for split in splits}
        if "validation" in loaded and "test" in loaded:
            check_disjoint(name, loaded["validation"], loaded["test"])


def check_disjoint(task: str, validation: Sequence[Any], test: Sequence[Any]) -> None:
    """Refuse a validation split that is the test split (every test pair in it): a search on validation would
    tune on the test set. A few shared pairs are only warned about: small or generated datasets repeat pairs."""
    import sys

    seen = {(e.premise, e.hypothesis) for e in validation}
    shared = [e for e in test if (e.premise, e.hypothesis) in seen]
    if shared and len(shared) == len(test):
        raise ConfigError(f"task '{task}': every test example is also in its validation split (the same data?); "
                          "coefficients would be searched on the test set: give disjoint splits")
    if shared:
        print(f"warning: task '{task}': {len(shared)} of {len(test)} test pairs also occur in its validation split",
              file=sys.stderr)


def file_slug(name: str) -> str:
    """The file-name form of a method's name (`ties@knots` → `ties-knots`), as the runner writes it."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def check_experiment(config: Any, stages: Sequence[str], formulation: Any) -> None:
    """Everything an experiment can check before it trains: tasks known (after its task file), the data
    directory and a local model present, the formulation able to express every task (`formulation()` gives its name), and every
    split the stages read present, parseable, non-empty and labelled with the task's labels."""
    from lorafuse.model.formulations import check_formulation
    from lorafuse.model.models import resolve_model
    from lorafuse.tasks import get_task

    config.check_tasks()
    resolve_model(config.model)  # a missing local model is an error now (it was tried on the Hub at training)
    check_formulation(formulation(), [get_task(t) for t in config.tasks])
    check_given_adapters(config)
    splits = splits_for(stages)
    trained = [t for t in config.tasks if t not in config.adapters]
    needs_train = "data-driven" in stages and (  # the router trains on every task; RegMean, AdaMerging may read it
        config.router is not None or getattr(config.regmean, "split", None) == "train"
        or "train" in getattr(config.adamerging, "inputs", ()))
    check_data(config.tasks if needs_train else trained, config.data_dir, splits)
    check_data([t for t in config.tasks if t not in trained and not needs_train], config.data_dir,
               [s for s in splits if s != "train"])


def check_given_adapters(config: Any) -> None:
    """Each adapter given under `adapters:` loads (its config and weights are read; errors name the file)."""
    from lorafuse.adapters.reader import LoraAdapter
    from lorafuse.errors import LorafuseError

    for task, source in config.adapters.items():
        try:
            LoraAdapter(source)
        except LorafuseError as exc:
            raise ConfigError(f"adapters.{task}: {exc}") from None
