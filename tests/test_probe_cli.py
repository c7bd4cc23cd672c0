"""`saturation probe` from the command line: outputs on success, one plain line and exit 1 on bad input."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import saturation_app

runner = CliRunner()




def _probe(*args):
    return runner.invoke(saturation_app, ["probe", *map(str, args)], env={"COLUMNS": "300"})


def _one_line_error(result, text):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in result.output, result.output


def test_writes_every_output(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    result = _probe("--model", tiny_model_dir, "--data", dataset, "--n", 4, "--batch-size", 3, "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("per_sample.parquet", "summary.csv", "recommendation.json", "figure2.png", "figure2.pdf"):
        assert (out / name).stat().st_size > 0, name
    rec = json.loads((out / "recommendation.json").read_text())
    assert isinstance(rec["split"], int) and rec["num_layers"] == 6 and rec["rule"] == "auto"
    assert f"recommended split  s = {rec['split']}" in result.output and str(out) in result.output

    again = _probe("--model", tiny_model_dir, "--data", dataset, "--n", 4, "--out", out, "--rule", "conservative")
    assert again.exit_code == 0 and "0 probed now" in again.output
    assert json.loads((out / "recommendation.json").read_text())["rule"] == "conservative"

    changed = _probe("--model", tiny_model_dir, "--data", dataset, "--n", 4, "--out", out, "--seed", 3)
    _one_line_error(changed, "--no-resume")
    assert (out / "figure2.png").is_file()  # nothing already written is lost


def test_missing_data_file(tiny_model_dir, tmp_path):
    _one_line_error(_probe("--model", tiny_model_dir, "--data", tmp_path / "nope.json"), "data file not found")


def test_malformed_json(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,')
    _one_line_error(_probe("--model", tiny_model_dir, "--data", bad), "malformed JSON")


def test_n_larger_than_the_data(tiny_model_dir, dataset, tmp_path):
    _one_line_error(_probe("--model", tiny_model_dir, "--data", dataset, "--n", 50, "--out", tmp_path), "only 12")


def test_not_a_llava_model(tmp_path, dataset):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    _one_line_error(_probe("--model", tmp_path, "--data", dataset, "--n", 2), "not a LLaVA model")


def test_bad_rule_and_batch_size(tiny_model_dir, dataset, tmp_path):
    _one_line_error(_probe("--model", tiny_model_dir, "--data", dataset, "--rule", "magic"), "unknown rule")
    _one_line_error(_probe("--model", tiny_model_dir, "--data", dataset, "--batch-size", 0), "batch-size")


def test_no_arguments_probes_the_embedded_model(tiny_model_dir, dataset, tmp_path, monkeypatch):
    """`saturation probe` alone: the embedded model (stood in for by the tiny random one) and its samples."""
    import saturation.core.loading
    import saturation.probe

    monkeypatch.setattr(saturation.core.loading, "TINY_DIR", tiny_model_dir)
    monkeypatch.setitem(saturation.core.loading.EMBEDDED, "tiny", tiny_model_dir)  # what resolve_name("tiny") reads
    monkeypatch.setattr(saturation.probe, "DEFAULT_DATA", dataset)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(saturation_app, ["probe"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "probe" / "tiny"
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["evidence"]["n"] == 12  # all 12 records: fewer than 64
    assert rec["num_layers"] == 6 and rec["model"] == str(tiny_model_dir)  # the stand-in, not the shipped model
    assert (out / "figure2.png").is_file() and (out / "figure2.pdf").is_file()


@pytest.mark.parametrize("name", ["tiny", "tiny-staged"])
def test_the_auxiliary_loss_caveat_comes_with_the_aux_trained_model_only(name, dataset, tmp_path):
    """The default `tiny` was trained with a logit-lens loss on its image tokens, which shapes what the lens sees
    there: its recommendation and printed result say so. `tiny-staged` (answer losses only) gets no such note."""
    result = _probe("--model", name, "--data", dataset, "--n", 4, "--out", tmp_path / name)
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / name / "recommendation.json").read_text())
    aux = name == "tiny"
    assert ("caveat" in rec["evidence"]) == aux and ("auxiliary logit-lens loss" in result.output) == aux, result.output


def test_the_caveat_follows_the_recipe_in_the_model_folder(tmp_path):
    """Stamped for a folder whose recipe.json records aux_weight > 0 (the `tiny` recipe), not for tiny-clean's
    (aux_weight 0), the staged model's (no aux_weight), a folder without one, or an unreadable one."""
    from saturation.core.loading import resolve_name
    from saturation.probe import _training_caveat

    assert "auxiliary logit-lens loss" in _training_caveat(resolve_name("tiny"))
    assert _training_caveat(resolve_name("tiny-clean")) is None and _training_caveat(resolve_name("tiny-staged")) is None
    for name, text in (("retrained", '{"aux_weight": 0.5}'), ("zero", '{"aux_weight": 0}'), ("bad", "{"),
                       ("list", "[1]"), ("none", None)):
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "recipe.json").write_text(text)
        assert (_training_caveat(str(tmp_path / name)) is not None) == (name == "retrained"), name
    assert _training_caveat("org/some-hub-model") is None


@pytest.mark.slow
def test_embedded_model_end_to_end_is_deterministic(tmp_path):
    for name in ("a", "b"):
        result = _probe("--n", 16, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "summary.csv").read_bytes() == (tmp_path / "b" / "summary.csv").read_bytes()
    summary = pd.read_csv(tmp_path / "a" / "summary.csv")
    assert set(summary["metric"]) >= {"cosine", "attention_mass", "logit_lens_kl"}


def test_bad_lens_positions(tiny_model_dir, dataset, tmp_path):
    for bad in (0, -2):
        _one_line_error(_probe("--model", tiny_model_dir, "--data", dataset, "--lens-positions", bad, "--out", tmp_path),
                        "--lens-positions must be at least 2")
