"""The README's two commands stay true: CI runs the same test command, and the entry points exist."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """Shell lines of fenced code blocks, as ../shared/tools/newcomer-check reads them (first two count)."""
    lines, inside = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if re.fullmatch(r"```(bash|sh|shell|console)?", line):
            inside = not inside
            continue
        if inside and line.strip() and not line.startswith("#"):
            lines.append(line.removeprefix("$ "))
    return lines[:2]


def test_readme_opens_with_install_run_and_install_test():
    run, test = readme_commands()
    assert "pip install" in run and "saturation probe" in run
    assert "pip install" in test and "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_console_scripts_run_the_typer_apps():
    """The scripts' entry points wrap the typer apps (click's usage errors as one line: tests/test_bad_input.py)."""
    import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"saturation": "cli:saturation_main", "routing": "cli:routing_main"}
    assert cli.saturation_app.registered_commands and cli.routing_app.info.help
    with pytest.raises(SystemExit) as done:
        cli.routing_main(["bench", "--help"])
    assert done.value.code == 0


def test_readme_main_job_runs_on_the_embedded_model(tmp_path):
    """The first README command after its install step, as written (with --out moved to a temp folder)."""
    import shlex

    from typer.testing import CliRunner

    from cli import saturation_app

    args = shlex.split(readme_commands()[0].split("&&")[-1])
    assert args[:2] == ["saturation", "probe"]
    args = args[2:]
    if "--out" in args:
        args[args.index("--out") + 1] = str(tmp_path / "quickstart")
    result = CliRunner().invoke(saturation_app, ["probe", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("per_sample.parquet", "summary.csv", "recommendation.json", "figure2.png", "figure2.pdf"):
        assert (tmp_path / "quickstart" / name).is_file()


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's notebook lines (load, probe, parse_plan + build, generate, save) run as printed, from a folder
    that has the repository's data_samples/ (the snippet reads an image by that relative path)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "the README has no Python snippet"
    (tmp_path / "data_samples").symlink_to(ROOT / "data_samples")
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "shallow" in out and "fusion" in out  # plan.describe()
    assert (tmp_path / "runs" / "nb-routing" / "routing.json").is_file()
    assert (tmp_path / "runs" / "nb-probe" / "recommendation.json").is_file()
