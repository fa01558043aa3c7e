"""`lorafuse regmean`: RegMean (Jin et al., ICLR 2023) from unlabelled inputs of each adapter's task, written as one
PEFT adapter (exact, rank Σr a module) with its record in regmean.json."""

from __future__ import annotations

import argparse

from lorafuse.commands.unlabelled import add_common_arguments


def _alpha(text: str) -> float:
    from lorafuse.validate import finite_float

    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, ["train", "validation"], "train", 256)
    p.add_argument("--alpha", type=_alpha, default=0.9,
                   help="off-diagonal shrinkage of the Gram matrices: G̃ = α·G + (1−α)·diag(G) (the paper's 0.9)")


def run(args: argparse.Namespace) -> int:
    from lorafuse.commands.unlabelled import prepare
    from lorafuse.fusion.regmean import RegMeanSettings, regmean_fusion, save_regmean

    ev, tasks, inputs = prepare(args)
    settings = RegMeanSettings(args.alpha, args.examples, args.split, args.batch_size, args.seed)
    merged, record = regmean_fusion(ev, args.adapters, tasks, inputs, settings)
    out = save_regmean(merged, record, args.adapters, args.output, args.overwrite, args.modules_to_save)
    seen = ", ".join(f"{t} {n}" for t, n in record["data"]["examples_per_task"].items())
    print(f"RegMean of {len(tasks)} adapters from unlabelled {args.split} inputs ({seen}) in {record['seconds']:.1f} s; "
          f"wrote {out}")
    return 0
