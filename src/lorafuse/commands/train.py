"""`lorafuse train`: one LoRA adapter for one task (PEFT + Hugging Face Trainer; `accelerate launch` works)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="task name, e.g. mnli, rte, scitail (see --list-tasks)")
    p.add_argument("--list-tasks", action="store_true", help="print the known tasks and their labels, then exit")
    p.add_argument("--model", default="minilm", help="minilm, smollm2, or a Hugging Face id / local path")
    p.add_argument("--formulation", choices=["classify", "chat"], help="default: the model's (minilm: classify)")
    p.add_argument("-o", "--output", help="adapter directory to write")
    p.add_argument("--data-dir", help="directory of <task>/<split>.jsonl (e.g. ../shared/data/nli)")
    p.add_argument("--task-file", action="append", default=[], help="YAML defining extra tasks (repeatable)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=8)
    lora.add_argument("--alpha", type=float, default=16.0)
    lora.add_argument("--dropout", type=float, default=0.05)
    lora.add_argument("--target-modules", nargs="+",
                      help="module names, one regex, or `all` (Llama: all 7 projections); default: the model's")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, help="LoRA learning rate (default: the model's recipe)")
    opt.add_argument("--head-lr", type=float, help="classify head learning rate (default: the model's recipe)")
    opt.add_argument("--warmup", type=float, help="warmup fraction of the steps (default: the model's recipe)")
    opt.add_argument("--chat-loss", choices=["verbalizer", "generative"], default="verbalizer",
                     help="chat training loss (default: verbalizer, the label words' deciding tokens)")
    opt.add_argument("--no-best-checkpoint", action="store_true",
                     help="write the last adapter instead of the best one by validation accuracy")
    opt.add_argument("--epochs", type=float, default=2.0)
    opt.add_argument("--batch-size", type=int, default=16)
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--max-examples", type=int, help="use at most this many training examples")
    opt.add_argument("--max-length", type=int, help="token limit per example")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--gradient-checkpointing", action="store_true")
    run_group = p.add_argument_group("run")
    run_group.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: every epoch)")
    run_group.add_argument("--resume", action="store_true", help="resume an interrupted run from its checkpoint")
    run_group.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    run_group.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import json

    from lorafuse.errors import ConfigError
    from lorafuse.tasks import get_task, list_tasks, load_task_file

    for task_file in args.task_file:
        load_task_file(task_file)
    if args.list_tasks:
        for name in list_tasks():
            print(f"{name}: {', '.join(get_task(name).labels)}")
        return 0
    if not args.task or not args.output:
        raise ConfigError("give --task and --output (or --list-tasks)")
    from lorafuse.training import TRAIN_RECORD, TrainConfig, train_adapter

    cfg = TrainConfig(task=args.task, model=args.model, output=args.output, formulation=args.formulation,
                      rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=args.target_modules,
                      lr=args.lr, head_lr=args.head_lr, warmup=args.warmup, chat_loss=args.chat_loss,
                      best_checkpoint=not args.no_best_checkpoint, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_examples=args.max_examples, max_length=args.max_length, seed=args.seed,
                      data_dir=args.data_dir, gradient_checkpointing=args.gradient_checkpointing,
                      save_steps=args.save_steps, resume=args.resume, overwrite=args.overwrite,
                      progress=not args.quiet)
    out = train_adapter(cfg)
    record = json.loads((out / TRAIN_RECORD).read_text())
    val = record.get("validation_accuracy")
    best = f" (best at step {record['best_step']})" if record.get("best_step") is not None else ""
    print(f"wrote {out}: {record['train_steps']} steps in {record['train_seconds']:.0f} s, validation accuracy "
          + (f"{100 * val:.1f}%{best}" if val is not None else "n/a (no validation split)"))
    return 0
