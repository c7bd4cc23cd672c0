"""Save and load a routing: only what is new (the side branch and the plan), rebuilt on its base model.

A routing directory holds::

    side_branch.safetensors   the side-branch weights (d_v decoder layers)
    routing.json              split, variant, K, d_v, base model id + geometry + weight fingerprint, toolkit version

Both are written into a temporary sibling folder that then replaces the old artifact, so a crash mid-save
leaves the previous artifact whole. Readers accept the artifact folder or the run folder of `routing train`
(whose ``routing/`` subfolder is the artifact).

This module is the file format alone: the plan's part of the manifest is `RoutingPlan.to_manifest` /
`RoutingPlan.from_manifest`, and rebuilding a routed model from an artifact (which needs `routing.model`, which saves
through this module) is `routing.saved.load`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saturation import __version__ as toolkit_version
from saturation.core.adapters import adapter_for
from saturation.core.errors import ToolkitError
from saturation.core.files import read_json

from .plan import RoutingPlan

WEIGHTS = "side_branch.safetensors"
MANIFEST = "routing.json"
FORMAT = "dpvr-routing/1"
RUN_SUBFOLDER = "routing"  # `routing train --out D` writes the artifact to D/routing
# the keys `load` needs, with their JSON types (the plan's are checked by `RoutingPlan.from_manifest`)
REQUIRED = {"variant": str, "split": int, "fusion_layers": int, "side_depth": int, "num_layers": int,
            "base_geometry": dict, "base_fingerprint": list}
BASE_KEYS = ("base_geometry", "base_fingerprint")


def base_geometry(model) -> dict:
    """The base facts a side branch depends on: a routing saved on one geometry cannot run on another."""
    a = adapter_for(model)
    c = a.text_config
    return {
        "model_type": model.config.model_type,
        "num_layers": a.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "vocab_size": c.vocab_size,
        "image_token_id": a.image_token_id,
    }


def base_fingerprint(model, layers: range) -> list[float]:
    """A few weights of the layers the side branch was copied from, enough to tell checkpoints apart.

    Sampled at fixed strided indices of each layer's fingerprint weight (the adapter's: the query projection);
    stable across dtypes up to rounding.
    """
    from saturation.core.loading import weights_in_place

    a = adapter_for(model)
    values = []
    for i in layers:
        with weights_in_place(a.layers[i]):  # a layer a device map offloaded holds meta tensors until then
            w = a.fingerprint_weight(i).detach().reshape(-1)
            step = max(1, w.numel() // 16)
            values += w[::step][:16].float().cpu().tolist()
    return values


def _base_id(model) -> str:
    return str(getattr(model.config, "name_or_path", "") or getattr(model, "name_or_path", "") or "")


def _aside(out: Path) -> Path:
    """Where the old artifact waits while the new one is renamed into place (see `_swap`)."""
    return out.with_name(f".{out.name}.old-{os.getpid()}")


def _recover(out: Path) -> None:
    """Bring back an old artifact that a crash left renamed aside (between the two renames of `_swap`)."""
    if out.exists():
        return
    left = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime) if out.parent.is_dir() else []
    if left:
        try:
            os.replace(left[-1], out)
        except OSError:  # a reader without write access: the error about the missing artifact says enough
            pass


def _swap(new: Path, out: Path) -> None:
    """Replace folder `out` by `new`. POSIX cannot rename over a non-empty folder, so the old one is renamed
    aside first and removed last; a crash in between leaves it aside whole, and `_recover` brings it back."""
    if not out.exists():
        os.replace(new, out)
        return
    old = _aside(out)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    """`save_routing` replaces the whole folder: refuse one that holds anything but an artifact."""
    if out.exists() and not out.is_dir():
        raise ToolkitError(f"cannot save a routing to '{out}': it is a file")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in (WEIGHTS, MANIFEST))
        if others:
            raise ToolkitError(f"'{out}' is not a routing artifact (it holds {', '.join(others[:3])}): "
                               "save the routing to a new or empty folder")


def save_routing(routed, directory, extra: dict | None = None) -> Path:
    """Write `routed`'s side branch and plan under `directory`, replacing an old artifact there atomically.
    `extra`: more keys for ``routing.json`` that loading ignores (``calibration``: how a plan's layer was found)."""
    out = Path(directory)
    _recover(out)
    _check_replaceable(out)
    plan = routed.plan
    state = {k: v.detach().contiguous().cpu() for k, v in routed.side.state_dict().items()}
    manifest = {
        "format": FORMAT,
        **plan.to_manifest(),
        "base_model": _base_id(routed.base),
        "base_geometry": base_geometry(routed.base),
        "base_fingerprint": base_fingerprint(routed.base, plan.side_sources),
        "trainable_parameters": routed.trainable_parameters().trainable,
        "dtype": str(next(routed.side.parameters()).dtype if len(routed.side) else routed.base.dtype
                     ).removeprefix("torch."),
        "toolkit_version": toolkit_version,
    }
    clash = sorted(set(extra or {}) & set(manifest))
    if clash:
        raise ToolkitError(f"extra routing.json keys {', '.join(clash)} would overwrite the manifest's own")
    manifest |= extra or {}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def artifact_dir(directory) -> Path:
    """The artifact folder itself, or the ``routing/`` subfolder of a `routing train` run folder."""
    d = Path(directory)
    _recover(d)
    if not (d / MANIFEST).exists() and (d / RUN_SUBFOLDER / MANIFEST).exists():
        d = d / RUN_SUBFOLDER
        _recover(d)
    return d


def _validate(manifest, path: Path) -> RoutingPlan:
    """The plan of a manifest `load` can use; anything else is one line naming the file and the problem."""
    if not isinstance(manifest, dict):
        raise ToolkitError(f"{path} is not a routing manifest (expected a JSON object)")
    if manifest.get("format") != FORMAT:
        raise ToolkitError(f"{path}: unknown routing format {manifest.get('format')!r} (expected {FORMAT})")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ToolkitError(f"{path} lacks {', '.join(missing)}: it was not written by `routing train`, "
                           "or was edited; train it again")
    try:  # key types, split in range, known variant, K and d_v that fit: the plan's own checks
        plan = RoutingPlan.from_manifest(manifest)
    except ToolkitError as err:
        raise ToolkitError(f"{path}: {err}") from None
    for key in BASE_KEYS:
        value, kind = manifest[key], REQUIRED[key]
        if not isinstance(value, kind):
            raise ToolkitError(f"{path}: '{key}' must be a JSON {kind.__name__}, got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in manifest["base_fingerprint"]):
        raise ToolkitError(f"{path}: 'base_fingerprint' must be a list of numbers")
    return plan


def read_artifact(directory) -> tuple[dict, RoutingPlan]:
    """The validated ``routing.json`` of an artifact (or of a run folder's ``routing/``) and its plan."""
    d = artifact_dir(directory)
    path = d / MANIFEST
    if not path.is_file() or not (d / WEIGHTS).is_file():
        raise ToolkitError(f"'{directory}' is not a routing directory: it needs {MANIFEST} and {WEIGHTS} "
                           f"(or a {RUN_SUBFOLDER}/ subfolder with them, as `routing train --out` writes)")
    manifest = read_json(path)
    return manifest, _validate(manifest, path)


def read_manifest(directory) -> dict:
    """The validated ``routing.json`` of an artifact (or of a run folder's ``routing/``)."""
    return read_artifact(directory)[0]


def read_plan(directory) -> RoutingPlan:
    """The plan of a saved routing, checked before any weights load."""
    return read_artifact(directory)[1]


def check_base(model, manifest: dict, where: str) -> None:
    """Refuse a base that is not the one the routing was trained on, with one line saying what differs."""
    saved_id, base_id = str(manifest.get("base_model") or ""), _base_id(model)
    if saved_id and base_id and Path(saved_id).name != Path(base_id).name:
        raise ToolkitError(f"routing {where} was built on '{saved_id}', not on '{base_id}'")
    geometry = base_geometry(model)
    diff = {k: (v, geometry.get(k)) for k, v in manifest["base_geometry"].items() if geometry.get(k) != v}
    if diff:
        detail = ", ".join(f"{k} {saved} vs {now}" for k, (saved, now) in diff.items())
        raise ToolkitError(f"routing {where} does not fit this base model ({detail}; saved vs given)")
    sources = range(manifest["split"], manifest["split"] + manifest["side_depth"])
    saved = torch.tensor(manifest["base_fingerprint"])
    now = torch.tensor(base_fingerprint(model, sources))
    if saved.shape != now.shape or not torch.allclose(saved, now, rtol=2e-2, atol=1e-3):
        raise ToolkitError(f"routing {where} was built on different base weights than the given model "
                           f"('{saved_id or 'unnamed'}'): load the base it was trained on")


def load_side(routed, directory: Path) -> None:
    """Fill `routed`'s side branch from the artifact in `directory` (safetensors only, strictly by name and shape)."""
    weights = Path(directory) / WEIGHTS
    try:  # never torch.load: safetensors only, and a file that is not one is the user's error, not a crash
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ToolkitError(f"{weights} is not a readable safetensors file ({err})") from None
    try:
        missing, unexpected = routed.side.load_state_dict(state, strict=False)
    except RuntimeError as err:  # right names, wrong shapes
        detail = str(err).strip().splitlines()[-1].strip()
        raise ToolkitError(f"routing '{directory}': side-branch weights do not fit the plan ({detail})") from None
    if missing or unexpected:
        raise ToolkitError(f"routing '{directory}': side-branch weights do not match the plan "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
