"""Optuna's TPE sampler for a method's coefficient search (`sampler: tpe`, `samples: N` trials over the values
of `search`), with the study stored as SQLite in the run directory (`optuna.db`), so that every worker of a Ray
run asks and tells the same study and an interrupted search resumes with its finished trials.

Each trial is one merge and one validation evaluation; its result is kept in the trial (`user_attrs["result"]`)
and the sweep of the job is read back from the study. Deliberate choices: the searched values are categorical
(the grid's values, as in a grid or random search: TPE chooses among them); `constant_liar` is on, because
several workers ask at once (Optuna's advice for parallel TPE); each trial slot seeds its own sampler
(`sample_seed` and the slot number), so concurrent workers do not draw the same start-up points. A TPE search run
sequentially is reproducible; one run by several workers depends on the order in which trials finish.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

STUDY_FILE = "optuna.db"


def _storage(runner: Any) -> Any:
    return _open_storage(f"sqlite:///{(runner.out / STUDY_FILE).resolve()}")


@functools.lru_cache(maxsize=8)
def _open_storage(url: str) -> Any:
    """One storage (engine, schema check) per process and file, reused by every trial a worker runs."""
    import optuna

    # a busy SQLite file waits instead of failing while another worker writes
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def _study(runner: Any, spec: Any, seed: int) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                         n_startup_trials=min(10, max(2, (spec.samples or 1) // 3)))
    return optuna.create_study(study_name=runner.search_id(spec), storage=_storage(runner), sampler=sampler,
                               direction="maximize", load_if_exists=True)


def trial_slots(runner: Any, spec: Any) -> list[int]:
    """The slots of the trials still to run (`samples` minus the completed ones). Trials left running by an
    interrupted run are marked failed first, so that the sampler stops counting them as in flight."""
    from optuna.trial import TrialState

    study = _study(runner, spec, spec.sample_seed)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    start = len(study.get_trials(deepcopy=False))
    return list(range(start, start + max(0, spec.samples - done)))


def run_trial(runner: Any, spec: Any, slot: int) -> dict[str, Any]:
    """Ask the study for a setting, merge and evaluate it on validation, tell the study its score."""
    from optuna.distributions import CategoricalDistribution

    from lorafuse.experiment.selection import point_score as _score

    seed = int(hashlib.sha256(f"{spec.sample_seed}-{slot}".encode()).hexdigest()[:8], 16)
    study = _study(runner, spec, seed)
    trial = study.ask({name: CategoricalDistribution(values) for name, values in spec.search.items()})
    point = {name: trial.params[name] for name in spec.search}
    try:
        result = runner._search_point(spec, point)
    except BaseException:
        from optuna.trial import TrialState

        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("result", result)
    study.tell(trial, _score(result)[0])  # the objective; ties are broken when the best is chosen
    return result


def completed(runner: Any, spec: Any) -> list[dict[str, Any]]:
    """The results of the study's completed trials, in trial order."""
    from optuna.trial import TrialState

    study = _study(runner, spec, spec.sample_seed)
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return [{**t.user_attrs["result"], "trial": t.number} for t in trials]
