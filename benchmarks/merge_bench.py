"""Merge benchmark on Llama-3-8B shapes: lorafuse against the I/O floor and PEFT's `add_weighted_adapter`.

Four random rank-16 LoRA adapters (fp32 factors, lora_alpha 32, all 7 projections q,k,v,o,gate,up,down;
hidden 4096, intermediate 14336, 32 heads / 8 KV heads so k/v project to 1024) are written once as PEFT adapter
directories under benchmarks/work/ (git-ignored) for 1, 2 and 32 layers. Every case runs in a fresh child
process, so its peak RSS (ru_maxrss) is its own; seconds exclude the child's imports.

    .venv/bin/python benchmarks/merge_bench.py               # everything (PEFT's *_svd take minutes each)
    .venv/bin/python benchmarks/merge_bench.py --skip-peft   # re-use PEFT's numbers from the last results json
    .venv/bin/python benchmarks/merge_bench.py --only ties --layers 32   # one case, no results written
    .venv/bin/python benchmarks/merge_bench.py --only ties ties_global dare_ties --layers 32 --write   # issue 23

Results: benchmarks/results/merge_bench.md and .json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
THREADS = 2  # the default; --threads overrides it (recorded in every row)
N_ADAPTERS, RANK, ALPHA = 4, 16, 32
LAYER_COUNTS = (1, 2, 32)
HIDDEN, INTERMEDIATE, KV_OUT = 4096, 14336, 1024
SHAPES = {  # (out, in) of each projection in Llama-3-8B
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_OUT, HIDDEN),
    "self_attn.v_proj": (KV_OUT, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
DENSE_KNOTS_MODULES = ("self_attn.q_proj", "self_attn.k_proj")  # v and o have the shapes of k and q
PEFT_TYPES = ("svd", "ties_svd", "dare_ties_svd")


# -- adapters --------------------------------------------------------------------------------------------
def adapter_dirs(layers: int) -> list[Path]:
    return [WORK / "adapters" / f"L{layers}" / f"task{i}" for i in range(N_ADAPTERS)]


def ensure_adapters(layers: int) -> list[Path]:
    """Write the adapters once; each (task, layer, projection) has its own seed, so L1 ⊂ L2 ⊂ L32."""
    import torch
    from safetensors.torch import save_file

    dirs = adapter_dirs(layers)
    for task, path in enumerate(dirs):
        if (path / "adapter_model.safetensors").is_file():
            continue
        state = {}
        for layer in range(layers):
            for j, (proj, (out_f, in_f)) in enumerate(SHAPES.items()):
                gen = torch.Generator().manual_seed(1_000_000 * task + 100 * layer + j)
                key = f"base_model.model.model.layers.{layer}.{proj}"
                state[f"{key}.lora_A.weight"] = torch.randn(RANK, in_f, generator=gen) / in_f**0.5
                state[f"{key}.lora_B.weight"] = torch.randn(out_f, RANK, generator=gen) * 0.02
        path.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "use_rslora": False,
            "target_modules": [p.split(".")[-1] for p in SHAPES], "base_model_name_or_path":
            "meta-llama/Meta-Llama-3-8B", "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
            "rank_pattern": {}, "alpha_pattern": {},
        }
        (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return dirs


# -- cases (each runs in a child process) -------------------------------------------------------------------
def case_lorafuse(layers: int, method: str, **params: Any) -> dict[str, Any]:
    from lorafuse.merging.engine import merge

    dirs = adapter_dirs(layers)
    out = _fresh(WORK / "out" / f"{method}-{params.get('space', 'full')}-L{layers}")
    start = time.perf_counter()
    result = merge(dirs, method, progress=False, **params)
    result.save(out)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "retained_energy_min": result.provenance["retained_energy"]["min"],
            **(_vllm_check(out) if method == "ctm" else {})}


def _vllm_check(out: Path) -> dict[str, Any]:
    """`lorafuse check --engine vllm` of the written adapter (after the clock): CtM's one rank-r output must load."""
    from lorafuse.adapters.check import check_adapter

    verdict = check_adapter(out, "vllm")
    return {"vllm_check": "passes" if verdict.ok else "fails: " + "; ".join(str(f) for f in verdict.failures)}


