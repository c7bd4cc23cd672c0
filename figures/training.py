"""Training curves: loss against step, one line per run, as a pure function of the log table."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure


def loss_curve(logs: dict[str, pd.DataFrame], title: str = "side-branch training"):
    """A figure of ``loss`` vs ``step`` for each named log (columns as the HF Trainer logs them)."""
    fig = Figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.subplots()
    for name, frame in logs.items():
        ax.plot(frame["step"], frame["loss"], label=name, lw=1.6)
    ax.set(xlabel="optimizer step", ylabel="training loss (nats / answer token)", title=title)
    ax.grid(alpha=0.3)
    if len(logs) > 1:
        ax.legend(frameon=False)
    return fig
