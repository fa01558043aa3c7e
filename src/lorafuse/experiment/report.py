"""The report directory: results.json, results.csv, report.md, PNG plots and report.html with the same.

Every number carries its uncertainty (lorafuse.experiment.analysis): each task's accuracy a 95% Wilson interval,
each method's average normalized accuracy a 95% paired-bootstrap interval and paired tests against the best fused
method and task arithmetic; stochastic methods show mean ± sd over seeds; warnings (a collapsed task, a coefficient
on the edge of its grid, an adapter at chance, two methods with the same update) open the report."""

from __future__ import annotations

import base64
import csv
import json
import os
from pathlib import Path
from typing import Any

from lorafuse.experiment.analysis import analyse
from lorafuse.experiment.cache import write_json_atomic
from lorafuse.provenance import stamp

# every file write_report may write (`lorafuse experiment --fresh` deletes a report folder holding only these)
PLOTS = ("per_task_accuracy.png", "normalized_accuracy.png", "coefficient_sweeps.png")
REPORT_FILES = frozenset({"results.json", "results.csv", "report.md", "report.html", *PLOTS})


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    from lorafuse.model.precision import cpu_model

    cpu = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# What legitimately differs between two runs of one config (times, paths, the machine, the executor).
RUN_SPECIFIC = frozenset({"seconds", "search_seconds", "train_seconds", "stage_seconds", "stage_compute_seconds",
                          "machine", "fused_dir", "adapter", "created", "timestamp", "date", "executor"})


def comparable_results(obj: Any) -> Any:
    """results.json without its run-specific fields (RUN_SPECIFIC; adapters by directory name): two runs of one
    config, on any executor, give equal values."""
    if isinstance(obj, dict):
        return {k: {t: Path(d).name for t, d in v.items()} if k == "adapters" else comparable_results(v)
                for k, v in obj.items() if k not in RUN_SPECIFIC}
    if isinstance(obj, list):
        return [comparable_results(v) for v in obj]
    return obj


def write_report(out: Path, config: Any, state: Any) -> dict[str, Any]:
    """Every output of the report directory from the run's state; returns what results.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = list(state.jobs)
    statistics, warnings = analyse(jobs, config.tasks)
    statistics["selection_tasks"] = list(getattr(state, "trusted", {}).get("validation") or config.tasks)
    results = {"experiment": config.name, "config": config.model_dump(), "tasks": config.tasks,
               "adapters": {t: str(p) for t, p in state.adapters.items()}, "training": list(state.training),
               "warnings": warnings, "statistics": statistics,
               "jobs": jobs, "not_run": list(getattr(state, "not_run", [])), "stage_seconds": dict(state.stage_seconds),
               "stage_compute_seconds": compute_seconds(state.training, jobs), **stamp(), "machine": machine()}
    write_json_atomic(out / "results.json", results)
    _write_csv(out / "results.csv", jobs, config.tasks, statistics)
    plots = _plots(out, jobs, config.tasks, statistics)
    md = markdown(results, plots)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(html(md, out, plots))
    return results


def compute_seconds(training: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per stage summed over its jobs as measured when each ran (cached jobs keep their first time)."""
    totals: dict[str, float] = {}
    for job in [*training, *jobs]:
        stage = job.get("stage", "train" if job.get("kind") == "train" else "?")
        totals[stage] = round(totals.get(stage, 0.0) + float(job.get("seconds") or 0.0), 2)
    return totals


def finalize_timings(report_dir: Path, stage_seconds: dict[str, float]) -> None:
    """The report stage cannot time itself: add the final stage times to results.json afterwards."""
    path = report_dir / "results.json"
    if path.is_file():
        data = json.loads(path.read_text())
        data["stage_seconds"] = stage_seconds
        write_json_atomic(path, data)


def _evaluated(job: dict[str, Any]) -> bool:
    return job.get("status") == "ok" and "test" in job


