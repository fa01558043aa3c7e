"""The training-free routers inside an experiment: Arrow (lorafuse.fusion.arrow) and LoGo (lorafuse.fusion.logo).

Neither trains anything: Arrow's prototypes come from the adapters' factors, LoGo's weights from one probe pass
per input at inference. Their settings (`arrow: {top_k, temperature}`, `logo: {top_k, ...}`) are chosen as every
static method's coefficients are: each combination is evaluated on the validation split, the best (the first of
equals, in the grid's order) runs on test and is saved as a router directory under `fused/`. The job records what
the method cost in data and time: `examples_seen` (labelled validation examples the choice read; 0 when there
was nothing to choose), `data_split` and `search_seconds` (building the router and the choice)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

DESCRIPTIONS = {
    "arrow": "Arrow (Ostapenko et al., ICML 2024): per token and layer, top-k adapters by |x·v_t| with v_t the top "
             "right singular vector of ΔW_t, softmax weights",
    "logo": "LoGo (Lee et al., ACL 2026): per input, top-k adapters by their LoRA output's norm at the last token of "
            "one probe pass, weights proportional to it",
}
INFERENCE = {"arrow": "every adapter's factors in every adapted layer, top-k of them per token",
             "logo": "one probe pass (every adapter attached, up to the probe module), then the input's top-k mixture"}


def build(kind: str, adapters: list[Path], tasks: list[str], settings: Any) -> Any:
    """The router of `kind` over the adapters, with its fixed settings (the searched ones come later)."""
    if kind == "arrow":
        from lorafuse.fusion.arrow import ArrowRouter

        return ArrowRouter.from_adapters(adapters, tasks)
    from lorafuse.fusion.logo import LoGoRouter

    return LoGoRouter.from_adapters(adapters, tasks, signal=settings.signal, probe=settings.probe)


def experiment_job(runner: Any, kind: str) -> dict[str, Any]:
    """Build the router, choose its settings on validation, evaluate the choice on test and save it."""
    settings = getattr(runner.config, kind)
    tasks = list(runner.state.adapters)
    heads = runner.own_heads()
    start = time.perf_counter()
    base = build(kind, [runner.state.adapters[t] for t in tasks], tasks, settings)
    build_seconds = time.perf_counter() - start
    sweep = [_validation_point(runner, replace(base, **point), point, heads) for point in settings.grid()]
    best = max(sweep, key=lambda p: p["score"])
    search_seconds = time.perf_counter() - start
    router = replace(base, **best["params"])
    start = time.perf_counter()
    result = runner.evaluator("test").evaluate(router, heads=heads)
    test_seconds = time.perf_counter() - start
    examples = sum(result.examples.values())
    test = result.normalize(runner.state.reference["test"]).to_dict()
    chose = len(sweep) > 1
    seen = sum(best["validation"]["examples"].values()) if chose else 0
    out = router.save(runner.out / "fused" / f"router-{kind}", overwrite=True,
                      extra={"tasks": tasks, "chosen_on": "validation" if chose else None,
                             "sweep": [{"params": p["params"], "score": p["score"]} for p in sweep]})
    fixed = {} if kind == "arrow" else {"signal": settings.signal, "probe": settings.probe}
    return {"name": kind, "kind": "data-driven", "method": kind, "training_free": True,
            "params": {**best["params"], **fixed}, "sweep": sweep, "validation": best["validation"], "test": test,
            "router_dir": str(out), "settings_tried": len(sweep), "search_seconds": round(search_seconds, 2),
            "examples_seen": seen, "data_split": "validation" if chose else None,
            "cost": {"examples_seen": seen, "data_split": "validation" if chose else None, "training": "none",
                     "build_seconds": round(build_seconds, 2), "search_seconds": round(search_seconds, 2),
                     "settings_tried": len(sweep), "test_ms_per_example": round(1000 * test_seconds / examples, 3),
                     "inference": INFERENCE[kind], "method": DESCRIPTIONS[kind]}}


def _validation_point(runner: Any, router: Any, point: dict[str, Any], heads: dict[str, Any]) -> dict[str, Any]:
    """One setting on validation: its normalized results (without per-example records) and the search's score."""
    split = runner.evaluator("validation").evaluate(router, heads=heads)
    split = split.normalize(runner.state.reference["validation"]).to_dict()
    return {"params": point, "validation": {k: v for k, v in split.items() if k != "correct"},
            "score": runner._selection_score(split)}
