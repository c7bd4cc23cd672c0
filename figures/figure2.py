"""Figure 2 of the paper from the probe's ``summary.csv``: three panels, image vs text, split marked.

A pure function of the summary table (columns ``layer, modality, metric, median, q25, q75``); it imports
nothing from the model packages. Medians are lines, the interquartile range across samples is a band.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .io import save_figure

COLOURS = {"image": "#D55E00", "text": "#0072B2", "bos": "#6E6E6E"}  # colour-blind safe (Okabe-Ito)
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text
}
REQUIRED = {"layer", "modality", "metric", "median", "q25", "q75"}


def read_summary(summary: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """The summary as a DataFrame, checked for the columns the figure needs."""
    df = summary if isinstance(summary, pd.DataFrame) else pd.read_csv(summary)
    missing = REQUIRED - set(df.columns)
    if missing:
        raise ValueError(f"summary lacks columns: {', '.join(sorted(missing))}")
    return df


def _series(df: pd.DataFrame, metric: str, modality: str) -> pd.DataFrame | None:
    rows = df[(df["metric"] == metric) & (df["modality"] == modality)].sort_values("layer")
    return None if rows.empty else rows


def _band(ax, rows: pd.DataFrame, colour: str, label: str, **line) -> None:
    ax.fill_between(rows["layer"], rows["q25"], rows["q75"], color=colour, alpha=0.18, linewidth=0)
    ax.plot(rows["layer"], rows["median"], color=colour, label=label, linewidth=1.6, **line)


def figure2(summary: pd.DataFrame | str | os.PathLike, *, model: str, n: int, split: int | None = None,
            transitions: dict[str, int] | None = None, note: str | None = None) -> Figure:
    """Draw Figure 2: (a) adjacent-layer cosine, (b) attention mass of text queries, (c) logit-lens KL.

    `split` draws a dashed vertical line at that layer in every panel; `transitions` ({"image": l, ...})
    marks each modality's 50% KL transition in panel (c); `note` is a footnote under the panels.
    """
    df = read_summary(summary)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(11.0, 3.6), layout="constrained")
        axes = fig.subplots(1, 3)
        _cosine_panel(axes[0], df)
        _attention_panel(axes[1], df)
        _kl_panel(axes[2], df, transitions or {})
        layers = df["layer"]
        for ax in axes:
            ax.set_xlabel("decoder layer ℓ")
            ax.set_xlim(layers.min(), layers.max())
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.25, linewidth=0.6)
            if split is not None:
                ax.axvline(split, color="black", linestyle="--", linewidth=1.1)
                _tag(ax, split, f"s={split}", "black")
        handles = [Line2D([], [], color=COLOURS[m], linewidth=2, label=f"{m} tokens (median, IQR band)")
                   for m in ("image", "text")]
        if split is not None:
            handles.append(Line2D([], [], color="black", linestyle="--", label=f"recommended split s = {split}"))
        if transitions:
            handles.append(Line2D([], [], color="#444444", linestyle=":", label="50% KL transition"))
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), frameon=False)
        fig.suptitle(f"Saturation probe — {model}, n = {n}", fontsize=11)
        if note:
            fig.text(0.5, -0.075, note, ha="center", va="top", fontsize=7.5, style="italic")
    return fig


def _tag(ax, x: float, text: str, colour: str) -> None:
    """A small label at the top of a vertical line."""
    ax.annotate(text, xy=(x, 0.0), xycoords=("data", "axes fraction"), xytext=(2, 2), textcoords="offset points",
                ha="left", va="bottom", fontsize=7.5, color=colour)


def _cosine_panel(ax, df: pd.DataFrame) -> None:
    for modality in ("image", "text"):
        rows = _series(df, "cosine", modality)
        if rows is not None:
            _band(ax, rows, COLOURS[modality], f"{modality} tokens")
    ax.set_title("(a) adjacent-layer cosine")
    ax.set_ylabel("cos(h$_ℓ$, h$_{ℓ+1}$)")


def _attention_panel(ax, df: pd.DataFrame) -> None:
    for modality, label in (("image", "text→image"), ("text", "text→text"), ("bos", "text→BOS")):
        rows = _series(df, "attention_mass", modality)
        if rows is not None:
            _band(ax, rows, COLOURS[modality], label, linestyle=":" if modality == "bos" else "-")
    top = _series(df, "attention_mass_max_head", "image")
    if top is not None:
        ax.plot(top["layer"], top["median"], color=COLOURS["image"], linestyle="--", linewidth=1.0,
                label="text→image, top head")
    uniform = _series(df, "attention_mass_uniform", "image")
    if uniform is not None:
        ax.plot(uniform["layer"], uniform["median"], color="#999999", linestyle="-.", linewidth=0.9,
                label="text→image if uniform")
    top_value = max(float(df[df["metric"].str.startswith("attention_mass")]["q75"].max()), 0.1)
    ax.set_ylim(0, min(1.0, top_value) * 1.45)  # headroom for the legend
    ax.legend(loc="upper center", ncol=2, fontsize=7, frameon=True, framealpha=0.9, edgecolor="none")
    ax.set_title("(b) attention mass of text queries")
    ax.set_ylabel("attention probability")


def _kl_panel(ax, df: pd.DataFrame, transitions: dict[str, int]) -> None:
    for modality in ("image", "text"):
        rows = _series(df, "logit_lens_kl", modality)
        if rows is not None:
            _band(ax, rows, COLOURS[modality], f"{modality} tokens")
        if modality in transitions:
            ax.axvline(transitions[modality], color=COLOURS[modality], linestyle=":", linewidth=1.3)
            y = 0.9 if modality == "image" else 0.8
            ax.annotate(f"{modality} ℓ={transitions[modality]}", xy=(transitions[modality], y),
                        xycoords=("data", "axes fraction"), xytext=(2, 0), textcoords="offset points",
                        fontsize=7.5, color=COLOURS[modality])
    ax.set_ylim(bottom=0)
    ax.set_title("(c) logit-lens KL")
    ax.set_ylabel("KL(p$_{final}$ ‖ p$_ℓ$)  [nats]")


def save_figure2(summary: pd.DataFrame | str | os.PathLike, out_dir: str | os.PathLike, *, stem: str = "figure2",
                 **kwargs) -> list[Path]:
    """Draw `figure2` and write ``{stem}.png`` (200 dpi) and ``{stem}.pdf`` into `out_dir`, each atomically."""
    return save_figure(figure2(summary, **kwargs), Path(out_dir) / stem)


def figure2_from_dir(probe_dir: str | os.PathLike, note: str | None = None) -> list[Path]:
    """Redraw Figure 2 from a probe output folder (``summary.csv`` + ``recommendation.json``)."""
    d = Path(probe_dir)
    rec = json.loads((d / "recommendation.json").read_text())
    ev = rec.get("evidence", {})
    note = note if note is not None else ev.get("caveat")
    return save_figure2(d / "summary.csv", d, model=rec.get("display_name", rec["model"]), n=ev.get("n", 0), split=rec.get("split"),
                        transitions=ev.get("transition"), note=note)
