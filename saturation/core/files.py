"""Atomic file writes: a reader (or a crash) never sees half a table, log or JSON file; JSON read back with
one-line errors.

And the checks every command runs on its output paths before any work (`ensure_output_dir`,
`ensure_output_file`), so a bad ``--out`` or ``--json`` fails in a second with one line, not after the run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
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
