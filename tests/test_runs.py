"""The run-folder contract of every long job (issue 28): one process per folder (a real second process is refused,
a kill -9 leaves nothing that blocks), options recorded and checked on rerun, no stale results, and a full disk as
one `error:` line with partial files cleaned (ENOSPC injected)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import routing_app, saturation_app
from saturation.core.errors import ToolkitError
from saturation.core.runs import locked, open_run

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
HOLD = """
import sys, time
from saturation.core.runs import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    """A real second process holding `folder`'s run lock (until killed)."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]  # beside progress and logs
    assert len(errors) == 1 and errors[0].startswith("error:"), result.output
    return errors[0]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- one process per folder ---


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_one_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(ToolkitError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            with locked(out):
                pass
        # two `routing train` into one new --out: the second is refused before it makes any training data
        line = _one_error_line(runner.invoke(routing_app, ["train", "--out", str(out), "--split", "6",
                                                           "--max-steps", "1"]))
        assert f"pid {holder.pid}" in line and str(out) in line
        assert not any(out.glob("train_data_*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with locked(out):  # the OS dropped the dead holder's lock: nothing stale blocks
        with locked(out):  # and a job inside a job on the same folder is no second process
            pass
    with locked(out):
        pass


def test_probe_and_compare_and_reproduce_take_the_lock(tmp_path):
    out = tmp_path / "busy"
    holder = _holder(out)
    try:
        for app, args in ((saturation_app, ["probe", "--out", str(out), "-n", "2"]),
                          (routing_app, ["compare", "--plans", "vanilla", "--out", str(out)]),
                          (routing_app, ["reproduce", "--out", str(out)])):
            assert f"pid {holder.pid}" in _one_error_line(runner.invoke(app, args))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# --- options recorded, checked, stale results removed ---


def test_open_run_refuses_other_options_and_a_fresh_start_removes_old_results(tmp_path):
    labels = {"n": "--n", "plans": "--plans"}
    assert open_run(tmp_path, {"n": 4, "plans": ["a", "b"]}, labels, True, ("result.csv",)) is False
    (tmp_path / "result.csv").write_text("x")
    assert open_run(tmp_path, {"n": 4, "plans": ["a", "b"]}, labels, True, ("result.csv",)) is True  # a resume
    assert (tmp_path / "result.csv").exists()
    with pytest.raises(ToolkitError, match=r"--n 4 \(now 5\), --plans a,b \(now a\); pass --no-resume"):
        open_run(tmp_path, {"n": 5, "plans": ["a"]}, labels, True, ("result.csv",))
    assert (tmp_path / "result.csv").exists()  # a refusal touches nothing
    open_run(tmp_path, {"n": 5, "plans": ["a"]}, labels, False, ("result.csv",), log=lambda _: None)
    assert not (tmp_path / "result.csv").exists()
    assert json.loads((tmp_path / "run.json").read_text()) == {"n": 5, "plans": ["a"]}


def test_reproduce_with_other_options_is_refused_naming_each(tmp_path):
    from routing.jobs.reproduce import ReproduceConfig, reproduce_identity, run_reproduce

    out = tmp_path / "rep"
    first = ReproduceConfig(out=out, n_eval=16, max_steps=30)
    out.mkdir()
    (out / "run.json").write_text(json.dumps(reproduce_identity(first)))
    (out / "report.md").write_text("a report of the 16-question run")
    for change, text in (({"n_eval": 48}, "--n-eval 16 (now 48)"), ({"max_steps": 5}, "--max-steps 30 (now 5)")):
        with pytest.raises(ToolkitError, match=r"holds a run with other options: .*--no-resume") as err:
            run_reproduce(_with(first, **change), log=lambda _: None)
        assert text in str(err.value)
    assert (out / "report.md").exists()  # refused: the run is kept as it was


def _with(cfg, **change):
    from dataclasses import replace

    return replace(cfg, **change)


def test_compare_killed_midway_leaves_no_stale_frontier_and_resumes_per_plan(tmp_path, monkeypatch):
    import routing.jobs.compare as compare
    from routing.jobs.compare import CompareConfig, run_compare

    out = tmp_path / "cmp"
    cfg = CompareConfig(plans="vanilla,lf@5", n=4, train_steps=4, repeats=1, out=out)
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"plans": ["vanilla", "fastv@2:R=50%"]}))
    for name in ("frontier.csv", "pareto.png", "pareto.pdf"):
        (out / name).write_text("the previous run's")
    with pytest.raises(ToolkitError, match=r"--plans vanilla,fastv@2:R=50% \(now vanilla,lf@5\)"):
        run_compare(cfg, log=lambda _: None)
    assert (out / "frontier.csv").exists()  # refused: nothing touched

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "measure_latency", killed)
    with pytest.raises(KeyboardInterrupt):  # --no-resume, killed after training and evaluating, before timing
        run_compare(_with(cfg, resume=False), log=lambda _: None)
    assert not any((out / name).exists() for name in ("frontier.csv", "pareto.png", "pareto.pdf"))
    summary = out / "train" / "lf-s5" / "train_summary.json"
    stamp = summary.stat().st_mtime_ns
    assert json.loads(summary.read_text())["steps"] == 4

    monkeypatch.undo()
    evaluated = []
    real = __import__("routing.jobs.evaluate", fromlist=["evaluate"]).evaluate
    monkeypatch.setattr("routing.jobs.evaluate.evaluate", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    table = run_compare(cfg, log=lambda _: None)  # the rerun: the trained plan and both accuracies are kept
    assert summary.stat().st_mtime_ns == stamp and evaluated == []
    assert list(table["plan"]) == ["vanilla", "lf@5"] and (out / "frontier.csv").is_file()


def test_compare_resumes_a_plan_cut_short_from_its_checkpoint(tmp_path, monkeypatch):
    from routing.jobs import train
    from routing.jobs.compare import CompareConfig, run_compare

    out = tmp_path / "cmp"
    cfg = CompareConfig(plans="vanilla,lf@5", n=2, train_steps=4, repeats=1, out=out)
    real = train.SideBranchTrainer._save_checkpoint

    def die_after_step_2(self, model, trial):
        real(self, model, trial)
        if self.state.global_step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.SideBranchTrainer, "_save_checkpoint", die_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, log=lambda _: None)
    monkeypatch.undo()
    messages = []
    run_compare(cfg, log=messages.append)
    assert any("resuming" in m and "from step 2" in m for m in messages), messages
    assert json.loads((out / "train" / "lf-s5" / "train_summary.json").read_text())["resumed_from"].endswith("-2")


def test_shapes_training_records_its_recipe_and_refuses_another(tmp_path):
    from dataclasses import asdict

    from saturation.shapes.train import Recipe, train

    out = tmp_path / "tiny"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps(asdict(Recipe(seed=0))))
    messages = []
    assert train(out, Recipe(seed=0), log=messages.append) == out  # finished with this recipe: nothing to do
    assert "already trained" in messages[0]
    with pytest.raises(ToolkitError, match=r"another recipe: seed 0 \(now 1\).*--no-resume"):
        train(out, Recipe(seed=1), log=lambda _: None)


# --- a full disk: one line naming the folder and the space, partial files cleaned ---


def test_full_disk_while_generating_training_data_is_one_line_and_leaves_no_partial_set(tmp_path, monkeypatch):
    from saturation import shapes

    out = tmp_path / "run"

    def partial_then_full(folder, *args, **kwargs):
        Path(folder, "images").mkdir(parents=True)
        Path(folder, "images", "0.png").write_bytes(b"x" * 1000)
        _disk_full()

    monkeypatch.setattr(shapes, "make_dataset", partial_then_full)
    line = _one_error_line(runner.invoke(routing_app, ["train", "--out", str(out), "--split", "6",
                                                       "--max-steps", "1"]))
    assert "no space left" in line and str(out / "train_data_seed0_n2000") in line
    assert "free there" in line and "needed" in line
    assert not (out / "train_data_seed0_n2000" / "tmp").exists()


@pytest.mark.parametrize("where", ["checkpoint", "artifact"])
def test_full_disk_at_a_checkpoint_or_the_artifact_is_one_line_and_the_run_resumes(tiny_model_dir, dataset, tmp_path,
                                                                                    monkeypatch, where):
    from safetensors import SafetensorError

    from routing.jobs import train
    from routing.model import RoutedModel

    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(dataset), "--split", "2", "--max-steps", "2",
            "--save-steps", "1", "--out", str(out), "--device", "cpu"]
    if where == "checkpoint":  # safetensors' own error, as a full disk raises it while writing a checkpoint
        def full(*a, **k):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        monkeypatch.setattr(train.SideBranchTrainer, "_save", full)
    else:
        monkeypatch.setattr(RoutedModel, "save_routing", _disk_full)
    line = _one_error_line(runner.invoke(routing_app, args))
    assert "no space left" in line and str(out) in line and "free there" in line
    assert not [c for c in (out / "checkpoints").glob("checkpoint-*") if not (c / "checkpoint_complete").exists()]
    monkeypatch.undo()
    again = runner.invoke(routing_app, args)
    assert again.exit_code == 0, again.output
    assert (out / "routing" / "routing.json").is_file()


def test_full_disk_in_the_probe_shards_and_figure_is_one_line(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from saturation.probe import ShardStore

    out = tmp_path / "probe"
    monkeypatch.setattr(ShardStore, "write", _disk_full)
    line = _one_error_line(runner.invoke(saturation_app, ["probe", "--out", str(out), "-n", "2"]))
    assert "no space left" in line and str(out) in line
    monkeypatch.undo()
    monkeypatch.setattr(Figure, "savefig", _disk_full)
    line = _one_error_line(runner.invoke(saturation_app, ["probe", "--out", str(out), "-n", "2"]))
    assert "no space left" in line and str(out) in line and "free there" in line
    assert not list(out.glob(".figure2*.tmp")) and not (out / "figure2.png").exists()
    monkeypatch.undo()
    assert runner.invoke(saturation_app, ["probe", "--out", str(out), "-n", "2"]).exit_code == 0
    assert (out / "figure2.png").is_file()


def test_full_disk_message_names_the_space_free(tmp_path):
    from saturation.core.files import disk_guard

    with pytest.raises(ToolkitError, match=r"no space left on the disk of .*run \([0-9.]+ [KMGT]?B(ytes)? free there, "
                                           r"about 3.0 MB needed\)"):
        with disk_guard(tmp_path / "run", needed=3_000_000):
            _disk_full()
    with pytest.raises(ValueError):  # anything else goes through untouched
        with disk_guard(tmp_path):
            raise ValueError("not a disk")
