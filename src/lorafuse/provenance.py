"""What every output records about how it was made."""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata
from typing import Any

TRACKED_PACKAGES = ("lorafuse", "torch", "safetensors", "peft", "transformers", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def stamp() -> dict[str, Any]:
    """Creation time, library versions and machine, for the provenance section of any output."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
    }
