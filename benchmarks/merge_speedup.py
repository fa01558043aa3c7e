"""Old against new lorafuse in one process, on the merge benchmark's Llama-3-8B-shaped layers: the speed ratio of
the full-space element-wise merges, measured alternately so that other jobs on the machine slow both alike, and
whether the results are the same (the dense merged update bit for bit, the saved rank-16 factors' product).

    git worktree add --detach /tmp/lorafuse-old <old commit>
    .venv/bin/python benchmarks/merge_speedup.py --old-src /tmp/lorafuse-old/src --layers 1 --repeats 2

The old tree is imported as `lorafuse_old` (a copy with its imports renamed, under benchmarks/work/).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench  # noqa: E402  (the benchmark's adapters and shapes)

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ties": ("ties", {"density": 0.2, "rank": 16}),
    "ties_global": ("ties", {"density": 0.2, "rank": 16, "trim_scope": "global"}),
    "dare_ties": ("dare_ties", {"drop_rate": 0.9, "rank": 16}),
}


def import_old(src: Path) -> Any:
    """The package under `src`/lorafuse, copied as lorafuse_old with every `lorafuse.` import renamed."""
    root = merge_bench.WORK / "old-src"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(src / "lorafuse", root / "lorafuse_old", ignore=shutil.ignore_patterns("__pycache__"))
    for path in (root / "lorafuse_old").rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\blorafuse\.", "lorafuse_old.", text)
        text = re.sub(r"^(\s*)(from|import) lorafuse\b(?!_)", r"\1\2 lorafuse_old", text, flags=re.M)
        path.write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module("lorafuse_old.merging.engine")


def timed(engine: Any, layers: int, method: str, params: dict[str, Any], **extra: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = engine.merge(merge_bench.adapter_dirs(layers), method, progress=False, **params, **extra)
    return time.perf_counter() - start, result


def cpu_timed(engine: Any, layers: int, method: str, params: dict[str, Any]) -> tuple[float, float]:
    """Wall and CPU seconds of one merge. On a machine whose cores other jobs hold, the CPU time (this process's,
    all its threads) is far less noisy than the wall time: time spent descheduled does not count."""
    cpu = time.process_time()
    wall, _ = timed(engine, layers, method, params)
    return wall, time.process_time() - cpu


def compare(old: Any, new: Any) -> dict[str, Any]:
    """Bit-identical dense results? And the largest relative difference of the saved factors' products."""
    identical, factor_diff, dense_diff = True, 0.0, 0.0
    for module in new.modules:
        a, b = old.exact[module].matrix, new.exact[module].matrix
        identical &= torch_equal(a, b)
        dense_diff = max(dense_diff, float((a - b).norm() / b.norm().clamp(min=1e-30)))
        x, y = old.delta(module), new.delta(module)
        factor_diff = max(factor_diff, float((x - y).norm() / y.norm().clamp(min=1e-30)))
    return {"dense_bit_identical": identical, "dense_max_rel_diff": dense_diff, "rank16_max_rel_diff": factor_diff}


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a.view(torch.int32), b.view(torch.int32)))  # bit for bit (signed zeros, NaN payloads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-src", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-check", action="store_true", help="skip the equality check (one run each)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    merge_bench.ensure_adapters(args.layers)
    old_engine = import_old(args.old_src)
    new_engine = importlib.import_module("lorafuse.merging.engine")
    for case in args.cases:
        method, params = CASES[case]
        row: dict[str, Any] = {"case": case, "layers": args.layers, "threads": args.threads}
        if not args.no_check:
            _, old = timed(old_engine, args.layers, method, params, keep_exact=True)
            _, new = timed(new_engine, args.layers, method, params, keep_exact=True)
            row.update(compare(old, new))
            del old, new
        times: dict[str, list[float]] = {"old": [], "new": [], "old_cpu": [], "new_cpu": []}
        for _ in range(args.repeats):  # alternately: a change of load hits both
            for name, engine in (("old", old_engine), ("new", new_engine)):
                wall, cpu = cpu_timed(engine, args.layers, method, params)
                times[name].append(round(wall, 2))
                times[f"{name}_cpu"].append(round(cpu, 2))
        row.update(times)
        row["speedup"] = round(sum(times["old"]) / sum(times["new"]), 2)
        row["speedup_cpu"] = round(sum(times["old_cpu"]) / sum(times["new_cpu"]), 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
