"""The report directory: results.json, results.csv, report.md, PNG plots and report.html with the same."""

from __future__ import annotations

import base64
import csv
import json
import os
import platform
from pathlib import Path
from typing import Any

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


def rows_of(state: Any) -> list[dict[str, Any]]:
    return [j for j in state.jobs]


def write_report(out: Path, config: Any, state: Any) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    jobs = rows_of(state)
    results = {"experiment": config.name, "config": config.model_dump(), "tasks": config.tasks,
               "adapters": {t: str(p) for t, p in state.adapters.items()}, "jobs": jobs,
               "stage_seconds": dict(state.stage_seconds), **stamp(), "machine": machine()}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    _write_csv(out / "results.csv", jobs, config.tasks)
    plots = _plots(out, jobs, config.tasks)
    md = markdown(results, plots)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(html(md, out, plots))
    return results


def finalize_timings(out: Path, stage_seconds: dict[str, float]) -> None:
    """The report stage cannot time itself: add the final stage times to results.json afterwards."""
    path = out / "report" / "results.json"
    if path.is_file():
        data = json.loads(path.read_text())
        data["stage_seconds"] = stage_seconds
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _ok(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [j for j in jobs if j.get("status") == "ok" and "test" in j]


def _write_csv(path: Path, jobs: list[dict[str, Any]], tasks: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "kind", "task", "validation_accuracy", "test_accuracy", "test_normalized", "params"])
        for j in _ok(jobs):
            for t in tasks:
                w.writerow([j["name"], j.get("kind", ""), t, j.get("validation", {}).get("accuracy", {}).get(t),
                            j["test"]["accuracy"].get(t), j["test"].get("normalized", {}).get(t),
                            json.dumps(j.get("params", {}))])


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


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    jobs, tasks, m = results["jobs"], results["tasks"], results["machine"]
    failed = [j for j in jobs if j.get("status") != "ok"]
    parts = [f"# Experiment `{results['experiment']}`", "",
             f"Model `{results['config']['model']}`, tasks {', '.join(tasks)}; "
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; lorafuse {results['versions'].get('lorafuse')}; "
             f"{results['created']}.", "",
             "## Test accuracy (%, normalized to each task's own adapter in brackets)", "",
             results_table(jobs, tasks), "",
             "Coefficients were chosen on the validation split by average normalized accuracy (one setting for all "
             "tasks); the table reports the test split.", ""]
    if results["config"].get("notes"):
        parts += [results["config"]["notes"], ""]
    parts += ["## Search and timing", "", "| job | settings tried | search s | job s |", "|---|---|---|---|"]
    parts += [f"| {j.get('name')} | {j.get('settings_tried', '')} | {j.get('search_seconds', '')} | "
              f"{j.get('seconds', '')} |" for j in jobs]
    parts += ["", "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in results["stage_seconds"].items()), ""]
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


def _plots(out: Path, jobs: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(jobs)
    if not ok:
        return []
    names = [j["name"] for j in ok]
    files = []
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * len(names) / 3), 4))
    width = 0.8 / len(names)
    for i, j in enumerate(ok):
        ax.bar([k + i * width for k in range(len(tasks))], [100 * j["test"]["accuracy"][t] for t in tasks], width,
               label=j["name"])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Per-task accuracy by method")
    ax.legend(fontsize=7, ncol=2)
    files.append(_save(fig, out / "per_task_accuracy.png"))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    values = [j["test"].get("normalized_average") or 0.0 for j in ok]
    bars = ax.bar(names, values, color=["#888" if j.get("kind") == "reference" else "#3a7" for j in ok])
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_ylabel("average normalized accuracy (%)")
    ax.set_title("Average normalized accuracy by method (test)")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    files.append(_save(fig, out / "normalized_accuracy.png"))
    sweeps = [j for j in ok if len(j.get("sweep", [])) > 1]
    if sweeps:
        fig, ax = plt.subplots(figsize=(7, 4))
        for j in sweeps:
            key = next(iter(j["sweep"][0]["params"]))
            pts = sorted((s["params"][key], s["validation"]["normalized_average"]) for s in j["sweep"]
                         if all(s["params"].get(k) == j["params"].get(k) for k in s["params"] if k != key))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{j['name']} ({key})")
        ax.set_xlabel("coefficient")
        ax.set_ylabel("validation avg normalized accuracy (%)")
        ax.set_title("Coefficient sweeps (other coefficients at their chosen values)")
        ax.legend(fontsize=7)
        files.append(_save(fig, out / "coefficient_sweeps.png"))
    return files


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
