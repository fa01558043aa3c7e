"""`lorafuse router`: train the gate of an input-routed mixture of adapters; `lorafuse eval --adapter DIR` runs it."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm")
    p.add_argument("--formulation", choices=["classify", "chat"])
    p.add_argument("--adapters", nargs="+", required=True, help="one adapter per task, in --tasks order")
    p.add_argument("--tasks", required=True, help="comma-separated: the task of each adapter")
    p.add_argument("--data-dir")
    p.add_argument("--task-file")
    p.add_argument("--examples-per-task", type=int, default=200)
    p.add_argument("--epochs", type=int, default=200, help="full-batch gate optimisation steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    from lorafuse.atomic import check_output
    from lorafuse.errors import ConfigError
    from lorafuse.evaluation import Evaluator
    from lorafuse.fusion.router import Router, train_gate
    from lorafuse.tasks import load_task_file

    check_output(args.output, args.overwrite)
    if args.task_file:
        load_task_file(args.task_file)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if len(tasks) != len(args.adapters):
        raise ConfigError(f"--tasks names {len(tasks)} tasks for {len(args.adapters)} adapters")
    ev = Evaluator(args.model, tasks, split="train", formulation=args.formulation, data_dir=args.data_dir,
                   max_examples=args.examples_per_task, max_length=args.max_length, progress=False)
    router = Router.from_adapters(args.adapters, int(ev.model.config.hidden_size), tasks)
    stats = train_gate(router, ev.model, [ev.batches[t] for t in tasks], args.epochs, args.lr, args.seed)
    out = router.save(args.output, args.overwrite, {"tasks": tasks, "training": stats})
    print(f"gate accuracy on its training inputs {100 * stats['gate_train_accuracy']:.1f}%; wrote {out}")
    return 0
