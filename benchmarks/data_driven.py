"""Data-driven fusion on the shared NLI data: LoraHub (5 and 20 shots, per target task) and the input-routed
mixture of the five single-task adapters, with search / training time and the router's latency per example
beside one merged adapter; written to benchmarks/results/data_driven.{md,json}.

    .venv/bin/python benchmarks/data_driven.py                       # MiniLM, mnli snli rte scitail fever
    .venv/bin/python benchmarks/data_driven.py --max-test 100 --shots 5 --tasks mnli rte   # a quick look

Adapters: each task's single-task adapter from `lorafuse experiment nli5-minilm --output benchmarks/work/nli5-minilm
--cache-dir benchmarks/work/cache` (what benchmarks/single_task.py reuses), found by the task named in its
lorafuse_train.json; with --train-missing, a task without one gets a small adapter trained here (`lorafuse train`'s
code, short budget).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nli"
TASKS = ["mnli", "snli", "rte", "scitail", "fever"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--adapters-dir", nargs="+", default=[str(ROOT / "benchmarks" / "work" / d / "adapters")
                                                          for d in ("nli5-minilm", "cache")],
                   help="where to look for single-task adapters (by the task in lorafuse_train.json)")
    p.add_argument("--train-missing", action="store_true", help="train a small adapter for tasks without one")
    p.add_argument("--max-test", type=int, default=300)
    p.add_argument("--shots", type=int, nargs="+", default=[5, 20])
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--router-examples", type=int, default=200, help="training inputs per task for the gate")
    p.add_argument("--e2e-epochs", type=int, default=1, help="end-to-end gate epochs after the task-id fit (0: off)")
    p.add_argument("--latency-examples", type=int, default=64, help="examples timed one at a time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the results JSON")
    args = p.parse_args()
    out = ROOT / "benchmarks" / "results" / "data_driven"
    if args.render_only:
        result = json.loads(out.with_suffix(".json").read_text())
        result.setdefault("majority", majority(result["tasks"], args.data_dir, result["settings"]["max_test"]))
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        return

    import torch

    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message=".*RHOEND")  # scipy's COBYLA inside nevergrad's NGOpt portfolio
    from lorafuse.experiment.report import machine
    from lorafuse.model.evaluation import Evaluator, own_head

    adapters = find_adapters(args)
    start = time.perf_counter()
    ev = Evaluator(args.model, args.tasks, split="test", data_dir=args.data_dir, max_examples=args.max_test,
                   batch_size=32, max_length=128, progress=False)
    heads = {t: own_head(adapters[t]) for t in args.tasks}
    setup = time.perf_counter() - start
    result: dict[str, Any] = {"model": args.model, "formulation": ev.formulation_name, "tasks": args.tasks,
                              "adapters": {t: str(a) for t, a in adapters.items()}, "settings": vars(args),
                              "test_examples": {t: sum(len(b.targets) for b in ev.batches[t]) for t in args.tasks},
                              "setup_seconds": round(setup, 1)}
    result["majority"] = majority(args.tasks, args.data_dir, args.max_test)
    result["own"] = {t: ev.subset([t]).evaluate(adapters[t], heads=heads).accuracy[t] for t in args.tasks}
    result["average_merge"] = average_merge(ev, adapters, heads, args.tasks)
    result["lorahub"] = {str(k): run_lorahub(ev, adapters, heads, args, k) for k in args.shots}
    result["router"] = run_router(ev, adapters, heads, args)
    result.update({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "command": " ".join(sys.argv)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def majority(tasks: list[str], data_dir: str, max_test: int) -> dict[str, float]:
    """Accuracy of always answering each test subset's most frequent label: the floor an adapter must clear."""
    from collections import Counter

    from lorafuse.tasks import get_task

    out = {}
    for task in tasks:
        labels = [e.label for e in get_task(task).load("test", data_dir, max_test)]
        out[task] = Counter(labels).most_common(1)[0][1] / len(labels)
    return out


