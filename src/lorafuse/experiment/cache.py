"""Finished work on disk. A job is done iff its result file exists: results are written to a temporary file and
renamed into place, so a killed run never leaves a half-written result, a rerun skips finished jobs and an
interrupted run resumes with what is missing. Adapters are cached by a hash of everything that determines them
(model, formulation, task, data file hashes, hyperparameters, seed, library version), so several run directories
can share one adapter cache (`--cache-dir`)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from lorafuse import __version__
from lorafuse.atomic import replace_file
from lorafuse.validate import check_inside


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON rendering with sorted keys: equal settings give equal keys across runs and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def adapter_key(config: Any, task: str, data_fingerprint: str) -> str:
    """The cache key of one task's adapter: everything that determines the trained weights. The dtype enters as
    the one training resolves to on this machine, and only when it is not fp32 (keys made before there was a
    dtype are fp32 runs and still match)."""
    settings = config.train_for(task)
    key = {"model": config.model, "formulation": config.formulation, "task": task,
           "train": settings.model_dump(exclude={"dtype"}), "version": __version__, "data": data_fingerprint}
    dtype = train_dtype(settings.dtype)
    if dtype != "float32":
        key["dtype"] = dtype
    return stable_hash(key)


def train_dtype(requested: str) -> str:
    """The dtype training runs in here for `requested` (the Trainer's device: the GPU when there is one)."""
    from lorafuse.model.precision import training_precision

    return training_precision(requested).dtype


class JobStore:
    """One JSON file per finished job under `root`; failed jobs are stored too (for the report) but count as
    unfinished, so the next run retries them. `root` is created by the first result written (a config refused
    before any work leaves no empty jobs/ behind)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, job_id: str) -> Path:
        return check_inside(self.root / f"{job_id}.json", self.root, "job file")

    def get(self, job_id: str) -> dict[str, Any] | None:
        """A finished job's result, or None when it has not run or failed. A file that does not parse (truncated
        by a full disk, emptied by hand) counts as missing, with a warning naming it: the job runs again."""
        path = self.path(job_id)
        if not path.is_file():
            return None
        data = read_json_or_none(path)
        if data is None:
            print(f"warning: {path}: unreadable job file, counted as not done (the job runs again)", file=sys.stderr)
            return None
        return data if data.get("status") == "ok" else None

    def put(self, job_id: str, result: dict[str, Any]) -> None:
        write_json_atomic(self.path(job_id), result)


def write_json_atomic(path: Path, data: Any) -> None:
    """`lorafuse.atomic.replace_file` of `data` as JSON: a finished job survives a kill and a power cut whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when the file is unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


class SettingCache:
    """The validation result of each evaluated setting of one method's search, one file per setting, and a
    pointer from the chosen setting to the job whose test results it has. The directory is keyed by everything
    that determines a setting's result except the grid (method, space, fixed parameters, adapters, seeds,
    evaluation settings and data), so a widened grid or an interrupted search evaluates only what is new, and a
    widened grid that chooses the same setting reuses its test evaluation."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, kind: str, point: dict[str, Any]) -> Path:
        return self.root / f"{kind}-{stable_hash(point)[:16]}.json"

    def _read(self, kind: str, point: dict[str, Any]) -> dict[str, Any] | None:
        data = read_json_or_none(self._path(kind, point))
        same = data is not None and data.get("params") == json.loads(json.dumps(point, default=str))
        return data if same else None  # a hash collision or a hand-edited file is a miss, never a wrong hit

    def get(self, point: dict[str, Any]) -> dict[str, Any] | None:
        """A setting's stored validation result (as `_search_point` returns it), or None."""
        data = self._read("setting", point)
        return data["result"] if data is not None else None

    def put(self, point: dict[str, Any], result: dict[str, Any]) -> None:
        write_json_atomic(self._path("setting", point), {"params": point, "result": result})

    def chosen_job(self, point: dict[str, Any]) -> str | None:
        """The id of a finished job that chose `point` (its test results are this setting's), or None."""
        data = self._read("chosen", point)
        return data["job_id"] if data is not None else None

    def set_chosen(self, point: dict[str, Any], job_id: str) -> None:
        write_json_atomic(self._path("chosen", point), {"params": point, "job_id": job_id})
