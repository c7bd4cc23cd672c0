"""`routing compare` (issue 17): one row per plan with every column filled, the Pareto figure, one-line errors."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
from family_fixtures import family
from typer.testing import CliRunner

from cli import routing_app
from figures.pareto import frontier, pareto_figure
from routing.jobs.compare import (
    COLUMNS,
    COMPOSED,
    DEFAULT_PLANS,
    GEOMETRY_PLANS,
    CompareConfig,
    best_pruner,
    fit_default,
    parse_plans,
    ranked_pruners,
)
from routing.plan import split_specs
from saturation.core.errors import ToolkitError
from saturation.core.geometry import geometry_config


def test_compare_writes_a_filled_row_per_plan_and_the_figure(tmp_path):
    out = tmp_path / "cmp"
    plans = "vanilla,lf@5,vtw@5,fastv@2:R=50%,rank=all,prune-pre:25%,pool:25%,lf@5+prune-pre:50%"
    result = CliRunner().invoke(routing_app, ["compare", "--plans", plans, "--n", "8", "--train-steps", "2",
                                              "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "frontier.csv")
    assert list(table.columns) == list(COLUMNS)
    assert list(table["plan"]) == split_specs(plans)  # a spec's own key=value parameters stay with it
    params = table.set_index("plan")["params"]
    assert params["fastv@2:R=50%,rank=all"] == "fastv K=2, R=50% dropped, rank=all"  # FastV's own terms
    assert params["prune-pre:25%"] == "R=25% kept"
    numbers = table[["accuracy", "flops_ratio", "prefill_ratio", "decode_ratio", "trainable_params"]]
    assert numbers.notna().all().all()
    assert table.set_index("plan").loc["vanilla", ["flops_ratio", "prefill_ratio", "decode_ratio"]].tolist() == [1, 1, 1]
    flops = table.set_index("plan")["flops_ratio"]
    assert flops["prune-pre:25%"] < flops["fastv@2:R=50%,rank=all"] < 1 and flops["lf@5+prune-pre:50%"] < flops["lf@5"]
    trainable = table.set_index("plan")["trainable_params"]
    assert trainable["lf@5"] == trainable["lf@5+prune-pre:50%"] > 0 and trainable["fastv@2:R=50%,rank=all"] == 0
    assert (out / "pareto.png").stat().st_size > 0 and (out / "pareto.pdf").exists()


@pytest.mark.parametrize("plans,message", [("vanilla,fastv@2", "fastv needs R"), ("lf@3,lf@3", "twice"),
                                           ("vanilla,fastv@2:25%", "share dropped: write fastv@2:R=75%"),
                                           ("vanilla,quantize:50%", "cannot read plan"), (",", "empty")])
def test_bad_plans_fail_in_one_line_before_loading(tmp_path, plans, message):
    result = CliRunner().invoke(routing_app, ["compare", "--plans", plans, "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    with pytest.raises(ToolkitError, match=message):
        parse_plans(plans)


def test_frontier_marks_the_undominated_points():
    assert frontier([1.0, 0.5, 0.6, 0.4], [0.9, 0.8, 0.7, 0.2]) == [True, True, False, True]
    rows = pd.DataFrame({"plan": ["vanilla", "a", "geometry"], "accuracy": [0.9, 0.8, math.nan],
                         "flops_ratio": [1.0, 0.5, 0.4], "prefill_ratio": [1.0, 0.7, 0.5]})
    fig = pareto_figure(rows)
    assert len(fig.axes) == 2 and all(len(ax.collections) == 2 for ax in fig.axes)  # the n/a row is left out


def test_geometry_mode_times_random_weights_with_accuracy_na(tmp_path):
    out = tmp_path / "geo"
    plans = "vanilla,lf@2,vtw@2,fastv@1:R=50%,pool:25%,lf@2+pool:50%"
    result = CliRunner().invoke(routing_app, ["compare", "--geometry", "tiny", "--layers", "4", "--plans", plans,
                                              "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    raw = pd.read_csv(out / "frontier.csv", keep_default_na=False)
    assert list(raw.columns) == list(COLUMNS) and list(raw["plan"]) == plans.split(",")
    assert (raw["accuracy"] == "n/a").all()  # written as n/a, not an empty cell or nan
    numbers = raw[["flops_ratio", "prefill_ratio", "decode_ratio", "prefill_ms", "decode_ms", "trainable_params"]]
    assert numbers.apply(pd.to_numeric).notna().all().all()
    table = raw.set_index("plan")
    assert table.loc["vanilla", ["flops_ratio", "prefill_ratio", "decode_ratio"]].tolist() == [1, 1, 1]
    assert table.loc["vtw@2", "flops_ratio"] < 1 and table.loc["lf@2+pool:50%", "flops_ratio"] < table.loc["lf@2", "flops_ratio"]
    assert table.loc["lf@2", "trainable_params"] > 0 and table.loc["lf@2", "trained"] == "untrained (geometry)"
    assert "n/a" in result.output and "random tiny, 4 layers" in result.output
    assert (out / "pareto.png").stat().st_size > 0 and (out / "pareto.pdf").exists()


def test_geometry_default_sweep_needs_no_pixels():
    cfg = CompareConfig(geometry="tiny")
    assert cfg.plans == GEOMETRY_PLANS and not any("prune-pre" in p for p in cfg.plans)


@pytest.mark.parametrize("args,message", [
    (["--routing", "runs/x"], "takes no --routing"), (["--data", "x.json"], "takes no --data"),
    (["--n", "4"], "takes no --n"), (["--model", "tiny"], "takes no --model"),
    (["--plans", "vanilla,prune-pre:50%"], "real pixels"), (["--plans", "vanilla,lf@2+prune-pre:50%"], "real pixels"),
    (["--layers", "2"], "at least 3")])
def test_bad_geometry_combinations_fail_in_one_line(tmp_path, args, message):
    out = tmp_path / "x"
    result = CliRunner().invoke(routing_app, ["compare", "--geometry", "tiny", *args, "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (out / "frontier.csv").exists()


@pytest.mark.parametrize("args,message", [(["--geometry", "llava-9b"], "unknown geometry"),
                                          (["--layers", "4"], "shrinks a --geometry")])
def test_bad_geometry_names_fail_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(routing_app, ["compare", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_the_figure_without_accuracy_draws_the_cost_panel():
    rows = pd.DataFrame({"plan": ["vanilla", "vtw@2"], "accuracy": [math.nan, math.nan],
                         "flops_ratio": [1.0, 0.8], "prefill_ratio": [1.0, 0.85]})
    fig = pareto_figure(rows)
    assert len(fig.axes) == 1 and len(fig.axes[0].collections[0].get_offsets()) == 2
    assert "n/a" in fig.axes[0].get_title()


# ---------------------------------------------------------------- the default sweep (issue 25)
def test_the_default_sweep_holds_the_issues_rows():
    assert DEFAULT_PLANS == ("vanilla", "lf", "vtw@auto", "fastv@2:R=50%", "fastv@2:R=75%", "pdrop", "visionzip",
                             "divprune", COMPOSED) and COMPOSED == "lf+best"
    assert "pdrop" in GEOMETRY_PLANS
    assert parse_plans(DEFAULT_PLANS) and parse_plans(GEOMETRY_PLANS)  # every one reads
    cfg = CompareConfig()
    assert cfg.plans == DEFAULT_PLANS and cfg.defaulted and not CompareConfig(plans="vanilla,lf").defaulted
    # geometry mode has no data (vtw@auto, lf+best's accuracy) and no pixels (visionzip)
    assert not {"vtw@auto", "visionzip", COMPOSED} & set(GEOMETRY_PLANS) and "lf+fastv@2:R=75%" in GEOMETRY_PLANS
    with pytest.raises(ToolkitError, match="no accuracy"):
        CompareConfig(geometry="tiny", plans="vanilla,divprune,lf+best")
    with pytest.raises(ToolkitError, match=r"\+best composes a DPVR variant"):
        parse_plans("vanilla,vtw@3+best")


def test_compare_defaults_fill_every_row_and_column(tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(routing_app, ["compare", "--n", "4", "--split", "5", "--train-steps", "1",
                                              "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "frontier.csv")
    assert table.notna().drop(columns=["params", "trained"]).all().all()  # no NaN in any number
    plans = list(table["plan"])
    assert plans[:5] == ["vanilla", "lf@5", "vtw@auto", "fastv@2:R=50%", "fastv@2:R=75%"]
    assert plans[5] == "pdrop:layers=3/6/9,lambda=0.5"  # PDrop's stages scaled to 12 layers
    assert plans[6:8] == ["visionzip:dominant=2,contextual=1", "divprune:keep=9.8%"]  # scaled to the 9 patches
    assert len(plans) == 9 and plans[8].startswith("lf@5+") and plans[8][len("lf@5+"):] in plans[3:8]
    composed = table.set_index("plan").loc[plans[8]]
    assert composed["trainable_params"] > 0 and composed["trained"] == "trained 1 steps"
    # the rule, on this run's rows: the best that LF at s=5 composes with (PDrop's stages 6 and 9 come after it)
    ranked = [c for c in ranked_pruners(table.to_dict("records")[:8]) if not c.startswith("pdrop")]
    assert plans[8][len("lf@5+"):] == ranked[0]
    assert "scaled to this tower's 9 patches" in result.output and "lf+best -> lf+" in result.output


def test_compare_geometry_defaults_run_without_data_or_pixels(tmp_path):
    out = tmp_path / "geo"
    result = CliRunner().invoke(routing_app, ["compare", "--geometry", "tiny", "--layers", "4", "--repeats", "1",
                                              "--text-tokens", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "+ 8 text tokens" in result.output
    raw = pd.read_csv(out / "frontier.csv", keep_default_na=False)
    assert list(raw["plan"]) == ["vanilla", "lf@2", "vtw@2", "fastv@2:R=50%", "fastv@2:R=75%",
                                 "pdrop:layers=1/2/3,lambda=0.5", "divprune:keep=9.8%", "lf@2+fastv@2:R=75%"]
    assert raw.drop(columns=["plan", "params", "trained", "accuracy"]).apply(pd.to_numeric).notna().all().all()


@pytest.mark.parametrize("name,spec,reason", [("gemma3", "visionzip", r"no \[CLS\] token"),
                                              ("qwen2_5_vl", "visionzip", r"no \[CLS\] token"),
                                              ("llava_next", "visionzip", "anyres crops"),
                                              ("qwen3_vl", "divprune", "positions read the image grid")])
def test_a_default_row_the_family_refuses_is_skipped_with_a_note(name, spec, reason):
    config = family(name).config()
    kept, note = fit_default(spec, config, 2)
    assert kept is None and note.startswith(f"skipped default row {spec}: ") and "\n" not in note
    assert re.search(reason, note)
    assert fit_default("fastv@2:R=50%", config, 2) == ("fastv@2:R=50%", "")  # the others stay
    assert fit_default(COMPOSED, config, 2) == (COMPOSED, "") and fit_default("vtw@auto", config, 2)[0] == "vtw@auto"


def test_visionzip_default_keeps_its_budget_where_it_fits_and_scales_where_not():
    assert fit_default("visionzip", geometry_config("llava-1.5-7b", layers=4), 2) == ("visionzip", "")
    kept, note = fit_default("visionzip", family("llava").config(), 2)  # 4 patches: [CLS] + 1 dominant, 1 contextual
    assert kept == "visionzip:dominant=2,contextual=1" and "this tower's 4 patches" in note
    explicit = "visionzip:dominant=4,contextual=2"  # a written budget is the user's: not rescaled
    assert fit_default(explicit, family("llava").config(), 2) == (explicit, "")


def test_best_pruner_picks_the_best_accuracy_per_flop_training_free_pruner():
    rows = [{"plan": "vanilla", "accuracy": 1.0, "flops_ratio": 1.0},
            {"plan": "lf@5", "accuracy": 0.99, "flops_ratio": 0.5},  # DPVR: not a pruner
            {"plan": "vtw@9", "accuracy": 1.0, "flops_ratio": 0.3},  # VTW withdraws every token: LF cannot compose
            {"plan": "vtw@auto", "accuracy": 1.0, "flops_ratio": 0.3},
            {"plan": "lf@5+fastv@2:R=75%", "accuracy": 0.9, "flops_ratio": 0.2},  # a composition
            {"plan": "fastv@2:R=50%", "accuracy": 0.8, "flops_ratio": 0.9},  # 0.889 per FLOP
            {"plan": "fastv@2:R=75%", "accuracy": 0.7, "flops_ratio": 0.7},  # 1.0
            {"plan": "divprune:keep=9.8%", "accuracy": 0.5, "flops_ratio": 0.5},  # 1.0, cheaper: wins the tie
            {"plan": "visionzip:dominant=2,contextual=1", "accuracy": math.nan, "flops_ratio": 0.1},  # no accuracy
            {"plan": "prune-pre:50%", "accuracy": 0.9, "flops_ratio": 1.0}]  # saves nothing
    assert best_pruner(rows) == "divprune:keep=9.8%"
    rows[6]["accuracy"] = 0.71  # 1.014 per FLOP
    assert best_pruner(rows) == "fastv@2:R=75%"
    assert best_pruner(rows[:5] + rows[8:]) is None
    assert best_pruner([{"plan": "pool:50%", "accuracy": 0.5, "flops_ratio": 0.5},
                        {"plan": "pool:25%", "accuracy": 0.25, "flops_ratio": 0.25},  # same ratio, cheaper
                        {"plan": "prune-pre:25%", "accuracy": 0.25, "flops_ratio": 0.25}]) == "pool:25%"  # earlier
