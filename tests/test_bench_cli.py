"""`routing bench` as a user types it: table, JSON and figure on a toy geometry, `--train`'s step report; one-line
errors on bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import routing_app

runner = CliRunner()
FAST = ["--repeats", "1", "--warmup", "0", "--new-tokens", "2"]


def test_bench_writes_json_and_figure(tmp_path):
    out = tmp_path / "bench" / "result.json"
    result = runner.invoke(routing_app, ["bench", "--geometry", "tiny", "--layers", "3", "--text-tokens", "4,8",
                                         "--variants", "lf,pc", "--json", str(out), *FAST])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["prefill_ratio"]) == set(data["decode_ratio"]) == {"lf", "pc"}
    assert set(data["theory"]["prefill"]["lf"]) == {"4", "8"} and data["split"] == 1
    assert (tmp_path / "bench" / "result.png").is_file() and (tmp_path / "bench" / "result.pdf").is_file()
    assert "vanilla" in result.output and "FLOPs" in result.output


@pytest.mark.parametrize("args, message", [
    (["--geometry", "llava-9b"], "unknown geometry"),
    (["--geometry", "tiny", "--variants", "lf,fast"], "unknown variant"),
    (["--geometry", "tiny", "--text-tokens", "0"], "must be positive"),
    (["--geometry", "tiny", "--text-tokens", "-8"], "must be positive"),
    (["--routing", "somewhere", "--split", "3"], "not both"),
    (["--geometry", "tiny", "--layers", "4", "--split", "3"], "split 3 is out of range"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, args, message):
    result = runner.invoke(routing_app, ["bench", *args, "--json", str(tmp_path / "b.json"), *FAST])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "b.json").exists()


def test_help_names_every_geometry():
    """`--geometry`'s help lists every preset there is (it listed 4 of 10 once), `python -m saturation.benchmark`'s
    too: a new preset fails here until its help says so."""
    from saturation.benchmark import app as probe_bench
    from saturation.core.geometry import GEOMETRIES

    for app, args in ((routing_app, ["bench", "--help"]), (probe_bench, ["--help"])):
        text = " ".join(runner.invoke(app, args, terminal_width=400).output.split())
        missing = [name for name in GEOMETRIES if name not in text]
        assert not missing, (args, missing)


def test_bench_train_reports_the_flop_model_and_where_the_step_goes(tmp_path):
    from routing import flops
    from routing.plan import make_plan
    from saturation.core.geometry import geometry_config

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(routing_app, ["bench", "--geometry", "tiny", "--layers", "4", "--split", "1",
                                              "--variants", "lf,kv", "--text-tokens", "6", "--batch-size", "2",
                                              "--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--train",
                                              "--json", str(out)])
    assert result.exit_code == 0, result.output
    steps = json.loads(out.read_text())["train_step"]["6"]
    assert list(steps) == ["pc", "lf", "kv"]
    g = flops.Geometry.of(geometry_config("tiny", 4).text_config)
    pc = flops.train_step_cost(g, make_plan(4, 1, "pc"), 9, 6, labelled=8)  # the last 8 positions
    for v, s in steps.items():
        cost = flops.train_step_cost(g, make_plan(4, 1, v), 9, 6, labelled=8)
        assert s["flop_ratio_vs_pc"] == pytest.approx(cost.total / pc.total)
        assert s["flop_gflops"]["backward"] == pytest.approx(cost.backward / 1e9)
        parts = s["breakdown_ms"]
        assert list(parts) == ["shallow", "side", "deep", "fusion", "head+loss", "other", "backward"]
        assert all(parts[k] > 0 for k in ("shallow", "side", "deep", "fusion", "head+loss", "backward"))
    assert steps["pc"]["ratio_vs_pc"] == 1.0 and steps["pc"]["flop_ratio_vs_pc"] == 1.0
    text = " ".join(result.output.split())
    lf = steps["lf"]
    assert (f"lf {lf['ms']:.1f} ms ({lf['ratio_vs_pc']:.3f}x PC, FLOP model {lf['flop_ratio_vs_pc']:.3f})" in text)
    assert "lf step in ms, by group (hooked rounds): shallow" in text and "pc step in ms" in text
