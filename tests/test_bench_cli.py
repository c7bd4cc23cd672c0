"""`routing bench` as a user types it: table, JSON and figure on a toy geometry; one-line errors on bad input."""

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
