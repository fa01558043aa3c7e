"""`lorafuse train`: one LoRA adapter for one task (PEFT + Hugging Face Trainer; `accelerate launch` works)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name (see --list-tasks), e.g. mnli, rte, syn_negation")
    p.add_argument("--model", default="minilm", help="minilm, smollm2, or a Hugging Face id / local path")
    p.add_argument("--formulation", choices=["classify", "chat"], help="default: the model's (minilm: classify)")
    p.add_argument("-o", "--output", required=True, help="adapter directory to write")
    p.add_argument("--data-dir", help="directory of <task>/<split>.jsonl (e.g. ../shared/data/nli)")
    p.add_argument("--task-file", help="YAML defining extra tasks")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--target-modules", nargs="+", help="module names (or one regex) to adapt")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-examples", type=int, help="use at most this many training examples")
    p.add_argument("--max-length", type=int, help="token limit per example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--resume", action="store_true", help="resume from the last epoch checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json

    from lorafuse.tasks import load_task_file
    from lorafuse.training import TRAIN_RECORD, TrainConfig, train_adapter

    if args.task_file:
        load_task_file(args.task_file)
    cfg = TrainConfig(task=args.task, model=args.model, output=args.output, formulation=args.formulation,
                      rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=args.target_modules,
                      lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_examples=args.max_examples, max_length=args.max_length, seed=args.seed,
                      data_dir=args.data_dir, gradient_checkpointing=args.gradient_checkpointing,
                      resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    out = train_adapter(cfg)
    record = json.loads((out / TRAIN_RECORD).read_text())
    print(f"wrote {out}: {record['train_steps']} steps in {record['train_seconds']:.0f} s, "
          f"validation accuracy {100 * record['validation_accuracy']:.1f}%")
    return 0
