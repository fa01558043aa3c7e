"""`lorafuse adamerging`: AdaMerging (Yang et al., ICLR 2024) coefficients learned by entropy minimisation on
unlabelled inputs of each adapter's task, written as one PEFT adapter with the coefficients in adamerging.json."""

from __future__ import annotations

import argparse

from lorafuse.commands.unlabelled import add_common_arguments
from lorafuse.validate import finite_float


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, ["train", "validation", "test"], "validation", 200)
    p.add_argument("--steps", type=int, default=500, help="Adam steps (the paper's 500)")
    p.add_argument("--lr", type=finite_float, default=1e-3, help="Adam's learning rate (the paper's 1e-3)")
    p.add_argument("--init", type=finite_float, default=0.3,
                   help="the starting λ of every task and module, in [0, 1] (task arithmetic's; the paper's 0.3)")
    p.add_argument("--granularity", choices=["layer", "task"], default="layer",
                   help="layer: one λ per task and adapted module (layer-wise AdaMerging); task: one per task")


def run(args: argparse.Namespace) -> int:
    import sys

    from lorafuse.commands.unlabelled import own_heads, prepare
    from lorafuse.fusion.adamerging import AdaMergingSettings, adamerging, save_adamerging

    settings = AdaMergingSettings(args.steps, args.lr, args.batch_size, args.init, args.granularity, args.seed)
    settings.check()
    ev, tasks, inputs = prepare(args)
    if args.split == "test":
        print("note: inputs from the test split (the paper's transductive protocol): accuracy measured on those "
              "test examples afterwards is not a held-out result", file=sys.stderr)
    result, updates = adamerging(ev, args.adapters, tasks, inputs, own_heads(args.adapters, tasks), settings)
    out = save_adamerging(result, updates, args.adapters, tasks, args.split, inputs, args.output, args.overwrite,
                          args.modules_to_save)
    print(f"AdaMerging of {len(tasks)} adapters on {sum(map(len, inputs.values()))} unlabelled {args.split} inputs: "
          f"mean entropy {result.entropy_before:.4f} → {result.entropy_after:.4f} in {args.steps} steps "
          f"({result.seconds:.1f} s); wrote {out}")
    return 0