def _ok(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [j for j in jobs if _evaluated(j)]


CSV_FIELDS = ["method", "kind", "status", "task", "validation_accuracy", "test_accuracy", "test_accuracy_low",
              "test_accuracy_high", "test_examples", "test_normalized", "in_normalized_average", "seeds", "params",
              "error"]


def _write_csv(path: Path, jobs: list[dict[str, Any]], tasks: list[str], statistics: dict[str, Any]) -> None:
    """One row per (method, task); a failed job has one row per task with its error and no numbers."""
    trusted = set(statistics["trusted_tasks"])
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, CSV_FIELDS)
        w.writeheader()
        for j in jobs:
            for t in tasks:
                row = {"method": j.get("name"), "kind": j.get("kind", ""), "status": j.get("status"), "task": t,
                       "params": json.dumps(j.get("params", {})), "error": j.get("error", "")}
                if _evaluated(j):
                    summary = statistics["methods"][j["name"]]
                    interval = summary["per_task"][t]["interval"] or [None, None]
                    row.update(validation_accuracy=j.get("validation", {}).get("accuracy", {}).get(t),
                               test_accuracy=j["test"]["accuracy"].get(t), test_accuracy_low=interval[0],
                               test_accuracy_high=interval[1], test_examples=summary["per_task"][t]["examples"],
                               test_normalized=j["test"].get("normalized", {}).get(t),
                               in_normalized_average=t in trusted, seeds=summary["seeds"])
                w.writerow(row)


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _comparison(c: dict[str, Any] | None) -> str:
    """`−3.2 [−5.0, −1.4] p=0.001 ▼`: a paired difference, its interval, its p-value, ▲/▼ when significant."""
    if not c:
        return ""
    mark = (" ▲" if c["difference"] > 0 else " ▼") if c["significant"] else " (borderline)" if c.get("borderline") \
        else ""
    lo, hi = c["interval"]
    return f"{c['difference']:+.1f} [{lo:+.1f}, {hi:+.1f}] {p_text(c['p_value'])}{mark}"


def p_text(p: float) -> str:
    """A p-value as printed: below 0.001 (the randomization test's floor is 1/4,001) as `p<0.001`."""
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def summary_table(jobs: list[dict[str, Any]], statistics: dict[str, Any]) -> str:
    """Per method: average normalized accuracy with its 95% paired-bootstrap interval, the paired tests against
    the best fused method and task arithmetic, the spread over seeds, the chosen parameters."""
    best, ta = statistics.get("best"), statistics.get("task_arithmetic")
    chosen_on = statistics.get("best_chosen_on", "validation")
    lines = [f"| method | kind | avg normalized | 95% interval | vs best on {chosen_on} ({best or '–'}) | "
             f"vs {ta or 'task_arithmetic'} "
             "| seeds: mean ± sd | avg acc | chosen parameters |", "|---|---|---|---|---|---|---|---|---|"]
    for j in _ok(jobs):
        m = statistics["methods"][j["name"]]
        interval = m.get("interval")
        spread = f"{m['seed_mean']:.1f} ± {m['seed_sd']:.1f} ({m['seeds']})" if "seed_sd" in m else ""
        vs_best = "best" if j["name"] == best else _comparison(m.get("vs_best"))
        lines.append(f"| {j['name']} | {m['kind']} | {_pct(m['normalized_average'])} | "
                     + (f"{interval[0]:.1f}–{interval[1]:.1f}" if interval else "") + f" | {vs_best} | "
                     f"{_comparison(m.get('vs_task_arithmetic'))} | {spread} | {100 * j['test']['average']:.1f} | "
                     f"{_params(j)} |")
    return "\n".join(lines)


def results_table(jobs: list[dict[str, Any]], tasks: list[str], statistics: dict[str, Any] | None = None) -> str:
    """Test accuracy per task with its 95% Wilson interval (normalized in brackets), the averages (normalized:
    over the tasks whose adapters learned), chosen parameters."""
    statistics = statistics or analyse(jobs, tasks)[0]
    trusted = statistics["trusted_tasks"]
    head = "| method | " + " | ".join(t if t in trusted else f"{t} (left out)" for t in tasks)
    lines = [head + " | avg acc | avg normalized | chosen parameters |", "|" + "---|" * (len(tasks) + 4)]
    for j in _ok(jobs):
        test, m = j["test"], statistics["methods"][j["name"]]
        cells = []
        for t in tasks:
            norm = test.get("normalized", {}).get(t)
            interval = m["per_task"][t]["interval"]
            cells.append(f"{100 * test['accuracy'][t]:.1f}" + (f" ({norm:.1f})" if norm is not None else "")
                         + (f" [{100 * interval[0]:.1f}–{100 * interval[1]:.1f}]" if interval else ""))
        lines.append(f"| {j['name']} | " + " | ".join(cells) + f" | {100 * test['average']:.1f} | "
                     f"{_pct(m['normalized_average'])} | {_params(j)} |")
    return "\n".join(lines)


