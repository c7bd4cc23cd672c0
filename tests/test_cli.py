"""Command-line behaviour shared by every command: help, and one-line errors with a non-zero exit."""

import os
import subprocess
import sys

from typer.testing import CliRunner

from cli import routing_app, saturation_app

runner = CliRunner()


def test_help_explains_itself():
    for app in (saturation_app, routing_app):
        result = runner.invoke(app, ["--help"])
        assert result.exit_code == 0 and "Usage" in result.output
    result = runner.invoke(saturation_app, ["probe", "--help"])
    assert "--model" in result.output and "--n" in result.output


def test_offline_alias_fails_with_one_line_naming_the_id():
    """The real console script, as a user types it; no traceback, exit 1."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="400")
    proc = subprocess.run([sys.executable, "-c", "import cli; cli.saturation_app()", "probe", "--model",
                           "llava-1.5-7b", "--n", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "llava-hf/llava-1.5-7b-hf" in lines[0] and "Traceback" not in proc.stderr


def test_not_llava_model_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    result = runner.invoke(saturation_app, ["probe", "--model", str(tmp_path), "--n", "2"])
    assert result.exit_code == 1 and "not a LLaVA model" in result.output
