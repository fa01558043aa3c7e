"""Single-task adapters on the shared NLI data: test accuracy beside each task's majority-class baseline, with
training and evaluation times and the budget, written to benchmarks/results/single_task_<model>.{md,json}.

    .venv/bin/python benchmarks/single_task.py --model minilm                 # mnli snli rte scitail fever
    .venv/bin/python benchmarks/single_task.py --model smollm2 --tasks mnli fever rte scitail \
        --max-examples 240 --epochs 1 --batch-size 8 --max-test 200

Adapters are cached by the experiment runner's hash: `--run-dir benchmarks/work/nli5-minilm` reuses the adapters
of `lorafuse experiment nli5-minilm --output benchmarks/work/nli5-minilm` (the defaults here are its settings)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nli"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--tasks", nargs="+", default=["mnli", "snli", "rte", "scitail", "fever"])
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--max-examples", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-validation", type=int, default=200)
    p.add_argument("--max-test", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "work"))
    p.add_argument("--run-dir", help="reuse an experiment run directory's cached adapters (same settings)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lorafuse.experiment.config import parse_config
    from lorafuse.experiment.report import machine
    from lorafuse.experiment.runner import ExperimentRunner
    from lorafuse.tasks import get_task

    name = f"single-{args.model}"
    config = parse_config({
        "name": name, "model": args.model, "tasks": args.tasks, "data_dir": args.data_dir,
        "train": {"rank": 8, "alpha": 16, "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
                  "max_examples": args.max_examples, "max_length": args.max_length},
        "eval": {"max_validation": args.max_validation, "max_test": args.max_test, "batch_size": 32,
                 "max_length": args.max_length}}, "single_task")
    runner = ExperimentRunner(config, Path(args.run_dir or Path(args.work) / name), progress=True)
    config.check_tasks()
    start = time.perf_counter()
    runner.train_all()
    train_wall = time.perf_counter() - start
    start = time.perf_counter()
    runner.references()
    eval_wall = time.perf_counter() - start
    rows = []
    for task in args.tasks:
        record = json.loads((runner.state.adapters[task] / "lorafuse_train.json").read_text())
        test = get_task(task).load("test", args.data_dir, args.max_test)
        label, count = Counter(e.label for e in test).most_common(1)[0]
        rows.append({"task": task, "test_accuracy": runner.state.reference["test"][task],
                     "majority_baseline": count / len(test), "majority_label": label, "test_examples": len(test),
                     "validation_accuracy": runner.state.reference["validation"][task],
                     "train_examples": record["train_examples"], "train_steps": record["train_steps"],
                     "train_seconds": record["train_seconds"]})
    result = {"model": args.model, "formulation": runner._formulation(), "budget": vars(args), "rows": rows,
              "train_wall_seconds": round(train_wall, 1), "eval_wall_seconds": round(eval_wall, 1),
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(sys.argv)}
    out = ROOT / "benchmarks" / "results" / f"single_task_{args.model}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Single-task adapters: {r['model']} ({r['formulation']})", "",
             f"{r['date']}; {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']} "
             f"({m['torch_threads']} threads). Command: `{r['command']}`.", "",
             f"Budget: ≤{r['budget']['max_examples']} training examples per task, {r['budget']['epochs']} epochs, "
             f"batch {r['budget']['batch_size']}, lr {r['budget']['lr']}, LoRA r=8 α=16, max length "
             f"{r['budget']['max_length']}; test on ≤{r['budget']['max_test']} examples of each test split.", "",
             "| task | test acc | majority baseline | margin | val acc | train ex | steps | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['task']} | {100 * row['test_accuracy']:.1f} | {100 * row['majority_baseline']:.1f} "
                     f"({row['majority_label']}) | {100 * (row['test_accuracy'] - row['majority_baseline']):+.1f} | "
                     f"{100 * row['validation_accuracy']:.1f} | {row['train_examples']} | {row['train_steps']} | "
                     f"{row['train_seconds']:.0f} |")
    lines += ["", f"Wall time: training {r['train_wall_seconds']} s, evaluation {r['eval_wall_seconds']} s.", ""]
    if r["model"] == "minilm":
        lines.append("MiniLM (all-MiniLM-L6-v2) was contrastively pre-trained on ~1B sentence pairs that include "
                     "SNLI and MultiNLI, which favours those two tasks.")
    lines.append("The shared data differ from the public datasets: see ../shared/data/nli/README.md (MNLI/SNLI "
                 "train subsampled; SciTail re-split from its test set; FEVER without NOT ENOUGH INFO).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
