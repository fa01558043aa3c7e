"""Finished work on disk: a job is done iff its JSON exists (written atomically), so a rerun skips it and an
interrupted run resumes with what is missing. Adapters are cached by a hash of everything that determines them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class JobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.json"

    def get(self, job_id: str) -> dict[str, Any] | None:
        """A finished job's result; failed jobs count as unfinished (retried on the next run)."""
        path = self.path(job_id)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return data if data.get("status") == "ok" else None

    def put(self, job_id: str, result: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{job_id}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
        os.replace(tmp, self.path(job_id))
