"""Split-layer rules: pure functions from the probe's summary (median curves) to a split and its evidence.

Layers are 0-based decoder-layer indices. A split s means layers 0..s-1 see every token and the image tokens
leave the main stack from layer s on (DPVR's LF variant). Which splits exist at all is `split_range`, the one
definition that routing's plan, split resolution and sweeps use too; the rules answer for the routing defaults
(K = 1 fusion layer, a side branch of depth 1), so every answer lies in [1, L-2].

Rules (``--rule``):

- ``auto`` (default): s = max(paper, min(text_done, image_ready)), where ``image_ready`` is the later of the
  layer by which the image tokens' logit-lens KL has completed 80% of its drop and the layer from which their
  adjacent cosine has settled (the ``cosine`` rule's plateau), and ``text_done`` is the text→image attention
  plateau, counted only when the attention has collapsed (its deep level is at most half its peak).
- ``paper``: s = L_trans(image) − round(L/8), L_trans the 50%-transition layer of the image-token
  logit-lens KL. At 32 layers this is the paper's "L_sat ≈ L_trans − 4"; depth-scaled it gives the paper's
  s=18 for llava-1.5-7b (L_trans 22) and s=28 for llava-1.5-13b (L_trans 33, 40 layers). round is half-up.
- ``attention``: the layer where text→image attention mass reaches its plateau (text has settled on how
  much it reads image tokens).
- ``cosine``: the layer where the image tokens' adjacent-layer cosine reaches its plateau (each layer then
  changes the image tokens about as little as the last ones do), the last layer left out: it is a fusion
  layer, sees the image anyway, and often rewrites everything for the output.
- ``conservative``: the latest split any other rule gives (image tokens stay longest in the main stack).

Why ``auto`` has this shape, and why it transfers across depths and models. Under LF, deep layers s..L-2
run without the image tokens, and the fusion layer reads them as the side branch left them, roughly as they
were at layer s + 1. That is harmless when either (a) text has stopped reading the image by s, the paper's
situation (LLaVA-1.5's text→image attention collapses and stays flat after L18 of 32), or (b) the image
tokens are already close to their final form at s, so what the fusion layer reads is nearly what the full
model's deep stack would have made of them. ``text_done`` measures (a) and ``image_ready`` (b); either is
enough, hence the min. 80% rather than the paper's 50% because the 50% point is too early for (b): on the
embedded model LF at its 50% transition (s=3) answers 0.80 against 0.996. The paper's rule stays as a floor (never split earlier than the paper would), hence the
max. Every term is a fraction of a curve's own range (80% of the KL drop, 10% plateau bands, half the
attention peak), never a layer number or an absolute level, so the rule reads a 12-layer and a 40-layer curve
alike. On the paper's curves (vision transition L22 of 32, attention flat after L18; L33 of 40) it gives the
paper's 18 and 28: (a) holds by then and the paper's floor decides. On the embedded 12-layer model (KL
50% transition at L3, attention hovering near uniform until the last layer) (a) never holds and (b) gives
L5, inside the range where LF matches vanilla (s = 4..10 measured by ``routing reproduce``), where the paper's
rule gives s=1 and a blind model. A model whose image tokens settle late and whose text keeps reading them
gets a late split: the rule gives up FLOPs before it gives up accuracy.

A plateau is the first layer from which a curve stays within 10% of its range (or an absolute floor: 0.01 of
attention probability, 0.005 of cosine) around its final level, the median of its last quarter of layers.

The cross-check reported with every rule: the split agrees with the attention view when text→image mass has
reached its plateau at or before the split. When the rules disagree by more than a few layers (round(L/8),
at least 2), the evidence says so and names the conservative choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd

from saturation.core.errors import ToolkitError

from .metrics import final_level, plateau_layer, transition_layer

TRANSITION_FRACTION = 0.5
SETTLED_FRACTION = 0.8  # auto: share of the image KL drop done before image tokens count as close to final
COLLAPSE_RATIO = 0.5  # auto: attention has collapsed when its deep level is at most this share of its peak
PLATEAU_TOLERANCE = 0.1  # share of the curve's range
PLATEAU_FLOOR = {"attention_mass": 0.01, "cosine": 0.005}  # absolute: changes smaller than this are noise


def split_range(num_layers: int, fusion_layers: int = 1, side_depth: int = 1, min_split: int = 1) -> range:
    """Every valid split s of an L-layer decoder with K fusion layers and a side branch of depth d_v.

    s ≥ 1 keeps a shallow stack; s ≤ L−K−1 keeps at least one deep layer before the fusion layers; s + d_v ≤ L
    leaves d_v layers to copy the side branch from. K = 0 (LF-ideal) allows s = L−1. Raises ToolkitError when
    K or d_v leave no split at all, naming the option to change. `min_split` (the adapter's; Qwen3-VL's DeepStack
    adds image features after its first layers) raises the lower end.
    """
    if fusion_layers < 0:
        raise ToolkitError(f"fusion layers K (--fusion-layers) must be >= 0 (got {fusion_layers})")
    if side_depth < 1:
        raise ToolkitError(f"side branch depth d_v (--side-depth) must be >= 1 (got {side_depth})")
    if fusion_layers > num_layers - 2:
        raise ToolkitError(f"K={fusion_layers} fusion layers leave no room for a split in a {num_layers}-layer model: "
                           f"K (--fusion-layers) must be at most {max(num_layers - 2, 0)}, so one shallow and one deep layer remain")
    if side_depth > num_layers - 1:
        raise ToolkitError(f"a side branch of depth {side_depth} leaves no room for a split in a {num_layers}-layer "
                           f"model: d_v (--side-depth) must be at most {num_layers - 1}")
    return range(min_split, min(num_layers - fusion_layers - 1, num_layers - side_depth) + 1)


def curve(summary: pd.DataFrame, metric: str, modality: str, stat: str = "median") -> list[float]:
    """One per-layer curve of the summary, ordered by layer."""
    rows = summary[(summary["metric"] == metric) & (summary["modality"] == modality)].sort_values("layer")
    if rows.empty:
        raise ValueError(f"the summary has no {metric}/{modality} rows")
    return [float(v) for v in rows[stat]]


def paper_offset(num_layers: int) -> int:
    """round(L/8), half-up: 4 at 32 layers, 5 at 40."""
    return math.floor(num_layers / 8 + 0.5)


def clip_split(split: int, num_layers: int, fusion_layers: int = 1, side_depth: int = 1) -> int:
    """Clip to `split_range` (with the defaults, [1, L-2])."""
    valid = split_range(num_layers, fusion_layers, side_depth)
    return int(min(max(split, valid.start), valid.stop - 1))


def paper_split(vision_transition: int, num_layers: int) -> int:
    """s = L_trans(vision) − round(L/8), clipped to [1, L−2]."""
    return clip_split(vision_transition - paper_offset(num_layers), num_layers)


def few_layers(num_layers: int) -> int:
    """How far rules may disagree before the probe says so: round(L/8), at least 2."""
    return max(2, paper_offset(num_layers))


def curve_evidence(summary: pd.DataFrame) -> dict:
    """Every number a rule may use: transitions, plateaus and the levels they were read from."""
    kl = {m: curve(summary, "logit_lens_kl", m) for m in ("image", "text")}
    mass = curve(summary, "attention_mass", "image")
    cos_image = curve(summary, "cosine", "image")
    mass_final = final_level(mass)
    ev = {
        "transition": {m: transition_layer(c, TRANSITION_FRACTION) for m, c in kl.items()},
        "transition_fraction": TRANSITION_FRACTION,
        "image_kl_settled_layer": transition_layer(kl["image"], SETTLED_FRACTION),
        "settled_fraction": SETTLED_FRACTION,
        "logit_lens_kl_peak": {m: max(c) for m, c in kl.items()},
        "logit_lens_kl_first_layer": {m: c[0] for m, c in kl.items()},
        "attention_plateau_layer": plateau_layer(mass, PLATEAU_TOLERANCE, floor=PLATEAU_FLOOR["attention_mass"]),
        "attention_collapsed": mass_final <= COLLAPSE_RATIO * max(mass),
        "collapse_ratio": COLLAPSE_RATIO,
        # the last layer is always a fusion layer: how much it still turns the image tokens says nothing
        # about whether they may leave the stack before it (and it often rewrites everything for the output)
        "cosine_plateau_layer": plateau_layer(cos_image[:-1], PLATEAU_TOLERANCE, floor=PLATEAU_FLOOR["cosine"]),
        "plateau_tolerance": PLATEAU_TOLERANCE,
        "plateau_floor": PLATEAU_FLOOR,
        "text_to_image_mass": {"first_layer": mass[0], "peak": max(mass), "final_level": mass_final,
                               "last_layer": mass[-1]},
        "image_cosine": {"first_layer": cos_image[0], "min": min(cos_image), "last_layer": cos_image[-1]},
    }
    if (summary["metric"] == "attention_mass_uniform").any():
        ev["text_to_image_mass"]["uniform"] = curve(summary, "attention_mass_uniform", "image")[0]
    if (summary["metric"] == "attention_mass_max_head").any():
        top = curve(summary, "attention_mass_max_head", "image")
        ev["text_to_image_mass"]["max_head_peak"] = max(top)
        ev["text_to_image_mass"]["max_head_peak_layer"] = top.index(max(top))
    return ev


# Each rule: (evidence, L) -> (split, which evidence decided, in words).


def _paper(ev: dict, num_layers: int) -> tuple[int, str]:
    t, off = ev["transition"]["image"], paper_offset(num_layers)
    return paper_split(t, num_layers), f"image logit-lens KL 50% transition L{t} - round(L/8) = {t - off}"


def _attention(ev: dict, num_layers: int) -> tuple[int, str]:
    return clip_split(ev["attention_plateau_layer"], num_layers), f"text->image attention plateau L{ev['attention_plateau_layer']}"


def _cosine(ev: dict, num_layers: int) -> tuple[int, str]:
    return clip_split(ev["cosine_plateau_layer"], num_layers), f"image cosine plateau L{ev['cosine_plateau_layer']}"


def _auto(ev: dict, num_layers: int) -> tuple[int, str]:
    paper, _ = _paper(ev, num_layers)
    kl, cos = ev["image_kl_settled_layer"], ev["cosine_plateau_layer"]
    ready = clip_split(max(kl, cos), num_layers)
    ready_text = (f"image tokens close to final by L{max(kl, cos)} (KL {SETTLED_FRACTION:.0%} of its drop by L{kl}, "
                  f"cosine settled by L{cos})")
    if ev["attention_collapsed"]:
        done = clip_split(ev["attention_plateau_layer"], num_layers)
        done_text = f"text->image attention collapsed and flat from L{ev['attention_plateau_layer']}"
        safe, safe_text = (done, done_text) if done <= ready else (ready, ready_text)
    else:
        safe, safe_text = ready, ready_text + "; text->image attention never collapses, so it cannot argue earlier"
    if paper >= safe:
        return paper, f"the paper rule ({_paper(ev, num_layers)[1]}), no earlier than: {safe_text}"
    return safe, f"{safe_text}; later than the paper rule's {paper}"


def _conservative(ev: dict, num_layers: int) -> tuple[int, str]:
    answers = {name: fn(ev, num_layers)[0] for name, fn in RULES.items() if name != "conservative"}
    latest = max(answers.values())
    return latest, "the latest of " + ", ".join(f"{k} {v}" for k, v in answers.items())


RULES: dict[str, Callable[[dict, int], tuple[int, str]]] = {
    "auto": _auto,
    "paper": _paper,
    "attention": _attention,
    "cosine": _cosine,
    "conservative": _conservative,
}
DEFAULT_RULE = "auto"
RULE_TEXT = {
    "auto": (f"s = max(paper, min(text_done, image_ready)); image_ready = later of image KL {SETTLED_FRACTION:.0%} "
             "of its drop and image cosine settled (last layer excluded); text_done = attention plateau if "
             f"attention collapses to <= {COLLAPSE_RATIO:g} of its peak; clipped to [1, L-2]"),
    "paper": "s = L_trans(image logit-lens KL, 50%) - round(L/8), clipped to [1, L-2]",
    "attention": "s = layer where text->image attention mass reaches its plateau, clipped to [1, L-2]",
    "cosine": "s = layer where image-token adjacent cosine reaches its plateau (last layer excluded), clipped to [1, L-2]",
    "conservative": "s = the latest split of any other rule",
}


def disagreement(alternatives: dict[str, int], rule: str, split: int, num_layers: int) -> dict | None:
    """None when every rule lands within a few layers of the others; else the spread, the conservative
    choice (the latest split) and one plain sentence saying both."""
    spread = max(alternatives.values()) - min(alternatives.values())
    if spread <= few_layers(num_layers):
        return None
    latest = max(alternatives.values())
    listed = ", ".join(f"{k} {v}" for k, v in alternatives.items())
    return {"spread": spread, "conservative": latest,
            "text": f"the rules disagree by {spread} layers ({listed}); '{rule}' chose s = {split}; the conservative "
                    f"choice is s = {latest} (--split {latest} or --rule conservative): image tokens stay in the "
                    "main stack longest, at the smallest FLOP saving"}


def per_sample_transitions(per_sample: pd.DataFrame, modality: str = "image") -> dict:
    """Median and IQR across samples of each sample's own logit-lens KL transition layer."""
    rows = per_sample[(per_sample["metric"] == "logit_lens_kl") & (per_sample["modality"] == modality)]
    layers = rows.sort_values("layer").groupby("sample")["value"].apply(lambda v: transition_layer(list(v)))
    q = layers.quantile([0.25, 0.5, 0.75])
    return {"median": float(q[0.5]), "q25": float(q[0.25]), "q75": float(q[0.75])}


