"""VTW at its own layer (`routing.vtw`, ``vtw@auto``): the pure pieces against hand-made numbers, the search on the
embedded model against a brute-force reference written from VTW's code (HF's own layers, one unpadded prompt at a
time, the image span cut before layer k, KL as VTW's ``KLDivLoss(log_softmax(vanilla), softmax(withdrawn))``), the
grammar's one-line errors, the saved artifact and `routing compare`."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from family_fixtures import (
    FAMILIES,
    LLAVA_IMAGE_SIZES,
    QWEN_FAMILIES,
    QWEN_IMAGE_SIZES,
    save_checkpoint,
    write_images_dataset,
)
from typer.testing import CliRunner

import routing
from cli import routing_app
from routing.plan import parse_spec, plan_for
from routing.vtw import (
    VtwSearch,
    candidate_layers,
    choose_layer,
    last_token_kl,
    layer_kl,
    search_vtw_layer,
    start_layer,
)
from saturation.core.adapters import adapter_for
from saturation.core.data import PromptFormat, generation_batch, read_records, sample_records
from saturation.core.errors import ToolkitError
from saturation.core.loading import DATA_SAMPLES, load_model

runner = CliRunner()
PROBE = DATA_SAMPLES / "shapes" / "probe.json"
N = 6  # calibration samples in the tests (VTW's default is 20)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def records():
    return read_records(PROBE)


@pytest.fixture(scope="module")
def searched(tiny, records):
    """VTW's own eta (0.003, tuned on LLaVA-1.5-7B): on the embedded model it may or may not meet a layer, so tests
    read its KL table (eta-free) and take the choice's eta from that table (`eta_in_the_widest_gap`)."""
    model, processor = tiny
    return search_vtw_layer(model, processor, records, eta=0.003, n=N, seed=0)


def eta_in_the_widest_gap(kl) -> float:
    """An eta that splits a KL table where its sorted values jump most (the largest ratio between neighbours,
    where the image stops mattering): some layers above, some below, and far from every value (rounded to two
    digits, so that it reads back the same from a spec), so a 1e-4 difference in a KL cannot move a layer across.
    Measured on the model itself: the embedded model's KLs are not VTW's 7B ones, and change when it is retrained."""
    ordered = sorted(kl)
    assert ordered[0] > 0, ordered
    lo, hi = max(zip(ordered, ordered[1:]), key=lambda pair: pair[1] / pair[0])
    eta = float(f"{math.sqrt(lo * hi):.2g}")
    assert lo * 1.01 < eta < hi / 1.01, (lo, eta, hi)  # a real gap: each side is clearly one
    return eta


# ---------------------------------------------------------------- pure pieces
def test_kl_is_withdrawn_against_vanilla_of_hand_made_distributions():
    withdrawn = torch.tensor([[0.5, 0.5], [0.1, 0.9]]).log()
    vanilla = torch.tensor([[0.25, 0.75], [0.1, 0.9]]).log() + 3.0  # logits: a shift changes nothing
    kl = last_token_kl(withdrawn, vanilla)
    # KL(P_w || P_v) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3); the other direction would be 0.1308
    torch.testing.assert_close(kl, torch.tensor([0.5 * math.log(4 / 3), 0.0]), atol=1e-6, rtol=0)
    # VTW's own call, one sample at a time (batchmean over a batch of 1)
    for row in range(2):
        theirs = F.kl_div(F.log_softmax(vanilla[row : row + 1], -1), F.softmax(withdrawn[row : row + 1], -1),
                          reduction="batchmean")
        torch.testing.assert_close(kl[row], theirs)
    # a token P_withdrawn never emits adds nothing (not nan)
    assert last_token_kl(torch.tensor([[0.0, -math.inf]]), torch.zeros(1, 2)).item() == pytest.approx(math.log(2))


def test_the_first_layer_under_eta_wins_and_none_falls_back_to_the_least_kl():
    layers = (5, 6, 7, 8, 9)
    kl = (0.5, 0.002, 0.01, 0.001, 0.001)
    assert choose_layer(layers, kl, 0.003) == (6, False)  # the first, though 7 is above eta again
    assert choose_layer(layers, kl, 0.002) == (6, False)  # <= eta qualifies
    assert choose_layer(layers, kl, 1.0) == (5, False)  # a large eta: the start layer
    assert choose_layer(layers, kl, 0.0) == (8, True)  # none: the least KL, the first of ties
    with pytest.raises(ToolkitError):
        choose_layer(layers, kl[:3], 0.003)


