"""Split rules on synthetic summary curves, including the paper's two published operating points."""

import json
import math

import pandas as pd
import pytest

from saturation.metrics import transition_layer
from saturation.recommend import RULES, clip_split, paper_offset, paper_split, recommend


def synthetic_summary(num_layers: int, image_transition: float, text_transition: float,
                      mass_plateau: int, width: float = 1.5) -> pd.DataFrame:
    """Sigmoid KL curves falling to 0 at the last layer, attention mass that falls then stays flat."""
    rows = []

    def add(metric, modality, values):
        for layer, v in enumerate(values):
            rows.append({"layer": layer, "modality": modality, "metric": metric, "median": v,
                         "q25": v * 0.9, "q75": v * 1.1})

    for modality, t in (("image", image_transition), ("text", text_transition)):
        raw = [1 / (1 + math.exp((layer - t) / width)) for layer in range(num_layers)]
        add("logit_lens_kl", modality, [8.0 * (r - raw[-1]) for r in raw])
    add("attention_mass", "image", [min(0.6, 0.1 + 0.125 * max(0, mass_plateau - layer)) for layer in range(num_layers)])
    add("attention_mass", "text", [0.3] * num_layers)
    add("cosine", "image", [min(0.8 + 0.02 * layer, 0.99) for layer in range(num_layers)])
    add("cosine", "text", [0.9] * num_layers)
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("num_layers", "transition", "split"), [(32, 22, 18), (40, 33, 28)])
def test_paper_rule_reproduces_the_papers_splits(num_layers, transition, split):
    """llava-1.5-7b: vision transition L22 of 32 -> s=18; llava-1.5-13b: L33 of 40 -> s=28."""
    summary = synthetic_summary(num_layers, transition, transition - 8, mass_plateau=12)
    kl = summary[(summary.metric == "logit_lens_kl") & (summary.modality == "image")]["median"].tolist()
    assert transition_layer(kl) == transition
    rec = recommend(summary, model="m", num_layers=num_layers)
    assert rec["split"] == split and rec["rule"] == "paper" and rec["num_layers"] == num_layers
    ev = rec["evidence"]
    assert ev["transition"]["image"] == transition and ev["offset"] == num_layers // 8
    assert ev["raw_paper_split"] == split and ev["alternatives"]["paper"] == split
    assert ev["cross_check"]["agrees"] and ev["attention_plateau_layer"] == 12
    json.dumps(rec, allow_nan=False)


def test_paper_offset_and_clipping():
    assert [paper_offset(n) for n in (6, 12, 20, 32, 40)] == [1, 2, 3, 4, 5]  # half-up: 12/8 = 1.5 -> 2
    assert clip_split(0, 12) == 1 and clip_split(11, 12) == 10 and clip_split(5, 12) == 5
    assert paper_split(1, 12) == 1  # an early transition never gives split 0


def test_every_rule_and_the_cross_check():
    summary = synthetic_summary(32, 22, 14, mass_plateau=24)
    recs = {rule: recommend(summary, model="m", num_layers=32, rule=rule) for rule in RULES}
    assert recs["paper"]["split"] == 18
    assert recs["attention"]["split"] == 24
    assert recs["conservative"]["split"] == 24
    assert recs["cosine"]["split"] == recs["paper"]["evidence"]["cosine_plateau_layer"]
    assert not recs["paper"]["evidence"]["cross_check"]["agrees"]
    assert "24" in recs["paper"]["evidence"]["cross_check"]["text"]
    assert recs["conservative"]["evidence"]["cross_check"]["agrees"]
    for rec in recs.values():  # every rule reports every alternative
        assert rec["evidence"]["alternatives"] == recs["paper"]["evidence"]["alternatives"]


def test_unknown_rule_and_too_few_layers():
    summary = synthetic_summary(8, 5, 3, mass_plateau=3)
    with pytest.raises(ValueError, match="unknown rule"):
        recommend(summary, model="m", num_layers=8, rule="magic")
    with pytest.raises(ValueError, match="at least 3"):
        recommend(summary, model="m", num_layers=2)
