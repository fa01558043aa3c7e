"""Outputs are built in a temporary directory beside the target and moved into place whole, so a failed run
leaves nothing behind and an existing output is never replaced without an explicit overwrite.

Every output lorafuse writes carries a marker file (`MARKER_NAME`: its kind, every path it wrote, the process
that wrote it); a run directory of `lorafuse experiment` carries the same marker, of kind "run". `--overwrite`
and `--fresh` delete only a directory with that marker, of their own kind, and nothing added to it since (at any
depth), so they never delete a user's own folder or file. Every temporary is named `.<name>.tmp-*` and names its writer (a directory in its marker, a
file in its name); one rule (`is_abandoned`) lets the next run remove those of a killed one, and restore the
previous output when a kill came between the two renames of a replacement (`.<name>.old-*`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError, OutputExistsError
from lorafuse.validate import user_path

MARKER_NAME = ".lorafuse-output.json"
# provenance files of outputs written before the marker existed: still recognised as lorafuse's
_LEGACY_RECORDS = ("lorafuse_merge.json", "lorafuse_train.json", "router_config.json")


class OutputError(LorafuseError):
    """An output directory that cannot be written, or that lorafuse will not replace."""


# -- the marker ------------------------------------------------------------------------------------------
def write_marker(directory: str | Path, kind: str, entries: Sequence[str] | None = None,
                 files: Sequence[str] | None = None) -> Path:
    """Mark `directory` as written by lorafuse (`kind`: adapter, merged-model, run, ...). `entries` lists the
    top-level names it wrote (for a directory that grows, such as a run, the names it may write); `files` every
    path it wrote, relative and '/'-separated (folders too). An overwrite then refuses a directory holding
    anything else, at any depth."""
    path = Path(directory) / MARKER_NAME
    record: dict[str, Any] = {"kind": kind, "pid": os.getpid(), "host": socket.gethostname()}
    if entries is not None:
        record["entries"] = sorted(e for e in entries if e != MARKER_NAME)
    if files is not None:
        record["files"] = sorted(f for f in files if f != MARKER_NAME)
    path.write_text(json.dumps(record) + "\n")
    return path


def tree_paths(directory: Path) -> list[str]:
    """Every path under `directory`, relative and '/'-separated (what `write_marker` records as `files`)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The marker's record, or None when there is none (or it is unreadable: then it is not ours)."""
    try:
        record = json.loads((Path(directory) / MARKER_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("kind"), str) else None


def is_lorafuse_output(directory: str | Path) -> bool:
    """True for a directory lorafuse wrote: its marker, or the provenance file of an older lorafuse."""
    directory = Path(directory)
    if not directory.is_dir() or directory.is_symlink():
        return False
    return read_marker(directory) is not None or any((directory / name).is_file() for name in _LEGACY_RECORDS)


def check_replaceable(path: Path, kind: str | None = None) -> None:
    """Raise unless `path` may be deleted by an overwrite: lorafuse's own output (of `kind` when given), holding
    nothing but what lorafuse wrote (at any depth, where its marker records every path), or empty."""
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory lorafuse wrote; not replacing it")
    if not any(path.iterdir()):
        return
    if not is_lorafuse_output(path):
        raise OutputError(f"{path}: not an output of lorafuse (no {MARKER_NAME}); --overwrite only replaces "
                          "lorafuse's own outputs: choose another directory or delete it yourself")
    found = (read_marker(path) or {}).get("kind")
    if kind is not None and not _same_kind(found, kind):
        raise OutputError(f"{path}: is a lorafuse {found} output, not {kind!r}; not replacing it with another "
                          "kind: choose another directory or delete it yourself")
    added = unexpected_paths(path)
    if added:
        raise OutputError(f"{path}: holds files lorafuse did not write ({', '.join(added[:3])}"
                          f"{'…' if len(added) > 3 else ''}); not replacing it: move them or delete it yourself")


def _same_kind(found: str | None, kind: str) -> bool:
    """Whether an output of kind `found` may be replaced by one of `kind`: equal kinds, or an output without a
    kind or of the generic "output" of earlier builds (a run directory never: it holds a whole experiment)."""
    return found == kind or (found in (None, "output") and kind != "run")


def unexpected_paths(path: Path) -> list[str]:
    """What lies in lorafuse's output `path` that lorafuse did not write: every path its marker does not record
    (a marker of an earlier build records only the top-level names: those are compared)."""
    marker = read_marker(path) or {}
    if "files" in marker:
        return sorted(set(tree_paths(path)) - set(marker["files"]) - {MARKER_NAME})
    if "entries" in marker:
        return sorted({p.name for p in path.iterdir()} - set(marker["entries"]) - {MARKER_NAME})
    return []


def check_output(path: str | Path, overwrite: bool, kind: str | None = None) -> Path:
    """Refuse an existing output early (before any expensive work) unless overwrite is set and it is lorafuse's
    own (of `kind`, when given); also refuse an output whose directory cannot be written. Leftovers of a killed
    run are removed first (a previous output it had set aside is put back)."""
    path = user_path(path)  # as the overlap checks see it (lorafuse.validate.real)
    clean_leftovers(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{path}: output exists (pass --overwrite / overwrite=True to replace it)")
        check_replaceable(path, kind)
    check_writable(path)
    return path


# -- writability and space -------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    for candidate in (path.parent, *path.parent.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def check_writable(path: str | Path, need_bytes: int = 0) -> None:
    """Refuse an output whose nearest existing folder is not a writable directory (read-only disk, no
    permission) or lacks `need_bytes` of free space; probed with a file created and removed at once."""
    path = Path(path)
    folder = _existing_ancestor(path)
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot create it: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lorafuse-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write in {folder} ({exc.strerror or exc})") from None
    if need_bytes:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise OutputError(f"{path}: needs {_size(need_bytes)} but {folder} has {_size(free)} free")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


# -- leftovers of killed runs ----------------------------------------------------------------------------
# A temporary whose writer cannot be asked (no marker: a file, or a directory killed before its marker; a marker
# from another host) is abandoned once untouched for this long: no lorafuse writer leaves its temporary idle
# for an hour (the longest quiet stretch is the validation at the end of training, minutes).
STALE_AFTER_S = 3600.0


def _alive(marker: dict[str, Any] | None) -> bool | None:
    """Whether the process that wrote a temporary may still be writing it: True/False when the marker names a
    process of this host, None when that cannot be known (no marker, another host)."""
    if not marker or marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int) \
            or isinstance(marker.get("pid"), bool):
        return None
    if marker["pid"] == os.getpid():
        return True
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _idle_seconds(path: Path) -> float:
    """Seconds since `path`, or any entry directly inside it, last changed (a writer streaming a file keeps
    that file's mtime fresh)."""
    try:
        times = [path.lstat().st_mtime]
        if path.is_dir() and not path.is_symlink():
            times += [p.lstat().st_mtime for p in path.iterdir()]
    except OSError:
        return 0.0
    return time.time() - max(times)


def is_abandoned(temporary: str | Path) -> bool:
    """The one leftover rule: a temporary (`.<name>.tmp-*`, file or directory) is removed only when it carries
    lorafuse's evidence of ownership (a directory its marker, or nothing at all: one killed between its creation
    and its marker; a file its writer in its name) and the process that wrote it is gone (the marker, or the
    file's name, names a dead process of this host) or, when its writer cannot be asked (another host, an empty
    directory), it has been untouched for longer than STALE_AFTER_S. A user's file or folder that merely has
    such a name is never removed, nor a temporary of a live process of this host. (The rule of atomic_outputs
    and of `lorafuse experiment`'s run directories, and of lorafuse.model.training's output.)"""
    temporary = Path(temporary)
    if temporary.is_dir() and not temporary.is_symlink():
        marker = read_marker(temporary)
        if marker is None and any(temporary.iterdir()):
            return False  # holds something, but no marker says it is ours
    else:  # a file names its writer: `.<name>.tmp-<pid>@<host tag>-<random>` (temporary_file)
        owner = re.search(r"\.tmp-(\d+)@([0-9a-f]{8})-[^.]*$", temporary.name)
        if owner is None:
            return False
        marker = {"pid": int(owner.group(1)), "host": socket.gethostname()} if owner.group(2) == host_tag() else None
    alive = _alive(marker or None)
    if alive is not None:
        return not alive
    return _idle_seconds(temporary) > STALE_AFTER_S


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(path: str | Path) -> list[Path]:
    """Remove what a killed run left beside `path` and return it: its abandoned temporaries (`is_abandoned`),
    and a previous output set aside for a replacement that never finished — put back when `path` itself is
    missing (then not listed), removed otherwise."""
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for sibling in sorted(path.parent.glob(f".{path.name}.old-*")):
        swapping = path.parent / f".{path.name}.tmp-{sibling.name.rsplit('-', 1)[-1]}"
        if not is_lorafuse_output(sibling) or (swapping.exists() and not is_abandoned(swapping)):
            continue  # not ours, or a replacement in progress right now
        if not path.exists() and not path.is_symlink():
            sibling.rename(path)
        else:
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    for sibling in sorted(path.parent.glob(f".{path.name}.tmp-*")):
        if is_abandoned(sibling):
            _remove_path(sibling)
            removed.append(sibling)
    return removed


def clean_leftovers_in(folder: str | Path) -> list[Path]:
    """`clean_leftovers` for every output whose temporaries lie in `folder` (a run's jobs/, fused/, ...); also
    the `.<name>.<random>.tmp` job files of earlier builds, which have no writer to ask (the age rule)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    targets = {name.rsplit(sep, 1)[0][1:] for name in (p.name for p in folder.glob(".*"))
               for sep in (".tmp-", ".old-") if sep in name}
    removed = [p for target in sorted(targets) if target for p in clean_leftovers(folder / target)]
    for legacy in sorted(folder.glob(".*.tmp")):  # named by mkstemp, so no writer to ask: the age rule alone
        if legacy.is_file() and not legacy.is_symlink() and _idle_seconds(legacy) > STALE_AFTER_S:
            legacy.unlink(missing_ok=True)
            removed.append(legacy)
    return removed


def temporary_file(path: str | Path) -> tuple[int, Path]:
    """A new temporary file beside `path` named as every lorafuse temporary (`.<name>.tmp-*`), open for
    writing: (fd, its path). Its mode is the one `open` would give (0666 less the umask), not mkstemp's 0600:
    it is renamed into place as the published file."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}@{host_tag()}-", dir=path.parent)
    os.chmod(name, 0o666 & ~current_umask())
    return fd, Path(name)


