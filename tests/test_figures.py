"""Figure 2 is a pure function of the summary table, and `figures` stands apart from the model packages."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from figures.figure2 import figure2, figure2_from_dir, save_figure2


def summary(num_layers: int = 8) -> pd.DataFrame:
    rows = []
    curves = {
        ("cosine", "image"): lambda layer: 0.7 + 0.03 * layer,
        ("cosine", "text"): lambda layer: 0.8 + 0.01 * layer,
        ("attention_mass", "image"): lambda layer: 0.5 - 0.05 * layer,
        ("attention_mass", "text"): lambda layer: 0.3 + 0.04 * layer,
        ("attention_mass", "bos"): lambda layer: 0.2 + 0.01 * layer,
        ("attention_mass_max_head", "image"): lambda layer: 0.9 - 0.05 * layer,
        ("attention_mass_uniform", "image"): lambda layer: 0.45,
        ("logit_lens_kl", "image"): lambda layer: 6.0 * (num_layers - 1 - layer) / (num_layers - 1),
        ("logit_lens_kl", "text"): lambda layer: 3.0 * (num_layers - 1 - layer) / (num_layers - 1),
    }
    for (metric, modality), f in curves.items():
        for layer in range(num_layers):
            v = f(layer)
            rows.append({"layer": layer, "modality": modality, "metric": metric, "median": v, "q25": v * 0.9,
                         "q75": v * 1.1})
    return pd.DataFrame(rows)


def test_three_panels_with_split_titles_and_legends():
    fig = figure2(summary(), model="llava-1.5-7b", n=500, split=3, transitions={"image": 5, "text": 2})
    axes = fig.get_axes()
    assert len(axes) == 3
    assert "llava-1.5-7b" in fig.get_suptitle() and "n = 500" in fig.get_suptitle()
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert any(list(line.get_xdata()) == [3, 3] and line.get_linestyle() == "--" for line in ax.get_lines())
    assert len(axes[1].get_legend().get_texts()) == 5  # text->image, text->text, BOS, top head, uniform
    assert len(fig.legends) == 1  # the shared legend: image, text, split, transition
    image_line = axes[2].get_lines()[0]
    assert list(image_line.get_ydata())[-1] == 0.0


def test_save_writes_png_and_pdf(tmp_path):
    csv = tmp_path / "summary.csv"
    summary().to_csv(csv, index=False)
    paths = save_figure2(csv, tmp_path, model="m", n=4, split=2)
    assert [p.name for p in paths] == ["figure2.png", "figure2.pdf"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"
    assert not list(tmp_path.glob(".*tmp"))


def test_redraw_from_a_probe_folder(tmp_path):
    summary().to_csv(tmp_path / "summary.csv", index=False)
    rec = {"model": "/x/tiny-llava", "display_name": "tiny-llava", "num_layers": 8, "split": 3, "rule": "paper",
           "evidence": {"n": 9, "transition": {"image": 5, "text": 2}, "caveat": "a note"}}
    (tmp_path / "recommendation.json").write_text(json.dumps(rec))
    assert len(figure2_from_dir(tmp_path)) == 2


def test_missing_columns_are_reported():
    with pytest.raises(ValueError, match="q75"):
        figure2(summary().drop(columns=["q75"]), model="m", n=1)


def test_figures_imports_no_model_package():
    code = "import sys, figures.figure2; assert not {'saturation', 'routing'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