def find_adapters(args: argparse.Namespace) -> dict[str, Path]:
    """Each task's single-task adapter (newest if several), training one where allowed and missing."""
    found: dict[str, Path] = {}
    records = [f for d in map(Path, args.adapters_dir) if d.is_dir() for f in d.glob("*/lorafuse_train.json")]
    for record in sorted(records, key=lambda f: f.stat().st_mtime):
        task = json.loads(record.read_text()).get("task")
        if task in args.tasks:
            found[task] = record.parent
    missing = [t for t in args.tasks if t not in found]
    if missing and not args.train_missing:
        sys.exit(f"no adapter for {missing} under {args.adapters_dir} (run `lorafuse experiment nli5-minilm --output "
                 "benchmarks/work/nli5-minilm` or pass --train-missing)")
    for task in missing:
        from lorafuse.model.training import TrainConfig, train_adapter

        out = ROOT / "benchmarks" / "work" / "data_driven" / "adapters" / task
        found[task] = out if (out / "lorafuse_train.json").is_file() else train_adapter(TrainConfig(
            task=task, model=args.model, output=str(out), rank=8, alpha=16, lr=1e-3, epochs=1, batch_size=16,
            max_examples=400, max_eval_examples=100, max_length=128, data_dir=args.data_dir, progress=False))
    return found


def average_merge(ev: Any, adapters: dict[str, Path], heads: dict, tasks: list[str]) -> dict[str, Any]:
    """The data-free reference point: the plain average of all adapters, each task scored with its own head."""
    from lorafuse.merging.engine import merge

    fused = merge([adapters[t] for t in tasks], "average", modules_to_save="drop", progress=False)
    return {"accuracy": ev.evaluate(fused.modules, heads=heads).accuracy}


def run_lorahub(ev: Any, adapters: dict[str, Path], heads: dict, args: argparse.Namespace, shots: int
                ) -> dict[str, Any]:
    """LoraHub per target task over all the adapters (the target's own included, as in a hub that holds it),
    on `shots` validation examples; test accuracy with the learned weights and the target's own head."""
    from lorafuse.fusion.lorahub import LoraHubSettings, lorahub
    from lorafuse.tasks import get_task

    settings = LoraHubSettings(budget=args.budget, seed=args.seed)
    paths = [adapters[t] for t in args.tasks]
    rows = {}
    for task in args.tasks:
        pool = get_task(task).load("validation", args.data_dir)
        sample = random.Random(f"{args.seed}-{task}").sample(pool, min(shots, len(pool)))
        res, updates = lorahub(ev, paths, task, sample, settings, heads[task])
        rows[task] = {"accuracy": ev.subset([task]).evaluate(updates, heads=heads).accuracy[task],
                      "weights": dict(zip(args.tasks, [round(w, 4) for w in res.weights])),
                      "few_shot_loss": round(res.loss, 4), "search_seconds": round(res.seconds, 2),
                      "ms_per_candidate": round(1000 * res.seconds / settings.budget, 1)}
        print(f"lorahub {shots}-shot {task}: {rows[task]}", flush=True)
    return rows