def _params(job: dict[str, Any]) -> str:
    """The chosen parameters; a job run over seeds names them all instead of its first seed."""
    seeded = len(job.get("seeds") or []) > 1
    shown = [f"{k}={v}" for k, v in job.get("params", {}).items() if not (seeded and k == "seed")]
    return ", ".join(shown + ([f"seeds={','.join(map(str, job['seeds']))}"] if seeded else []))


def warning_lines(warnings: list[dict[str, Any]]) -> list[str]:
    return [f"- **{w['kind'].replace('_', ' ')}**: {w['message']}" for w in warnings]


def _average_note(statistics: dict[str, Any]) -> str:
    trusted, left = statistics["trusted_tasks"], statistics["left_out_tasks"]
    note = (f"Average normalized accuracy is over {', '.join(trusted)}" if trusted else
            "No individual adapter is significantly above its majority class: there is no normalized average")
    if left:
        note += (f"; left out: {', '.join(left)} (its own adapter is not significantly above its majority "
                 "class, exact one-sided binomial test at 5%)")
    return (note + f". Intervals: 95% paired bootstrap over test examples ({statistics['resamples']} resamples; "
            "each task's examples resampled, the same resample for every method and for the own-adapter "
            "denominator). Differences against the best fused method and against task arithmetic: the observed "
            "difference, its 95% paired-bootstrap interval and the p-value of a two-sided paired randomization "
            "test (4,000 sign flips of the per-example differences; its floor is p = 1/4,001, printed p<0.001); "
            "▼/▲ mark differences significant at 5% by both the randomization test and the bootstrap interval (not "
            "corrected for multiple comparisons), `borderline` where only one of them says so. The best fused "
            f"method is chosen on {statistics.get('best_chosen_on', 'validation')} (its chosen setting's average "
            "normalized accuracy there), then compared on test"
            + (f"; not significantly different from it on test: {', '.join(statistics['tied_with_best'])} (a tie)"
               if statistics.get("tied_with_best") else "") + ". Per-task intervals: Wilson 95%.")


# The ordering the literature reports on Llama-3-8B, six NLI tasks (../shared/notes/methods.md): each pair is
# (lower, higher).
PUBLISHED_ORDER = [("ties", "ties@knots"), ("ties@knots", "tsv@core"), ("ties", "tsv@core"), ("ties", "ties@core")]


def findings(jobs: list[dict[str, Any]], statistics: dict[str, Any]) -> list[str]:
    """The report's opening in plain words, computed from the statistics: the ranking, which differences are
    significant, what the best static fusion keeps and how the published ordering fares here."""
    methods = statistics["methods"]
    fused = [j["name"] for j in _ok(jobs) if methods[j["name"]]["kind"] in ("static", "data-driven")
             and methods[j["name"]]["normalized_average"] is not None]
    if not fused:
        return []
    ranked = sorted(fused, key=lambda n: -methods[n]["normalized_average"])
    out = ["- **Ranking on test** (average normalized accuracy, 100 = each task's own adapter): "
           + ", ".join(f"{n} {methods[n]['normalized_average']:.1f}" for n in ranked[:6])
           + (f", … {ranked[-1]} {methods[ranked[-1]]['normalized_average']:.1f}" if len(ranked) > 6 else "") + "."]
    best = statistics.get("best")
    if best:
        tied = statistics.get("tied_with_best") or []
        out.append(f"- **Best fused method** (chosen on {statistics.get('best_chosen_on')}): {best}, "
                   f"{methods[best]['normalized_average']:.1f}"
                   + (f" [{methods[best]['interval'][0]:.1f}–{methods[best]['interval'][1]:.1f}]"
                      if methods[best].get("interval") else "")
                   + (f"; not significantly different from it on test: {', '.join(tied)}" if tied else
                      "; every other fused method is significantly different from it on test") + ".")
    above = [n for n in fused if (methods[n].get("vs_task_arithmetic") or {}).get("significant")
             and methods[n]["vs_task_arithmetic"]["difference"] > 0]
    below = [n for n in fused if (methods[n].get("vs_task_arithmetic") or {}).get("significant")
             and methods[n]["vs_task_arithmetic"]["difference"] < 0]
    if statistics.get("task_arithmetic"):
        out.append(f"- **Against task arithmetic** (paired, 5%): significantly above: {', '.join(above) or 'none'}; "
                   f"significantly below: {', '.join(below) or 'none'}.")
    out += _against_ties(jobs, methods)
    out += _at_floor(jobs)
    static = [n for n in ranked if methods[n]["kind"] == "static"]
    if static:
        top = static[0]
        out.append(f"- The best static fusion on test, {top}, keeps {methods[top]['normalized_average']:.1f}% of the "
                   "individual adapters' accuracy on average" + _router_gap(methods, top) + ".")
    checks = [(lo, hi) for lo, hi in PUBLISHED_ORDER if lo in methods and hi in methods
              and methods[lo]["normalized_average"] is not None and methods[hi]["normalized_average"] is not None]
    if checks:
        out.append("- **Published ordering on Llama-3-8B** (TIES < KnOTS-TIES < Core-space methods): "
                   + "; ".join(_order_text(methods, lo, hi) for lo, hi in checks) + ".")
    return out


def _router_gap(methods: dict[str, Any], top: str) -> str:
    """The routers beside the best static fusion: the trained one, then the training-free Arrow and LoGo."""
    router = next((n for n in methods if n.startswith("router") and methods[n]["normalized_average"] is not None),
                  None)
    label = "the router" if router == "router" else f"the router ({router})"
    found = [(label, router)] if router is not None else []
    found += [(label, name) for name, label in TRAINING_FREE_ROUTERS.items()
              if name in methods and methods[name]["normalized_average"] is not None]
    if not found:
        return ""
    return "; " + ", ".join(f"{label} {'reaches ' if i == 0 else ''}{methods[n]['normalized_average']:.1f} "
                            f"({methods[n]['normalized_average'] - methods[top]['normalized_average']:+.1f})"
                            for i, (label, n) in enumerate(found))


NEWER_METHODS = ("ctm", "cart", "star", "wudi", "robustmerge")  # issue 21: each judged against TIES
TIES_RIVALS = ("ties@knots", "tsv@core")  # the published improvements on TIES, shown beside them


def _against_ties(jobs: list[dict[str, Any]], methods: dict[str, Any]) -> list[str]:
    """One line: the newer data-free methods (and KnOTS-TIES, Core-space TSV) against TIES, paired on test."""
    rivals = [j["name"] for j in _ok(jobs) if (j.get("method") in NEWER_METHODS or j["name"] in TIES_RIVALS)
              and methods[j["name"]].get("vs_ties")]
    if not rivals:
        return []
    above = [n for n in rivals if methods[n]["vs_ties"]["significant"] and methods[n]["vs_ties"]["difference"] > 0]
    cells = "; ".join(f"{n} {_comparison(methods[n]['vs_ties'])}" for n in rivals)
    return [f"- **Against TIES** (paired on test, 5%; difference in points of average normalized accuracy): "
            f"{cells}. Significantly above TIES: {', '.join(above) or 'none'}."]


def _at_floor(jobs: list[dict[str, Any]]) -> list[str]:
    """One line: the chosen settings at their method's floor (the lowest a parameter can go on these adapters),
    which a grid cannot bracket from below."""
    cells = [f"{j['name']}: {why}" for j in _ok(jobs) for why in (j.get("at_floor") or {}).values()]
    if not cells:
        return []
    return ["- **At the method's floor** (chosen at the least its parameter can express on these adapters, so the "
            "search is bracketed by the method, not the grid): " + "; ".join(cells) + "."]


TRAINING_FREE_ROUTERS = {"arrow": "Arrow (training-free)", "logo": "LoGo (training-free)"}  # job name -> words


def _order_text(methods: dict[str, Any], lo: str, hi: str) -> str:
    a, b = methods[lo]["normalized_average"], methods[hi]["normalized_average"]
    return f"{lo} {a:.1f} {'<' if a < b else '≥'} {hi} {b:.1f} ({'as published' if a < b else 'not as published'})"


def precision_line(jobs: list[dict[str, Any]]) -> str:
    """The dtype evaluation ran in and why (lorafuse.model.precision), from the reference job."""
    ref = next((j for j in jobs if j.get("name") == "individual" and j.get("status") == "ok"), None)
    p = ((ref or {}).get("test") or {}).get("precision") or {}
    if not p:
        return "Evaluation dtype: not recorded (a run made before lorafuse recorded it)."
    line = f"Evaluation dtype: **{p['dtype']}** (requested `{p['requested']}`: {p['reason']})."
    check = (ref or {}).get("precision_check")
    if check:
        line += (f" Its predictions equal fp32's on {100 * check['agreement']:.2f}% of the individual adapters' "
                 f"{check['examples']} validation examples (accuracy differences: "
                 + ", ".join(f"{t} {100 * d:+.1f}" for t, d in check["accuracy_difference"].items()) + " points).")
    return line