def _fresh(out: Path) -> Path:
    """Remove a previous run's output before the clock starts: unlinking a large file with its pages still
    cached is not merge work (a user writes to a new directory), and would slow the write that follows."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return out


def case_io_floor(layers: int) -> dict[str, Any]:
    """Read all adapters and write one rank-16 adapter of the same size: what any merge must at least do."""
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    states = [load_file(str(d / "adapter_model.safetensors")) for d in adapter_dirs(layers)]
    checksum = sum(float(t.sum()) for state in states for t in state.values())  # touch every byte once
    out = _fresh(WORK / "out" / f"io-floor-L{layers}")
    out.mkdir(parents=True)
    save_file(states[0], str(out / "adapter_model.safetensors"))
    return {"seconds": time.perf_counter() - start, "checksum": checksum}


def _peft_model(layers: int) -> Any:
    """A Llama-3-8B-shaped model (bf16, uninitialised weights, vocab 1000) with the adapters loaded."""
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=layers, vocab_size=1000)
    with torch.device("meta"):
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    base = base.to_empty(device="cpu")
    dirs = adapter_dirs(layers)
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name="task0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"task{i}")
    return model


def case_peft(layers: int, combination_type: str) -> dict[str, Any]:
    model = _peft_model(layers)
    names = [f"task{i}" for i in range(N_ADAPTERS)]
    baseline = _peak_gb()
    start = time.perf_counter()
    model.add_weighted_adapter(names, [1.0] * N_ADAPTERS, "merged", combination_type=combination_type,
                               svd_rank=RANK, density=0.2 if combination_type == "ties_svd" else 0.1)
    return {"seconds": time.perf_counter() - start, "peak_gb_before_call": baseline}


def case_peft_linear_error(layers: int) -> dict[str, Any]:
    """PEFT `linear` combines A's and B's separately; its product has cross terms. Error vs Σ w_t ΔW_t."""

    model = _peft_model(layers)
    names = [f"task{i}" for i in range(N_ADAPTERS)]
    weights = [1.0] * N_ADAPTERS
    start = time.perf_counter()
    model.add_weighted_adapter(names, weights, "merged", combination_type="linear")
    seconds = time.perf_counter() - start
    err2 = ref2 = 0.0
    for _, module in model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            got = module.get_delta_weight("merged").double()
            true = sum(w * module.get_delta_weight(n).double() for n, w in zip(names, weights))
            err2 += float((got - true).pow(2).sum())
            ref2 += float(true.pow(2).sum())
    return {"seconds": seconds, "relative_error": (err2 / ref2) ** 0.5}


def case_knots_dense(layers: int) -> dict[str, Any]:
    """KnOTS's own computation: a full SVD of [ΔW_1 | … | ΔW_T] (m × T·n) per module, on q and k."""
    import torch

    from lorafuse.adapters.reader import LoraAdapter

    adapters = [LoraAdapter(d) for d in adapter_dirs(layers)]
    start = time.perf_counter()
    for module in adapters[0].modules:
        if module.endswith(DENSE_KNOTS_MODULES):
            concat = torch.cat([a.update(module).dense() for a in adapters], dim=1)
            torch.linalg.svd(concat, full_matrices=False)
    return {"seconds": time.perf_counter() - start, "modules": "q,k"}