def raise_to_min_split(split: int, alternatives: dict[str, int], min_split: int) -> tuple[int, dict, dict | None]:
    """``(split, alternatives, note)`` with every split raised to `min_split` (the backbone's first allowed split:
    Qwen3-VL's DeepStack still adds image features to layers 0..min_split-1); `note` says which rules were raised
    from what, in words, or is None when none was."""
    raised = {k: v for k, v in alternatives.items() if v < min_split}
    if not raised:
        return split, alternatives, None
    note = {"min_split": min_split, "raised": raised,
            "text": f"raised to s = {min_split}, the backbone's first allowed split (image features are still added "
                    f"to layers 0..{min_split - 1}, DeepStack): " + ", ".join(f"{k} {v}" for k, v in raised.items())}
    return max(split, min_split), {k: max(v, min_split) for k, v in alternatives.items()}, note


def recommend(summary: pd.DataFrame, *, model: str, num_layers: int, rule: str = DEFAULT_RULE, n: int | None = None,
              per_sample: pd.DataFrame | None = None, min_split: int = 1) -> dict:
    """``{"model", "num_layers", "split", "rule", "decided_by", "alternatives", "evidence"}``, JSON-ready.

    `alternatives` is every rule's split; `decided_by` says in words which evidence fixed this rule's answer.
    `evidence` holds every number any rule used, the attention cross-check and, when the rules disagree by
    more than a few layers, ``disagreement`` (else None); `per_sample`, if given, adds the spread of
    per-sample vision transitions. Every split is at least `min_split` (the backbone's, `Adapter.first_split`);
    ``evidence["min_split"]`` says which rules it raised (else None).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule '{rule}': use one of {', '.join(RULES)}")
    if num_layers < 3:
        raise ValueError(f"a split needs at least 3 decoder layers (got {num_layers})")
    valid = split_range(num_layers, min_split=min_split)
    if not valid:
        raise ToolkitError(f"no split exists in a {num_layers}-layer model whose first allowed split is {min_split}")
    ev = curve_evidence(summary)
    split, decided_by = RULES[rule](ev, num_layers)
    alternatives = {name: fn(ev, num_layers)[0] for name, fn in RULES.items()}
    split, alternatives, raised = raise_to_min_split(split, alternatives, min_split)
    if raised is not None and rule in raised["raised"]:
        decided_by += f"; {raised['text']}"
    plateau = ev["attention_plateau_layer"]
    ev |= {
        "min_split": raised,
        "offset": paper_offset(num_layers),
        "raw_paper_split": ev["transition"]["image"] - paper_offset(num_layers),
        "clip": [valid.start, valid.stop - 1],
        "alternatives": alternatives,
        "decided_by": decided_by,
        "cross_check": {
            "agrees": plateau <= split,
            "text": (f"text->image attention mass has plateaued by layer {plateau}, at or before the split"
                     if plateau <= split else
                     f"text->image attention mass is still changing until layer {plateau}, after the split; "
                     f"--rule conservative gives {alternatives['conservative']}"),
        },
        "disagreement": disagreement(alternatives, rule, split, num_layers),
    }
    if per_sample is not None:
        ev["per_sample_transition"] = {m: per_sample_transitions(per_sample, m) for m in ("image", "text")}
    if n is not None:
        ev["n"] = n
    ev["rule_definition"] = RULE_TEXT[rule]
    return {"model": model, "num_layers": num_layers, "split": int(split), "rule": rule, "decided_by": decided_by,
            "alternatives": _plain(alternatives), "evidence": _plain(ev)}


def _plain(obj):
    """Python scalars only, so json.dumps never meets numpy types."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item()
    return obj
