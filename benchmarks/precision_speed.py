"""Evaluation and training throughput in fp32 against bf16, in the same run, on this machine's CPU: what
`dtype: auto` (lorafuse.model.precision) decides from. Results: benchmarks/results/precision_speed.{md,json}.

    python benchmarks/precision_speed.py                       # MiniLM and SmolLM2, evaluation and training
    python benchmarks/precision_speed.py --models minilm --threads 2

Evaluation runs through `Evaluator`'s own batches and `formulation.predict` on real MNLI test pairs:
- fp32: the default;
- bf16 weights: `Evaluator(dtype="bfloat16")` (fp32 masters, weights cast; what lorafuse runs);
- bf16 autocast: fp32 weights inside `torch.autocast` (for comparison only: a weight changed in place inside one
  autocast region can go unseen, so lorafuse never evaluates this way).
Each also reports the share of predictions equal to fp32's. Training runs `lorafuse.model.training`'s Trainer on the
same MNLI train pairs in fp32 and in bf16 mixed precision (`TrainConfig(dtype=...)`), one epoch, no validation.
Each case runs `--repeats` times alternately; the best is kept (on a shared machine the least disturbed). The CPU
model, its flags relevant to bf16 and the load average are recorded with the results."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nli"
RESULTS = ROOT / "benchmarks" / "results" / "precision_speed"
SIZES = {"minilm": {"eval": 512, "batch": 128, "train": 256, "train_batch": 16, "length": 128},
         "smollm2": {"eval": 48, "batch": 16, "train": 32, "train_batch": 8, "length": 160}}


def machine() -> dict[str, Any]:
    import torch

    from lorafuse.model.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model, resolve_precision

    flags = cpu_flags()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
            "bf16_flags": {f: f in flags for f in (*NATIVE_BF16_FLAGS, "amx_tile", "avx512f", "avx512_vnni")},
            "auto_chooses": resolve_precision("auto", "cpu").to_dict(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def eval_case(model: str, mode: str, n: int, batch: int, length: int, repeats: int) -> tuple[float, Any]:
    """Best examples/s of one evaluation mode over `repeats` passes, and its predictions."""
    import torch

    from lorafuse.model.evaluation import Evaluator

    ev = Evaluator(model, ["mnli"], split="test", data_dir=str(DATA), max_examples=n, batch_size=batch,
                   max_length=length, progress=False, dtype="bfloat16" if mode == "bf16 weights" else "float32")
    task = ev.tasks[0]
    head = _random_head(ev) if ev.formulation_name == "classify" else None
    best, predictions = 0.0, None
    with torch.inference_mode(), _maybe_head(ev, head):
        for _ in range(repeats + 1):  # the first pass warms the kernels up
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16 autocast"):
                predictions = torch.cat([ev.formulation.predict(ev.model, b, task) for b in ev.batches["mnli"]])
            best = max(best, n / (time.perf_counter() - start))
    return best, predictions


def _random_head(ev: Any) -> dict[str, Any]:
    """A fixed random classification head (the prediction's speed does not depend on its values)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return {f"classifier.{k}": torch.randn(v.shape, generator=gen) for k, v in ev.model.classifier.state_dict().items()}


def _maybe_head(ev: Any, head: dict[str, Any] | None) -> Any:
    from contextlib import nullcontext

    from lorafuse.model.evaluation import head_loaded

    return head_loaded(ev.model, head) if head else nullcontext()


def train_case(model: str, dtype: str, n: int, batch: int, length: int, work: Path) -> float:
    """Training examples/s of one epoch over n MNLI train pairs (validation off)."""
    from lorafuse.model.training import TRAIN_RECORD, TrainConfig, train_adapter

    out = work / f"{model}-{dtype}"
    train_adapter(TrainConfig(task="mnli", model=model, output=str(out), data_dir=str(DATA), epochs=1,
                              batch_size=batch, max_examples=n, max_length=length, eval_steps=0, dtype=dtype,
                              overwrite=True, progress=False))
    record = json.loads((out / TRAIN_RECORD).read_text())
    return n / record["train_seconds"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    at_start = machine()  # the load average before this run adds its own
    rows: list[dict[str, Any]] = []
    for model in args.models:
        size = SIZES[model]
        speeds, preds = {}, {}
        for mode in ("fp32", "bf16 weights", "bf16 autocast"):
            speeds[mode], preds[mode] = eval_case(model, mode, size["eval"], size["batch"], size["length"],
                                                  args.repeats)
        for mode in speeds:
            rows.append({"model": model, "work": "evaluation", "mode": mode, "examples": size["eval"],
                         "examples_per_second": round(speeds[mode], 2),
                         "vs_fp32": round(speeds[mode] / speeds["fp32"], 2),
                         "predictions_equal_to_fp32": float((preds[mode] == preds["fp32"]).float().mean())})
        if args.train:
            work = ROOT / "benchmarks" / "work" / "precision"
            train = {d: max(train_case(model, d, size["train"], size["train_batch"], size["length"], work)
                            for _ in range(args.repeats)) for d in ("float32", "bfloat16")}
            for dtype, speed in train.items():
                rows.append({"model": model, "work": "training", "mode": dtype, "examples": size["train"],
                             "examples_per_second": round(speed, 2), "vs_fp32": round(speed / train["float32"], 2)})
    return {"machine": at_start, "threads": args.threads, "repeats": args.repeats, "rows": rows,
            "finished": time.strftime("%Y-%m-%d %H:%M")}


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["bf16_flags"].items())
    lines = ["# Evaluation and training throughput: fp32 against bf16 (same run)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {results['threads']} thread(s); "
             f"flags: {flags}; 1-min load average at the start {m['load_average']:.2f}; {m['date']}. "
             f"`dtype: auto` here chooses **{m['auto_chooses']['dtype']}** ({m['auto_chooses']['reason']}).", "",
             f"Best of {results['repeats']} passes each (after one warm-up pass for evaluation).", "",
             "| model | work | mode | examples | examples/s | × fp32 | predictions equal to fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        agree = f"{100 * r['predictions_equal_to_fp32']:.1f}%" if "predictions_equal_to_fp32" in r else "–"
        lines.append(f"| {r['model']} | {r['work']} | {r['mode']} | {r['examples']} | {r['examples_per_second']} | "
                     f"{r['vs_fp32']} | {agree} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=sorted(SIZES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-train", dest="train", action="store_false", help="evaluation only")
    args = p.parse_args()
    results = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
