"""`lorafuse lorahub`: weights for a target task from a few labelled examples (LoraHub), written as an adapter."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="minilm, smollm2, or a Hugging Face id / local path")
    p.add_argument("--formulation", choices=["classify", "chat"])
    p.add_argument("--adapters", nargs="+", required=True, help="the adapters to compose")
    p.add_argument("--task", required=True, help="target task (its few-shot examples come from --split)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--split", default="validation", choices=["train", "validation"])
    p.add_argument("--data-dir")
    p.add_argument("--task-file")
    p.add_argument("--head", help="adapter whose classification head scores the task (classify)")
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--optimizer", default="NGOpt", help="any nevergrad optimizer, e.g. CMA, NGOpt, OnePlusOne")
    p.add_argument("--composition", choices=["factors", "updates"], default="factors",
                   help="factors: Σw·A, Σw·B as in the paper; updates: the exact Σw·ΔW")
    p.add_argument("--l1", type=float, default=0.05)
    p.add_argument("--bound", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json
    import random

    from lorafuse.atomic import check_output
    from lorafuse.engine import merge
    from lorafuse.evaluation import Evaluator, own_head
    from lorafuse.fusion.lorahub import LoraHubSettings, lorahub
    from lorafuse.tasks import get_task, load_task_file

    check_output(args.output, args.overwrite)
    if args.task_file:
        load_task_file(args.task_file)
    pool = get_task(args.task).load(args.split, args.data_dir)
    examples = random.Random(args.seed).sample(pool, min(args.shots, len(pool)))
    ev = Evaluator(args.model, [args.task], split=args.split, formulation=args.formulation, data_dir=args.data_dir,
                   max_examples=1, max_length=args.max_length, progress=False)
    settings = LoraHubSettings(args.budget, args.optimizer, args.bound, args.l1, args.composition, args.seed)
    result, _ = lorahub(ev, args.adapters, args.task, examples, settings, own_head(args.head) if args.head else None)
    method = "lorahub_factors" if args.composition == "factors" else "linear"
    fused = merge(args.adapters, method, weights=result.weights, modules_to_save="drop", progress=False)
    fused.provenance["lorahub"] = {"task": args.task, "shots": len(examples), "settings": settings.__dict__,
                                   "weights": result.weights, "few_shot_loss": result.loss,
                                   "search_seconds": result.seconds, "trace": result.trace}
    out = fused.save(args.output, overwrite=args.overwrite)
    (out / "lorahub_trace.json").write_text(json.dumps(fused.provenance["lorahub"], indent=2) + "\n")
    print(f"weights {[round(w, 3) for w in result.weights]}, few-shot loss {result.loss:.4f}, "
          f"{result.seconds:.1f} s; wrote {out}")
    return 0
