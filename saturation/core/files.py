"""Atomic file writes: a reader (or a crash) never sees half a table, log or JSON file; JSON read back with
one-line errors.

And the checks every command runs on its output paths before any work (`ensure_output_dir`,
`ensure_output_file`), so a bad ``--out`` or ``--json`` fails in a second with one line, not after the run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from saturation.core.errors import ToolkitError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary sibling of `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def file_digest(*paths: str | os.PathLike) -> str:
    """The first 16 hex digits of the sha256 of the files' bytes, in order (what a run records of the data files it
    read; one file gives its own sha256)."""
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def read_json(path: Path):
    """The parsed JSON file at `path`; malformed JSON or text that is not UTF-8 is one line naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ToolkitError(f"malformed JSON in {path}: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UnicodeDecodeError:
        raise ToolkitError(f"malformed JSON in {path}: not UTF-8 text") from None


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (`Path.exists` is False under a file, so this stops there)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_writable(folder: Path, what: str) -> None:
    """Create and remove a temporary file in `folder`: the only test that also holds for root and read-only mounts."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise ToolkitError(f"{what}: cannot write in {folder} ({err.strerror or err})") from None


def _check_folder(folder: Path, what: str) -> None:
    """`folder` is, or can become, a folder this process can write in; else a one-line `ToolkitError`."""
    try:
        if folder.exists() and not folder.is_dir():
            raise ToolkitError(f"{what}: {folder} is a file, not a folder")
        base = _nearest_existing(folder.absolute())
        if not base.is_dir():
            raise ToolkitError(f"{what}: {base} is a file, so no folder can be made under it")
    except OSError as err:  # e.g. an ancestor without search permission
        raise ToolkitError(f"{what}: {err.strerror or err}") from None
    _check_writable(base, what)


def ensure_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Fail with one line unless `path` is, or can become, a folder this process can write in. Creates nothing."""
    path = Path(path)
    _check_folder(path, f"{option} {path}")
    return path


def ensure_output_file(path: str | os.PathLike, option: str = "--json") -> Path:
    """Fail with one line unless a file can be written at `path` (atomically, beside itself). Creates nothing."""
    path = Path(path)
    what = f"{option} {path}"
    try:
        if path.is_dir():
            raise ToolkitError(f"{what} is a folder; give a file name")
    except OSError as err:
        raise ToolkitError(f"{what}: {err.strerror or err}") from None
    _check_folder(path.parent, what)
    return path


# --- a full disk: one line naming the folder and the space, never a traceback ---

DISK_FULL_TEXTS = ("No space left on device", "StorageFull", "Disk quota exceeded")  # safetensors' Rust I/O errors


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err` (or an exception it was raised from) is a full disk: ENOSPC/EDQUOT, or safetensors' and
    other libraries' wrappings of it (a ``SafetensorError`` is not an OSError)."""
    for _ in range(8):  # the chain of causes, bounded
        if err is None:
            return False
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err) for text in DISK_FULL_TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


def size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def disk_full_message(folder: str | os.PathLike | None, err: BaseException | None = None,
                      needed: int | None = None) -> str:
    """One line: the disk under `folder` (else the file `err` names) is full, what is free there and needed."""
    if folder is None:
        name = getattr(err, "filename", None)
        folder = Path(name).parent if name else Path.cwd()
    folder = Path(folder)
    try:
        free = size_text(shutil.disk_usage(_nearest_existing(folder.absolute())).free)
    except OSError:
        free = "unknown"
    want = f", about {size_text(needed)} needed" if needed else ""
    return (f"no space left on the disk of {folder} ({free} free there{want}): free some space or choose a folder "
            "on another disk, then rerun (finished work is kept and the run resumes)")


@contextmanager
def disk_guard(folder: str | os.PathLike, needed: int | None = None,
               cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into one `ToolkitError` naming `folder`, after `cleanup()` (removing
    partial files) when given."""
    try:
        yield
    except ToolkitError:
        raise
    except Exception as err:
        if not is_disk_full(err):
            raise
        if cleanup is not None:
            cleanup()
        raise ToolkitError(disk_full_message(folder, err, needed)) from None
