"""`routing train --plan SPEC`: a composed plan (DPVR over token pruning) trains its side branch on the kept tokens,
the plan is recorded in run.json, the summary and the artifact, and a resume with another pruning is refused."""

import json

import pytest
from typer.testing import CliRunner

import routing
from cli import routing_app
from saturation.core.loading import load_model

runner = CliRunner()


def _train(out, *extra):
    """`routing train` on the embedded model with a tiny generated set (8 records, 2 batches per epoch)."""
    args = ["train", "--model", "tiny", "--n-train", "8", "--batch-size", "4", "--save-steps", "2", "--out", str(out),
            "--max-steps", "2", *extra]
    return runner.invoke(routing_app, args)


def test_a_composed_plan_trains_and_is_recorded(tmp_path):
    out = tmp_path / "run"
    result = _train(out, "--plan", "lf@4+prune-pre:50%")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert (run["variant"], run["split"], run["prune"], run["prune_layer"], run["keep"]) == ("lf", 4, "prune-pre", 0, 0.5)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["plan"] == "lf@4+prune-pre:50%" and summary["options"]["plan"] == "lf@4+prune-pre:50%"
    assert summary["steps"] == 2 and summary["trainable_params"] > 0
    model, _ = load_model("tiny")
    routed = routing.load(model, out)
    assert routed.plan.spec == "lf@4+prune-pre:50%"
    plain = routing.build(model, 4)
    trained = dict(routed.side.named_parameters())
    assert any((trained[n] != p).any() for n, p in plain.side.named_parameters())  # the side branch moved

    again = _train(out, "--plan", "lf@4+prune-pre:25%")  # another keep ratio: another run
    assert again.exit_code == 1 and "--plan 0.5 (now 0.25)" in again.output
    assert len(again.output.strip().splitlines()) == 1


def test_plan_split_fills_in_for_auto_and_fastv_composes(tmp_path):
    result = _train(tmp_path / "run", "--plan", "pc+fastv@2:R=50%", "--split", "5")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["plan"] == "pc@5+fastv@2:R=50%" and summary["variant"] == "pc"


@pytest.mark.parametrize("extra, message", [
    (["--plan", "fastv@2:R=50%"], "fastv has no side branch to train"),
    (["--plan", "vanilla"], "vanilla has no side branch to train"),
    (["--plan", "lf@4+prune-pre"], "prune-pre needs a keep ratio"),
    (["--plan", "lf@4", "--variant", "pc"], "is a lf plan but --variant says pc"),
    (["--plan", "lf@4", "--split", "5"], "splits at 4 but --split says 5"),
    (["--plan", "lf@4+fastv@6:R=50%"], "comes after the split 4"),
])
def test_bad_plans_are_one_line_before_any_work(tmp_path, extra, message):
    result = _train(tmp_path / "run", *extra)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run" / "run.json").exists()
