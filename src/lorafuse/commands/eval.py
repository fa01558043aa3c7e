"""`lorafuse eval`: accuracy per task of a base model, a single adapter or a fused one; normalized accuracy
against each task's own adapter; the cross-task average. JSON and a Markdown table."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="minilm, smollm2, or a Hugging Face id / local path")
    p.add_argument("--adapter", help="adapter directory (single or fused); omit for the base model")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--formulation", choices=["classify", "chat"])
    p.add_argument("--data-dir", help="directory of <task>/<split>.jsonl")
    p.add_argument("--task-file", help="YAML defining extra tasks")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int)
    p.add_argument("--heads", nargs="+", default=[], metavar="TASK=DIR",
                   help="classification heads from each task's own adapter (classify)")
    p.add_argument("--reference", nargs="+", default=[], metavar="TASK=DIR",
                   help="each task's own adapter: evaluated too, for normalized accuracy")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--quiet", action="store_true")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    from lorafuse.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{flag} {item!r}: expected TASK=DIR")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lorafuse.evaluation import Evaluator, markdown_table, own_head
    from lorafuse.tasks import load_task_file

    if args.task_file:
        load_task_file(args.task_file)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    references = _pairs(args.reference, "--reference")
    head_dirs = {**references, **_pairs(args.heads, "--heads")}
    heads = {t: head for t, d in head_dirs.items() if (head := own_head(d))}
    ev = Evaluator(args.model, tasks, split=args.split, formulation=args.formulation, data_dir=args.data_dir,
                   max_examples=args.max_examples, batch_size=args.batch_size, max_length=args.max_length,
                   progress=not args.quiet)
    result = ev.evaluate(args.adapter, heads=heads)
    rows = {Path(args.adapter).name if args.adapter else "base": result}
    if references:
        own = {t: ev.subset([t]).evaluate(d, heads=heads).accuracy[t] for t, d in references.items()}
        result.normalize(own)
    print(markdown_table(rows, tasks))
    if args.output:
        Path(args.output).write_text(json.dumps({"model": args.model, "adapter": args.adapter, "split": args.split,
                                                 **result.to_dict()}, indent=2) + "\n")
    return 0
