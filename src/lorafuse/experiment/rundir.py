"""The run directory: lorafuse deletes only what it created.

A run directory carries a marker file (`.lorafuse-run`) written when lorafuse first creates it. `--fresh` deletes
a directory only when it carries that marker, and any run refuses a directory that is neither a run nor empty
(a user's folder is never filled with `jobs/` and `adapters/`, nor deleted). A run directory may not contain an
input of the experiment (data, task files, a local model, with `--fresh` the adapter cache) nor lie inside an
input directory. Leftovers of a killed run (temporary job files, half-written adapter and fused directories) are
removed by the next run."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorafuse import validate
from lorafuse.errors import ConfigError

__all__ = ["MARKER", "check_apart", "experiment_inputs", "is_run_dir", "prepare", "remove_leftovers"]

MARKER = ".lorafuse-run"
RUN_ENTRIES = {"jobs", "adapters", "fused", "report", "router", MARKER}  # what a run directory holds
# the run directory may neither hold an input nor lie inside one (lorafuse.validate.check_apart)
check_apart = functools.partial(validate.check_apart, what="run directory")


def is_run_dir(path: Path) -> bool:
    return (path / MARKER).is_file()


def _looks_like_old_run(path: Path) -> bool:
    """A run written before the marker existed: a jobs/ folder and nothing but run entries."""
    entries = {p.name for p in path.iterdir()}
    return "jobs" in entries and entries <= RUN_ENTRIES


def experiment_inputs(config: Any) -> list[tuple[str, Path]]:
    """(what, path) of everything the experiment reads from the local disk."""
    from lorafuse.tasks import get_task

    inputs: list[tuple[str, Path]] = []
    if config.data_dir:
        inputs.append(("data_dir", Path(config.data_dir)))
    if config.task_file:
        inputs.append(("task_file", Path(config.task_file)))
    if Path(config.model).exists():
        inputs.append(("model", Path(config.model)))
    for name in config.tasks:
        for split, file in sorted(get_task(name).files.items()):
            inputs.append((f"task '{name}' {split} file", Path(file)))
    return inputs


def prepare(out: Path, fresh: bool, cache_dir: Path | None = None) -> None:
    """Create (or with `fresh`, recreate) the run directory with its marker; refuse a directory that is not a
    run. Called after the whole config and its data have been validated, so a refused config creates nothing.
    `cache_dir` is a separate adapter cache (--cache-dir), which `fresh` must never delete."""
    if cache_dir is not None:
        _check_cache_apart(out, cache_dir, fresh)
    if out.is_symlink():
        raise ConfigError(f"run directory {out}: is a symbolic link (give the directory it points to)")
    if out.exists():
        _reuse_or_empty(out, fresh)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not is_run_dir(out):
            write_marker(out)
    except OSError as exc:
        raise ConfigError(f"run directory {out}: cannot be written ({exc.strerror or exc})") from None


def _check_cache_apart(out: Path, cache_dir: Path, fresh: bool) -> None:
    run, cache = out.resolve(), cache_dir.resolve()
    if (cache / "adapters") in run.parents:
        raise ConfigError(f"run directory {out} lies inside the adapter cache {cache_dir / 'adapters'}: "
                          "choose another --output")
    if fresh and (cache == run or run in cache.parents):
        raise ConfigError(f"--fresh would delete the adapter cache {cache_dir}, which lies inside the run "
                          f"directory {out}: give a --cache-dir outside it, or drop --fresh")


def _reuse_or_empty(out: Path, fresh: bool) -> None:
    """An existing directory: a run (resumed, or with `fresh` deleted), an empty directory, or a run of an older
    lorafuse without the marker (resumed, never deleted); anything else is refused untouched."""
    if not out.is_dir():
        raise ConfigError(f"run directory {out}: exists and is not a directory")
    marked, empty = is_run_dir(out), not any(out.iterdir())
    if not (marked or empty or _looks_like_old_run(out)):
        raise ConfigError(f"run directory {out}: exists and is not a lorafuse run (no {MARKER}); "
                          "nothing was changed: choose another --output")
    if fresh and not empty:
        if not marked:
            raise ConfigError(f"--fresh: {out} has no {MARKER} marker (a run from an older lorafuse?); "
                              "delete it yourself if it should go")
        try:
            shutil.rmtree(out)
        except OSError as exc:
            raise ConfigError(f"--fresh: cannot delete the run directory {out} ({exc})") from None


def write_marker(out: Path) -> None:
    from lorafuse import __version__

    with open(out / MARKER, "w") as fh:
        fh.write(f"lorafuse {__version__} experiment run directory: `lorafuse experiment --fresh` may delete it\n")
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(out)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(out: Path, adapter_dirs: Iterable[Path]) -> list[Path]:
    """Delete what a killed run left half-written: temporary job files in jobs/, temporary and replaced
    directories of fused/ (owned by this run) and of this run's own adapters (in a shared cache only those of
    the adapters this run trains: another run may be writing its own). Training checkpoints are kept (resume)."""
    found: list[Path] = []
    jobs = out / "jobs"
    if jobs.is_dir():
        found += [p for p in jobs.glob(".*.tmp") if p.is_file()]
    for root in (out / "fused", out, out / "report"):
        if root.is_dir():
            found += [p for p in root.glob(".*") if _is_temporary(p.name)]
    for adapter in adapter_dirs:
        if adapter.parent.is_dir():
            found += [p for p in adapter.parent.glob(f".{adapter.name}.*") if _is_temporary(p.name)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if found:
        print(f"removed {len(found)} leftover(s) of an interrupted run in {out}", file=sys.stderr)
    return found


def _is_temporary(name: str) -> bool:
    """Names lorafuse's atomic writers use: `.<name>.tmp-XXXX`, `.<name>.old-XXXX`, `.<name>.XXXX.tmp`."""
    return ".tmp-" in name or ".old-" in name or name.endswith(".tmp")
