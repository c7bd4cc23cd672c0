"""Latency against text length (the paper's Table 8 as a plot), as a pure function of the benchmark's rows."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

COLOURS = {"vanilla": "#3A3A3A", "lf": "#0072B2", "pc": "#D55E00", "kv": "#009E73", "lf-ideal": "#CC79A7"}
REQUIRED = ("text_tokens", "model", "prefill_ms", "decode_ms", "prefill_ratio", "decode_ratio", "prefill_theory",
            "decode_theory")


def latency_figure(rows: pd.DataFrame, title: str = ""):
    """Four panels over text length: prefill ms and decode ms/token per model (median, IQR bars), then the
    prefill and decode ratios to vanilla per variant, measured (solid) beside the FLOP model's (dashed).

    `rows`: one row per (text_tokens, model) with the columns of ``routing.jobs.bench.rows_of`` (``*_q1``/``*_q3``
    columns are optional).
    """
    missing = [c for c in REQUIRED if c not in rows.columns]
    if missing:
        raise ValueError(f"latency rows lack columns {missing}")
    fig = Figure(figsize=(9.0, 6.0), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    ticks = sorted(rows["text_tokens"].unique())
    for name, frame in rows.groupby("model", sort=False):
        frame = frame.sort_values("text_tokens")
        colour = COLOURS.get(name)
        for ax, kind in zip(axes[0], ("prefill", "decode")):
            ax.errorbar(frame["text_tokens"], frame[f"{kind}_ms"], yerr=_iqr(frame, f"{kind}_ms"), color=colour,
                        marker="o", ms=4, lw=1.6, capsize=2, label=name)
        if name == "vanilla":
            continue
        for ax, kind in zip(axes[1], ("prefill", "decode")):
            ax.errorbar(frame["text_tokens"], frame[f"{kind}_ratio"], yerr=_iqr(frame, f"{kind}_ratio"),
                        color=colour, marker="o", ms=4, lw=1.6, capsize=2, label=f"{name} measured")
            ax.plot(frame["text_tokens"], frame[f"{kind}_theory"], color=colour, ls="--", lw=1.2,
                    label=f"{name} FLOP model")
    axes[0][0].set(ylabel="prefill (ms)", title="prefill latency")
    axes[0][1].set(ylabel="decode (ms / token)", title="decode latency (KV cache)")
    axes[1][0].set(ylabel="prefill / vanilla", title="prefill ratio")
    axes[1][1].set(ylabel="decode / vanilla", title="decode ratio")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.axhline(1.0, color=COLOURS["vanilla"], lw=0.8, ls=":")
        ax.set_xlabel("text tokens")
    axes[0][0].legend(frameon=False, fontsize=8)
    axes[1][0].legend(frameon=False, fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _iqr(frame: pd.DataFrame, column: str):
    """Asymmetric error bars from the quartile columns, or None when they are absent."""
    if f"{column}_q1" not in frame or f"{column}_q3" not in frame:
        return None
    return [(frame[column] - frame[f"{column}_q1"]).clip(lower=0), (frame[f"{column}_q3"] - frame[column]).clip(lower=0)]