def saved_adapter_lines(jobs: list[dict[str, Any]]) -> list[str]:
    """Every result was evaluated exactly; where a saved adapter was cut (dense element-wise results saved at
    rank min(Σr, m, n)), the energy it keeps and its own validation score beside the exact one's."""
    cut = [j for j in _ok(jobs) if (j.get("saved_adapter") or {}).get("exact") is False]
    if not cut:
        return []
    lines = ["Every method's numbers above are of its exact result. These saved adapters are that result cut to "
             "the rank shown (each module's best rank-k approximation, to ~1e-7 of its energy), so they compute a "
             "slightly different model:", "",
             "| method | saved rank | energy kept (min / mean over modules) | validation score: exact | saved |",
             "|---|---|---|---|---|"]
    for j in cut:
        s = j["saved_adapter"]
        exact = s.get("exact_validation_score")
        lines.append(f"| {j['name']} | {s['rank']} | {100 * s['retained_energy']:.1f}% / "
                     f"{100 * s['retained_energy_mean']:.1f}% | {_pct(exact)} | {_pct(s['validation_score'])} |")
    return lines


def data_cost_lines(jobs: list[dict[str, Any]], cfg: dict[str, Any], statistics: dict[str, Any]) -> list[str]:
    """Every data-driven job's data and time beside its result, so a gain can be weighed against its cost: the
    split its examples came from, how many a task, which labels it read, its seeds and the method's own seconds
    (the job's, evaluation included, beside them); the rest of its cost record after them."""
    from lorafuse.experiment.analysis import data_cost

    rows = [(j, data_cost(j, cfg)) for j in _ok(jobs)]
    rows = [(j, d) for j, d in rows if d is not None]
    if not rows:
        return []
    lines = ["## Data-driven methods: data and time", "",
             "| method | avg normalized | inputs from | examples a task (per seed) | labels read | seeds | method s | "
             "job s | other cost |", "|---|---|---|---|---|---|---|---|---|"]
    for j, d in rows:
        split = d["split"] + (" (transductive: the inputs it is tested on, labels unseen)" if d.get("transductive")
                              else "")
        lines.append(f"| {j['name']} | {_pct(statistics['methods'][j['name']]['normalized_average'])} | {split} | "
                     f"{_count_cell(d.get('examples_per_task'), d.get('examples_total'))} | {d['labels']} | {d['seeds']} | {d.get('seconds', '')} | {j.get('seconds', '')} | "
                     f"{_cost_cell(j.get('cost') or {})} |")
    if any(d.get("transductive") for _, d in rows):
        lines += ["", "A job whose inputs come from test (AdaMerging's protocol in its paper) adapted to the very "
                  "test inputs it is scored on, without their labels: compare it with the same method fed validation "
                  "inputs, the held-out result."]
    if any(d.get("derived") for _, d in rows):
        lines += ["", "Rows with `≤` were recorded before jobs carried their data: their counts come from the config "
                  "(at most that many a task)."]
    return lines + [""]


_COST_SHOWN = {"seeds", "search_seconds", "examples_seen", "data_split", "method"}  # in other columns or the methods


def _cost_cell(cost: dict[str, Any]) -> str:
    """A job's other costs in words: `gate train 91.2 s; routed 38.6 ms/example; …` (seconds and milliseconds
    rounded, what the other columns already show left out)."""
    cells = []
    for key, value in cost.items():
        if key in _COST_SHOWN:
            continue
        name = key.replace("_", " ")
        if key.endswith("_ms_per_example") and isinstance(value, (int, float)):
            cells.append(f"{name.removesuffix(' ms per example')} {value:.1f} ms/example")
        elif key.endswith("_seconds") and isinstance(value, (int, float)):
            cells.append(f"{name.removesuffix(' seconds')} {value:.1f} s")
        elif isinstance(value, float):
            cells.append(f"{name} {value:.3g}")
        else:
            cells.append(f"{name}: {value}" if isinstance(value, str) else f"{name} {value}")
    return "; ".join(cells).replace("|", "/")


def _count_cell(counts: dict[str, int] | int | None, total: int | None = None) -> str:
    """Examples a task: one number when every task saw as many, else each task's; `≤n` for a count derived from a
    config (at most n); `n in all` where only the total is recorded; `?` when unknown."""
    if total is not None:
        return f"{total} in all"
    if isinstance(counts, dict):
        values = set(counts.values())
        return str(values.pop()) if len(values) == 1 else ", ".join(f"{t} {n}" for t, n in counts.items())
    return "?" if counts is None else f"≤{counts}"


