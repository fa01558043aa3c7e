"""The job protocol between the runner and the executors: a `Job` (what the runner plans: one unit of a stage's
work, named by the call that computes it) and `resolve_call` (how an executor finds that call on a runner). The
runner produces jobs, the executors consume them; neither imports the other's module for these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorafuse.errors import LorafuseError


class ExperimentError(LorafuseError):
    """A stage cannot go on (an adapter failed to train, or a prerequisite stage has not run)."""


Call = tuple[str, tuple[Any, ...]]  # a runner method (or "module:function" taking the runner) and its arguments


@dataclass(frozen=True)
class Job:
    """One unit of work of a stage. `call` names what computes its result; `record` holds fields every result
    of it carries, failed or not; `parts`, when given, are independent pieces an executor may spread over its
    workers (each `part` call returns a value), after which `finish` receives `args + (values, part_seconds)`.
    An executor that does not split runs `call` alone, which does the whole job."""

    job_id: str
    stage: str
    label: str
    call: str
    args: tuple[Any, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)
    executed_as: str = ""
    parts: tuple[Call, ...] = ()
    finish: str | None = None

    @property
    def trace_name(self) -> str:
        return self.executed_as or self.job_id


def resolve_call(runner: Any, name: str) -> Callable[..., Any]:
    """A runner method by name, or `module:function` called with the runner first."""
    if ":" not in name:
        return getattr(runner, name)
    import functools
    import importlib

    module, function = name.split(":", 1)
    return functools.partial(getattr(importlib.import_module(module), function), runner)
