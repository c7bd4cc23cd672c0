"""Mechanism figure: fusion-layer text→image attention per head (routed vs vanilla) and shallow drift."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

COLOURS = {"vanilla": "#6E6E6E", "routed": "#D55E00"}


def mechanism_figure(fusion_attention: pd.DataFrame, shallow_drift: pd.DataFrame, title: str = ""):
    """(a) head-wise text→image mass at the last fusion layer, (b) routed-vs-vanilla cosine per shallow layer."""
    fig = Figure(figsize=(9.0, 3.2), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    layer = fusion_attention["layer"].max()
    heads = (fusion_attention[fusion_attention["layer"] == layer]
             .groupby(["model", "head"])["mass"].mean().unstack("model"))
    x = np.arange(len(heads))
    for i, model in enumerate(("vanilla", "routed")):
        ax.bar(x + (i - 0.5) * 0.4, heads[model], width=0.4, color=COLOURS[model],
               label=f"{model} (mean {heads[model].mean():.3f})")
    ax.set(xlabel="head", ylabel="text→image attention mass", title=f"(a) fusion layer {layer}")
    ax.set_xticks(x)
    ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if len(shallow_drift):
        per_layer = shallow_drift.groupby("layer")["cosine"]
        bx.plot(per_layer.median().index, per_layer.median(), "o-", color=COLOURS["routed"], label="median")
        bx.fill_between(per_layer.min().index, per_layer.min(), per_layer.max(), alpha=0.25,
                        color=COLOURS["routed"], label="min–max")
        lo = min(per_layer.min().min(), 1 - 1e-6)
        bx.set_ylim(lo - (1 - lo) * 0.5 - 1e-7, 1 + (1 - lo) * 0.5 + 1e-7)
        bx.legend(frameon=False, fontsize=8)
    bx.set(xlabel="shallow layer", ylabel="cos(routed, vanilla)", title="(b) shallow drift (must be 1)")
    bx.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
