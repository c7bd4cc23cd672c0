"""Accuracy against cost for a list of routing plans (the paper's Figure 1b), a pure function of frontier.csv."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

REQUIRED = ("plan", "accuracy", "flops_ratio", "prefill_ratio")


def frontier(costs: list[float], accuracies: list[float]) -> list[bool]:
    """Which points no other point dominates (as cheap or cheaper AND as accurate or more, one strictly)."""
    points = list(zip(costs, accuracies))
    return [not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for c2, a2 in points) for c, a in points]


def pareto_figure(rows: pd.DataFrame, title: str = "") -> Figure:
    """Two panels: accuracy against the FLOP model's prefill ratio, and against the measured prefill ratio; each
    panel's Pareto frontier joined and its points filled. Rows whose accuracy is not a number are left out of the
    panels; when no row has one (geometry mode: random weights) the one panel is the measured prefill ratio against
    the FLOP model's, the diagonal marking where time follows FLOPs."""
    missing = [c for c in REQUIRED if c not in rows.columns]
    if missing:
        raise ValueError(f"frontier rows lack columns {missing}")
    data = rows.assign(accuracy=pd.to_numeric(rows["accuracy"], errors="coerce")).dropna(subset=["accuracy"])
    if data.empty:
        return _cost_figure(rows, title)
    fig = Figure(figsize=(9.0, 4.0), layout="constrained")
    for ax, column, label in zip(fig.subplots(1, 2, sharey=True), ("flops_ratio", "prefill_ratio"),
                                 ("prefill FLOPs / vanilla (FLOP model)", "prefill time / vanilla (measured)")):
        on = frontier(list(data[column]), list(data["accuracy"]))
        for (_, row), best in zip(data.iterrows(), on):
            ax.scatter(row[column], row["accuracy"], s=40, color="#0072B2" if best else "white",
                       edgecolors="#0072B2", zorder=3)
            ax.annotate(row["plan"], (row[column], row["accuracy"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        best = data[on].sort_values(column)
        ax.step(best[column], best["accuracy"], where="post", color="#0072B2", alpha=0.6)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("accuracy")
    if title:
        fig.suptitle(title)
    return fig


def _cost_figure(rows: pd.DataFrame, title: str) -> Figure:
    """One panel for rows without accuracy: measured prefill ratio against the FLOP model's, one point per plan."""
    fig = Figure(figsize=(5.0, 4.0), layout="constrained")
    ax = fig.subplots()
    x = pd.to_numeric(rows["flops_ratio"], errors="coerce")
    y = pd.to_numeric(rows["prefill_ratio"], errors="coerce")
    ax.scatter(x, y, s=40, color="#0072B2", zorder=3)
    for plan, xi, yi in zip(rows["plan"], x, y):
        ax.annotate(plan, (xi, yi), fontsize=7, xytext=(4, 3), textcoords="offset points")
    finite = pd.concat([x, y]).dropna()
    top = max(1.0, float(finite.max())) if len(finite) else 1.0
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="time follows FLOPs")
    ax.set_xlabel("prefill FLOPs / vanilla (FLOP model)")
    ax.set_ylabel("prefill time / vanilla (measured)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title("accuracy n/a (random weights)", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig
