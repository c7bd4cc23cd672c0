"""Save and load a routing: only what is new (the side branch and the plan), rebuilt on its base model.

A routing directory holds::

    side_branch.safetensors   the side-branch weights (d_v decoder layers)
    routing.json              split, variant, K, d_v, base model id + geometry + weight fingerprint, toolkit version
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saturation import __version__ as toolkit_version
from saturation.anatomy import anatomy
from saturation.errors import ToolkitError

WEIGHTS = "side_branch.safetensors"
MANIFEST = "routing.json"
FORMAT = "dpvr-routing/1"


def base_geometry(model) -> dict:
    """The base facts a side branch depends on: a routing saved on one geometry cannot run on another."""
    a = anatomy(model)
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

    Sampled at fixed strided indices of each layer's query projection; stable across dtypes up to rounding.
    """
    a = anatomy(model)
    values = []
    for i in layers:
        w = a.attention(i).q_proj.weight.detach().reshape(-1)
        step = max(1, w.numel() // 16)
        values += w[::step][:16].float().cpu().tolist()
    return values


def _base_id(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def save_routing(routed, directory) -> Path:
    """Write `routed`'s side branch and plan under `directory` (created if needed). Returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plan = routed.plan
    state = {k: v.detach().contiguous().cpu() for k, v in routed.side.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    manifest = {
        "format": FORMAT,
        "variant": plan.variant,
        "split": plan.split,
        "fusion_layers": plan.fusion_layers,
        "side_depth": plan.side_depth,
        "num_layers": plan.num_layers,
        "base_model": _base_id(routed.base),
        "base_geometry": base_geometry(routed.base),
        "base_fingerprint": base_fingerprint(routed.base, plan.side_sources),
        "trainable_parameters": routed.trainable_parameters().trainable,
        "dtype": str(next(routed.side.parameters()).dtype).removeprefix("torch."),
        "toolkit_version": toolkit_version,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file() or not (Path(directory) / WEIGHTS).is_file():
        raise ToolkitError(f"'{directory}' is not a routing directory: it needs {MANIFEST} and {WEIGHTS}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ToolkitError(f"{path}: unknown routing format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def check_base(model, manifest: dict, where: str) -> None:
    """Refuse a base that is not the one the routing was trained on, with one line saying what differs."""
    saved_id, base_id = manifest.get("base_model", ""), _base_id(model)
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


def load(model, directory):
    """Rebuild a saved routing on `model`; refuses a mismatched base with a `ToolkitError`."""
    from .model import build

    manifest = read_manifest(directory)
    check_base(model, manifest, f"'{directory}'")
    routed = build(model, manifest["split"], manifest["variant"], manifest["fusion_layers"], manifest["side_depth"])
    state = load_file(str(Path(directory) / WEIGHTS))
    missing, unexpected = routed.side.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ToolkitError(f"routing '{directory}': side-branch weights do not match the plan "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return routed
