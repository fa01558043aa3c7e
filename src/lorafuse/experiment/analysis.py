"""What a report must say about its own numbers: intervals, paired tests, seeds, and warnings.

Works on the jobs of results.json (pure: numpy via lorafuse.stats, no torch). `analyse(jobs, tasks)` returns

- `statistics`: which tasks enter the normalized average (an individual adapter that is not significantly above its
  majority class is left out, and named), each method's average normalized accuracy over those tasks with a 95%
  paired-bootstrap interval, its differences from the best fused method and from task arithmetic (a paired-
  bootstrap interval of the difference and a paired randomization test's p-value), the
  spread over seeds of a stochastic method, and each task's accuracy with a 95% Wilson interval;
- `warnings`: a fused model collapsed on a task, a chosen coefficient on the edge of its grid, an adapter at chance,
  two methods with the same fused update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lorafuse import stats
from lorafuse.stats import mean_split, over_seeds  # noqa: F401 (used here and re-exported)

COLLAPSE_SHARE = 0.9  # a fused model predicting one label this often has collapsed (unless the task's adapter does)
ALPHA = 0.05
RESAMPLES = 2000
SAME_UPDATE_TOLERANCE = 1e-5  # relative difference of two update sketches below which the updates are the same
# bounds of a parameter's domain: a chosen value there is at the end of what is possible, not of the grid only
DOMAIN_BOUNDS = {"density": (None, 1.0), "drop_rate": (0.0, None), "gamma": (0.0, None), "top_k": (1, None)}
FUSED_KINDS = ("static", "data-driven")
REFERENCE_METHOD = "task_arithmetic"
TIES_REFERENCE = "ties"  # the newer methods are judged against TIES in the full space (issue 21)
PRECISION_AGREEMENT = 0.99  # below this share of predictions equal to fp32's, a reduced dtype is warned about


def evaluated(job: dict[str, Any]) -> bool:
    return job.get("status") == "ok" and "test" in job


def normalized_over(split: dict[str, Any], tasks: Sequence[str]) -> float | None:
    """Average normalized accuracy over some tasks (those whose adapters learned)."""
    values = [split.get("normalized", {}).get(t) for t in tasks]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# -- which tasks count ---------------------------------------------------------------------------------------
def majority_share(split: dict[str, Any], task: str) -> float | None:
    labels = split.get("labels", {}).get(task)
    return max(labels.values()) / sum(labels.values()) if labels else None


def trusted_tasks(individual: dict[str, Any] | None, tasks: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Tasks whose own adapter is significantly above its majority class on this split (exact one-sided
    binomial test), and why each other one is left out. Without gold label counts every task counts."""
    if individual is None:
        return list(tasks), {}
    kept, left_out = [], {}
    for t in tasks:
        share = majority_share(individual, t)
        n = individual.get("examples", {}).get(t)
        if share is None or not n:
            kept.append(t)
            continue
        chance = at_chance(individual["accuracy"][t], n, share)
        if chance is None:
            kept.append(t)
        else:
            left_out[t] = chance
    return kept, left_out


def at_chance(accuracy: float, n: int, share: float | None) -> dict[str, Any] | None:
    """None when an accuracy on n examples is significantly above the majority class's share (exact one-sided
    binomial test at ALPHA) or there is nothing to test against; else the test's numbers (`chance_text` words
    them). `train` and `eval` warn with it, as the report leaves such a task out."""
    if share is None or not n:
        return None
    above, p = stats.above_majority(round(accuracy * n), n, share, ALPHA)
    return None if above else {"accuracy": accuracy, "majority_share": share, "examples": n, "p_value": p}


def chance_text(r: dict[str, Any]) -> str:
    """An `at_chance` result in words."""
    return (f"{100 * r['accuracy']:.1f}% on {r['examples']} examples is not significantly above its majority class "
            f"({100 * r['majority_share']:.1f}%; exact one-sided binomial test p = {r['p_value']:.2g})")


# -- per-example correctness ----------------------------------------------------------------------------------
def correctness(job: dict[str, Any], task: str) -> np.ndarray | None:
    """Per-example correctness on test (the mean over seeds for a stochastic method), or None if not recorded."""
    runs = [r["test"] for r in job.get("seed_runs", [])] or [job["test"]]
    flags = []
    for split in runs:
        packed, n = split.get("correct", {}).get(task), split.get("examples", {}).get(task)
        if packed is None or n is None:
            return None
        flags.append(stats.unpack_bits(packed, n).astype(np.float32))
    return np.mean(flags, axis=0)


