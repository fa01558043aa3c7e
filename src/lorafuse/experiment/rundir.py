"""The run directory: lorafuse deletes only what it created.

A run directory carries lorafuse's output marker (`lorafuse.atomic.MARKER_NAME`, kind "run", listing the
top-level entries a run writes), written when lorafuse first creates it. `--fresh` deletes a directory only when
it carries that marker and holds nothing else (`lorafuse.atomic.check_replaceable`, the rule of `--overwrite`),
and any run refuses a directory that is neither a run nor empty (a user's folder is never filled with `jobs/` and
`adapters/`, nor deleted). A run directory may not contain an input of the experiment (data, task files, a local
model, with `--fresh` the adapter cache) nor lie inside an input directory. Leftovers of a killed run (temporary
job files, half-written adapter and fused directories) are removed by the next run under lorafuse's one rule
(`lorafuse.atomic.is_abandoned`: the writer is gone, or the temporary is older than a bound)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorafuse import atomic, validate
from lorafuse.atomic import MARKER_NAME, fsync_dir, read_marker
from lorafuse.errors import ConfigError

__all__ = ["MARKER", "check_apart", "experiment_inputs", "is_run_dir", "prepare", "remove_leftovers"]

MARKER = MARKER_NAME
RUN_KIND = "run"
LEGACY_MARKER = ".lorafuse-run"  # the marker of earlier builds: still a run, upgraded on the next prepare
RUN_ENTRIES = {"jobs", "adapters", "fused", "report", "router"}  # what a run directory holds
# the run directory may neither hold an input nor lie inside one (lorafuse.validate.check_apart)
check_apart = functools.partial(validate.check_apart, what="run directory")


def is_run_dir(path: Path) -> bool:
    """A directory lorafuse created as a run: its marker says kind "run" (or an earlier build's marker file)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (read_marker(path) or {}).get("kind") == RUN_KIND or (path / LEGACY_MARKER).is_file()


def _looks_like_old_run(path: Path) -> bool:
    """A run written before the marker existed: a jobs/ folder and nothing but run entries."""
    entries = {p.name for p in path.iterdir()}
    return "jobs" in entries and entries <= RUN_ENTRIES | {MARKER_NAME, LEGACY_MARKER}


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
    for task, adapter in sorted(getattr(config, "adapters", {}).items()):
        if Path(adapter).exists():
            inputs.append((f"task '{task}' adapter", Path(adapter)))
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
        if (read_marker(out) or {}).get("kind") != RUN_KIND:
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
        if (read_marker(out) or {}).get("kind") != RUN_KIND:
            write_marker(out)  # an earlier build's marker: upgraded, so that the one rule below applies
        try:
            atomic.check_replaceable(out, RUN_KIND)  # the rule of --overwrite: nothing added but what a run writes
        except atomic.OutputError as exc:
            raise ConfigError(f"--fresh: {exc}") from None
        added = unexpected_in_run(out)
        if added:
            raise ConfigError(f"--fresh: {out}: holds files lorafuse did not write ({', '.join(added[:3])}"
                              f"{'…' if len(added) > 3 else ''}); not deleting it: move them or delete it yourself")
        try:
            shutil.rmtree(out)
        except OSError as exc:
            raise ConfigError(f"--fresh: cannot delete the run directory {out} ({exc})") from None


# lorafuse's own hidden names in a run's folders: temporaries `.<name>.tmp-*`, set-aside outputs `.<name>.old-*`,
# training checkpoints `.<name>.checkpoints`, job files of earlier builds `.<name>.<random>.tmp`
_OWN_HIDDEN = re.compile(r"\..+\.(tmp-.+|old-.+|checkpoints|tmp)")


def unexpected_in_run(out: Path) -> list[str]:
    """Paths inside a run's folders that no run writes (a run's marker lists only its top-level names, and its
    folders grow over many processes): job records are `jobs/*.json`, the report's files are known by name,
    and adapters, fused adapters and routers are lorafuse outputs whose own markers record every path."""
    found: list[str] = []
    for folder in sorted(p for p in out.iterdir() if p.name in RUN_ENTRIES):
        if read_marker(folder) is not None:  # an output of its own (router/)
            found += [f"{folder.name}/{p}" for p in atomic.unexpected_paths(folder)]
        elif folder.is_symlink() or not folder.is_dir():
            found.append(folder.name)
        else:
            found += [f"{folder.name}/{p}" for entry in sorted(folder.iterdir()) for p in _unexpected_entry(entry)]
    return found


def _unexpected_entry(entry: Path) -> list[str]:
    """What in `entry` (directly inside a run's folder) no run wrote, relative to that folder."""
    if _OWN_HIDDEN.fullmatch(entry.name):
        return []
    if entry.parent.name == "jobs":
        if entry.name == "settings" and entry.is_dir() and not entry.is_symlink():
            return [f"settings/{p}" for p in _unexpected_settings(entry)]
        return [] if entry.is_file() and entry.suffix == ".json" else [entry.name]
    if entry.parent.name == "report":
        from lorafuse.experiment.report import REPORT_FILES

        return [] if entry.is_file() and entry.name in REPORT_FILES else [entry.name]
    if not atomic.is_lorafuse_output(entry):
        return [entry.name]
    return [f"{entry.name}/{p}" for p in atomic.unexpected_paths(entry)]


def _unexpected_settings(folder: Path) -> list[str]:
    """jobs/settings/ holds one folder per method's search, of JSON files (lorafuse.experiment.cache.SettingCache)."""
    found = []
    for search in sorted(folder.iterdir()):
        if not search.is_dir() or search.is_symlink():
            found.append(search.name)
            continue
        found += [f"{search.name}/{f.name}" for f in sorted(search.iterdir())
                  if not (_OWN_HIDDEN.fullmatch(f.name) or (f.is_file() and f.suffix == ".json"))]
    return found


def write_marker(out: Path) -> None:
    """lorafuse's output marker, kind "run", fsynced (a run directory outlives many processes); an earlier
    build's `.lorafuse-run` is replaced by it."""
    path = atomic.write_marker(out, RUN_KIND, sorted(RUN_ENTRIES | {LEGACY_MARKER}))
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    (out / LEGACY_MARKER).unlink(missing_ok=True)
    fsync_dir(out)


def remove_leftovers(out: Path, adapter_dirs: Iterable[Path]) -> list[Path]:
    """Delete what a killed run left half-written, under lorafuse's one leftover rule (`atomic.is_abandoned`):
    temporary job files in jobs/, temporary and set-aside directories of fused/ and report/, and those of this
    run's own adapters (in a shared cache only those: the rule keeps a live writer's temporaries anyway, but
    another run's are its own business). A previous output set aside by a killed replacement is put back.
    Training checkpoints are kept (resume)."""
    found: list[Path] = []
    settings = out / "jobs" / "settings"
    searches = sorted(p for p in settings.iterdir() if p.is_dir()) if settings.is_dir() else []
    for root in (out / "jobs", *searches, out / "fused", out, out / "report"):
        found += atomic.clean_leftovers_in(root)
    for adapter in adapter_dirs:
        found += atomic.clean_leftovers(adapter)
    if found:
        print(f"removed {len(found)} leftover(s) of an interrupted run in {out}", file=sys.stderr)
    return found
