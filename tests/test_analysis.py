"""Mechanism analyses: shallow stack untouched, fusion-layer attention measured per head for both models."""

import json

import torch
from typer.testing import CliRunner

import routing
from cli import routing_app
from routing.jobs.analysis import mechanism, per_head_mass, summarize
from saturation.core.data import read_records

runner = CliRunner()


def test_per_head_mass_on_a_known_pattern():
    pattern = torch.zeros(1, 2, 3, 3)
    pattern[0, 0, :, 0] = 1.0  # head 0: everything on key 0
    pattern[0, 1, :, 2] = 1.0  # head 1: everything on key 2
    query = torch.tensor([[False, True, True]])
    keys = torch.tensor([[True, True, False]])
    assert per_head_mass(pattern, query, keys).tolist() == [[1.0, 0.0]]


def test_shallow_stack_does_not_drift_and_heads_are_reported(tiny_model, processor, dataset):
    routed = routing.build(tiny_model, 3)
    with torch.no_grad():  # perturb the side branch, as training would
        for p in routed.side.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tables = mechanism(tiny_model, routed, processor, read_records(dataset)[:5], batch_size=2)
    assert set(tables["shallow_drift"]["layer"]) == {0, 1, 2}
    assert (tables["shallow_drift"]["cosine"] > 1 - 1e-6).all()  # same modules, same inputs (fp32 cosine noise)
    summary = summarize(tables)
    fusion = summary["fusion_layers"][5]
    assert 0 < fusion["head_mean"]["vanilla"] < 1 and fusion["head_mean"]["routed"] != fusion["head_mean"]["vanilla"]
    assert len(tables["fusion_attention"]) == 2 * 4 * 5  # models x heads x samples


def test_analyze_command(tiny_model, tiny_model_dir, dataset, tmp_path):
    routing.build(tiny_model, 2).save_routing(tmp_path / "routing")
    result = runner.invoke(routing_app, ["analyze", "--model", str(tiny_model_dir), "--routing",
                                         str(tmp_path / "routing"), "--data", str(dataset), "--n", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "analysis" / "mechanism.json").read_text())
    assert summary["shallow_drift_min_cosine"] > 1 - 1e-6 and (tmp_path / "analysis" / "mechanism.png").is_file()


def test_analyze_takes_the_run_folder_and_writes_beside_it(tiny_model, tiny_model_dir, dataset, tmp_path):
    """`--routing RUN` (what `routing train --out` names) works, and the default output sits in RUN/analysis."""
    run = tmp_path / "run"
    routing.build(tiny_model, 2).save_routing(run / "routing")
    result = runner.invoke(routing_app, ["analyze", "--model", str(tiny_model_dir), "--routing", str(run),
                                         "--data", str(dataset), "--n", "2"])
    assert result.exit_code == 0, result.output
    assert (run / "analysis" / "mechanism.json").is_file()
    assert not (tmp_path / "analysis").exists()
