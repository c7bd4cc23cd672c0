"""`routing save-plan`: a training-free plan saved as an artifact, which eval, generate and bench take through
--routing (and the lmms-eval plugin through routing=, which calls the same `routing.load`)."""

import json

import pytest
import torch
from typer.testing import CliRunner

import routing
from cli import routing_app
from routing.jobs.evaluate import evaluate
from saturation.core.data import generation_batch, read_records
from saturation.core.loading import DATA_SAMPLES, load_model

runner = CliRunner()
HELD_OUT = DATA_SAMPLES / "shapes" / "heldout.json"


def _save(out, *args):
    return runner.invoke(routing_app, ["save-plan", "--out", str(out), *args])


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.mark.parametrize("spec, build", [("fastv@2:R=50%", (0, "fastv", {"prune_layer": 2, "keep": 0.5})),
                                         ("pool:25%", (0, "pool", {"keep": 0.25})),
                                         ("vtw@6", (6, "vtw", {}))])
def test_a_saved_plan_is_the_plan(tiny, tmp_path, spec, build):
    """The artifact rebuilds the same plan, whose logits equal the plan built in memory."""
    model, processor = tiny
    result = _save(tmp_path / "plan", "--plan", spec)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "plan" / "routing.json").read_text())["spec"] == spec
    loaded = routing.load(model, tmp_path / "plan")
    split, variant, kw = build
    direct = routing.build(model, split, variant, **kw)
    assert loaded.plan == direct.plan
    batch = generation_batch(read_records(HELD_OUT)[:3], processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, direct(**batch).logits, rtol=0, atol=0)


def test_eval_generate_and_bench_take_a_saved_plan(tiny, tmp_path):
    model, processor = tiny
    plan = tmp_path / "fastv"
    assert _save(plan, "--plan", "fastv@2:R=75%").exit_code == 0
    out = runner.invoke(routing_app, ["eval", "--routing", str(plan), "--n", "8", "--json", str(tmp_path / "e.json")])
    assert out.exit_code == 0, out.output
    records = read_records(HELD_OUT)
    from saturation.core.data import sample_records

    mine, _ = evaluate(routing.build(model, 0, "fastv", prune_layer=2, keep=0.25), processor,
                       sample_records(records, 8, 0))
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == mine["accuracy"]
    gen = runner.invoke(routing_app, ["generate", "--routing", str(plan), "--image", str(records[0].image),
                                      "--prompt", "what colour is the circle?"])
    assert gen.exit_code == 0 and gen.stdout.strip().startswith(f"{records[0].image}:"), gen.output
    bench = runner.invoke(routing_app, ["bench", "--routing", str(plan), "--text-tokens", "8", "--repeats", "1",
                                        "--warmup", "0", "--new-tokens", "1", "--json", str(tmp_path / "b.json")])
    assert bench.exit_code == 0, bench.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["variants"] == ["fastv@2:R=75%"] and 0 < b["theory"]["prefill"]["fastv@2:R=75%"]["8"] < 1  # measured alone


@pytest.mark.parametrize("args, message", [
    (["--plan", "vanilla"], "needs no artifact"),
    (["--plan", "lf@4"], "has a side branch to train: use `routing train --plan lf@4`"),
    (["--plan", "lf@4+prune-pre:50%"], "routing train --plan lf@4+prune-pre:50%"),
    (["--plan", "vtw"], "needs its split: write e.g. vtw@6"),
    (["--plan", "fastv@2"], "fastv needs R"), (["--plan", "fastv@2:25%"], "old spelling"),
    (["--plan", "fastv@20:R=50%"], "FastV's layer K must be in 1..11"),
])
def test_bad_plans_are_one_line_and_write_nothing(tmp_path, args, message):
    result = _save(tmp_path / "plan", *args)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "plan" / "routing.json").exists()


def test_split_option_fills_a_missing_split_and_bench_refuses_pre_llm_scores_in_one_line(tmp_path):
    assert _save(tmp_path / "vtw", "--plan", "vtw", "--split", "5").exit_code == 0
    assert json.loads((tmp_path / "vtw" / "routing.json").read_text())["spec"] == "vtw@5"
    assert _save(tmp_path / "pre", "--plan", "prune-pre:50%").exit_code == 0
    bench = runner.invoke(routing_app, ["bench", "--routing", str(tmp_path / "pre"), "--text-tokens", "8",
                                        "--repeats", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")])
    assert bench.exit_code == 1 and "routing compare --plans vanilla,prune-pre:50%" in bench.output
    assert len(bench.output.strip().splitlines()) == 1


def test_analyze_refuses_plans_it_cannot_compare_in_one_line_before_any_work(tmp_path):
    """analyze compares fusion layers token for token with vanilla: a pruned plan (before: KeyError traceback) or
    one with no fusion layer is one line, and no analysis folder is made."""
    assert _save(tmp_path / "vtw", "--plan", "vtw@4").exit_code == 0
    assert _save(tmp_path / "fastv", "--plan", "fastv@2:R=50%").exit_code == 0
    for plan, message in (("vtw", "plan vtw@4 has none"), ("fastv", "plan fastv@2:R=50% prunes image tokens")):
        result = runner.invoke(routing_app, ["analyze", "--routing", str(tmp_path / plan), "--n", "2",
                                             "--out", str(tmp_path / f"an-{plan}")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / f"an-{plan}").exists()
