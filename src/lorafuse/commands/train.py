"""`lorafuse train`: one LoRA adapter for one task (PEFT + Hugging Face Trainer; `accelerate launch --multi_gpu
--num_processes N -m lorafuse train ...` trains data parallel, batch_size per process; gloo on a CPU-only machine)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lorafuse.validate import finite_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="task name, e.g. mnli, rte, scitail (see --list-tasks)")
    p.add_argument("--list-tasks", action="store_true", help="print the known tasks and their labels, then exit")
    p.add_argument("--model", default="minilm", help="minilm, smollm2, or a Hugging Face id / local path")
    p.add_argument("--formulation", choices=["classify", "chat"], help="default: the model's (minilm: classify)")
    p.add_argument("-o", "--output", help="adapter directory to write")
    p.add_argument("--data-dir", help="directory of <task>/<split>.jsonl (e.g. ../shared/data/nli)")
    p.add_argument("--task-file", action="append", default=[], help="YAML defining extra tasks (repeatable)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=positive_int, default=8)
    lora.add_argument("--alpha", type=finite_float, default=16.0)
    lora.add_argument("--dropout", type=finite_float, default=0.05)
    lora.add_argument("--target-modules", nargs="+",
                      help="module names, one regex, or `all` (Llama: all 7 projections); default: the model's")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=finite_float, help="LoRA learning rate (default: the model's recipe)")
    opt.add_argument("--head-lr", type=finite_float, help="classify head learning rate (default: the model's recipe)")
    opt.add_argument("--warmup", type=finite_float, help="warmup fraction of the steps (default: the model's recipe)")
    opt.add_argument("--chat-loss", choices=["verbalizer", "generative"], default="verbalizer",
                     help="chat training loss (default: verbalizer, the label words' deciding tokens)")
    opt.add_argument("--no-best-checkpoint", action="store_true",
                     help="write the last adapter instead of the best one by validation accuracy")
    opt.add_argument("--epochs", type=finite_float, default=2.0)
    opt.add_argument("--batch-size", type=positive_int, default=16)
    opt.add_argument("--grad-accum", type=positive_int, default=1)
    opt.add_argument("--max-examples", type=positive_int, help="use at most this many training examples")
    opt.add_argument("--max-length", type=positive_int, help="token limit per example")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                     help="bfloat16: mixed precision (fp32 master weights); auto: bf16 on a GPU or a CPU with "
                          "AMX-BF16/AVX512-BF16, else fp32")
    run_group = p.add_argument_group("run")
    run_group.add_argument("--save-steps", type=positive_int, help="checkpoint every N steps (default: every epoch)")
    run_group.add_argument("--resume", action="store_true", help="resume an interrupted run from its checkpoint")
    run_group.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    run_group.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import time

    start = time.perf_counter()  # the summary's total is the command's wall time

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
    from lorafuse.validate import check_apart

    check_apart(args.output, [p for p in (args.data_dir, *args.task_file) if p], "-o")  # never over the data
    if args.target_modules and len(args.target_modules) == 1:
        from lorafuse.validate import check_regex

        check_regex(args.target_modules[0], "--target-modules")  # before the model loads
    from lorafuse.model.training import TRAIN_RECORD, TrainConfig, train_adapter

    cfg = TrainConfig(task=args.task, model=args.model, output=args.output, formulation=args.formulation,
                      rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=args.target_modules,
                      lr=args.lr, head_lr=args.head_lr, warmup=args.warmup, chat_loss=args.chat_loss,
                      best_checkpoint=not args.no_best_checkpoint, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_examples=args.max_examples, max_length=args.max_length, seed=args.seed,
                      data_dir=args.data_dir, gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype,
                      save_steps=args.save_steps, resume=args.resume, overwrite=args.overwrite,
                      progress=not args.quiet, stage_lines=True)
    out = train_adapter(cfg)
    if os.environ.get("RANK", "0") != "0":  # under `accelerate launch` the first process reports
        return 0
    record = json.loads((out / TRAIN_RECORD).read_text())
    print(summary(out, record, time.perf_counter() - start))
    warning = chance_warning(record)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def summary(out: object, record: dict[str, Any], wall: float) -> str:
    """The closing line: what was written, its validation accuracy, and the wall time split into training,
    validation and the rest (the parts add up to the total a person timed)."""
    val = record.get("validation_accuracy")
    best = f" (best at step {record['best_step']})" if record.get("best_step") is not None else ""
    accuracy = f"{100 * val:.1f}%{best}" if val is not None else "n/a (no validation split)"
    training, validation = record["train_seconds"], record.get("validation_seconds", 0.0)
    rest = max(0.0, wall - training - validation)
    return (f"wrote {out}: {record['train_steps']} steps, validation accuracy {accuracy}; {wall:.0f} s in all: "
            f"training {training:.0f} s, validation {validation:.0f} s, loading and writing {rest:.0f} s")


def chance_warning(record: dict[str, Any]) -> str | None:
    """A warning when the validation accuracy is not significantly above the validation split's majority class
    (the exact one-sided binomial test the experiment report uses to leave a task out)."""
    from lorafuse.experiment.analysis import at_chance, chance_text, majority_share

    val, n = record.get("validation_accuracy"), record.get("validation_examples")
    if val is None or not n:
        return None
    chance = at_chance(val, n, majority_share({"labels": {"v": record.get("validation_labels")}}, "v"))
    if chance is None:
        return None
    return f"warning: validation accuracy {chance_text(chance)}: the adapter may not have learned the task"