def case_truncation_accuracy(layers: int) -> dict[str, Any]:
    """How much of the optimal rank-16 energy the dense truncation keeps on TIES merges of q_proj and k_proj:
    the default range finder (started from the inputs' row space) against a random start with 4 power
    iterations (the textbook default, what lorafuse used before), both against the exact SVD."""
    import torch

    from lorafuse.adapters.reader import LoraAdapter
    from lorafuse.merging.algebra.dense import dense_truncated_svd
    from lorafuse.merging.engine import _Thresholds
    from lorafuse.merging.methods.primitives import Draws
    from lorafuse.merging.methods.registry import get_method
    from lorafuse.merging.spaces import DenseRows

    adapters = [LoraAdapter(d) for d in adapter_dirs(layers)]
    draws = Draws(tuple(range(len(adapters))))  # TIES draws nothing
    spec = get_method("ties")
    params = spec.parse_params({"density": 0.2})
    out: dict[str, Any] = {"seconds": 0.0}
    for proj in DENSE_KNOTS_MODULES:
        rows = DenseRows([a.update(f"model.layers.0.{proj}") for a in adapters])
        module = f"model.layers.0.{proj}"
        limits = _Thresholds(spec, params, [0.2] * len(adapters), "module", lambda _: draws).for_rows(module, rows)
        merged = torch.empty(rows.shape)
        for start, stop in rows.bands():
            merged[start:stop] = spec.fn(rows.band(start, stop), torch.ones(len(adapters)), limits, params, draws)
        _, best = dense_truncated_svd(merged, RANK, exact=True)
        start = time.perf_counter()
        _, row_space = dense_truncated_svd(merged, RANK, row_space=torch.cat(rows.A))
        out["seconds"] += time.perf_counter() - start
        _, random = dense_truncated_svd(merged, RANK, n_iter=4)
        name = proj.split(".")[-1]
        out[f"{name}_row_space_vs_exact"] = row_space / best
        out[f"{name}_random_start_vs_exact"] = random / best
    return out


def _aligned_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lorafuse.merging.aligned") is not None


CASES: dict[str, dict[str, Any]] = {
    "io_floor": {"fn": case_io_floor, "layers": (1, 2, 32), "label": "I/O floor (load 4 + save 1)"},
    "task_arithmetic": {"fn": case_lorafuse, "args": ("task_arithmetic",), "kwargs": {}, "layers": (1, 2, 32),
                        "label": "lorafuse task_arithmetic (exact, rank 64)", "peft": "svd"},
    "ties": {"fn": case_lorafuse, "args": ("ties",), "kwargs": {"density": 0.2, "rank": RANK}, "layers": (1, 2, 32),
             "label": "lorafuse ties (density 0.2, rank 16)", "peft": "ties_svd"},
    "ties_global": {"fn": case_lorafuse, "args": ("ties",), "kwargs": {"density": 0.2, "rank": RANK,
                                                                        "trim_scope": "global"},
                    "layers": (1, 2, 32), "label": "lorafuse ties (global trim 0.2, rank 16)", "peft": "ties_svd"},
    "dare_ties": {"fn": case_lorafuse, "args": ("dare_ties",), "kwargs": {"drop_rate": 0.9, "rank": RANK},
                  "layers": (1, 2, 32), "label": "lorafuse dare_ties (p 0.9, rank 16)", "peft": "dare_ties_svd"},
    "knots_ties": {"fn": case_lorafuse, "args": ("ties",), "aligned": True,
                   "kwargs": {"density": 0.2, "rank": RANK, "space": "knots", "trim_scope": "global"},
                   "layers": (1, 2, 32), "label": "lorafuse KnOTS-TIES (global trim 0.2, rank 16)", "peft": "ties_svd"},
    "core_ties": {"fn": case_lorafuse, "args": ("ties",), "aligned": True,
                  "kwargs": {"density": 0.2, "rank": RANK, "space": "core"}, "layers": (1, 2, 32),
                  "label": "lorafuse core-space TIES (0.2, rank 16)", "peft": "ties_svd"},
    "core_tsv": {"fn": case_lorafuse, "args": ("tsv",), "aligned": True, "kwargs": {"rank": RANK, "space": "core"},
                 "layers": (1, 2, 32), "label": "lorafuse core-space TSV (rank 16)"},
    # the newest data-free methods (issue 21), each beside TIES in the same run
    "cart": {"fn": case_lorafuse, "args": ("cart",), "kwargs": {"rank": RANK}, "layers": (1, 2, 32),
             "label": "lorafuse CART (rank_ratio 0.12, λ 2, rank 16)"},
    "star": {"fn": case_lorafuse, "args": ("star",), "kwargs": {"rank": RANK}, "layers": (1, 2, 32),
             "label": "lorafuse STAR (η 40%, rank 16)"},
    "robustmerge": {"fn": case_lorafuse, "args": ("robustmerge",), "kwargs": {"rank": RANK}, "layers": (1, 2, 32),
                    "label": "lorafuse RobustMerge (density 0.2, rank 16)"},
    "ctm": {"fn": case_lorafuse, "args": ("ctm",), "kwargs": {"base": "ties", "density": 0.2, "rank": RANK},
            "layers": (1, 2, 32), "label": "lorafuse CtM (TIES 0.2 on the cores, rank 16)"},
    "wudi": {"fn": case_lorafuse, "args": ("wudi",), "kwargs": {"steps": 300, "rank": RANK}, "layers": (1, 2),
             "label": "lorafuse WUDI (the paper's 300 Adam steps, rank 16)"},
    "truncation_accuracy": {"fn": case_truncation_accuracy, "layers": (1,),
                            "label": "dense truncation: energy kept vs exact SVD (TIES, q and k)"},
    "knots_dense_reference": {"fn": case_knots_dense, "layers": (1,), "aligned": True,
                              "label": "dense KnOTS SVD (torch.linalg.svd of m×4n), q and k only"},
    "peft_linear_error": {"fn": case_peft_linear_error, "layers": (1,), "peft_case": True,
                          "label": "PEFT linear (A, B combined separately)"},
    **{f"peft_{c}": {"fn": case_peft, "args": (c,), "layers": (1,), "peft_case": True,
                     "label": f"PEFT add_weighted_adapter {c} (rank 16)"} for c in PEFT_TYPES},
}


