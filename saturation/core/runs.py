"""The run-folder contract every long job keeps (probe, train, reproduce, compare, the embedded model's training).

- **One process per folder.** `locked(folder)` holds ``folder/.lock`` (an OS file lock, `filelock`) for the run; a
  second process is refused in one line naming the holder's pid. The OS drops the lock when its holder dies, so a
  run killed with ``kill -9`` never blocks the next one. Locking a folder this process already holds is a no-op
  (a job that calls another job on the same folder).
- **Defining options are recorded and checked.** `open_run` writes the options that define the run to
  ``folder/<manifest>`` and, on a rerun, refuses in one line naming each option that differs (``--no-resume``
  starts afresh instead).
- **A partial result never looks whole.** Results are written at the end, atomically (`saturation.core.files`); a
  run that starts with other options (or afresh) first removes the previous run's results, so a run killed midway
  leaves none that answer other options.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from saturation.core.errors import ToolkitError
from saturation.core.files import write_json

LOCK = ".lock"
HOLDER = ".lock.pid"  # the holder's pid, beside the lock (the lock file itself is truncated by every try)
FRESH = "pass --no-resume to start fresh there, or choose another --out"
_held: dict[str, list] = {}  # resolved folder -> [lock, depth]: this process's locks, so nesting is a no-op


def _file_lock(path: Path):
    from filelock import FileLock

    try:  # filelock 4 may fall back to a soft lock (a file that outlives a killed holder): never here
        return FileLock(str(path), timeout=0, fallback_to_soft=False)
    except TypeError:  # filelock 3 has only the OS lock
        return FileLock(str(path), timeout=0)


def holder_pid(folder: Path) -> str:
    """The pid recorded by the process that holds `folder`'s lock ('unknown' while it is being written)."""
    try:
        return (Path(folder) / HOLDER).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def locked(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder`'s run lock for the block (creating the folder); refuse in one line if another process does."""
    from filelock import Timeout

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:  # this process already holds it: a job inside a job
        _held[key][1] += 1
        try:
            yield folder
        finally:
            _held[key][1] -= 1
        return
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # what the lock creates
    folder.mkdir(parents=True, exist_ok=True)
    lock = _file_lock(folder / LOCK)
    try:
        lock.acquire()
    except Timeout:
        raise ToolkitError(f"{folder} is in use by another run (pid {holder_pid(folder)}): wait for it to finish, "
                           "or choose another --out") from None
    _held[key] = [lock, 1]
    try:
        (folder / HOLDER).write_text(f"{os.getpid()}\n")
        yield folder
    finally:
        del _held[key]
        (folder / HOLDER).unlink(missing_ok=True)
        lock.release()
        _remove_if_unused(folder, made)


def _remove_if_unused(folder: Path, made: list[Path]) -> None:
    """A run refused before it wrote anything leaves no folder behind: remove the lock file and the folders the
    lock created when nothing else was written there."""
    if not made or any(p.name != LOCK for p in folder.iterdir()):
        return
    try:
        (folder / LOCK).unlink(missing_ok=True)
        for path in made:  # innermost first
            path.rmdir()
    except OSError:  # another process started there meanwhile: leave it
        pass


def differences(old: dict, new: dict, labels: dict[str, str], defaults: dict | None = None,
                same: Callable[[str, object, object], bool] | None = None) -> list[str]:
    """``--split 4 (now 5)`` for each option of `labels` present in `new` that `old` records otherwise (an option
    an older `old` lacks counts as its value in `defaults`)."""
    defaults = defaults or {}
    diffs = []
    for key in (k for k in labels if k in new):
        before, now = old.get(key, defaults.get(key)), new[key]
        if not (same(key, before, now) if same is not None else before == now):
            diffs.append(f"{labels[key]} {_shown(before)} (now {_shown(now)})")
    return diffs


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def read_manifest(path: Path) -> dict | None:
    """The JSON object at `path`, None if there is no file; a damaged one is one line."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        value = None
    if not isinstance(value, dict):
        raise ToolkitError(f"{path} is damaged, so the run in {path.parent} cannot be resumed safely: {FRESH}")
    return value


def check_manifest(folder: Path, identity: dict, labels: dict[str, str], manifest: str = "run.json",
                   defaults: dict | None = None, same=None, hint: str = FRESH) -> dict | None:
    """Refuse (one line naming each difference) when `folder/manifest` records other defining options than
    `identity`; returns the recorded options (None when there are none)."""
    old = read_manifest(Path(folder) / manifest)
    if old is not None:
        diffs = differences(old, identity, labels, defaults, same)
        if diffs:
            raise ToolkitError(f"{folder} holds a run with other options: {', '.join(diffs)}; {hint}")
    return old


def remove(folder: Path, names: Iterable[str]) -> None:
    """Delete these files or folders of `folder` (a previous run's results)."""
    for name in names:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def open_run(folder: Path, identity: dict, labels: dict[str, str], resume: bool, results: Iterable[str] = (),
             manifest: str = "run.json", log: Callable[[str], None] = print) -> bool:
    """Start or resume the run of `identity` in `folder`: refuse other options when resuming; else remove the
    previous run's `results` when it had other options (or none recorded), then record `identity`. Returns True
    when the folder's earlier work is this run's (a resume of the same options)."""
    folder = Path(folder)
    old = check_manifest(folder, identity, labels, manifest) if resume else read_manifest_quiet(folder / manifest)
    same = old is not None and not differences(old, identity, labels)
    if not (resume and same):
        present = [n for n in results if (folder / n).exists()]
        if present:
            log(f"{folder}: removing the previous run's results ({', '.join(present)}): they answer other options")
        remove(folder, present)
    write_json(folder / manifest, identity)
    return resume and same


def read_manifest_quiet(path: Path) -> dict | None:
    """`read_manifest`, a damaged file read as none (a fresh start overwrites it)."""
    try:
        return read_manifest(path)
    except ToolkitError:
        return None
