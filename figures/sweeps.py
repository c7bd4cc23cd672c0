"""Accuracy sweeps (the paper's Figure 4): accuracy against a routing knob, with the FLOPs ratio beside it."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure


def sweep_figure(frame: pd.DataFrame, x: str, *, reference: float | None = None, chosen: int | None = None,
                 xlabel: str | None = None, title: str = ""):
    """Accuracy (left axis) and prefill FLOPs ratio (right axis) against column `x` of `frame`.

    `reference` draws a horizontal line (e.g. vanilla accuracy); `chosen` marks the recommended value.
    """
    fig = Figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(frame[x], frame["accuracy"], "o-", color="#0072B2", lw=1.8, label="LF accuracy")
    if reference is not None:
        ax.axhline(reference, color="#6E6E6E", ls=":", lw=1.2, label="vanilla")
    if chosen is not None:
        ax.axvline(chosen, color="#D55E00", ls="--", lw=1.2, label="recommended")
    ax.set(xlabel=xlabel or x, ylabel="held-out accuracy", title=title)
    ax.set_xticks(list(frame[x]))
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(frame[x], frame["flops_ratio"], "s--", color="#009E73", lw=1.2, ms=4, label="FLOPs ratio")
    twin.set_ylabel("prefill FLOPs / vanilla", color="#009E73")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, frameon=False, fontsize=8, loc="lower left")
    return fig
