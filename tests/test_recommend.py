"""Split rules on synthetic summary curves (the paper's two operating points) and on the embedded model."""

import json
import math

import pandas as pd
import pytest

from saturation.metrics import final_level, plateau_layer, transition_layer
from saturation.recommend import (
    DEFAULT_RULE,
    RULES,
    clip_split,
    disagreement,
    few_layers,
    paper_offset,
    paper_split,
    recommend,
)

# LF within 0.05 of vanilla on the embedded model: `routing reproduce`'s split sweep (README, "Measured here")
EMBEDDED_WORKING_SPLITS = range(4, 11)


def _frame(curves: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    rows = [{"layer": layer, "modality": modality, "metric": metric, "median": v, "q25": v * 0.9, "q75": v * 1.1}
            for (metric, modality), values in curves.items() for layer, v in enumerate(values)]
    return pd.DataFrame(rows)


def _sigmoid_kl(num_layers: int, transition: float, width: float) -> list[float]:
    """A logit-lens KL that falls around `transition` and is 0 at the last layer, as KL(p_final ‖ p_L-1) is."""
    raw = [1 / (1 + math.exp((layer - transition) / width)) for layer in range(num_layers)]
    return [8.0 * (r - raw[-1]) for r in raw]


def synthetic_summary(num_layers: int, image_transition: float, text_transition: float,
                      mass_plateau: int, width: float = 1.5) -> pd.DataFrame:
    """Sigmoid KL curves falling to 0 at the last layer, attention mass that falls then stays flat."""
    return _frame({
        ("logit_lens_kl", "image"): _sigmoid_kl(num_layers, image_transition, width),
        ("logit_lens_kl", "text"): _sigmoid_kl(num_layers, text_transition, width),
        ("attention_mass", "image"): [min(0.6, 0.1 + 0.125 * max(0, mass_plateau - layer)) for layer in range(num_layers)],
        ("attention_mass", "text"): [0.3] * num_layers,
        ("cosine", "image"): [min(0.8 + 0.02 * layer, 0.99) for layer in range(num_layers)],
        ("cosine", "text"): [0.9] * num_layers,
    })


def figure2_summary(num_layers: int, image_transition: int, attention_flat_from: int) -> pd.DataFrame:
    """The paper's Figure 2 as curves: image-token KL transition at `image_transition`, text one layer later,
    image adjacent cosine >= 0.92 from layer 0 (rising towards 0.99, a dip at the last layer), and text->image
    attention that falls from 0.55 to an asymptote of 0.08 at `attention_flat_from` (with +-0.005 wiggle)."""
    falling = [0.55 - (0.55 - 0.08) * layer / attention_flat_from for layer in range(attention_flat_from)]
    flat = [0.08 + 0.005 * (-1) ** layer for layer in range(attention_flat_from, num_layers)]
    cosine = [0.92 + 0.07 * (1 - math.exp(-layer / 4)) for layer in range(num_layers)]
    cosine[-1] = 0.85  # the last layer rewrites everything for the output; it must not move the answer
    return _frame({
        ("logit_lens_kl", "image"): _sigmoid_kl(num_layers, image_transition, 2.0),
        ("logit_lens_kl", "text"): _sigmoid_kl(num_layers, image_transition + 1, 2.0),
        ("attention_mass", "image"): falling + flat,
        ("attention_mass", "text"): [0.3] * num_layers,
        ("cosine", "image"): cosine,
        ("cosine", "text"): [0.9] * num_layers,
    })


# llava-1.5-7b: vision transition L22 of 32, attention flat after L18 -> s=18; llava-1.5-13b: L33 of 40 -> s=28,
# its attention asymptote taken at the same depth share (18/32 of 40 layers = L22.5 -> L23)
PAPER_CURVES = [(32, 22, 18, 18), (40, 33, 23, 28)]


@pytest.mark.parametrize("rule", ["paper", "auto"])
@pytest.mark.parametrize(("num_layers", "transition", "flat_from", "split"), PAPER_CURVES)
def test_paper_and_auto_rules_reproduce_the_papers_splits(rule, num_layers, transition, flat_from, split):
    summary = figure2_summary(num_layers, transition, flat_from)
    kl = summary[(summary.metric == "logit_lens_kl") & (summary.modality == "image")]["median"].tolist()
    cos = summary[(summary.metric == "cosine") & (summary.modality == "image")]["median"]
    mass = summary[(summary.metric == "attention_mass") & (summary.modality == "image")]["median"].tolist()
    assert transition_layer(kl) == transition and cos.min() >= 0.92 - 0.08  # only the last layer dips
    # a linear fall enters the plateau band (10% of the range) a few layers before it is flat
    assert flat_from - 3 <= plateau_layer(mass, 0.1, floor=0.01) <= flat_from
    rec = recommend(summary, model="m", num_layers=num_layers, rule=rule)
    assert rec["split"] == split and rec["rule"] == rule and rec["num_layers"] == num_layers
    ev = rec["evidence"]
    assert ev["transition"] == {"image": transition, "text": transition + 1}
    assert rec["alternatives"]["paper"] == rec["alternatives"]["auto"] == split == ev["alternatives"]["paper"]
    assert ev["attention_collapsed"] and ev["cross_check"]["agrees"]
    json.dumps(rec, allow_nan=False)


def test_paper_rule_is_the_papers_formula():
    """s = L_trans − round(L/8): pinned on the older sigmoid curves too (attention plateau L12)."""
    for num_layers, transition, split in ((32, 22, 18), (40, 33, 28)):
        summary = synthetic_summary(num_layers, transition, transition - 8, mass_plateau=12)
        rec = recommend(summary, model="m", num_layers=num_layers, rule="paper")
        ev = rec["evidence"]
        assert rec["split"] == split and ev["offset"] == num_layers // 8 and ev["raw_paper_split"] == split
        assert "50% transition L" in rec["decided_by"]


def test_paper_offset_and_clipping():
    assert [paper_offset(n) for n in (6, 12, 20, 32, 40)] == [1, 2, 3, 4, 5]  # half-up: 12/8 = 1.5 -> 2
    assert clip_split(0, 12) == 1 and clip_split(11, 12) == 10 and clip_split(5, 12) == 5
    assert clip_split(11, 12, fusion_layers=3) == 8 and clip_split(11, 12, side_depth=4) == 8
    assert paper_split(1, 12) == 1  # an early transition never gives split 0
    assert [few_layers(n) for n in (6, 12, 32, 40)] == [2, 2, 4, 5]


def test_every_rule_and_the_cross_check():
    summary = synthetic_summary(32, 22, 14, mass_plateau=24)
    recs = {rule: recommend(summary, model="m", num_layers=32, rule=rule) for rule in RULES}
    assert recs["paper"]["split"] == 18
    assert recs["attention"]["split"] == 24
    assert recs["auto"]["split"] == 24  # text still reads the image until L24: later than the paper rule
    assert "attention collapsed" in recs["auto"]["decided_by"]
    assert recs["conservative"]["split"] == max(r["split"] for r in recs.values()) == 24
    assert recs["cosine"]["split"] == recs["paper"]["evidence"]["cosine_plateau_layer"]
    assert not recs["paper"]["evidence"]["cross_check"]["agrees"]
    assert "24" in recs["paper"]["evidence"]["cross_check"]["text"]
    assert recs["conservative"]["evidence"]["cross_check"]["agrees"]
    for rule, rec in recs.items():  # every rule reports every alternative, and its own answer among them
        assert rec["alternatives"] == recs["paper"]["alternatives"] == rec["evidence"]["alternatives"]
        assert rec["alternatives"][rule] == rec["split"] and rec["decided_by"] == rec["evidence"]["decided_by"]


def _embedded_like(attention: list[float]) -> pd.DataFrame:
    """The embedded model's measured curves (README "Measured here", probe --n 64) with a given attention curve."""
    return _frame({
        ("logit_lens_kl", "image"): [1.266, 1.336, 1.225, 0.448, 0.278, 0.193, 0.158, 0.126, 0.073, 0.041, 0.023, 0.0],
        ("logit_lens_kl", "text"): [2.132, 1.966, 1.070, 0.706, 0.411, 0.303, 0.266, 0.373, 0.286, 0.124, 0.061, 0.0],
        ("attention_mass", "image"): attention,
        ("attention_mass", "text"): [0.4] * 12,
        ("cosine", "image"): [0.959, 0.905, 0.981, 0.940, 0.982, 0.993, 0.993, 0.997, 0.996, 0.997, 0.997, 0.974],
        ("cosine", "text"): [0.9] * 12,
    })


EMBEDDED_ATTENTION = [0.433, 0.529, 0.519, 0.690, 0.533, 0.458, 0.528, 0.550, 0.496, 0.551, 0.437, 0.378]


def test_auto_on_the_embedded_curves_waits_for_the_image_tokens():
    """Paper gives s=1 (a blind model); auto waits until the image KL is 80% done and the cosine settled."""
    rec = recommend(_embedded_like(EMBEDDED_ATTENTION), model="m", num_layers=12)
    ev = rec["evidence"]
    assert rec["rule"] == DEFAULT_RULE == "auto" and rec["alternatives"]["paper"] == 1
    assert ev["image_kl_settled_layer"] == 5 and ev["cosine_plateau_layer"] == 5
    assert not ev["attention_collapsed"] and final_level(EMBEDDED_ATTENTION) > 0.5 * max(EMBEDDED_ATTENTION)
    assert rec["split"] == 5 and rec["split"] in EMBEDDED_WORKING_SPLITS
    assert "never collapses" in rec["decided_by"] and "later than the paper rule's 1" in rec["decided_by"]


def test_flat_attention_never_pulls_auto_back_to_the_paper_rule():
    """Attention flat from layer 0 (plateau L0) without a collapse must not argue for an early split."""
    flat = [0.5 + 0.004 * (-1) ** layer for layer in range(12)]
    rec = recommend(_embedded_like(flat), model="m", num_layers=12)
    assert rec["evidence"]["attention_plateau_layer"] == 0 and rec["alternatives"]["attention"] == 1
    assert rec["split"] == 5


def test_attention_collapse_before_the_image_settles_decides():
    """A collapse at L3 (text stopped reading the image) is enough on its own: auto = 3, not 5."""
    collapsing = [0.6, 0.5, 0.3, 0.1] + [0.1 + 0.003 * (-1) ** layer for layer in range(8)]
    rec = recommend(_embedded_like(collapsing), model="m", num_layers=12)
    assert rec["evidence"]["attention_collapsed"] and rec["evidence"]["attention_plateau_layer"] == 3
    assert rec["split"] == 3 and rec["decided_by"].startswith("text->image attention collapsed")


def test_rules_far_apart_are_said_plainly_with_the_conservative_choice():
    rec = recommend(_embedded_like(EMBEDDED_ATTENTION), model="m", num_layers=12)
    far = rec["evidence"]["disagreement"]
    assert far["spread"] == 9 and far["conservative"] == 10 == rec["alternatives"]["conservative"]
    assert "the rules disagree by 9 layers" in far["text"] and "'auto' chose s = 5" in far["text"]
    assert "conservative choice is s = 10 (--split 10" in far["text"]
    near = {"auto": 18, "paper": 18, "attention": 18, "cosine": 16, "conservative": 18}
    assert disagreement(near, "auto", 18, 32) is None  # 2 layers apart at 32 layers: a few
    assert disagreement(near | {"cosine": 13}, "auto", 18, 32)["spread"] == 5


def test_unknown_rule_and_too_few_layers():
    summary = synthetic_summary(8, 5, 3, mass_plateau=3)
    with pytest.raises(ValueError, match="unknown rule"):
        recommend(summary, model="m", num_layers=8, rule="magic")
    with pytest.raises(ValueError, match="at least 3"):
        recommend(summary, model="m", num_layers=2)


def test_probe_of_the_embedded_model_recommends_a_working_split(tmp_path):
    """The headline flow's first half, measured: `saturation probe` on the shipped model, default rule."""
    from saturation.probe import ProbeConfig, run_probe, summary_lines

    result = run_probe(ProbeConfig(model="tiny", n=32, out=tmp_path / "p", progress=False))
    rec = json.loads(result.recommendation_path.read_text())
    assert rec["rule"] == "auto" and rec["num_layers"] == 12
    assert rec["split"] in EMBEDDED_WORKING_SPLITS and rec["alternatives"]["paper"] not in EMBEDDED_WORKING_SPLITS
    printed = "\n".join(summary_lines(result))
    assert "WARNING: the rules disagree" in printed and "decided by: image tokens close to final" in printed


def test_the_recommendation_honours_the_backbones_first_split():
    """Qwen3-VL's DeepStack adds image features to layers 0..n-1: no rule may split there. Every rule is raised to
    min_split, and the recommendation says which were, from what; unraised runs say nothing."""
    from saturation.core.errors import ToolkitError

    summary = synthetic_summary(12, 2, 1, mass_plateau=1)
    plain = recommend(summary, model="m", num_layers=12, rule="paper")
    assert plain["split"] == 1 and plain["evidence"]["min_split"] is None and plain["evidence"]["clip"] == [1, 10]
    rec = recommend(summary, model="m", num_layers=12, rule="paper", min_split=3)
    ev = rec["evidence"]
    assert rec["split"] == 3 and min(rec["alternatives"].values()) >= 3 and ev["clip"] == [3, 10]
    assert ev["min_split"]["raised"]["paper"] == 1 and "first allowed split" in rec["decided_by"]
    assert {k: max(v, 3) for k, v in plain["alternatives"].items()} == rec["alternatives"]
    assert recommend(summary, model="m", num_layers=12, rule="paper", min_split=1) == plain
    json.dumps(rec, allow_nan=False)
    with pytest.raises(ToolkitError, match="first allowed split is 11"):
        recommend(summary, model="m", num_layers=12, min_split=11)