@pytest.mark.parametrize("layers, first, start", [(32, 1, 5), (40, 1, 6), (28, 1, 4), (12, 1, 2), (16, 1, 3),
                                                  (36, 3, 6), (8, 3, 3), (4, 1, 1)])
def test_the_start_layer_is_5_of_32_scaled_and_after_the_first_allowed_split(layers, first, start):
    assert start_layer(layers, first) == start
    assert candidate_layers(layers, first) == range(start, layers)  # up to L-1, as VTW's range(5, 32)


# ---------------------------------------------------------------- the search against a brute-force reference
@torch.no_grad()
def _reference_kl(model, processor, record, layer: int) -> float:
    """VTW's --findk for one prompt, batch 1, by hand on HF's modules: the hidden states entering `layer` (HF's own
    forward), the image positions cut there, the rest of HF's layers on the text at its original positions, the
    final norm and head on the last token; KL as VTW's KLDivLoss(log_softmax(vanilla), softmax(withdrawn))."""
    batch = generation_batch([record], processor, fmt=PromptFormat.of(model))
    out = model(**batch, output_hidden_states=True)
    vanilla = out.logits[:, -1]
    keep = batch["input_ids"][0] != model.config.image_token_id
    h = out.hidden_states[layer][:, keep]
    positions = torch.arange(batch["input_ids"].shape[1])[keep][None]
    lm = model.model.language_model
    rope = lm.rotary_emb(h, positions)
    t = h.shape[1]
    mask = torch.full((t, t), -math.inf).triu(1)[None, None]  # causal over the kept tokens, in their order
    for block in lm.layers[layer:]:
        h = block(h, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        h = h[0] if isinstance(h, tuple) else h
    withdrawn = model.lm_head(lm.norm(h))[:, -1]
    return F.kl_div(F.log_softmax(vanilla, -1), F.softmax(withdrawn, -1), reduction="batchmean").item()


def test_the_search_equals_a_brute_force_reference(tiny, records, searched):
    model, processor = tiny
    sample = sample_records(records, N, 0)
    layers = list(range(2, 12))  # round(5 * 12 / 32) = 2 .. L-1 = 11
    table = [sum(_reference_kl(model, processor, r, k) for r in sample) / N for k in layers]
    assert list(searched.layers) == layers and searched.start == 2
    torch.testing.assert_close(torch.tensor(searched.kl), torch.tensor(table), rtol=1e-4, atol=1e-6)
    eta = eta_in_the_widest_gap(table)  # from the reference's own table: the search's choice is a real one
    assert min(table) < eta < max(table)  # the table decides: some layers are above eta, some below
    chosen = search_vtw_layer(model, processor, records, eta=eta, n=N, seed=0)
    first = next(k for k, v in zip(layers, table) if v <= eta)
    assert chosen.kl == searched.kl and (chosen.layer, chosen.fallback, chosen.eta) == (first, False, eta)
    assert searched.fallback == (min(table) > 0.003)  # VTW's eta: met or not, the same table decides


def test_eta_large_takes_the_start_layer_and_eta_zero_the_fallback(tiny, records, searched):
    model, processor = tiny
    wide = search_vtw_layer(model, processor, records, eta=1e9, n=N, seed=0)
    assert (wide.layer, wide.fallback) == (2, False) and wide.kl == searched.kl
    none = search_vtw_layer(model, processor, records, eta=0.0, n=N, seed=0)
    least = min(range(len(searched.kl)), key=lambda i: searched.kl[i])
    assert none.fallback and none.layer == searched.layers[least] and min(searched.kl) > 0
    assert "none <= eta 0" in none.summary() and "least KL" in none.describe()


def test_the_sample_is_seeded(tiny, records):
    model, processor = tiny
    a, b = (search_vtw_layer(model, processor, records, n=2, seed=s) for s in (1, 1))
    c = search_vtw_layer(model, processor, records, n=2, seed=2)
    assert a == b and a.kl != c.kl


def test_text_only_records_are_left_out_of_the_search(tiny, records):
    """A text-only record's KL is 0 at every layer; mixed in, it would lower the mean. The search skips them, and
    data with no image at all is one line."""
    from dataclasses import replace

    model, processor = tiny
    text_only = [replace(r, id=f"text-{r.id}", image=None) for r in records]
    mixed = search_vtw_layer(model, processor, text_only + records, n=N, seed=0)
    assert mixed == search_vtw_layer(model, processor, records, n=N, seed=0)
    with pytest.raises(ToolkitError, match="no record with an image"):
        search_vtw_layer(model, processor, text_only, n=N, seed=0)


# ---------------------------------------------------------------- the grammar
def test_vtw_auto_reads_its_keys_with_vtw_defaults():
    assert parse_spec("vtw@auto")["auto"] == {"eta": 0.003, "n": 20, "seed": 0}
    assert parse_spec("vtw@auto:eta=0.0005,n=16")["auto"] == {"eta": 0.0005, "n": 16, "seed": 0}
    assert parse_spec("vtw@auto:seed=3")["variant"] == "vtw" and "auto" not in parse_spec("vtw@6")


@pytest.mark.parametrize("spec, message", [
    ("vtw@auto:eta=-1", "eta must be a number >= 0"), ("vtw@auto:eta=nan", "eta must be a number >= 0"),
    ("vtw@auto:n=0", "n must be an integer >= 1"), ("vtw@auto:n=2.5", "n must be an integer >= 1"),
    ("vtw@auto:k=3", "vtw@auto takes eta=, n= and seed="), ("vtw@auto:", "vtw@auto takes eta="),
    ("vtw@auto:eta", "vtw@auto takes eta="), ("lf@auto", "cannot read plan"),
])
def test_bad_auto_specs_are_one_line(tmp_path, spec, message):
    with pytest.raises(ToolkitError, match=message):
        parse_spec(spec)
    result = runner.invoke(routing_app, ["save-plan", "--plan", spec, "--out", str(tmp_path / "p")])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def test_parse_plan_cannot_search_without_data(tiny):
    with pytest.raises(ToolkitError, match=r"write a layer \(e.g. vtw@6\), or resolve it with routing.vtw.resolve_auto") as err:
        routing.parse_plan("vtw@auto:n=4", tiny[0])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args, message", [
    (["--plan", "vtw@auto:n=900"], "asked for n=900 samples but the data has only 500"),
    (["--plan", "vtw@auto", "--split", "5"], "searches its own layer: leave --split out, or write vtw@5"),
    (["--plan", "vtw@5", "--data", str(PROBE)], "--data calibrates vtw@auto"),
])
def test_save_plan_refuses_in_one_line_and_writes_nothing(tmp_path, args, message):
    result = runner.invoke(routing_app, ["save-plan", "--out", str(tmp_path / "p"), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


# ---------------------------------------------------------------- the artifact and compare
def test_a_saved_auto_plan_records_its_search_and_reloads(tiny, records, tmp_path):
    model, processor = tiny
    result = runner.invoke(routing_app, ["save-plan", "--plan", "vtw@auto:n=4,seed=1", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    mine = search_vtw_layer(model, processor, records, n=4, seed=1)
    assert f"vtw@auto -> vtw@{mine.layer}" in result.output and f"saved plan vtw@{mine.layer}" in result.output
    manifest = json.loads((tmp_path / "p" / "routing.json").read_text())
    calibration = manifest["calibration"]
    assert calibration["spec"] == "vtw@auto:n=4,seed=1" and calibration["data"] == str(PROBE)
    assert VtwSearch(**{k: tuple(v) if isinstance(v, list) else v for k, v in calibration.items()
                        if k in VtwSearch.__dataclass_fields__}) == mine
    loaded = routing.load(model, tmp_path / "p")
    assert loaded.plan == plan_for(model, mine.layer, "vtw") and manifest["spec"] == f"vtw@{mine.layer}"
    batch = generation_batch(records[:3], processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, routing.build(model, loaded.plan)(**batch).logits,
                                   rtol=0, atol=0)
    evaluated = runner.invoke(routing_app, ["eval", "--routing", str(tmp_path / "p"), "--n", "4",
                                            "--json", str(tmp_path / "e.json")])
    assert evaluated.exit_code == 0 and json.loads((tmp_path / "e.json").read_text())["n"] == 4, evaluated.output


def test_compare_resolves_auto_and_prints_the_choice(tiny, records, tmp_path):
    """Two searches in one table: an eta the KL table meets (from the table itself) and eta=0, which none meets
    (the least-KL fallback); each row's params say which."""
    eta = eta_in_the_widest_gap(search_vtw_layer(*tiny, records, n=4, seed=0).kl)
    met, least = f"vtw@auto:n=4,eta={eta:g}", "vtw@auto:n=4,eta=0"
    out = tmp_path / "cmp"
    result = runner.invoke(routing_app, ["compare", "--plans", f"vanilla,{met},{least}", "--n", "4", "--repeats", "1",
                                         "--out", str(out)])
    assert result.exit_code == 0, result.output
    mine, fallback = (search_vtw_layer(*tiny, records, eta=e, n=4, seed=0) for e in (eta, 0.0))
    assert not mine.fallback and fallback.fallback and mine.kl == fallback.kl
    rows = pd.read_csv(out / "frontier.csv").set_index("plan")
    for spec, search in ((met, mine), (least, fallback)):
        assert search.summary() in result.output and search.table_line() in result.output
        saved = json.loads((out / "calibration.json").read_text())[spec]
        assert saved["plan"] == f"vtw@{search.layer}" and saved["kl"] == list(search.kl)
        assert saved["layers"] == list(search.layers) and saved["fallback"] == search.fallback
    assert rows.loc[met, "params"] == f"s={mine.layer} (auto, eta={eta:g}, KL {mine.kl_at_choice:.2g})" == mine.describe()
    assert rows.loc[least, "params"] == f"s={fallback.layer} (auto, no layer <= eta: least KL, KL {min(fallback.kl):.2g})"
    other = ["compare", "--plans", "vanilla,vtw@3", "--n", "2", "--repeats", "1", "--out", str(out)]
    refused = runner.invoke(routing_app, other)  # issue 28: other options in a run folder are refused, run kept
    assert refused.exit_code == 1 and f"--plans vanilla,{met},{least} (now vanilla,vtw@3)" in refused.output
    assert (out / "calibration.json").exists()
    again = runner.invoke(routing_app, [*other, "--no-resume"])
    assert again.exit_code == 0 and not (out / "calibration.json").exists()  # no stale search beside a new table


def test_compare_geometry_refuses_auto_in_one_line(tmp_path):
    result = runner.invoke(routing_app, ["compare", "--geometry", "tiny", "--plans", "vanilla,vtw@auto",
                                         "--out", str(tmp_path / "g")])
    assert result.exit_code == 1 and "searches VTW's layer on real data" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- every family
QUESTIONS = ("what colour is the circle?", "how many red square?", "what colour is the square left the circle?")


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_searches_and_a_padded_batch_equals_one_prompt_at_a_time(name, tmp_path):
    """The search runs through the routed model and the adapter's walk, so any family works: ragged prompts (other
    questions, anyres/M-RoPE image sizes) left-padded in one batch give each prompt's own KL; the start layer is after
    Qwen3-VL's DeepStack layers."""
    model, processor = load_model(str(save_checkpoint(name, tmp_path / "model")))
    sizes = QWEN_IMAGE_SIZES if name in QWEN_FAMILIES else LLAVA_IMAGE_SIZES
    data = read_records(write_images_dataset(tmp_path / "data", sizes=sizes, n=3))
    data = [dataclasses.replace(r, turns=((q, r.turns[0][1]),)) for r, q in zip(data, QUESTIONS)]
    found = search_vtw_layer(model, processor, data, n=3, batch_size=3)
    first = 2 if name == "qwen3_vl" else 1  # DeepStack adds image features after layers 0 and 1
    assert found.layers == tuple(range(first, adapter_for(model).num_layers)) and found.layer in found.layers
    one = layer_kl(model, processor, sample_records(data, 3, 0), found.layers, batch_size=1).mean(1)
    torch.testing.assert_close(torch.tensor(found.kl), one, rtol=1e-4, atol=1e-6)
    assert all(math.isfinite(k) and k >= -1e-6 for k in found.kl)