def run_router(ev: Any, adapters: dict[str, Path], heads: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Gate trained on each task's train inputs (task id as target), then optionally end to end; accuracy,
    routing accuracy on test inputs, and latency per example against one merged adapter."""
    import torch

    from lorafuse.fusion import loss_batches
    from lorafuse.fusion.router import Router, pooled_features, train_end_to_end, train_gate
    from lorafuse.tasks import get_task

    tasks = [get_task(t) for t in args.tasks]
    train = [t.load("train", args.data_dir, args.router_examples) for t in tasks]
    router = Router.from_adapters([adapters[t] for t in args.tasks], int(ev.model.config.hidden_size), args.tasks)
    start = time.perf_counter()
    stats = train_gate(router, ev.model, [loss_batches(ev.formulation, t, ex, 32) for t, ex in zip(tasks, train)],
                       seed=args.seed)
    out: dict[str, Any] = {"gate": stats, "gate_seconds": round(time.perf_counter() - start, 2)}
    out["task_id"] = routed_scores(ev, router, heads, args.tasks)
    if args.e2e_epochs:
        start = time.perf_counter()
        out["e2e"] = train_end_to_end(router, ev.model, ev.formulation, tasks,
                                      [loss_batches(ev.formulation, t, ex, 16) for t, ex in zip(tasks, train)],
                                      heads, args.e2e_epochs, 1e-3, args.seed)
        out["e2e_seconds"] = round(time.perf_counter() - start, 2)
        out["end_to_end"] = routed_scores(ev, router, heads, args.tasks)
    out["latency"] = latencies(ev, router, adapters, heads, args)
    with torch.no_grad():
        out["mean_gate_weights"] = {t: [round(float(x), 3) for x in torch.cat([router.weights(pooled_features(
            ev.model, b.inputs)) for b in ev.batches[t]]).mean(0)] for t in args.tasks}
    return out


def routed_scores(ev: Any, router: Any, heads: dict, tasks: list[str]) -> dict[str, Any]:
    """Test accuracy through the router, and how often the gate's top adapter is the input's own task's."""
    import torch

    from lorafuse.fusion.router import pooled_features

    accuracy = ev.evaluate(router, heads=heads).accuracy
    with torch.no_grad():
        routing = {t: float(torch.cat([router.weights(pooled_features(ev.model, b.inputs)).argmax(-1)
                                       for b in ev.batches[t]]).eq(i).float().mean()) for i, t in enumerate(tasks)}
    return {"accuracy": accuracy, "routing_accuracy": routing}


def latencies(ev: Any, router: Any, adapters: dict[str, Path], heads: dict, args: argparse.Namespace
              ) -> dict[str, Any]:
    """ms per example, batched (32, all test inputs of the first task) and one at a time, routed vs one merged
    adapter (its update folded into the weights: the cost of the base model)."""
    from lorafuse.fusion.router import latency
    from lorafuse.model.evaluation import adapter_updates

    first = args.tasks[0]
    single = ev.subset([first])
    merged, _ = adapter_updates(adapters[first])
    batched = {"routed": latency(single, router, heads, 2), "merged": latency(single, merged, heads, 2)}
    one = _one_at_a_time(ev, first, args.latency_examples)
    unbatched = {"routed": latency(one, router, heads, 2), "merged": latency(one, merged, heads, 2)}
    ms = {k: {n: round(1000 * s, 2) for n, s in v.items()} for k, v in (("batch_32", batched), ("batch_1", unbatched))}
    for v in ms.values():
        v["ratio"] = round(v["routed"] / v["merged"], 2)
    return ms


def _one_at_a_time(ev: Any, task: str, n: int) -> Any:
    """The evaluator's view with the first `n` test examples of `task` as single-example batches."""
    view = ev.subset([task])
    view.batches = dict(ev.batches)
    rows = [(b, i) for b in ev.batches[task] for i in range(len(b.targets))][:n]
    view.batches[task] = [_row(b, i) for b, i in rows]
    return view


def _row(batch: Any, i: int) -> Any:
    from lorafuse.model.formulations import Batch

    keep = batch.inputs["attention_mask"][i].bool()
    return Batch({k: v[i:i + 1][:, keep] for k, v in batch.inputs.items()}, batch.targets[i:i + 1])


def markdown(r: dict[str, Any]) -> str:
    m, tasks = r["machine"], r["tasks"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    avg = lambda d: sum(d[t] for t in tasks) / len(tasks)  # noqa: E731
    lines = [f"# Data-driven fusion: {r['model']} ({r['formulation']})", "",
             f"{r['date']}; {m['cpu']}, {m['cores']} cores (shared with other jobs), {m['memory_gib']} GiB, torch "
             f"{m['torch']} ({m['torch_threads']} thread). Command: `{r['command']}`.", "",
             f"Test: ≤{r['settings']['max_test']} examples per task ({r['test_examples']}). Adapters: "
             f"each task's single-task adapter ({Path(next(iter(r['adapters'].values()))).parent}). Classify "
             "formulation: every task is scored with its own adapter's head.", "",
             "## Accuracy (%)", "",
             "| fusion | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]

    def row(name: str, acc: dict[str, float]) -> None:
        lines.append(f"| {name} | " + " | ".join(pct(acc[t]) for t in tasks) + f" | {pct(avg(acc))} |")

    row("majority label (floor)", r["majority"])
    row("own adapter (upper reference)", r["own"])
    row(f"average of all {len(tasks)} (data-free)", r["average_merge"]["accuracy"])
    for shots, rows in r["lorahub"].items():
        row(f"LoraHub {shots}-shot", {t: rows[t]["accuracy"] for t in tasks})
    router = r["router"]
    row("router (gate: task id)", router["task_id"]["accuracy"])
    if "end_to_end" in router:
        row(f"router (+ {r['settings']['e2e_epochs']} epoch end to end)", router["end_to_end"]["accuracy"])
    lines += ["", "## Cost", "", "| | time |", "|---|---|"]
    for shots, rows in r["lorahub"].items():
        total = sum(rows[t]["search_seconds"] for t in tasks)
        per = sum(rows[t]["ms_per_candidate"] for t in tasks) / len(tasks)
        lines.append(f"| LoraHub {shots}-shot search, {r['settings']['budget']} candidates × {len(tasks)} tasks | "
                     f"{total:.1f} s ({per:.0f} ms per candidate) |")
    lines.append(f"| router gate fit ({router['gate']['examples']} inputs, task id) | {router['gate_seconds']} s "
                 "(features included) |")
    if "e2e_seconds" in router:
        e2e = router["e2e"]
        lines.append(f"| router end-to-end ({e2e['e2e_steps']} steps, lr 1e-3; mean task loss "
                     f"{e2e['e2e_first_epoch_loss']:.3f} in the first epoch, {e2e['e2e_last_epoch_loss']:.3f} in the "
                     f"last) | {router['e2e_seconds']} s |")
    lat = router["latency"]
    lines += ["", "Inference latency, ms per example (first task's test inputs):", "",
              "| | routed mixture | one merged adapter | ratio |", "|---|---|---|---|"]
    for k, v in lat.items():
        lines.append(f"| {k.replace('_', ' ')} | {v['routed']} | {v['merged']} | {v['ratio']}× |")
    lines += ["", "## Router: how often the gate picks the input's own task's adapter (%)", "",
              "| gate | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for key, name in (("task_id", "task id"), ("end_to_end", "+ end to end")):
        if key in router:
            lines.append(f"| {name} | " + " | ".join(pct(router[key]["routing_accuracy"][t]) for t in tasks) + " |")
    lines += ["", "## LoraHub weights (rows: target task; columns: adapters)", ""]
    for shots, rows in r["lorahub"].items():
        lines += [f"{shots}-shot:", "", "| target | " + " | ".join(tasks) + " | few-shot loss |",
                  "|---|" + "---|" * (len(tasks) + 1)]
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(f"{rows[t]['weights'][a]:+.2f}" for a in tasks)
                         + f" | {rows[t]['few_shot_loss']} |")
        lines.append("")
    weak = [t for t in tasks if r["own"][t] - r["majority"][t] < 0.05]
    if weak:
        lines += [f"**Caveat**: the single-task adapters of {', '.join(weak)} are within 5 points of the majority "
                  "label on test: they carry little task signal at this training budget, so fusing them cannot "
                  "show much; all-zero LoraHub weights mean no candidate beat the base model (with the target's "
                  "head) once the L1 term is counted.", ""]
    lines += [f"Notes: LoraHub searches {r['settings']['budget']} candidates (nevergrad NGOpt, [-1.5, 1.5], L1 0.05, start 0) on few-shot "
              "validation examples, with the target's own adapter among the candidates (a hub that holds it); the "
              "merged-adapter latency is the base model's (the update is folded into the weights). The routed "
              "mixture runs an extra base-model pass for the gate and rank-Σr products in every adapted layer.",
              "MiniLM (all-MiniLM-L6-v2) was contrastively pre-trained on sentence pairs that include SNLI and "
              "MultiNLI. The shared data differ from the public datasets: see ../shared/data/nli/README.md."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
