"""`lorafuse demo`: the shipped demo experiment — embedded MiniLM, four generated tasks, offline, minutes."""

from __future__ import annotations

import argparse

REAL_TASKS = ("mnli", "snli", "rte", "scitail", "fever")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="run on the real NLI tasks found here (e.g. ../shared/data/nli) instead")
    p.add_argument("--output", help="run directory (default: runs/demo)")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished work")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from lorafuse.commands.experiment import execute
    from lorafuse.errors import ConfigError
    from lorafuse.experiment.config import load_config

    torch.set_num_threads(min(torch.get_num_threads(), 2) or 1)
    config = load_config("demo")
    if args.data_dir:
        tasks = [t for t in REAL_TASKS if (Path(args.data_dir) / t / "train.jsonl").is_file()]
        if not tasks:
            raise ConfigError(f"{args.data_dir}: none of {', '.join(REAL_TASKS)} found as <task>/train.jsonl")
        config = config.model_copy(update={
            "name": "demo-real", "tasks": tasks, "data_dir": args.data_dir,
            "train": config.train.model_copy(update={"max_length": 128, "lr": 1e-3}),
            "eval": config.eval.model_copy(update={"max_length": 128, "max_validation": 200, "max_test": 500}),
            "notes": "Real NLI data from " + args.data_dir + " (a small CPU budget: 320 training examples a task)."})
    return execute(config, args.output or f"runs/{config.name}", args.fresh, args.quiet)
