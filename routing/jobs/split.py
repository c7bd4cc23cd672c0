"""Where the split layer comes from: an explicit integer, or the saturation probe's recommendation."""

from __future__ import annotations

import json
import re
from pathlib import Path

from routing.plan import out_of_range
from saturation.core.errors import ToolkitError
from saturation.core.files import read_json
from saturation.recommend import split_range

RECOMMENDATION = "recommendation.json"


def validate_split(split: int, num_layers: int, fusion_layers: int = 1, side_depth: int = 1) -> int:
    """A split must lie in `saturation.recommend.split_range` (with K=1 and d_v=1: [1, L−2])."""
    valid = split_range(num_layers, fusion_layers, side_depth)
    if split not in valid:
        raise ToolkitError(out_of_range(split, num_layers, fusion_layers, side_depth, valid))
    return split


def read_recommendation(probe_dir: Path) -> dict:
    """`recommendation.json` of a probe run, validated enough to trust its `split` and `num_layers`."""
    path = Path(probe_dir) / RECOMMENDATION
    if not path.is_file():
        raise ToolkitError(f"no {RECOMMENDATION} in {probe_dir}: run `saturation probe --out {probe_dir}` first")
    rec = read_json(path)
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


def find_split(split: str | int, num_layers: int, model: str, probe_dir: Path | None,
               probe_root: Path) -> tuple[int, str]:
    """``(split, where it came from)``, not yet checked against a plan's range (the plan made from it checks it).
    `split` is an integer or ``auto``; auto reads `probe_dir`, else the newest probe of the same model under
    `probe_root`. Returns ``(-1, "missing")`` when auto finds none, so the caller can run the probe first."""
    if str(split) != "auto":
        if not re.fullmatch(r"-?[0-9]{1,6}", str(split).strip(), re.ASCII):  # int() also reads ６ and ٦
            raise ToolkitError(f"--split must be an integer or 'auto', in ASCII digits (got '{str(split)[:24]}')")
        return int(split), "given"
    folder = probe_dir or newest_probe(probe_root, model)
    if folder is None:
        return -1, "missing"
    rec = read_recommendation(folder)
    if rec["num_layers"] != num_layers:
        raise ToolkitError(f"the probe in {folder} is for a {rec['num_layers']}-layer model, this one has {num_layers}")
    return rec["split"], str(folder / RECOMMENDATION)


def resolve_split(split: str | int, num_layers: int, model: str, probe_dir: Path | None,
                  probe_root: Path, fusion_layers: int = 1, side_depth: int = 1) -> tuple[int, str]:
    """`find_split`, checked against `split_range` for the given K and d_v (a K or d_v that leaves no split fails
    before any probe runs)."""
    split_range(num_layers, fusion_layers, side_depth)
    value, source = find_split(split, num_layers, model, probe_dir, probe_root)
    return (value if source == "missing" else validate_split(value, num_layers, fusion_layers, side_depth)), source
