"""Finished work on disk. A job is done iff its result file exists: results are written to a temporary file and
renamed into place, so a killed run never leaves a half-written result, a rerun skips finished jobs and an
interrupted run resumes with what is missing. Adapters are cached by a hash of everything that determines them
(model, formulation, task, data file hashes, hyperparameters, seed, library version), so several run directories
can share one adapter cache (`--cache-dir`)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lorafuse import __version__


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON rendering with sorted keys: equal settings give equal keys across runs and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def adapter_key(config: Any, task: str, data_fingerprint: str) -> str:
    """The cache key of one task's adapter: everything that determines the trained weights."""
    return stable_hash({"model": config.model, "formulation": config.formulation, "task": task,
                        "train": config.train.model_dump(), "version": __version__, "data": data_fingerprint})


class JobStore:
    """One JSON file per finished job under `root`; failed jobs are stored too (for the report) but count as
    unfinished, so the next run retries them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.json"

    def get(self, job_id: str) -> dict[str, Any] | None:
        """A finished job's result, or None when it has not run or failed."""
        path = self.path(job_id)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return data if data.get("status") == "ok" else None

    def put(self, job_id: str, result: dict[str, Any]) -> None:
        write_json_atomic(self.path(job_id), result)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
