"""Where the split layer comes from: an explicit integer, or the saturation probe's recommendation."""

from __future__ import annotations

import json
from pathlib import Path

from saturation.errors import ToolkitError

RECOMMENDATION = "recommendation.json"


def validate_split(split: int, num_layers: int) -> int:
    """A split must leave a shallow stack and at least one deep layer before the fusion layer: [1, L−2]."""
    if not 1 <= split <= num_layers - 2:
        raise ToolkitError(f"split {split} is out of range for a {num_layers}-layer model: choose 1..{num_layers - 2}")
    return split


def read_recommendation(probe_dir: Path) -> dict:
    """`recommendation.json` of a probe run, validated enough to trust its `split` and `num_layers`."""
    path = Path(probe_dir) / RECOMMENDATION
    if not path.is_file():
        raise ToolkitError(f"no {RECOMMENDATION} in {probe_dir}: run `saturation probe --out {probe_dir}` first")
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ToolkitError(f"malformed JSON in {path}: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("split"), int) or not isinstance(rec.get("num_layers"), int):
        raise ToolkitError(f"{path} has no integer 'split' and 'num_layers'")
    return rec


def newest_probe(root: Path, model: str) -> Path | None:
    """The most recent probe folder under `root` whose recommendation names `model` (resolved id or path)."""
    found = []
    for path in Path(root).glob(f"**/{RECOMMENDATION}"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("model") == model:
            found.append((path.stat().st_mtime, path.parent))
    return max(found)[1] if found else None


def resolve_split(split: str | int, num_layers: int, model: str, probe_dir: Path | None,
                  probe_root: Path) -> tuple[int, str]:
    """``(split, where it came from)``. `split` is an integer or ``auto``; auto reads `probe_dir`, else the
    newest probe of the same model under `probe_root`. Returns ``(-1, "missing")`` when auto finds none,
    so the caller can run the probe first."""
    if str(split) != "auto":
        try:
            value = int(split)
        except ValueError:
            raise ToolkitError(f"--split must be an integer or 'auto' (got '{split}')") from None
        return validate_split(value, num_layers), "given"
    folder = probe_dir or newest_probe(probe_root, model)
    if folder is None:
        return -1, "missing"
    rec = read_recommendation(folder)
    if rec["num_layers"] != num_layers:
        raise ToolkitError(f"the probe in {folder} is for a {rec['num_layers']}-layer model, this one has {num_layers}")
    return validate_split(rec["split"], num_layers), str(folder / RECOMMENDATION)
