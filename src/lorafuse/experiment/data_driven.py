"""Data-driven fusion inside an experiment: LoraHub per task on a few-shot sample of its validation split, the
input-routed mixture trained on the train splits, the training-free routers (Arrow, LoGo: settings chosen on
validation), RegMean (unlabelled inputs' Grams) and AdaMerging (one job per split its unlabelled inputs come
from). Each is a cached job like the static methods."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# (job name, cache key, the function that runs it as "module:function" taking the runner, its other arguments)
Job = tuple[str, dict[str, Any], str, tuple[Any, ...]]


def jobs(runner: Any) -> Iterator[Job]:
    cfg = runner.config
    ids = {t: p.name for t, p in runner.state.adapters.items()}
    if cfg.lorahub is not None:
        for shots in cfg.lorahub.shots:
            key = {"lorahub": cfg.lorahub.model_dump(), "shots": shots, "adapters": ids, "seeds": cfg.seeds}
            yield f"lorahub-{shots}shot", key, f"{__name__}:lorahub_job", (shots,)
    if cfg.router is not None:
        key = {"router": cfg.router.model_dump(), "adapters": ids, "seeds": cfg.seeds}
        yield "router", key, f"{__name__}:router_job", ()
    for kind in ("arrow", "logo"):
        settings = getattr(cfg, kind)
        if settings is not None:  # deterministic: no seeds in the key
            yield kind, {kind: settings.model_dump(), "adapters": ids}, f"{__name__}:training_free_job", (kind,)
    if cfg.regmean is not None:
        key = {"regmean": cfg.regmean.model_dump(), "adapters": ids, "seeds": cfg.seeds}
        yield "regmean", key, "lorafuse.fusion.regmean:experiment_job", ()
    if cfg.adamerging is not None:
        from lorafuse.fusion.adamerging import initial_lambda

        init = initial_lambda(runner, cfg.adamerging.init)  # `task_arithmetic`: the λ that job chose (key)
        for split in cfg.adamerging.inputs:
            key = {"adamerging": cfg.adamerging.model_dump(), "inputs": split, "init": init, "adapters": ids,
                   "seeds": cfg.seeds}
            yield f"adamerging-{split}", key, "lorafuse.fusion.adamerging:experiment_job", (split, init)


def lorahub_job(runner: Any, shots: int) -> dict[str, Any]:
    from lorafuse.fusion.lorahub import experiment_job

    return experiment_job(runner, shots)


def router_job(runner: Any) -> dict[str, Any]:
    from lorafuse.fusion.router import experiment_job

    return experiment_job(runner)


def training_free_job(runner: Any, kind: str) -> dict[str, Any]:
    from lorafuse.experiment.routing import experiment_job

    return experiment_job(runner, kind)