NOTES = {
    "ties": "the full space runs a band of rows at a time with exact per-module thresholds (one counting pass per "
    "task, bracketed by a sample); same run, one layer, same load: the original engine (all T dense blocks stacked, "
    "torch.kthvalue) took 170.6 s and 5.08 GB, this one 23.9 s and 0.64 GB, with bit-identical output. Since "
    "then: tasks are counted on parallel threads, the dense result is truncated by a range finder started from "
    "the inputs' row space (see the truncation row), and the bracket comes from entries at independent random "
    "positions (a rows × columns grid of a low-rank update is correlated, and missed the bracket for one task in "
    "four on gate_proj, forcing a second pass): that last change alone took 2 layers from 21.1 s to 13.2 s.",
    "dare_ties": "DARE's masks come from a counter-based generator (SplitMix64 keyed by adapter name and module, "
    "word i for entry i): each band is drawn on its own, one task per thread, with the same masks as one draw over "
    "the whole module; torch runs on one thread during the bands (OpenMP's spinning idle worker otherwise takes "
    "the mask threads' core).",
    "wudi": "dense by definition (Adam's steps are per entry): each step costs 2·m·n·Σr multiply-adds from the "
    "factors and an Adam update of the m×n matrix, for 300 steps a module; measured at 1 and 2 layers (the 32-layer "
    "time is 32 × the per-layer time: the modules are independent and streamed one at a time, as the other rows "
    "show), which would take hours here.",
    "truncation_accuracy": "rank-16 energy kept by lorafuse's randomized truncation of the dense TIES result, as "
    "a fraction of the exact SVD's (1.0 = optimal); seconds = the two default truncations only. The range finder "
    "starts from the inputs' row space (the stacked A's) with 1 power iteration; the textbook random start with 4 "
    "iterations, lorafuse's previous default, is shown beside it.",
    "knots_dense_reference": "what KnOTS's code computes (an m×4n SVD per module) for q_proj (4096×16384) and "
    "k_proj (1024×16384) only; v and o repeat those shapes, and the MLP's 14336×16384 and 4096×57344 SVDs are far "
    "out of reach on 2 cores. The ratio against lorafuse's one-layer KnOTS-TIES (all 7 projections, trim, merge "
    "and save) is therefore conservative.",
    "peft_svd": "PEFT builds every dense m×n update and takes a full torch.linalg.svd of each (its *_svd paths); the "
    "model is Llama-3-8B-shaped with 1 layer, vocab 1000, bf16 weights left uninitialised (only the adapters count).",
    "peft_linear_error": "relative Frobenius error of PEFT's `linear` result against the true Σ w_t ΔW_t over the "
    "layer's 7 modules (w_t = 1): it combines the A's and the B's separately, so the product has cross terms.",
}


