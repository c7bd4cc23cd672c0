"""Split resolution: explicit integers are range-checked, `auto` reads the probe's recommendation."""

import json
import os

import pytest

from routing.split import newest_probe, read_recommendation, resolve_split, validate_split
from saturation import ToolkitError


def _probe(folder, split, layers=12, model="m"):
    folder.mkdir(parents=True)
    (folder / "recommendation.json").write_text(json.dumps({"model": model, "num_layers": layers, "split": split}))
    return folder


@pytest.mark.parametrize("split", [0, 11, 12, -1])
def test_out_of_range_split_is_refused(split):
    with pytest.raises(ToolkitError, match=f"split {split} is out of range for a 12-layer model: choose 1..10"):
        validate_split(split, 12)


def test_integer_split_passes_through(tmp_path):
    assert resolve_split("7", 12, "m", None, tmp_path) == (7, "given")


def test_non_integer_split_is_refused(tmp_path):
    with pytest.raises(ToolkitError, match="must be an integer or 'auto'"):
        resolve_split("seven", 12, "m", None, tmp_path)


def test_auto_reads_the_given_probe(tmp_path):
    folder = _probe(tmp_path / "p", 6)
    assert resolve_split("auto", 12, "m", folder, tmp_path) == (6, str(folder / "recommendation.json"))


def test_auto_finds_the_newest_probe_of_the_same_model(tmp_path):
    old, new = _probe(tmp_path / "a", 5), _probe(tmp_path / "b", 7)
    _probe(tmp_path / "c", 3, model="other")
    os.utime(old / "recommendation.json", (1, 1))
    assert newest_probe(tmp_path, "m") == new
    assert resolve_split("auto", 12, "m", None, tmp_path)[0] == 7
    assert resolve_split("auto", 12, "unseen", None, tmp_path) == (-1, "missing")


def test_auto_refuses_a_probe_of_another_depth(tmp_path):
    folder = _probe(tmp_path / "p", 6, layers=32)
    with pytest.raises(ToolkitError, match="32-layer model, this one has 12"):
        resolve_split("auto", 12, "m", folder, tmp_path)


def test_malformed_recommendation(tmp_path):
    (tmp_path / "recommendation.json").write_text("{oops")
    with pytest.raises(ToolkitError, match="malformed JSON"):
        read_recommendation(tmp_path)
