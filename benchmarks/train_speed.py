"""Training throughput of `lorafuse.model.training` (the Hugging Face Trainer with the formulation's loss, length-grouped
batches, dynamic padding) beside a bare loop over the same batches: forward, loss, backward, AdamW step, nothing
else. Target: the Trainer at ≥ 0.8 of the bare loop. Results: benchmarks/results/train_speed.{md,json}.

    python benchmarks/train_speed.py --model minilm --task mnli --examples 320
    python benchmarks/train_speed.py --model smollm2 --task scitail --examples 48 --batch-size 8

Each side runs `--repeats` times alternately (trainer, bare, trainer, bare, ...) on a fresh LoRA; the best of each
is reported (on a shared machine the best is the least disturbed). Validation is off (eval_steps=0): it is timed
apart in training records."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nli"
RESULTS = ROOT / "benchmarks" / "results" / "train_speed"


def setup(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, Any, list[dict[str, Any]], Any]:
    import torch

    from lorafuse.model import training
    from lorafuse.model.formulations import load_model, make_formulation
    from lorafuse.model.models import resolve_model, resolve_targets
    from lorafuse.tasks import get_task

    info = resolve_model(args.model)
    cfg = training.resolve_recipe(training.TrainConfig(
        task=args.task, model=args.model, output=str(tmp / "out"), epochs=1, batch_size=args.batch_size,
        max_examples=args.examples, max_length=args.max_length, eval_steps=0, progress=False), dict(info.recipe))
    name = cfg.formulation or info.formulation
    torch.manual_seed(0)
    model, tokenizer = load_model(info.path, name)
    formulation = make_formulation(name, tokenizer, cfg.max_length, cfg.chat_loss)
    task = get_task(args.task)
    rows = formulation.encode(task, task.load("train", args.data_dir, args.examples))
    peft_model = training._wrap(model, cfg, name, resolve_targets(info, None))
    return cfg, peft_model, formulation, rows, task


def trainer_seconds(cfg: Any, model: Any, formulation: Any, rows: list[dict[str, Any]], task: Any,
                    tmp: Path) -> tuple[float, list[Any]]:
    from lorafuse.model import training

    trainer = training._trainer(model, formulation, task, rows, cfg, tmp / "ck")
    batches = list(trainer.get_train_dataloader())  # the same sampler and collate the Trainer uses
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, batches


def bare_seconds(model: Any, formulation: Any, batches: list[Any], task: Any, cfg: Any) -> float:
    import torch

    from lorafuse.model.formulations import Batch
    from lorafuse.model.training import _is_head

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if not _is_head(n)], "lr": cfg.lr},
                                   {"params": [p for n, p in named if _is_head(n)], "lr": cfg.head_lr}],
                                  weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for b in batches:
        inputs = dict(b)
        targets = inputs.pop("targets")
        loss = formulation.loss(model, Batch(inputs, targets), task)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="mnli")
    p.add_argument("--examples", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--note", default="")
    args = p.parse_args()
    import tempfile

    import torch

    from lorafuse.experiment.report import machine

    torch.set_num_threads(1)
    trainer_runs, bare_runs, loads = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            cfg, model, formulation, rows, task = setup(args, Path(tmp))
            seconds, batches = trainer_seconds(cfg, model, formulation, rows, task, Path(tmp))
            trainer_runs.append(seconds)
            cfg, model, formulation, rows, task = setup(args, Path(tmp))
            bare_runs.append(bare_seconds(model, formulation, batches, task, cfg))
    n = len(rows)
    row = {"model": args.model, "task": args.task, "examples": n, "batch_size": args.batch_size,
           "trainer_seconds": [round(s, 2) for s in trainer_runs], "bare_seconds": [round(s, 2) for s in bare_runs],
           "trainer_examples_per_second": round(n / min(trainer_runs), 2),
           "bare_examples_per_second": round(n / min(bare_runs), 2),
           "ratio": round(min(bare_runs) / min(trainer_runs), 3), "load_averages": loads, "note": args.note,
           "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    path = RESULTS.with_suffix(".json")
    runs = json.loads(path.read_text()) if path.is_file() else {}
    runs[f"{args.model}/{args.task}"] = row
    path.write_text(json.dumps(runs, indent=2) + "\n")
    lines = ["# Training throughput: lorafuse.model.training beside a bare loop of the same batches", "",
             "1 torch thread; best of the repeats (alternating); validation off. The bare loop: forward, the "
             "formulation's loss, backward, AdamW step over the batches the Trainer's own dataloader yields.", "",
             "| model | task | examples | batch | trainer ex/s | bare ex/s | ratio | load avg | date |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs.values():
        lines.append(f"| {r['model']} | {r['task']} | {r['examples']} | {r['batch_size']} | "
                     f"{r['trainer_examples_per_second']} | {r['bare_examples_per_second']} | {r['ratio']} | "
                     f"{max(r['load_averages']):.1f} | {r['date']} |")
    m = row["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. The machine was shared with other "
              "jobs (load average in the table): absolute rates are low; the ratio compares runs made alternately."]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "machine"}))


if __name__ == "__main__":
    main()
