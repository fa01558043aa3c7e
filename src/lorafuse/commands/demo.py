"""`lorafuse demo`: the shipped `demo` experiment — the embedded MiniLM and four generated NLI-style tasks, each
testing a different skill — offline, in minutes on two CPU cores. `--data-dir` swaps in the real NLI tasks."""

from __future__ import annotations

import argparse

REAL_TASKS = ("mnli", "snli", "rte", "scitail", "fever")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lorafuse.commands.experiment import add_run_options

    p.add_argument("--data-dir", help="run on the real NLI tasks found here (e.g. ../shared/data/nli) instead "
                                      "of the generated ones")
    p.add_argument("--config", default="demo", help="another experiment config (a file or a shipped name)")
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    from lorafuse.commands.experiment import execute
    from lorafuse.experiment.config import load_config

    config = load_config(args.config)
    if args.data_dir:
        config = real_data(config, args.data_dir)
    return execute(config, args)


def real_data(config, data_dir: str):
    """The demo's budget on the real tasks present in `data_dir` (longer sequences, a larger test sample)."""
    from pathlib import Path

    from lorafuse.errors import ConfigError

    tasks = [t for t in REAL_TASKS if (Path(data_dir) / t / "train.jsonl").is_file()]
    if not tasks:
        raise ConfigError(f"--data-dir {data_dir}: none of {', '.join(REAL_TASKS)} found as <task>/train.jsonl")
    return config.model_copy(update={
        "name": f"{config.name}-real", "tasks": tasks, "data_dir": data_dir,
        "train": config.train.model_copy(update={"max_length": 128, "lr": 1e-3}),
        "eval": config.eval.model_copy(update={"max_length": 128, "max_validation": 200, "max_test": 500}),
        "notes": f"Real NLI data from {data_dir}, on the demo's small CPU budget "
                 f"({config.train.max_examples} training examples a task)."})
