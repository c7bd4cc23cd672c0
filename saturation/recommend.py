"""Split-layer rules: pure functions from the probe's summary (median curves) to a split and its evidence.

Layers are 0-based decoder-layer indices. A split s means layers 0..s-1 see every token and the image tokens
leave the main stack from layer s on (DPVR's LF variant). Every rule's answer is clipped to [1, L-2], so at
least one shared layer and one deep layer remain.

Rules (``--rule``):

- ``paper`` (default): s = L_trans(image) − round(L/8), L_trans the 50%-transition layer of the image-token
  logit-lens KL. At 32 layers this is the paper's "L_sat ≈ L_trans − 4"; depth-scaled it gives the paper's
  s=18 for llava-1.5-7b (L_trans 22) and s=28 for llava-1.5-13b (L_trans 33, 40 layers). round is half-up.
- ``attention``: the layer where text→image attention mass reaches its plateau (text has settled on how
  much it reads image tokens).
- ``cosine``: the layer where the image tokens' adjacent-layer cosine reaches its plateau (each layer then
  changes the image tokens about as little as the last ones do).
- ``conservative``: the later of ``paper`` and ``attention``, so text has stopped changing how much it reads
  the image before the image tokens leave.

A plateau is the first layer from which a curve stays within 10% of its range (or an absolute floor: 0.01 of
attention probability, 0.005 of cosine) around its final level, the median of its last quarter of layers.

The cross-check reported with every rule: the split agrees with the attention view when text→image mass has
reached its plateau at or before the split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd

from .metrics import plateau_layer, transition_layer

TRANSITION_FRACTION = 0.5
PLATEAU_TOLERANCE = 0.1  # share of the curve's range
PLATEAU_FLOOR = {"attention_mass": 0.01, "cosine": 0.005}  # absolute: changes smaller than this are noise


def curve(summary: pd.DataFrame, metric: str, modality: str, stat: str = "median") -> list[float]:
    """One per-layer curve of the summary, ordered by layer."""
    rows = summary[(summary["metric"] == metric) & (summary["modality"] == modality)].sort_values("layer")
    if rows.empty:
        raise ValueError(f"the summary has no {metric}/{modality} rows")
    return [float(v) for v in rows[stat]]


def paper_offset(num_layers: int) -> int:
    """round(L/8), half-up: 4 at 32 layers, 5 at 40."""
    return math.floor(num_layers / 8 + 0.5)


def clip_split(split: int, num_layers: int) -> int:
    """Clip to [1, L-2]."""
    return int(min(max(split, 1), num_layers - 2))


def paper_split(vision_transition: int, num_layers: int) -> int:
    """s = L_trans(vision) − round(L/8), clipped to [1, L−2]."""
    return clip_split(vision_transition - paper_offset(num_layers), num_layers)


def curve_evidence(summary: pd.DataFrame) -> dict:
    """Every number a rule may use: transitions, plateaus and the levels they were read from."""
    kl = {m: curve(summary, "logit_lens_kl", m) for m in ("image", "text")}
    mass = curve(summary, "attention_mass", "image")
    cos_image = curve(summary, "cosine", "image")
    ev = {
        "transition": {m: transition_layer(c, TRANSITION_FRACTION) for m, c in kl.items()},
        "transition_fraction": TRANSITION_FRACTION,
        "logit_lens_kl_peak": {m: max(c) for m, c in kl.items()},
        "logit_lens_kl_first_layer": {m: c[0] for m, c in kl.items()},
        "attention_plateau_layer": plateau_layer(mass, PLATEAU_TOLERANCE, floor=PLATEAU_FLOOR["attention_mass"]),
        "cosine_plateau_layer": plateau_layer(cos_image, PLATEAU_TOLERANCE, floor=PLATEAU_FLOOR["cosine"]),
        "plateau_tolerance": PLATEAU_TOLERANCE,
        "plateau_floor": PLATEAU_FLOOR,
        "text_to_image_mass": {"first_layer": mass[0], "peak": max(mass), "last_layer": mass[-1]},
        "image_cosine": {"first_layer": cos_image[0], "min": min(cos_image), "last_layer": cos_image[-1]},
    }
    if (summary["metric"] == "attention_mass_uniform").any():
        ev["text_to_image_mass"]["uniform"] = curve(summary, "attention_mass_uniform", "image")[0]
    if (summary["metric"] == "attention_mass_max_head").any():
        top = curve(summary, "attention_mass_max_head", "image")
        ev["text_to_image_mass"]["max_head_peak"] = max(top)
        ev["text_to_image_mass"]["max_head_peak_layer"] = top.index(max(top))
    return ev


def _paper(ev: dict, num_layers: int) -> int:
    return paper_split(ev["transition"]["image"], num_layers)


def _attention(ev: dict, num_layers: int) -> int:
    return clip_split(ev["attention_plateau_layer"], num_layers)


def _cosine(ev: dict, num_layers: int) -> int:
    return clip_split(ev["cosine_plateau_layer"], num_layers)


def _conservative(ev: dict, num_layers: int) -> int:
    return max(_paper(ev, num_layers), _attention(ev, num_layers))


RULES: dict[str, Callable[[dict, int], int]] = {
    "paper": _paper,
    "attention": _attention,
    "cosine": _cosine,
    "conservative": _conservative,
}
RULE_TEXT = {
    "paper": "s = L_trans(image logit-lens KL, 50%) - round(L/8), clipped to [1, L-2]",
    "attention": "s = layer where text->image attention mass reaches its plateau, clipped to [1, L-2]",
    "cosine": "s = layer where image-token adjacent cosine reaches its plateau, clipped to [1, L-2]",
    "conservative": "s = max(paper, attention)",
}


def per_sample_transitions(per_sample: pd.DataFrame, modality: str = "image") -> dict:
    """Median and IQR across samples of each sample's own logit-lens KL transition layer."""
    rows = per_sample[(per_sample["metric"] == "logit_lens_kl") & (per_sample["modality"] == modality)]
    layers = rows.sort_values("layer").groupby("sample")["value"].apply(lambda v: transition_layer(list(v)))
    q = layers.quantile([0.25, 0.5, 0.75])
    return {"median": float(q[0.5]), "q25": float(q[0.25]), "q75": float(q[0.75])}


