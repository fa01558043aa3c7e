"""`lorafuse lorahub`: weights for a target task from a few labelled examples (LoraHub), written as an adapter."""

from __future__ import annotations

import argparse

from lorafuse.validate import finite_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="minilm, smollm2, or a Hugging Face id / local path")
    p.add_argument("--formulation", choices=["classify", "chat"])
    p.add_argument("--adapters", nargs="+", required=True, help="the adapters to compose")
    p.add_argument("--task", required=True, help="target task (its few-shot examples come from --split)")
    p.add_argument("--shots", type=positive_int, default=5)
    p.add_argument("--split", default="validation", choices=["train", "validation"])
    p.add_argument("--data-dir")
    p.add_argument("--task-file")
    p.add_argument("--head", help="classify: an adapter trained on the target task; its modules_to_save head "
                   "scores the task (LoraHub composes LoRA updates only)")
    p.add_argument("--budget", type=positive_int, default=40)
    p.add_argument("--optimizer", default="NGOpt", help="any nevergrad optimizer, e.g. CMA, NGOpt, OnePlusOne")
    p.add_argument("--composition", choices=["factors", "updates"], default="factors",
                   help="factors: Σw·A, Σw·B as in the paper; updates: the exact Σw·ΔW")
    p.add_argument("--l1", type=finite_float, default=0.05)
    p.add_argument("--bound", type=finite_float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=positive_int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto: bf16 on a GPU or a CPU with AMX-BF16/AVX512-BF16, else fp32)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    import random
    import sys

    from lorafuse.atomic import check_output
    from lorafuse.fusion.lorahub import LoraHubSettings, lorahub, save_lorahub
    from lorafuse.model.evaluation import Evaluator, own_head
    from lorafuse.tasks import get_task, load_task_file
    from lorafuse.validate import check_apart

    check_apart(args.output, [*args.adapters, *([args.head] if args.head else [])], "-o")  # never delete an input
    check_output(args.output, args.overwrite, "adapter")
    if args.task_file:
        load_task_file(args.task_file)
    settings = LoraHubSettings(args.budget, args.optimizer, args.bound, args.l1, args.composition, args.seed)
    settings.check()
    pool = get_task(args.task).load(args.split, args.data_dir)
    examples = random.Random(args.seed).sample(pool, min(args.shots, len(pool)))
    ev = Evaluator(args.model, [args.task], split=args.split, formulation=args.formulation, data_dir=args.data_dir,
                   max_examples=1, max_length=args.max_length, progress=False,
                   dtype=args.dtype)
    head = own_head(args.head) if args.head else None
    result, _ = lorahub(ev, args.adapters, args.task, examples, settings, head)
    for problem in result.problems():
        print(f"warning: LoraHub on {args.task}: {problem}", file=sys.stderr)
    out = save_lorahub(result, args.adapters, args.output, args.task, head, args.overwrite)
    print(f"weights {[round(w, 3) for w in result.weights]}, few-shot loss {result.loss:.4f} "
          f"({len(examples)} examples, {result.seconds:.1f} s); wrote {out}")
    return 0
