"""Evaluation throughput against a bare forward pass of the same model over the same batches.

    .venv/bin/python benchmarks/eval_overhead.py [--model minilm] [--task rte] [--examples 512]

The Evaluator's extra work per batch is the prediction (masked logits, argmax, comparison); adapters are applied
once as exact weight updates, so it should stay within a few percent of the bare forward."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="rte")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "nli"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(2)
    from lorafuse.experiment.report import machine
    from lorafuse.model.evaluation import Evaluator

    ev = Evaluator(args.model, [args.task], split="test", data_dir=args.data_dir, max_examples=args.examples,
                   batch_size=32, max_length=128, progress=False)
    head = {"classifier.weight": torch.randn(3, ev.model.config.hidden_size) * 0.02, "classifier.bias": torch.zeros(3)}
    task = ev.tasks[0]
    heads = {task.name: head} if ev.formulation_name == "classify" else {}

    def bare() -> None:
        with torch.inference_mode():
            for batch in ev.batches[task.name]:
                if ev.formulation_name == "classify":
                    ev.model(**batch.inputs)
                else:  # the plain model's own forward, logits at the last position only
                    ev.model(**batch.inputs, logits_to_keep=1)

    def full() -> None:
        ev.evaluate(None, heads=heads)

    bare()  # warm-up
    timings = {"bare_forward": [], "evaluator": []}
    for _ in range(args.repeats):
        for name, fn in (("bare_forward", bare), ("evaluator", full)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    n = sum(len(b.targets) for b in ev.batches[task.name])
    result = {"model": args.model, "task": args.task, "examples": n, "seconds": best,
              "examples_per_second": {k: n / v for k, v in best.items()},
              "overhead_percent": 100 * (best["evaluator"] / best["bare_forward"] - 1), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = ROOT / "benchmarks" / "results" / f"eval_overhead_{args.model}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("examples", "seconds", "overhead_percent")}, indent=2))


if __name__ == "__main__":
    main()