def recommend(summary: pd.DataFrame, *, model: str, num_layers: int, rule: str = "paper", n: int | None = None,
              per_sample: pd.DataFrame | None = None) -> dict:
    """``{"model", "num_layers", "split", "rule", "evidence"}``, JSON-ready.

    `evidence` holds every number any rule used, each rule's split (``alternatives``) and the attention
    cross-check; `per_sample`, if given, adds the spread of per-sample vision transitions.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule '{rule}': use one of {', '.join(RULES)}")
    if num_layers < 3:
        raise ValueError(f"a split needs at least 3 decoder layers (got {num_layers})")
    ev = curve_evidence(summary)
    split = RULES[rule](ev, num_layers)
    plateau = ev["attention_plateau_layer"]
    ev |= {
        "offset": paper_offset(num_layers),
        "raw_paper_split": ev["transition"]["image"] - paper_offset(num_layers),
        "clip": [1, num_layers - 2],
        "alternatives": {name: fn(ev, num_layers) for name, fn in RULES.items()},
        "cross_check": {
            "agrees": plateau <= split,
            "text": (f"text->image attention mass has plateaued by layer {plateau}, at or before the split"
                     if plateau <= split else
                     f"text->image attention mass is still changing until layer {plateau}, after the split; "
                     f"--rule conservative gives {_conservative(ev, num_layers)}"),
        },
    }
    if per_sample is not None:
        ev["per_sample_transition"] = {m: per_sample_transitions(per_sample, m) for m in ("image", "text")}
    if n is not None:
        ev["n"] = n
    ev["rule_definition"] = RULE_TEXT[rule]
    return {"model": model, "num_layers": num_layers, "split": int(split), "rule": rule, "evidence": _plain(ev)}


def _plain(obj):
    """Python scalars only, so json.dumps never meets numpy types."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item()
    return obj