def _individual(jobs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    return next((j for j in jobs if j.get("name") == "individual" and evaluated(j)), None)


def analyse(jobs: Sequence[dict[str, Any]], tasks: Sequence[str], resamples: int = RESAMPLES,
            seed: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(statistics, warnings) of a run's jobs; see the module docstring."""
    ok = [j for j in jobs if evaluated(j)]
    individual = _individual(ok)
    kept, left_out = trusted_tasks(individual["test"] if individual else None, tasks)
    methods: dict[str, dict[str, Any]] = {}
    for job in ok:
        methods[job["name"]] = _method_summary(job, tasks, kept)
    fused = [n for n, m in methods.items() if m["kind"] in FUSED_KINDS and m["normalized_average"] is not None]
    best, chosen_on = best_fused(ok, fused, kept)
    statistics: dict[str, Any] = {
        "trusted_tasks": kept, "left_out_tasks": left_out, "alpha": ALPHA, "resamples": resamples,
        "methods": methods, "best": best, "best_chosen_on": chosen_on,
        "task_arithmetic": REFERENCE_METHOD if REFERENCE_METHOD in methods else None,
        "ties": TIES_REFERENCE if TIES_REFERENCE in methods else None}
    _bootstrap(ok, kept, individual, statistics, resamples, seed)
    statistics["tied_with_best"] = [n for n in fused if n != best and "vs_best" in methods[n]
                                    and not methods[n]["vs_best"]["significant"]]
    warnings = (_left_out_warnings(left_out) + _collapse_warnings(ok, tasks, individual)
                + _edge_warnings(ok) + _same_update_warnings(ok) + _search_warnings(ok)
                + _precision_warnings(individual))
    return statistics, warnings


def best_fused(ok: Sequence[dict[str, Any]], fused: Sequence[str], kept: Sequence[str]) -> tuple[str | None, str]:
    """The best fused method and the split it was chosen on: validation (the average normalized accuracy of the
    chosen setting on the search's validation examples), never the test split the comparisons are made on. Only
    where no fused job carries a validation result does test decide, and the report says so."""
    scores = {j["name"]: normalized_over(j["validation"], kept) for j in ok
              if j["name"] in fused and isinstance(j.get("validation"), dict) and j["validation"].get("normalized")}
    scores = {n: v for n, v in scores.items() if v is not None}
    if scores:
        return max(scores, key=lambda n: scores[n]), "validation"
    tests = {j["name"]: normalized_over(j["test"], kept) for j in ok if j["name"] in fused}
    tests = {n: v for n, v in tests.items() if v is not None}
    return (max(tests, key=lambda n: tests[n]), "test") if tests else (None, "none")


def _method_summary(job: dict[str, Any], tasks: Sequence[str], kept: Sequence[str]) -> dict[str, Any]:
    test = job["test"]
    per_task = {}
    for t in tasks:
        n = test.get("examples", {}).get(t)
        acc = test["accuracy"][t]
        per_task[t] = {"accuracy": acc, "examples": n,
                       "interval": list(stats.wilson_interval(acc * n, n)) if n else None}
    summary: dict[str, Any] = {"kind": job.get("kind", "static"), "normalized_average": normalized_over(test, kept),
                               "per_task": per_task, "seeds": len(job.get("seed_runs", [])) or 1}
    if job.get("seed_runs"):
        per_seed = [normalized_over(r["test"], kept) for r in job["seed_runs"]]
        if None not in per_seed:
            summary["seed_mean"], summary["seed_sd"] = stats.mean_sd(per_seed)
            summary["seed_values"] = per_seed
    return summary


def _bootstrap(ok: Sequence[dict[str, Any]], kept: Sequence[str], individual: dict[str, Any] | None,
               statistics: dict[str, Any], resamples: int, seed: int) -> None:
    """Intervals and paired tests for every job whose per-example correctness was recorded."""
    if individual is None or not kept:
        return
    reference = {t: correctness(individual, t) for t in kept}
    if any(v is None for v in reference.values()):
        return
    vectors = {}
    for job in ok:
        per_task = {t: correctness(job, t) for t in kept}
        if all(v is not None and len(v) == len(reference[t]) for t, v in per_task.items()):
            vectors[job["name"]] = per_task
    if not vectors:
        return
    boot = stats.paired_bootstrap(vectors, reference, kept, resamples, seed)
    methods = statistics["methods"]
    best, ta, ties = (name if name in vectors else None
                      for name in (statistics["best"], statistics["task_arithmetic"], statistics.get("ties")))
    # each example's weight in the average normalized accuracy: 100 / (tasks · examples · own accuracy)
    weights = {t: 100 / (len(kept) * len(reference[t]) * max(float(reference[t].mean()), 1e-12)) for t in kept}
    for name in vectors:
        entry = methods[name]
        entry["normalized_average"] = float(boot.observed[boot.methods.index(name)])
        entry["interval"] = list(boot.interval(name))
        for key, other in (("vs_best", best), ("vs_task_arithmetic", ta), ("vs_ties", ties)):
            if other is not None and other != name:
                c = boot.compare(name, other)
                p = stats.randomization_test(vectors[name], vectors[other], weights, seed=seed)
                entry[key] = comparison(other, c.difference, c.low, c.high, p)


def comparison(against: str, difference: float, low: float, high: float, p: float) -> dict[str, Any]:
    """A paired comparison. Significant only when both tests say so: the randomization test's p < α and the
    paired-bootstrap interval excludes 0. Where they disagree (a difference at the edge of what the examples
    resolve) it is `borderline`, not significant."""
    by_test, by_interval = p < ALPHA, low > 0 or high < 0
    return {"against": against, "difference": difference, "interval": [low, high], "p_value": p,
            "significant": by_test and by_interval, "borderline": by_test != by_interval}


# -- warnings ---------------------------------------------------------------------------------------------------
def _warning(kind: str, message: str, **where: Any) -> dict[str, Any]:
    return {"kind": kind, "message": message, **where}


def _left_out_warnings(left_out: dict[str, Any]) -> list[dict[str, Any]]:
    return [_warning("adapter_at_chance",
                     f"the individual adapter of {t} reaches {100 * r['accuracy']:.1f}% on {r['examples']} test "
                     f"examples, not significantly above its majority class ({100 * r['majority_share']:.1f}%; "
                     f"exact binomial test p = {r['p_value']:.2g}): {t} is left out of the normalized average",
                     task=t) for t, r in left_out.items()]


def top_prediction(split: dict[str, Any], task: str) -> tuple[str, int, int] | None:
    counts = split.get("predicted", {}).get(task)
    if not counts:
        return None
    label, top = max(counts.items(), key=lambda kv: kv[1])
    return label, top, sum(counts.values())


def _collapse_warnings(ok: Sequence[dict[str, Any]], tasks: Sequence[str],
                       individual: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One warning per task, naming every fused model that collapsed on it."""
    out = []
    for t in tasks:
        own = top_prediction(individual["test"], t) if individual else None
        if own is not None and own[1] >= COLLAPSE_SHARE * own[2]:
            continue  # the task's own adapter predicts one label as often: nothing fusion-specific
        collapsed = []
        for job in ok:
            top = top_prediction(job["test"], t) if job.get("kind", "static") in FUSED_KINDS else None
            if top is not None and top[1] >= COLLAPSE_SHARE * top[2]:
                seeds = f", over {len(job['seed_runs'])} seeds" if job.get("seed_runs") else ""
                collapsed.append((job["name"], f"{job['name']} ({top[0]} for {top[1]} of {top[2]}{seeds})"))
        if collapsed:
            own_note = f"; the task's own adapter predicts {own[0]} for {100 * own[1] / own[2]:.0f}%" if own else ""
            fused = sum(j.get("kind", "static") in FUSED_KINDS for j in ok)
            who = "every fused model" if len(collapsed) == fused > 1 else \
                f"{len(collapsed)} fused model{'s' if len(collapsed) > 1 else ''}"
            out.append(_warning("collapsed", f"{t} is lost: {who} collapsed onto one label (≥ "
                                f"{100 * COLLAPSE_SHARE:.0f}% of its test predictions): "
                                + "; ".join(text for _, text in collapsed) + own_note,
                                task=t, methods=[name for name, _ in collapsed]))
    return out


def _edge_warnings(ok: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One warning per method, naming each chosen coefficient at an end of its grid (not of its domain, nor the
    method's floor on these adapters: `at_floor`, recorded by the runner)."""
    out = []
    for job in ok:
        edges = []
        sweep = job.get("sweep") or []
        grid: dict[str, set[Any]] = {}
        for point in sweep:
            for key, value in point["params"].items():
                grid.setdefault(key, set()).add(value)
        for key, values in grid.items():
            numbers = sorted(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
            chosen = job.get("params", {}).get(key)
            if len(numbers) < 2 or chosen not in numbers:
                continue
            low, high = DOMAIN_BOUNDS.get(key, (None, None))
            side = "lowest" if chosen == numbers[0] else "highest" if chosen == numbers[-1] else None
            if side is None or (side == "lowest" and chosen == low) or (side == "highest" and chosen == high):
                continue
            if side == "lowest" and key in (job.get("at_floor") or {}):
                continue  # the method cannot go lower there: the report says so among its findings
            edges.append((key, chosen, f"{key} = {chosen} is the {side} of {numbers}"))
        if edges:
            out.append(_warning("edge_of_grid", f"{job['name']}: the chosen " + "; ".join(e[2] for e in edges)
                                + ": the optimum is not bracketed (widen the grid; the settings already evaluated"
                                " are reused)", method=job["name"],
                                parameters={k: v for k, v, _ in edges}))
    return out


def _same_update_warnings(ok: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    sketched = [j for j in ok if j.get("update_sketch")]
    out = []
    for i, a in enumerate(sketched):
        for b in sketched[i + 1:]:
            x, y = np.asarray(a["update_sketch"]), np.asarray(b["update_sketch"])
            if x.shape != y.shape:
                continue
            scale = max(np.linalg.norm(x), np.linalg.norm(y), 1e-30)
            diff = float(np.linalg.norm(x - y) / scale)
            if diff < SAME_UPDATE_TOLERANCE:
                out.append(_warning("same_update", f"{a['name']} ({_params(a)}) and {b['name']} ({_params(b)}) "
                                    f"produced the same fused update (relative difference {diff:.1e}): one of "
                                    "them adds nothing", methods=[a["name"], b["name"]]))
    return out


def _precision_warnings(individual: dict[str, Any] | None) -> list[dict[str, Any]]:
    check = (individual or {}).get("precision_check")
    if not check or check["agreement"] >= PRECISION_AGREEMENT:
        return []
    worst = max(check["accuracy_difference"].items(), key=lambda kv: abs(kv[1]))
    return [_warning("precision", f"evaluation in {check['dtype']} agrees with fp32 on only "
                     f"{100 * check['agreement']:.1f}% of {check['examples']} validation predictions of the individual "
                     f"adapters (largest accuracy difference: {worst[0]} {100 * worst[1]:+.1f} points); set "
                     "`eval: {dtype: float32}` for exact comparisons", dtype=check["dtype"])]


def _search_warnings(ok: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A data-driven search that returned no composition for some task (LoraHub's all-zero weights, or a
    few-shot loss that never changed): its result there is the base model, not a fusion."""
    return [_warning("search_returned_nothing", f"{job['name']}: " + "; ".join(job["problems"]), method=job["name"])
            for job in ok if job.get("problems")]


def _params(job: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in job.get("params", {}).items()) or "no parameters"


# -- what each data-driven job saw and spent ------------------------------------------------------------------
DERIVED_DATA = {  # jobs recorded before they carried `data`: what their method reads, by its config section
    "lorahub": ("validation", "class labels"),
    "router": ("train", "task identity (which task an input is from)"),
}


def data_cost(job: dict[str, Any], config: dict[str, Any]) -> dict[str, Any] | None:
    """A data-driven job's data and time (lorafuse.fusion.data_record's fields: split, examples_per_task, labels,
    seeds, seconds), or None for other jobs. The training-free routers' own record (`examples_seen` over all tasks,
    `data_split`) is read as `examples_total`; a job recorded before it carried either (LoraHub, the router) gets
    them from the config that ran it, marked `derived` (its examples a task: at most that many)."""
    if job.get("kind") != "data-driven":
        return None
    if job.get("data"):
        return dict(job["data"])
    if "examples_seen" in job:  # the training-free routers (experiment.routing): labelled validation examples in all
        seen = job["examples_seen"]
        return {"split": job.get("data_split") or "none", "examples_total": seen,
                "labels": "class labels (choosing its settings)" if seen else "none", "seeds": 1,
                "seconds": job.get("search_seconds")}
    method = job.get("method", "")
    split, labels = DERIVED_DATA.get(method, ("?", "?"))
    count = (job.get("params", {}).get("shots") if method == "lorahub"
             else (config.get(method) or {}).get("examples_per_task"))
    seconds = job.get("search_seconds", (job.get("cost") or {}).get("gate_train_seconds"))
    return {"split": split, "examples_per_task": count, "labels": labels, "seeds": len(job.get("seeds") or [None]),
            "seconds": seconds, "derived": True}
