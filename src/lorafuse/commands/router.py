"""`lorafuse router`: train the gate of an input-routed mixture of adapters, or write a training-free router (Arrow,
LoGo); `lorafuse eval --adapter DIR` runs it."""

from __future__ import annotations

import argparse

from lorafuse.validate import finite_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["gate", "arrow", "logo"], default="gate",
                   help="gate: a trained gate (MoLE); arrow: training-free per-token routing by each adapter's "
                        "top right singular vector (Arrow, Ostapenko et al. 2024); logo: training-free per-input "
                        "selection by each adapter's LoRA output norm in one probe pass (LoGo, Lee et al. 2026)")
    p.add_argument("--top-k", type=positive_int, default=1,
                   help="arrow: adapters mixed per token and layer; logo: adapters mixed per input")
    p.add_argument("--temperature", type=finite_float, default=1.0, help="arrow: softmax temperature")
    p.add_argument("--signal", choices=["norm", "entropy"], default="norm",
                   help="logo: score each adapter's LoRA output by its L2 norm or its inverse entropy")
    p.add_argument("--probe", choices=["adapters", "base"], default="adapters",
                   help="logo: the probe pass runs with every adapter attached (the paper's) or with none")
    p.add_argument("--probe-module",
                   help="logo: the adapted module whose LoRA outputs are scored (default: the first adapted "
                        "module of the last adapted layer)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--formulation", choices=["classify", "chat"])
    p.add_argument("--adapters", nargs="+", required=True, help="one adapter per task, in --tasks order")
    p.add_argument("--tasks", required=True, help="comma-separated: the task of each adapter")
    p.add_argument("--data-dir")
    p.add_argument("--task-file")
    p.add_argument("--examples-per-task", type=positive_int, default=200)
    p.add_argument("--epochs", type=positive_int, default=200, help="full-batch gate optimisation steps")
    p.add_argument("--lr", type=finite_float, default=1e-2)
    p.add_argument("--granularity", choices=["sentence", "token"], default="sentence",
                   help="gate per input (mean-pooled features) or per token")
    p.add_argument("--e2e-epochs", type=int, default=0,
                   help="then fine-tune the gate end to end on the tasks' losses for this many epochs")
    p.add_argument("--e2e-lr", type=finite_float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=positive_int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto: bf16 on a GPU or a CPU with AMX-BF16/AVX512-BF16, else fp32)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    from lorafuse.atomic import check_output
    from lorafuse.errors import ConfigError
    from lorafuse.fusion import loss_batches
    from lorafuse.fusion.router import Router, train_end_to_end, train_gate
    from lorafuse.model.evaluation import Evaluator, adapter_heads
    from lorafuse.tasks import load_task_file
    from lorafuse.validate import check_apart

    check_apart(args.output, args.adapters, "-o")  # an overwrite must never delete an input
    check_output(args.output, args.overwrite, "router")
    if args.task_file:
        load_task_file(args.task_file)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if len(tasks) != len(args.adapters):
        raise ConfigError(f"--tasks names {len(tasks)} tasks for {len(args.adapters)} adapters")
    if args.kind == "arrow":  # nothing to train: no model, no data
        from lorafuse.fusion.arrow import ArrowRouter

        arrow = ArrowRouter.from_adapters(args.adapters, tasks, args.top_k, args.temperature)
        out = arrow.save(args.output, args.overwrite, {"tasks": tasks})
        print(f"Arrow router over {len(tasks)} adapters (top-{arrow.top_k}, temperature {arrow.temperature}); "
              f"wrote {out}")
        return 0
    if args.kind == "logo":  # nothing to train either: the probe pass runs per input at inference
        from lorafuse.fusion.logo import LoGoRouter

        logo = LoGoRouter.from_adapters(args.adapters, tasks, args.top_k, args.signal, args.probe, args.probe_module)
        out = logo.save(args.output, args.overwrite, {"tasks": tasks})
        print(f"LoGo router over {len(tasks)} adapters (top-{logo.top_k} by {logo.signal}, probe with "
              f"{logo.probe}); wrote {out}")
        return 0
    ev = Evaluator(args.model, tasks, split="train", formulation=args.formulation, data_dir=args.data_dir,
                   max_examples=args.examples_per_task, max_length=args.max_length, progress=False,
                   dtype=args.dtype)
    router = Router.from_adapters(args.adapters, int(ev.model.config.hidden_size), tasks, args.granularity)
    batches = [ev.batches[t] for t in tasks]
    stats = train_gate(router, ev.model, batches, args.epochs, args.lr, args.seed)
    if args.e2e_epochs:
        heads = {t: adapter_heads(a, [t]).get(t) for t, a in zip(tasks, args.adapters)}  # classify: own heads
        examples = [t.load("train", args.data_dir, args.examples_per_task) for t in ev.tasks]
        with_answers = [loss_batches(ev.formulation, t, ex, 32) for t, ex in zip(ev.tasks, examples)]
        stats |= train_end_to_end(router, ev.model, ev.formulation, ev.tasks, with_answers, heads, args.e2e_epochs,
                                  args.e2e_lr, args.seed)
    out = router.save(args.output, args.overwrite, {"tasks": tasks, "training": stats})
    print(f"gate accuracy on its training inputs {100 * stats['gate_train_accuracy']:.1f}%; wrote {out}")
    return 0
