"""Training curves: loss against step, one line per run, as a pure function of the log table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def loss_curve(logs: dict[str, pd.DataFrame], title: str = "side-branch training"):
    """A figure of ``loss`` vs ``step`` for each named log (columns as the HF Trainer logs them)."""
    fig, ax = plt.subplots(figsize=(5.0, 3.2), constrained_layout=True)
    for name, frame in logs.items():
        ax.plot(frame["step"], frame["loss"], label=name, lw=1.6)
    ax.set(xlabel="optimizer step", ylabel="training loss (nats / answer token)", title=title)
    ax.grid(alpha=0.3)
    if len(logs) > 1:
        ax.legend(frameon=False)
    return fig


def save_figure(fig, stem: Path) -> list[Path]:
    """Save `fig` as ``stem.png`` (150 dpi) and ``stem.pdf``; returns both paths."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths
