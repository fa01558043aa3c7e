"""The report directory: results.json, results.csv, report.md, PNG plots and report.html with the same."""

from __future__ import annotations

import base64
import csv
import json
import os
import platform
from pathlib import Path
from typing import Any

from lorafuse.experiment.cache import write_json_atomic
from lorafuse.provenance import stamp


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_report(out: Path, config: Any, state: Any) -> dict[str, Any]:
    """Every output of the report directory from the run's state; returns what results.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = list(state.jobs)
    results = {"experiment": config.name, "config": config.model_dump(), "tasks": config.tasks,
               "adapters": {t: str(p) for t, p in state.adapters.items()}, "training": list(state.training),
               "jobs": jobs, "stage_seconds": dict(state.stage_seconds),
               "stage_compute_seconds": compute_seconds(state.training, jobs), **stamp(), "machine": machine()}
    write_json_atomic(out / "results.json", results)
    _write_csv(out / "results.csv", jobs, config.tasks)
    plots = _plots(out, jobs, config.tasks)
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


CSV_FIELDS = ["method", "kind", "status", "task", "validation_accuracy", "test_accuracy", "test_normalized",
              "params", "error"]


def _write_csv(path: Path, jobs: list[dict[str, Any]], tasks: list[str]) -> None:
    """One row per (method, task); a failed job has one row per task with its error and no numbers."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, CSV_FIELDS)
        w.writeheader()
        for j in jobs:
            for t in tasks:
                row = {"method": j.get("name"), "kind": j.get("kind", ""), "status": j.get("status"), "task": t,
                       "params": json.dumps(j.get("params", {})), "error": j.get("error", "")}
                if _evaluated(j):
                    row.update(validation_accuracy=j.get("validation", {}).get("accuracy", {}).get(t),
                               test_accuracy=j["test"]["accuracy"].get(t),
                               test_normalized=j["test"].get("normalized", {}).get(t))
                w.writerow(row)


def results_table(jobs: list[dict[str, Any]], tasks: list[str]) -> str:
    """Test accuracy per task (normalized in brackets), averages, chosen parameters."""
    head = "| method | " + " | ".join(tasks) + " | avg acc | avg normalized | chosen parameters |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for j in _ok(jobs):
        test = j["test"]
        cells = []
        for t in tasks:
            norm = test.get("normalized", {}).get(t)
            cells.append(f"{100 * test['accuracy'][t]:.1f}" + (f" ({norm:.1f})" if norm is not None else ""))
        navg = test.get("normalized_average")
        params = ", ".join(f"{k}={v}" for k, v in j.get("params", {}).items())
        lines.append(f"| {j['name']} | " + " | ".join(cells) + f" | {100 * test['average']:.1f} | "
                     + (f"{navg:.1f}" if navg is not None else "–") + f" | {params} |")
    return "\n".join(lines)


def _machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{gpu}; torch {m['torch']} with "
            f"{m['torch_threads']} threads")


def _training_table(training: list[dict[str, Any]]) -> list[str]:
    lines = ["| task | status | train examples | steps | final loss | validation acc | train s | adapter |",
             "|---|---|---|---|---|---|---|---|"]
    for r in training:
        val = r.get("validation_accuracy")
        loss = r.get("train_loss")
        lines.append(f"| {r['task']} | {r.get('status')}{' (cached)' if r.get('reused') else ''} | "
                     f"{r.get('train_examples', '')} | {r.get('train_steps', '')} | "
                     f"{f'{loss:.3f}' if loss is not None else ''} | {f'{100 * val:.1f}' if val is not None else ''} | "
                     f"{r.get('train_seconds', '')} | `{Path(r['adapter']).name}` |")
    return lines


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    jobs, tasks, cfg = results["jobs"], results["tasks"], results["config"]
    failed = [j for j in jobs if j.get("status") != "ok"]
    parts = [f"# Experiment `{results['experiment']}`", "",
             f"Model `{cfg['model']}`, tasks {', '.join(tasks)}. Measured on {_machine_line(results['machine'])}; "
             f"lorafuse {results['versions'].get('lorafuse')}; {results['created']}.", "",
             "## Test accuracy (%, normalized to each task's own adapter in brackets)", "",
             results_table(jobs, tasks), "",
             "Coefficients were chosen on the validation split by average normalized accuracy (one setting for all "
             "tasks); the table reports the test split.", ""]
    if cfg.get("notes"):
        parts += [cfg["notes"], ""]
    t, e = cfg["train"], cfg["eval"]
    parts += ["## Budget", "",
              f"LoRA r={t['rank']} α={t['alpha']} on {t['target_modules'] or 'the model default modules'}, "
              f"lr {t['lr'] or 'of the model recipe'}, {t['epochs']} epochs, batch {t['batch_size']}×{t['grad_accum']}, "
              f"≤{t['max_examples'] or 'all'} training examples per task, max length {t['max_length']}, seed "
              f"{t['seed']}; validation ≤{e['max_validation'] or 'all'} and test ≤{e['max_test'] or 'all'} "
              "examples per task.", ""]
    if results.get("training"):
        parts += ["## Adapters", ""] + _training_table(results["training"]) + [""]
    parts += ["## Search and timing", "", "| job | status | settings tried | search s | job s |", "|---|---|---|---|---|"]
    parts += [f"| {j.get('name')} | {j.get('status')} | {j.get('settings_tried', '')} | "
              f"{j.get('search_seconds', '')} | {j.get('seconds', '')} |" for j in jobs]
    compute, wall = results.get("stage_compute_seconds", {}), results["stage_seconds"]
    parts += ["", "| stage | compute s (summed over its jobs, as measured when each ran) | this invocation's wall s |",
              "|---|---|---|"]
    parts += [f"| {s} | {compute.get(s, '')} | {wall.get(s, '')} |" for s in dict.fromkeys([*compute, *wall])]
    parts.append("")
    extra = [j for j in _ok(jobs) if j.get("cost")]
    if extra:
        parts += ["## Data-driven methods: cost", "", "| method | cost |", "|---|---|"]
        parts += [f"| {j['name']} | {json.dumps(j['cost'])} |" for j in extra]
        parts.append("")
    if failed:
        parts += ["## Failed jobs", ""] + [f"- `{j.get('job_id', j.get('name'))}`: {j.get('error')}" for j in failed]
        parts.append("")
    parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


