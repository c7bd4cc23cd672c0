"""Split resolution: explicit integers are range-checked, `auto` reads the probe's recommendation; one split range."""

import json
import os

import pytest
from typer.testing import CliRunner

from cli import routing_app
from routing.jobs.reproduce import sweep_splits
from routing.jobs.split import newest_probe, read_recommendation, resolve_split, validate_split
from routing.plan import make_plan
from saturation import ToolkitError
from saturation.recommend import clip_split, split_range


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


# --- the split range: one definition (saturation.recommend.split_range) behind every check ---


@pytest.mark.parametrize("num_layers", [4, 12, 32])
@pytest.mark.parametrize("fusion_layers", [0, 1, 2, 3])
@pytest.mark.parametrize("side_depth", [1, 2, 3])
def test_plan_validation_clipping_and_sweep_agree_on_the_range(num_layers, fusion_layers, side_depth):
    """make_plan, validate_split, clip_split and sweep_splits accept exactly the same splits, for every K and d_v."""
    if fusion_layers > num_layers - 2 or side_depth > num_layers - 1:
        return  # no split at all: covered by the next tests
    valid = split_range(num_layers, fusion_layers, side_depth)
    variant = "pc" if fusion_layers == 0 else "lf"  # lf needs K >= 1
    for split in range(-1, num_layers + 2):
        try:
            make_plan(num_layers, split, variant, fusion_layers, side_depth)
            planned = True
        except ToolkitError:
            planned = False
        try:
            validate_split(split, num_layers, fusion_layers, side_depth)
            validated = True
        except ToolkitError:
            validated = False
        assert planned == validated == (split in valid), split
        assert clip_split(split, num_layers, fusion_layers, side_depth) in valid
    assert sweep_splits(3, None, num_layers, fusion_layers, side_depth) == list(valid)
    assert all(s in valid for s in sweep_splits(valid[-1], 2, num_layers, fusion_layers, side_depth))


def test_k2_range_ends_one_layer_earlier():
    """K = 2 in a 12-layer model: layers 10 and 11 fuse, so s = 9 is the last split with a deep layer."""
    assert split_range(12, 2) == range(1, 10) and split_range(12) == range(1, 11) and split_range(12, 0) == range(1, 12)
    with pytest.raises(ToolkitError, match=r"split 10 is out of range for a 12-layer model with K=2 .*: choose 1\.\.9"):
        validate_split(10, 12, fusion_layers=2)
    assert sweep_splits(8, 2, 12, fusion_layers=2) == [6, 7, 8, 9]


@pytest.mark.parametrize("check", [lambda: make_plan(12, 5, "lf", 20), lambda: validate_split(5, 12, 20),
                                   lambda: sweep_splits(5, None, 12, 20), lambda: clip_split(5, 12, 20)])
def test_too_many_fusion_layers_is_an_error_about_k(check):
    with pytest.raises(ToolkitError) as err:
        check()
    text = str(err.value)
    assert text.startswith("K=20 fusion layers leave no room for a split in a 12-layer model")
    assert "--fusion-layers" in text and "at most 10" in text and "-9" not in text and "\n" not in text


def test_side_branch_too_deep_is_an_error_about_its_depth():
    with pytest.raises(ToolkitError, match=r"side branch of depth 12 .* 12-layer model: d_v \(--side-depth\) must be at most 11"):
        split_range(12, 1, 12)


def test_train_with_too_many_fusion_layers_is_one_line_before_any_work(tiny_model_dir, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --split auto with no probe would run one under ./runs: it must not get there
    result = CliRunner().invoke(routing_app, ["train", "--model", str(tiny_model_dir), "--split", "auto",
                                              "--fusion-layers", "20", "--data", str(dataset), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "K=20 fusion layers leave no room for a split in a 6-layer model" in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def test_auto_split_is_checked_against_the_fusion_layers(tmp_path):
    """A recommendation made for K = 1 (s = 10 of 12) does not fit K = 2: said before training starts."""
    folder = _probe(tmp_path / "p", 10)
    with pytest.raises(ToolkitError, match="with K=2 fusion layer"):
        resolve_split("auto", 12, "m", folder, tmp_path, fusion_layers=2)


@pytest.mark.parametrize("split", ["６", "٦", "1_0", "9" * 5000])
def test_a_split_in_other_digits_or_of_any_length_is_one_line(split, tmp_path):
    """int() reads full-width and Arabic-Indic digits and underscores: `--split ６` trained at split 6 (issue 28)."""
    with pytest.raises(ToolkitError, match="must be an integer or 'auto', in ASCII digits") as err:
        resolve_split(split, 12, "m", None, tmp_path)
    assert len(str(err.value)) < 120


@pytest.mark.parametrize("tokens", ["６4", "1_0", "9" * 5000])
def test_text_tokens_in_other_digits_are_one_line(tokens):
    from routing.jobs.bench import parse_text_tokens

    with pytest.raises(ToolkitError, match="comma-separated positive integers") as err:
        parse_text_tokens(f"8,{tokens}")
    assert len(str(err.value)) < 120