def _machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{gpu}; torch {m['torch']} with "
            f"{m['torch_threads']} thread{'' if m['torch_threads'] == 1 else 's'}")


def _adapter_cell(record: dict[str, Any]) -> str:
    if record.get("given"):
        return f"given: `{record.get('source')}` (sha256 {record['sha256'][:12]})"
    return f"`{Path(record['adapter']).name}`"


def _training_table(training: list[dict[str, Any]]) -> list[str]:
    lines = ["| task | status | train examples | steps | final loss | validation acc | train s | adapter |",
             "|---|---|---|---|---|---|---|---|"]
    for r in training:
        val = r.get("validation_accuracy")
        loss = r.get("train_loss")
        lines.append(f"| {r['task']} | {r.get('status')}{' (cached)' if r.get('reused') else ''} | "
                     f"{r.get('train_examples', '')} | {r.get('train_steps', '')} | "
                     f"{f'{loss:.3f}' if loss is not None else ''} | {f'{100 * val:.1f}' if val is not None else ''} | "
                     f"{r.get('train_seconds', '')} | {_adapter_cell(r)} |")
    return lines


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    jobs, tasks, cfg = results["jobs"], results["tasks"], results["config"]
    failed = [j for j in jobs if j.get("status") != "ok"]
    parts = [f"# Experiment `{results['experiment']}`", "",
             f"Model `{cfg['model']}`, tasks {', '.join(tasks)}. Measured on {_machine_line(results['machine'])}; "
             f"lorafuse {results['versions'].get('lorafuse')}; {results['created']}.", "",
             ]
    statistics, warnings = results["statistics"], results["warnings"]
    if results.get("not_run"):
        parts += [f"**A partial report**: {len(results['not_run'])} configured job(s) have not run yet "
                  f"({', '.join(results['not_run'])}); every number below is final for the jobs that have, and "
                  "rankings, the best method and its ties cover only those.", ""]
    found = findings(jobs, statistics)
    if found:
        parts += ["## What this run shows", ""] + found + [""]
    if warnings:
        parts += ["## Warnings", ""] + warning_lines(warnings) + [""]
    parts += ["## Average normalized accuracy on test (%, 100 = each task's own adapter)", "",
              summary_table(jobs, statistics), "", _average_note(statistics), "",
              "## Test accuracy per task (%, normalized in brackets, 95% interval in square brackets)", "",
              results_table(jobs, tasks, statistics), "",
              "Coefficients were chosen on the validation split by average normalized accuracy over the tasks whose "
              "adapters beat their majority class on validation (one setting for all tasks); stochastic methods "
              f"(DARE's random drop, LoraHub, the router) ran with {cfg.get('seeds', 1)} seeds each, the setting "
              "chosen by its mean over seeds, and report the mean over seeds. The tables report the test split.",
              ""]
    if cfg.get("notes"):
        parts += [cfg["notes"], ""]
    t, e = cfg["train"], cfg["eval"]
    parts += ["## Budget", "",
              f"LoRA r={t['rank']} α={t['alpha']} on {t['target_modules'] or 'the model default modules'}, "
              f"lr {t['lr'] or 'of the model recipe'}, {t['epochs']} epochs, batch {t['batch_size']}×{t['grad_accum']}, "
              f"≤{t['max_examples'] or 'all'} training examples per task, max length {t['max_length']}, seed "
              f"{t['seed']}; validation ≤{e['max_validation'] or 'all'} and test ≤{e['max_test'] or 'all'} "
              f"examples per task; {cfg.get('seeds', 1)} seeds per stochastic method.", ""]
    parts += [precision_line(jobs), ""]
    if results.get("training"):
        parts += ["## Adapters", ""] + _training_table(results["training"]) + [""]
    saved = saved_adapter_lines(jobs)
    if saved:
        parts += ["## What the saved adapters keep", ""] + saved + [""]
    parts += ["## Search and timing", "", "| job | status | settings tried | search s | job s |", "|---|---|---|---|---|"]
    parts += [f"| {j.get('name')} | {j.get('status')} | {j.get('settings_tried', '')} | "
              f"{j.get('search_seconds', '')} | {j.get('seconds', '')} |" for j in jobs]
    compute, wall = results.get("stage_compute_seconds", {}), results["stage_seconds"]
    parts += ["", "| stage | compute s (summed over its jobs, as measured when each ran) | this invocation's wall s |",
              "|---|---|---|"]
    parts += [f"| {s} | {compute.get(s, '')} | {wall.get(s, '')} |" for s in dict.fromkeys([*compute, *wall])]
    parts.append("")
    parts += data_cost_lines(jobs, cfg, statistics)
    if failed:
        parts += ["## Failed jobs", ""] + [f"- `{j.get('job_id', j.get('name'))}`: {j.get('error')}" for j in failed]
        parts.append("")
    parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


