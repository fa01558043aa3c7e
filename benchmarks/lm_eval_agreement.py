"""`lorafuse eval` (chat, fp32) against lm-evaluation-harness on `lorafuse export-lm-eval`'s tasks: accuracy of
each, and the share of examples where lm-eval's prediction is lorafuse's, for the whole-word choices
(`lorafuse_<task>`) and the distinguishing-token choices (`lorafuse_<task>_token`). Needs lm-eval (the dev extra).

    .venv/bin/python benchmarks/lm_eval_agreement.py --model smollm2 --tasks rte:80 mnli:80 [--adapter DIR]

Writes benchmarks/results/lm_eval_agreement.json (scratch: benchmarks/work/lm_eval/)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", help="a chat adapter (default: the base model)")
    parser.add_argument("--tasks", nargs="+", default=["rte:80", "mnli:80"], help="TASK:EXAMPLES")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "nli"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "lm_eval_agreement.json"))
    args = parser.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    from lorafuse.cli import main as cli
    from lorafuse.model.evaluation import Evaluator
    from lorafuse.model.models import resolve_model

    work = ROOT / "benchmarks" / "work" / "lm_eval"
    base = resolve_model(args.model).path
    peft = f",peft={args.adapter}" if args.adapter else ""
    report = {"model": args.model, "adapter": args.adapter, "lm_eval": lm_eval.__version__, "dtype": "float32",
              "date": time.strftime("%Y-%m-%d"), "tasks": {}}
    for spec in args.tasks:
        name, n = spec.split(":")
        out = work / name
        assert cli(["export-lm-eval", "--tasks", name, "--model", args.model, "--data-dir", args.data_dir,
                    "--max-examples", n, "-o", str(out), "--overwrite"]) == 0
        ev = Evaluator(args.model, [name], formulation="chat", dtype="float32", progress=False, batch_size=16,
                       data_dir=args.data_dir, max_examples=int(n))
        ours = list(ev.evaluate(args.adapter).accuracy.values())[0], list(ev.last_predictions[name])
        del ev
        tasks = [f"lorafuse_{name}", f"lorafuse_{name}_token"]
        os.chdir(out)  # the exported YAMLs name their data relative to the export
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={base}{peft},dtype=float32", tasks=tasks,
                                      task_manager=TaskManager(include_path=str(out), include_defaults=False),
                                      batch_size=16, device="cpu", log_samples=True)
        record = {"examples": int(n), "lorafuse_acc": ours[0],
                  "lorafuse_predictions": {str(k): ours[1].count(k) for k in sorted(set(ours[1]))}}
        for task in tasks:
            samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
            predicted = [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]
            record[task] = {"choices": [a[1] for a in samples[0]["arguments"]],
                            "acc": res["results"][task]["acc,none"], "acc_norm": res["results"][task]["acc_norm,none"],
                            "same_prediction_as_lorafuse": sum(a == b for a, b in zip(predicted, ours[1]))}
        report["tasks"][name] = record
        print(json.dumps({name: record}), flush=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
