"""Where the time of a full-space element-wise merge goes: one Llama-3-8B-shaped layer (the shapes and adapters of
merge_bench.py), TIES per module, TIES with a global trim, and DARE-TIES, rank-16 output.

Each stage is timed by wrapping the library function that does it (wall time, inclusive; the thread pools then
have one worker per torch thread, so with --threads 1 every stage runs alone and the stages add up).

    .venv/bin/python benchmarks/merge_profile.py                   # 1 layer, all three cases, torch threads 1
    .venv/bin/python benchmarks/merge_profile.py --cases ties --layers 2
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench  # noqa: E402  (the benchmark's adapters and shapes)

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ties": ("ties", {"density": 0.2, "rank": 16}),
    "ties_global": ("ties", {"density": 0.2, "rank": 16, "trim_scope": "global"}),
    "dare_ties": ("dare_ties", {"drop_rate": 0.9, "rank": 16}),
}


class Timers:
    """Inclusive wall seconds, CPU seconds (the process's: with --threads 1 one thread works at a time, and time
spent descheduled by other jobs does not count, so it is far less noisy on a shared machine) and call counts per
stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, attr: str, stage: str) -> None:
        original: Callable[..., Any] = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self.cpu[stage] += time.process_time() - cpu
                self.calls[stage] += 1

        setattr(owner, attr, timed)


def instrument(timers: Timers, package: str = "lorafuse") -> None:
    """Wrap the stages of the full-space element-wise path (whatever of them this version of lorafuse has)."""
    import importlib

    engine, spaces, elementwise, primitives, thresholds = (importlib.import_module(f"{package}.merging.{m}") for m in (
        "engine", "spaces", "methods.elementwise", "methods.primitives", "methods.thresholds"))

    stages = [
        (engine._Engine, "_elementwise_full", "module total (merge pass + per-module thresholds)"),
        (engine._Thresholds, "for_rows", "thresholds (per module)"),
        (engine._Thresholds, "fit_global", "thresholds (global, before the merge)"),
        (spaces.DenseRows, "task_band", "GEMM B·A (a band of one task's ΔW)"),
        (spaces.DenseRows, "task_sample", "threshold sample (random positions)"),
        (thresholds, "_bracket", "threshold bracket from the sample"),
        (thresholds, "_count_and_band", "threshold counting pass (incl. its GEMMs)"),
        (thresholds, "count_pass", "threshold counting pass (incl. its GEMMs)"),
        (elementwise, "sparsify", "trim / drop mask (sparsify)"),
        (elementwise, "sparsify_", "trim / drop mask (sparsify)"),
        (primitives, "weighted_sum", "weighted sums over tasks (votes, totals, counts)"),
        (primitives, "bernoulli_keep_mask", "DARE mask generator"),
        (primitives, "elect_sign", "sign election"),
        (primitives, "disjoint_mean", "disjoint mean"),
        (primitives, "disjoint_mean_", "disjoint mean"),
        (engine, "dense_truncated_svd", "rank-16 truncation (block Krylov, after the merge pass)"),
        (engine, "range_start", "range finder start block (QR)"),
        (getattr(engine, "_Bands", None), "run", "merge bands (GEMMs, merge, product with the test block)"),
        (getattr(engine, "_Bands", None), "run_parallel", "merge bands in parallel (wall)"),
    ]
    try:  # the compiled kernels (issue 23, round 4), where this version has them
        kernels = importlib.import_module(f"{package}.merging.methods.kernels")
    except ImportError:
        kernels = None
    stages += [
        (spaces.DenseRows, "band", "GEMMs B·A (a band of every task's ΔW)"),
        (thresholds, "_count_bands", "compiled counting pass (incl. its GEMMs)"),
        (kernels, "count_band", "kernel: counting pass"),
        (kernels, "gather_inside", "kernel: gather in-bracket values"),
        (kernels, "merge_band", "kernel: merge pass (drop, trim, election, mean)"),
        (getattr(engine._Engine, "_elementwise_compiled", None) and engine._Engine, "_elementwise_compiled",
         "module total, compiled (merge pass + per-module thresholds)"),
    ]
    for owner, attr, stage in stages:
        if owner is not None and hasattr(owner, attr):
            timers.wrap(owner, attr, stage)


def run(case: str, layers: int, package: str = "lorafuse") -> dict[str, Any]:
    import importlib

    merge = importlib.import_module(f"{package}.merging.engine").merge
    timers = Timers()
    instrument(timers, package)
    method, params = CASES[case]
    start, cpu = time.perf_counter(), time.process_time()
    result = merge(merge_bench.adapter_dirs(layers), method, progress=False, **params)
    merged, merged_cpu = time.perf_counter() - start, time.process_time() - cpu
    out = merge_bench._fresh(merge_bench.WORK / "out" / f"profile-{case}")
    save_start = time.perf_counter()
    result.save(out)
    return {"case": case, "package": package, "layers": layers, "total_s": merged + time.perf_counter() - save_start,
            "merge_s": merged, "merge_cpu_s": merged_cpu, "save_s": time.perf_counter() - save_start,
            "stages": {k: round(v, 3) for k, v in sorted(timers.seconds.items(), key=lambda kv: -kv[1])},
            "stages_cpu": {k: round(v, 3) for k, v in sorted(timers.cpu.items(), key=lambda kv: -kv[1])},
            "calls": dict(timers.calls), "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "energy_min": result.provenance["retained_energy"]["min"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--old-src", type=Path, help="also profile this tree (alternately, same process; see "
                        "merge_speedup.py)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    merge_bench.ensure_adapters(args.layers)
    packages = ["lorafuse"]
    if args.old_src:
        import merge_speedup

        merge_speedup.import_old(args.old_src)
        packages = ["lorafuse_old", "lorafuse"]
    for case in args.cases:
        for package in packages:
            print(json.dumps(run(case, args.layers, package), indent=1), flush=True)


if __name__ == "__main__":
    main()
