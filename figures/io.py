"""Writing figures: PNG (for screens) and PDF (for papers), each atomically."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from matplotlib.figure import Figure


def save_figure(fig: Figure, stem: str | os.PathLike, dpi: int = 200) -> list[Path]:
    """Write ``{stem}.png`` and ``{stem}.pdf`` through temporary files and renames; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", "pdf"):
        path = stem.with_name(f"{stem.name}.{fmt}")
        tmp = stem.with_name(f".{stem.name}.{os.getpid()}.{fmt}.tmp")
        try:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
            os.replace(tmp, path)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            # name the file, so the command's one line names its folder (the backend's error may name none)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
    return paths