def current_umask() -> int:
    """The process's umask (POSIX can only read it by setting it: it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_file(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory:
    readers see the old file or the new, never a part, and a kill leaves only a temporary the next run removes."""
    path = Path(path)
    fd, tmp = temporary_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """`check_output` for an output that is one file (a results JSON): an existing one is replaced only with
    `overwrite`, and never when it is a directory or a link (that is no file lorafuse wrote)."""
    path = user_path(path)
    clean_leftovers(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{path}: output exists (pass --overwrite / overwrite=True to replace it)")
        if path.is_symlink() or not path.is_file():
            raise OutputError(f"{path}: exists and is not a file; not replacing it")
    check_writable(path)
    return path


def write_output_file(path: str | Path, text: str, overwrite: bool = False) -> Path:
    """An output file written as every output is: checked (`check_output_file`), then `replace_file`."""
    path = check_output_file(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        replace_file(path, text.encode())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise OutputError(f"{path}: cannot write ({exc.strerror}); nothing was written") from None
        raise
    return path


def host_tag() -> str:
    """8 hex digits naming this host in a file name (a host name may be long or hold any character)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def fsync_dir(path: str | Path) -> None:
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


# -- atomic outputs --------------------------------------------------------------------------------------
@contextmanager
def atomic_outputs(paths: Sequence[str | Path], overwrite: bool = False,
                   kinds: Sequence[str] | None = None) -> Iterator[list[Path]]:
    """Yield one fresh temporary directory per output; when the block succeeds, all of them replace their
    targets together (a failure of any rename puts back the ones already done), else none is touched."""
    kinds = list(kinds or ["output"] * len(paths))
    targets = [check_output(p, overwrite, kind) for p, kind in zip(paths, kinds)]
    temps: list[Path] = []
    try:
        for target, kind in zip(targets, kinds):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would make the published output private
            write_marker(tmp, kind)  # first thing: a killed run's directory is then recognisably ours
            temps.append(tmp)
        yield temps
        for tmp, kind in zip(temps, kinds):
            write_marker(tmp, kind, [p.name for p in tmp.iterdir()], tree_paths(tmp))
            _modes_from_umask(tmp)
        for target, kind in zip(targets, kinds):  # re-checked: something may have appeared during the work
            check_output(target, overwrite, kind)
        _commit(temps, targets)
    except OSError as exc:
        _remove(temps)
        if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            where = exc.filename or (targets[0] if targets else "")
            raise OutputError(f"{where}: cannot write ({exc.strerror}); nothing was written") from None
        raise
    except BaseException:
        _remove(temps)
        raise


@contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False, kind: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `path` in one rename."""
    with atomic_outputs([path], overwrite, [kind]) as (tmp,):
        yield tmp


def _modes_from_umask(directory: Path) -> None:
    """Give every file and folder under `directory` the mode `open` and `mkdir` would (0666 / 0777 less the
    umask): some writers create theirs private (safetensors' save_file, hence PEFT's save_pretrained: 0600),
    which the published output must not inherit."""
    mask = current_umask()
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _commit(temps: list[Path], targets: list[Path]) -> None:
    done: list[tuple[Path, Path | None]] = []  # (target, the previous output set aside)
    try:
        for tmp, target in zip(temps, targets):
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
                target.rename(old)
            tmp.rename(target)
            done.append((target, old))
    except BaseException:
        for target, old in reversed(done):  # put the earlier outputs back as they were
            shutil.rmtree(target, ignore_errors=True)
            if old is not None:
                old.rename(target)
        raise
    for _, old in done:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _remove(temps: list[Path]) -> None:
    for tmp in temps:
        shutil.rmtree(tmp, ignore_errors=True)