KIND_COLOURS = {"reference": "#999999", "static": "#2f8f6f", "data-driven": "#3b6fb6"}


def _plots(out: Path, jobs: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """PNG plots (matplotlib's Agg backend: no display needed); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    ok = _ok(jobs)
    if not ok:
        return []
    files = [_per_task_heatmap(out, ok, tasks), _normalized_bars(out, ok)]
    sweeps = [j for j in ok if len(j.get("sweep", [])) > 1]
    if sweeps:
        files.append(_sweep_panels(out, sweeps))
    return files


def _per_task_heatmap(out: Path, ok: list[dict[str, Any]], tasks: list[str]) -> str:
    """Methods × tasks, test accuracy annotated: readable with twenty methods, unlike grouped bars."""
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [*tasks, "average"]
    values = np.array([[100 * j["test"]["accuracy"][t] for t in tasks] + [100 * j["test"]["average"]] for j in ok])
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 3, 0.38 * len(ok) + 1.4))
    ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(ok)), [j["name"] for j in ok], fontsize=8)
    mid = (values.max() + values.min()) / 2
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white" if v < mid else "black")
    ax.set_title("Test accuracy (%) per task, by method")
    return _save(fig, out / "per_task_accuracy.png")


def _normalized_bars(out: Path, ok: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    rows = sorted(ok, key=lambda j: j["test"].get("normalized_average") or 0.0)
    values = [j["test"].get("normalized_average") or 0.0 for j in rows]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    bars = ax.barh([j["name"] for j in rows], values,
                   color=[KIND_COLOURS.get(j.get("kind", "static"), "#2f8f6f") for j in rows])
    ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.axvline(100, color="#555555", lw=0.8, ls=":")
    ax.set_xlabel("average normalized accuracy on test (%; 100 = each task's own adapter)")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlim(0, max(105, max(values) * 1.08))
    ax.set_title("Average normalized accuracy by method (grey: references, blue: data-driven)", fontsize=9)
    return _save(fig, out / "normalized_accuracy.png")


def _sweep_panels(out: Path, sweeps: list[dict[str, Any]]) -> str:
    """One panel per searched method: validation score against its first coefficient, one line per value of the
    others; the chosen setting is starred."""
    import matplotlib.pyplot as plt

    n = len(sweeps)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax, job in zip(axes.flat, sweeps):
        key = next(iter(job["sweep"][0]["params"]))
        lines: dict[str, list[tuple[float, float]]] = {}
        for point in job["sweep"]:
            rest = ", ".join(f"{k}={v}" for k, v in point["params"].items() if k != key)
            lines.setdefault(rest, []).append((point["params"][key], point["validation"]["normalized_average"]))
        for rest, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=rest or None)
        ax.plot([job["params"][key]], [job["validation"]["normalized_average"]], marker="*", ms=11, color="#d62728",
                ls="none")
        ax.set_title(job["name"], fontsize=9)
        ax.set_xlabel(key, fontsize=8)
        ax.tick_params(labelsize=7)
        if len(lines) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supylabel("validation avg normalized accuracy (%)", fontsize=8)
    fig.suptitle("Coefficient sweeps (★ = chosen)", fontsize=10)
    return _save(fig, out / "coefficient_sweeps.png")


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def html(md: str, out: Path, plots: list[str]) -> str:
    """A self-contained page: the Markdown's tables as HTML tables, the plots embedded."""
    body = []
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<{tag}>{_esc(c)}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(f'<img alt="{_esc(name)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_esc(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_esc(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:1em 0}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>lorafuse report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "")
