"""What `lorafuse regmean` and `lorafuse adamerging` share: one adapter per task, a sample of unlabelled inputs of
each task's split, an fp32 model, and the output checks. Not a subcommand itself."""

from __future__ import annotations

import argparse
from typing import Any

from lorafuse.validate import positive_int


def add_common_arguments(p: argparse.ArgumentParser, splits: list[str], default_split: str,
                         default_examples: int) -> None:
    p.add_argument("--model", default="minilm", help="minilm, smollm2, or a Hugging Face id / local path")
    p.add_argument("--formulation", choices=["classify", "chat"])
    p.add_argument("--adapters", nargs="+", required=True, help="one adapter per task, in --tasks order")
    p.add_argument("--tasks", required=True, help="comma-separated: the task of each adapter (distinct)")
    p.add_argument("--split", choices=splits, default=default_split,
                   help="the split whose inputs are read (never their labels)")
    p.add_argument("--examples", type=positive_int, default=default_examples,
                   help="unlabelled inputs per task, drawn at random (seeded) from --split")
    p.add_argument("--data-dir")
    p.add_argument("--task-file")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=positive_int)
    p.add_argument("--modules-to-save", choices=["auto", "per_task", "average", "drop"], default="auto",
                   help="the adapters' classification heads: auto keeps each task's (task_heads/) for adapters "
                        "lorafuse trained")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def prepare(args: argparse.Namespace) -> tuple[Any, list[str], dict[str, list[Any]]]:
    """Checks first (output, tasks), then the fp32 model and each task's sample of unlabelled inputs."""
    from lorafuse.atomic import check_output
    from lorafuse.errors import ConfigError
    from lorafuse.fusion import sample_examples
    from lorafuse.model.evaluation import Evaluator
    from lorafuse.tasks import get_task, load_task_file
    from lorafuse.validate import check_apart

    check_apart(args.output, args.adapters, "-o")  # an overwrite must never delete an input
    check_output(args.output, args.overwrite, "adapter")
    if args.task_file:
        load_task_file(args.task_file)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if len(tasks) != len(args.adapters):
        raise ConfigError(f"--tasks names {len(tasks)} tasks for {len(args.adapters)} adapters")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"--tasks: each task once (got {', '.join(tasks)}): each adapter's inputs are its task's")
    inputs = {t: sample_examples(get_task(t), args.split, args.data_dir, args.examples, args.seed) for t in tasks}
    ev = Evaluator(args.model, tasks, split=args.split, formulation=args.formulation, data_dir=args.data_dir,
                   max_examples=1, max_length=args.max_length, progress=False, dtype="float32")
    return ev, tasks, inputs


def own_heads(adapters: list[str], tasks: list[str]) -> dict[str, Any]:
    """Each task's classification head from its own adapter (none in the chat formulation)."""
    from lorafuse.model.evaluation import adapter_heads

    return {t: h for t, a in zip(tasks, adapters) if (h := adapter_heads(a, [t]).get(t)) is not None}