TARGETS = {  # case at 32 layers: (seconds, peak GB or None), set for 2 cores (issue 23 for the element-wise ones)
    "task_arithmetic": (5.0, 1.5), "ties": (80.0, 1.5), "ties_global": (80.0, 1.5), "dare_ties": (90.0, 1.5),
    "knots_ties": (30.0, None),
}


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for case, (seconds, peak) in TARGETS.items():
        row = next((r for r in rows if r["case"] == case and r["layers"] == 32 and "seconds" in r), None)
        if row is None:
            continue
        met = row["seconds"] < seconds and (peak is None or row["peak_gb"] < peak)
        goal = f"< {seconds:g} s" + (f" and < {peak:g} GB" if peak else "")
        lines.append(f"- target {CASES[case]['label']}, 32 layers {goal}: {row['seconds']:.1f} s, "
                     f"{row['peak_gb']:.2f} GB with {row.get('threads', '?')} thread(s) at load "
                     f"{row.get('load_at_start')}: {'met' if met else 'not met'}")
    return lines


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child_main(case: str, layers: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    spec = CASES[case]
    out = spec["fn"](layers, *spec.get("args", ()), **spec.get("kwargs", {}))
    out["peak_gb"] = _peak_gb()
    print("RESULT " + json.dumps(out), flush=True)


# -- the parent -------------------------------------------------------------------------------------------
def wait_for_quiet(max_load: float, max_wait: float) -> None:
    """Other jobs on a 2-core machine distort every timing: wait (bounded) until the 1-minute load is low."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(10)


def run_case(case: str, layers: int, timeout: float, threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--layers", str(layers),
           "--threads", str(threads)]
    load = round(os.getloadavg()[0], 2)
    print(f"[{time.strftime('%H:%M:%S')}] {case} L{layers} (load {load}) …", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "layers": layers, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"case": case, "layers": layers, "error": proc.stderr.strip().splitlines()[-1:] or "no result"}
    row = {"case": case, "layers": layers, "threads": threads, "load_at_start": load, **json.loads(lines[-1][7:])}
    print(f"    {row['seconds']:.2f} s, peak {row['peak_gb']:.2f} GB", flush=True)
    return row


def machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    import peft
    import transformers

    flags = set(next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), []))
    simd = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return {"cpu": cpu, "cpu_flags": simd, "cores": os.cpu_count(), "ram_gb": round(mem / 2**20, 1), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "threads": threads,
            "python": platform.python_version(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratio vs the I/O floor of the same layer count, and vs PEFT per layer (PEFT's one-layer time)."""
    floor = {r["layers"]: r["seconds"] for r in rows if r["case"] == "io_floor" and "seconds" in r}
    peft = {r["case"].removeprefix("peft_"): r["seconds"] for r in rows if r["case"].startswith("peft_") and "seconds" in r}
    peft_rows = {r["case"].removeprefix("peft_"): r for r in rows if r["case"].startswith("peft_")}
    for r in rows:
        for key in ("ratio_vs_io_floor", "peft_case", "ratio_vs_peft_per_layer", "peft_conditions"):
            r.pop(key, None)  # recomputed from the rows as they are now
        if "seconds" not in r or r["case"].startswith("peft_") or r["case"] == "io_floor":
            continue
        if r["layers"] in floor and r["case"] not in ("knots_dense_reference", "truncation_accuracy"):
            r["ratio_vs_io_floor"] = r["seconds"] / floor[r["layers"]]
        peer = CASES[r["case"]].get("peft")
        if peer in peft:
            r["peft_case"] = peer
            r["ratio_vs_peft_per_layer"] = (r["seconds"] / r["layers"]) / peft[peer]
            other = peft_rows[peer]
            if other.get("cached_from") or other.get("threads") != r.get("threads"):
                r["peft_conditions"] = f"PEFT measured {other.get('cached_from', 'in this run')} with " \
                                       f"{other.get('threads', '?')} thread(s) at load {other.get('load_at_start')}"
    knots_ref = next((r for r in rows if r["case"] == "knots_dense_reference" and "seconds" in r), None)
    knots_l1 = next((r for r in rows if r["case"] == "knots_ties" and r["layers"] == 1 and "seconds" in r), None)
    if knots_ref and knots_l1:
        knots_l1["ratio_vs_dense_knots"] = knots_l1["seconds"] / knots_ref["seconds"]


def markdown(info: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> str:  # noqa: C901
    def fmt(value: Any, spec: str) -> str:
        return "" if value is None else format(value, spec)

    lines = [
        "# Merge benchmark (Llama-3-8B shapes, 4 adapters, rank 16)", "",
        f"Run {info['date']} on {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM; torch {info['torch']}, "
        f"peft {info['peft']}, transformers {info['transformers']}; torch threads {info['threads']}; load average "
        f"at start {info['load_average_at_start']}."
        + (f" CPU flags: {', '.join(info['cpu_flags'])}." if info.get("cpu_flags") else ""), "",
        *([f"Threads {info['threads']}, not 2: other jobs held at least one of the 2 cores for the whole run (the "
           "load column); with 2 threads every small parallel region then waits for a descheduled thread (core-space "
           "TIES, 2 layers: 22 s with 2 threads against 0.7 s with 1). Every number here is therefore a 1-core "
           "figure, PEFT's included.", ""] if info["threads"] != 2 else []),
        "Adapters: 4 × random rank-16 fp32 factors (lora_alpha 32) on q,k,v,o,gate,up,down (4096/14336, k/v 1024); "
        "each case in a fresh process; seconds exclude imports; peak = the child's max RSS (includes torch, "
        "~0.3 GB). Ratios: against the I/O floor of the same layer count, and seconds per layer against PEFT's "
        "one-layer time for the matching combination type (same run unless noted).", "",
        "| case | layers | seconds | peak GB | × I/O floor | × PEFT per layer | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        label = CASES[r["case"]]["label"] if r["case"] in CASES else r["case"]
        if "error" in r or "skipped" in r:
            lines.append(f"| {label} | {r['layers']} | | | | | {r.get('error') or r.get('skipped')} |")
            continue
        note = []
        if "relative_error" in r:
            note.append(f"relative Frobenius error {r['relative_error']:.1%}")
        if "q_proj_row_space_vs_exact" in r:
            note.append("energy kept ÷ exact: row-space start " + ", ".join(
                f"{m} {r[f'{m}_row_space_vs_exact']:.6f}" for m in ("q_proj", "k_proj")) + "; random start, 4 "
                "iterations " + ", ".join(f"{m} {r[f'{m}_random_start_vs_exact']:.4f}" for m in ("q_proj", "k_proj")))
        if "peft_case" in r:
            note.append(f"vs PEFT {r['peft_case']}" + (f" ({r['peft_conditions']}: not comparable)"
                                                       if r.get("peft_conditions") else ""))
        if "ratio_vs_dense_knots" in r:
            note.append(f"{r['ratio_vs_dense_knots']:.3f} × the dense KnOTS SVDs of one layer's q and k")
        if "vllm_check" in r:
            note.append(f"`lorafuse check --engine vllm` {r['vllm_check']}")
        if "peak_gb_before_call" in r:
            note.append(f"RSS before the call {r['peak_gb_before_call']:.2f} GB (bf16 base layer)")
        if r.get("load_at_start") is not None:
            note.append(f"threads {r.get('threads', info['threads'])}, load {r['load_at_start']}")
        if r.get("cached_from"):
            note.append(f"measured {r['cached_from']}")
        lines.append(f"| {label} | {r['layers']} | {r['seconds']:.2f} | {r['peak_gb']:.2f} | "
                     f"{fmt(r.get('ratio_vs_io_floor'), '.1f')} | {fmt(r.get('ratio_vs_peft_per_layer'), '.2g')} | "
                     f"{'; '.join(note)} |")
    lines += ["", *notes, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads of every case")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="run these cases only (no results written "
                        "unless --write)")
    parser.add_argument("--write", action="store_true", help="write results even with --only (merging rows)")
    parser.add_argument("--render", action="store_true", help="only rewrite the table from the results json")
    parser.add_argument("--skip-peft", action="store_true", help="re-use PEFT's rows from the last results json")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument("--max-load", type=float, default=1.0, help="wait before each case until the 1-minute load "
                        "average is below this (other jobs distort the timings) …")
    parser.add_argument("--max-wait", type=float, default=120.0, help="… but at most this many seconds")
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.layers, args.threads)
        return
    if args.render:
        previous = _load_previous()
        write_results(previous["machine"], [], previous)
        print((RESULTS / "merge_bench.md").read_text())
        return
    info = machine(args.threads)
    print(json.dumps(info), flush=True)
    for layers in LAYER_COUNTS:
        ensure_adapters(layers)
    previous = _load_previous()
    rows: list[dict[str, Any]] = []
    for case in args.only or CASES:
        spec = CASES[case]
        for layers in spec["layers"]:
            if args.layers and layers != args.layers:
                continue
            if spec.get("aligned") and not _aligned_available():
                rows.append({"case": case, "layers": layers, "skipped": "lorafuse.merging.aligned not available"})
                continue
            if spec.get("peft_case") and args.skip_peft:
                old = next((r for r in previous.get("rows", []) if r["case"] == case and r["layers"] == layers), None)
                if old is not None:
                    rows.append({**old, "cached_from": old.get("cached_from") or previous["machine"]["date"]})
                    if not args.only or args.write:
                        write_results(info, rows, previous if args.only else {})
                    continue
            wait_for_quiet(args.max_load, args.max_wait)
            rows.append(run_case(case, layers, args.timeout, args.threads))
            if not args.only or args.write:
                write_results(info, rows, previous if args.only else {})  # after every case: partial runs count
    if args.only and not args.write:
        add_ratios(rows)
        print(json.dumps(rows, indent=1))
        return
    print((RESULTS / "merge_bench.md").read_text())


def write_results(info: dict[str, Any], rows: list[dict[str, Any]], previous: dict[str, Any]) -> None:
    """The results json and table; rows of `previous` not measured now are kept (with --only --write)."""
    keep = {(r["case"], r["layers"]) for r in rows}
    rows = [r for r in previous.get("rows", []) if (r["case"], r["layers"]) not in keep] + [dict(r) for r in rows]
    rows.sort(key=lambda r: (list(CASES).index(r["case"]) if r["case"] in CASES else 99, r["layers"]))
    add_ratios(rows)
    notes = target_lines(rows) + [""] + [f"- {CASES[c]['label']}: {n}" for c, n in NOTES.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge_bench.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    (RESULTS / "merge_bench.md").write_text(markdown(info, rows, notes))


def _load_previous() -> dict[str, Any]:
    path = RESULTS / "merge_bench.json"
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    main()
