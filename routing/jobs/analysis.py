"""Mechanism checks of a trained routed model against its vanilla base (the paper's Section 5).

- **Fusion-layer attention concentration**: at the fusion layer, how much attention text queries put on image
  keys, per head, routed vs vanilla (the paper: head-mean 0.388 vs 0.219, 1.77×).
- **Shallow drift**: cosine between routed and vanilla hidden states of layers 0..s−1, which must be 1 up to
  float noise: the shallow stack is frozen and shared.
"""

from __future__ import annotations

from contextlib import contextmanager

import pandas as pd
import torch
from torch import Tensor

from routing.plan import RoutingPlan
from saturation.core.data import PromptFormat, Record, collate, encode_prompt, image_inputs, to_model
from saturation.core.errors import ToolkitError
from saturation.metrics import masked_mean, token_cosine, token_groups
from saturation.probe import eager_attention


def per_head_mass(pattern: Tensor, query: Tensor, keys: Tensor) -> Tensor:
    """Attention mass of `query` positions on `keys`, per head, averaged over queries. [b,h,q,k] -> [b,h]."""
    on_keys = pattern.float() @ keys.to(torch.float32)[:, None, :, None]  # [b, h, q, 1]
    w = query.to(torch.float32)[:, None, :, None]
    return ((on_keys * w).sum(2) / w.sum(2)).squeeze(-1)


@contextmanager
def recording(anat, layers: list[int], hidden: dict, patterns: dict, groups: dict):
    """Forward hooks that keep, per layer, the residual output (real tokens only) and the per-head image mass."""
    def resid(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if h.shape[1] == groups["real"].shape[1]:  # full-sequence layers only (deep LF layers see text only)
                hidden[layer] = h.detach()
        return hook

    def pattern(layer):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is not None and weights.shape[-1] == groups["real"].shape[1]:
                patterns[layer] = per_head_mass(weights, groups["query"], groups["image"])
        return hook

    handles = [anat.layers[i].register_forward_hook(resid(i)) for i in layers]
    handles += [anat.attention(i).register_forward_hook(pattern(i)) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_analyzable(plan: RoutingPlan) -> None:
    """One line for a plan these checks do not apply to: they compare fusion layers, token for token, with vanilla."""
    if plan.prune is not None:
        raise ToolkitError(f"routing analyze compares the routed and vanilla runs token for token; plan {plan.spec} "
                           "prunes image tokens, so the two sequences differ (compare plans with `routing compare`)")
    if not plan.fusion_layers:
        raise ToolkitError(f"routing analyze reads the fusion layers' attention; plan {plan.spec} has none")


@torch.no_grad()
def mechanism(base, routed, processor, records: list[Record], batch_size: int = 16) -> dict[str, pd.DataFrame]:
    """``{"fusion_attention": per (model, layer, head) mass, "shallow_drift": per layer cosine}`` over `records`."""
    anat, plan = routed.adapter, routed.plan
    check_analyzable(plan)
    for r in records:  # the image-token masses and drifts below are undefined without image tokens
        if not r.images:
            raise ToolkitError(f"record {r.id}: no image; routing analyze measures image tokens, so a text-only "
                               f"record has nothing to measure (leave it out of --data)")
    fusion, shallow = list(plan.fusion), list(plan.shallow)
    heads, drift = [], []
    fmt = PromptFormat.of(anat)
    with eager_attention(base):
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            batch = collate([encode_prompt(r, processor, fmt=fmt) for r in chunk], processor.tokenizer.pad_token_id,
                            padding_side="left")
            batch = to_model(batch, base.device, base.dtype)
            image_mask = batch["input_ids"] == anat.image_token_id
            g = token_groups(batch["attention_mask"], image_mask) | {"real": batch["attention_mask"].bool()}
            runs = {}
            for name, net in (("vanilla", None), ("routed", routed)):
                hidden, patterns = {}, {}
                with recording(anat, shallow + fusion, hidden, patterns, g):
                    if net is None:
                        anat.forward(batch["input_ids"], batch["attention_mask"], **image_inputs(batch))
                    else:
                        net(**batch)
                runs[name] = (hidden, patterns)
                for layer in fusion:
                    for b, row in enumerate(patterns[layer].cpu()):
                        heads += [{"model": name, "layer": layer, "head": h, "sample": start + b, "mass": float(m)}
                                  for h, m in enumerate(row)]
            for layer in shallow:
                cos = masked_mean(token_cosine(runs["vanilla"][0][layer], runs["routed"][0][layer]), g["real"])
                drift += [{"layer": layer, "sample": start + b, "cosine": float(c)} for b, c in enumerate(cos.cpu())]
    return {"fusion_attention": pd.DataFrame(heads), "shallow_drift": pd.DataFrame(drift)}


def summarize(tables: dict[str, pd.DataFrame]) -> dict:
    """Head-mean mass per model at each fusion layer, the ratio, the top head, and the worst shallow cosine."""
    att = tables["fusion_attention"].groupby(["model", "layer", "head"])["mass"].mean().reset_index()
    out = {"fusion_layers": {}}
    for layer, rows in att.groupby("layer"):
        by_model = {m: r.set_index("head")["mass"] for m, r in rows.groupby("model")}
        routed, vanilla = by_model["routed"], by_model["vanilla"]
        out["fusion_layers"][int(layer)] = {
            "head_mean": {"routed": float(routed.mean()), "vanilla": float(vanilla.mean())},
            "ratio": float(routed.mean() / vanilla.mean()),
            "top_head": {"head": int(routed.idxmax()), "routed": float(routed.max()),
                         "vanilla": float(vanilla[routed.idxmax()])},
        }
    drift = tables["shallow_drift"]
    out["shallow_drift_min_cosine"] = float(drift["cosine"].min()) if len(drift) else None
    return out