KIND_COLOURS = {"reference": "#999999", "static": "#2f8f6f", "data-driven": "#3b6fb6"}
KIND_NAMES = {"reference": "reference", "static": "data-free merge", "data-driven": "data-driven"}
DPI = 150  # saved at 1.5× the page's 100 px per inch: sharp on high-density screens, shown at its size in inches
FONT = 9


def _plots(out: Path, jobs: list[dict[str, Any]], tasks: list[str], statistics: dict[str, Any]) -> list[str]:
    """PNG plots (matplotlib's Agg backend: no display needed); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    ok = _ok(jobs)
    if not ok:
        return []
    files = [_per_task_heatmap(out, ok, tasks, statistics), _normalized_bars(out, ok, statistics)]
    sweeps = [j for j in ok if len(j.get("sweep", [])) > 1]
    if sweeps:
        files.append(_sweep_panels(out, sweeps))
    return files


def _per_task_heatmap(out: Path, ok: list[dict[str, Any]], tasks: list[str], statistics: dict[str, Any]) -> str:
    """Methods × tasks, test accuracy annotated, with a colour bar: readable with twenty methods, unlike grouped
    bars. Tasks left out of the normalized average are named so in their column."""
    import matplotlib.pyplot as plt
    import numpy as np

    trusted = statistics["trusted_tasks"]
    cols = [t if t in trusted else f"{t}\n(left out)" for t in tasks] + ["avg acc"]
    values = np.array([[100 * j["test"]["accuracy"][t] for t in tasks] + [100 * j["test"]["average"]] for j in ok])
    fig, ax = plt.subplots(figsize=(min(10.5, 0.95 * len(cols) + 3.5), 0.32 * len(ok) + 1.6))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="test accuracy (%)", fraction=0.05, pad=0.02)
    ax.set_xticks(range(len(cols)), cols, fontsize=FONT - 1)
    ax.set_yticks(range(len(ok)), [j["name"] for j in ok], fontsize=FONT - 1)
    mid = (values.max() + values.min()) / 2
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=FONT - 2, color="white" if v < mid else "black")
    ax.set_title("Test accuracy (%) per task, by method", fontsize=FONT + 1)
    return _save(fig, out / PLOTS[0])


def _normalized_bars(out: Path, ok: list[dict[str, Any]], statistics: dict[str, Any]) -> str:
    """Average normalized accuracy with 95% paired-bootstrap intervals; hatched: significantly below the best."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    methods = statistics["methods"]
    rows = sorted((j for j in ok if methods[j["name"]]["normalized_average"] is not None),
                  key=lambda j: methods[j["name"]]["normalized_average"])
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.9))
    if not rows:
        ax.text(0.5, 0.5, "no task's adapter beat its majority class: no normalized average", ha="center")
        ax.axis("off")
        return _save(fig, out / PLOTS[1])
    values = [methods[j["name"]]["normalized_average"] for j in rows]
    intervals = [methods[j["name"]].get("interval") or [v, v] for j, v in zip(rows, values)]
    below = [_significantly_below(methods[j["name"]]) for j in rows]
    kinds = [j.get("kind", "static") for j in rows]
    bars = ax.barh([j["name"] for j in rows], values, color=[KIND_COLOURS.get(k, "#2f8f6f") for k in kinds],
                   hatch=["//" if b else "" for b in below], edgecolor="white",
                   xerr=[[max(0.0, v - lo) for v, (lo, _) in zip(values, intervals)],
                         [max(0.0, hi - v) for v, (_, hi) in zip(values, intervals)]],
                   error_kw={"ecolor": "#222222", "capsize": 2, "lw": 0.8})
    labels = [f"{v:.1f} [{lo:.1f}, {hi:.1f}]" for v, (lo, hi) in zip(values, intervals)]
    for bar, (_, hi), text in zip(bars, intervals, labels):
        ax.text(hi + 0.8, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=FONT - 2)
    ax.axvline(100, color="#555555", lw=0.8, ls=":")
    ax.set_xlabel("average normalized accuracy on test (%; 100 = each task's own adapter)", fontsize=FONT)
    ax.tick_params(axis="y", labelsize=FONT - 1)
    top = max(hi for _, hi in intervals)
    ax.set_xlim(0, max(105, top * 1.22))
    handles = [Patch(color=KIND_COLOURS[k], label=KIND_NAMES[k]) for k in KIND_COLOURS if k in kinds]
    if any(below):
        handles.append(Patch(facecolor="#cccccc", hatch="//", edgecolor="white",
                             label=f"significantly below the best, {statistics.get('best')} (paired "
                                   "randomization test, 5%)"))
    ax.legend(handles=handles, fontsize=FONT - 2, loc="upper center", bbox_to_anchor=(0.45, -0.13 - 0.9 / (len(rows) + 5)),
              ncol=min(3, len(handles)), frameon=False)
    trusted = ", ".join(statistics["trusted_tasks"])
    ax.set_title(f"Average normalized accuracy over {trusted}\n(bars: 95% paired-bootstrap intervals)",
                 fontsize=FONT)
    return _save(fig, out / PLOTS[1])


