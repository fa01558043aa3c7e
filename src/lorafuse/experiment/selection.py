"""What a coefficient search maximises (`point_score`), shared by the runner's grid search and the Optuna trials
(lorafuse.experiment.tuning)."""

from __future__ import annotations

from typing import Any

# each parameter's value at which a method is plain task arithmetic (λ·Σ ΔW_t): the tie-break's origin
NEUTRAL = {"lambda": 1.0, "density": 1.0, "drop_rate": 0.0, "trim_density": 1.0, "alpha": 1.0, "gamma": 0.0}


def point_score(point: dict[str, Any]) -> tuple[float, float]:
    """What a search maximises: the point's selection score (see `ExperimentRunner._selection_score`); among
    equal scores, the setting that changes task arithmetic least (the smallest Σ |value − its neutral value| over
    the parameters in NEUTRAL), whatever the grid's order."""
    change = sum(abs(float(v) - NEUTRAL[k]) for k, v in point["params"].items()
                 if k in NEUTRAL and isinstance(v, (int, float)) and not isinstance(v, bool))
    return point["score"], -change