def _significantly_below(method: dict[str, Any]) -> bool:
    c = method.get("vs_best") or {}
    return method["kind"] != "reference" and bool(c.get("significant")) and c["difference"] < 0


def _sweep_panels(out: Path, sweeps: list[dict[str, Any]]) -> str:
    """One panel per searched method: validation score against its first coefficient, one line per value of the
    others (± sd over seeds for a stochastic method); the chosen setting is starred. At most three panels a row,
    each with its own y-axis label, so that the figure stays readable at its size in the page."""
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(sweeps)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.5 * ncols, 2.9 * nrows + 0.4), squeeze=False)
    for ax, job in zip(axes.flat, sweeps):
        key = next(iter(job["sweep"][0]["params"]))
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for point in job["sweep"]:
            rest = ", ".join(f"{k}={v}" for k, v in point["params"].items() if k != key)
            scores = point.get("seed_scores") or []
            sd = float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0
            score = point.get("score", point["validation"]["normalized_average"])
            lines.setdefault(rest, []).append((point["params"][key], score, sd))
        for rest, pts in lines.items():
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=3,
                        capsize=2, lw=1, label=rest or None)
        chosen = next(p for p in job["sweep"] if p["params"] == {k: job["params"][k] for k in p["params"]})
        chosen_score = chosen.get("score", chosen["validation"]["normalized_average"])
        ax.plot([job["params"][key]], [chosen_score], marker="*", ms=12, color="#d62728", ls="none")
        ax.set_title(job["name"], fontsize=FONT)
        ax.set_xlabel(key, fontsize=FONT)
        ax.set_ylabel("val. avg normalized (%)", fontsize=FONT - 1)
        ax.tick_params(labelsize=FONT - 1)
        if len(lines) > 1:
            ax.legend(fontsize=FONT - 2)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Coefficient sweeps on validation (★ = chosen)", fontsize=FONT + 1)
    return _save(fig, out / PLOTS[2])


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)  # keeps a legend placed below the axes
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def png_size(path: Path) -> tuple[int, int]:
    """Width and height in pixels, from the PNG header."""
    header = path.read_bytes()[16:24]
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def html(md: str, out: Path, plots: list[str]) -> str:
    """A self-contained page: the Markdown's tables as HTML tables, lists, the plots embedded at their size in
    inches (100 px per inch, never wider than the page), the warnings in a box."""
    body = []
    in_table = in_list = False
    section = ""
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<{tag}{_mark(c)}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("- "):
            cls = " class='warnings'" if section == "Warnings" else ""
            body.append(("" if in_list else f"<ul{cls}>") + f"<li>{_inline(line[2:])}</li>")
            in_list = True
            continue
        if in_list:
            body.append("</ul>")
            in_list = False
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            width, _ = png_size(out / name)
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(f'<img alt="{_esc(name)}" width="{round(width * 100 / DPI)}" '
                        f'src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            section = line.lstrip("# ")
            body.append(f"<h{level}>{_esc(section)}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    body.append("</table>" if in_table else "</ul>" if in_list else "")
    style = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;height:auto;"
             "margin:1em 0;display:block}ul.warnings{background:#fff4e5;border-left:4px solid #e08a00;"
             "padding:0.6em 0.6em 0.6em 2em}td.below{color:#b00020}td.above{color:#1a7f37}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>lorafuse report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold**."""
    parts = _esc(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def _mark(cell: str) -> str:
    """Significant differences coloured: ▼ red, ▲ green."""
    return " class='below'" if cell.endswith("▼") else " class='above'" if cell.endswith("▲") else ""


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "")
