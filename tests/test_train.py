"""`routing train`: split handling, the paper's recipe on the HF Trainer, seeds, checkpoints and resume."""

import json

import pandas as pd
import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

import routing
from cli import routing_app
from routing.jobs.train import DONE_MARKER, TrainConfig, last_complete_checkpoint, run_train, train_side_branch
from saturation.core.data import read_records

runner = CliRunner()


def _cfg(model_dir, dataset, out, **kw):
    base = dict(model=str(model_dir), split="2", data=dataset, out=out, max_steps=6, save_steps=3,
                logging_steps=1, lr=3e-3, batch_size=4, device="cpu")
    return TrainConfig(**(base | kw))


def _losses(out):
    return pd.read_csv(out / "train_log.csv").set_index("step")["loss"]


def test_split_out_of_range_is_one_line(tiny_model_dir, dataset, tmp_path):
    result = runner.invoke(routing_app, ["train", "--model", str(tiny_model_dir), "--split", "5", "--data",
                                         str(dataset), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "split 5 is out of range for a 6-layer model: choose 1..4" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_lf_ideal_is_refused_with_the_papers_reason(tiny_model_dir, dataset, tmp_path):
    result = runner.invoke(routing_app, ["train", "--model", str(tiny_model_dir), "--split", "2", "--variant",
                                         "lf-ideal", "--data", str(dataset), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "gradient is exactly zero" in result.output


def test_auto_split_consumes_the_recommendation(tiny_model_dir, dataset, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "recommendation.json").write_text(json.dumps({"model": str(tiny_model_dir), "num_layers": 6, "split": 3}))
    summary = run_train(_cfg(tiny_model_dir, dataset, tmp_path / "r", split="auto", probe=probe, max_steps=2),
                        log=lambda _: None)
    assert summary["split"] == 3 and summary["split_source"].endswith("recommendation.json")
    saved = json.loads((tmp_path / "r" / "routing" / "routing.json").read_text())
    assert saved["split"] == 3


def test_loss_decreases_and_artifact_is_small(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "r"
    summary = run_train(_cfg(tiny_model_dir, dataset, out, max_steps=12, save_steps=100), log=lambda _: None)
    losses = _losses(out)
    assert losses.iloc[-3:].mean() < losses.iloc[:3].mean()
    assert summary["steps"] == 12 and summary["trainable_params"] > 0
    artifact = sum(f.stat().st_size for f in (out / "routing").iterdir())
    base = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    assert artifact < base / 3  # only the side branch, never the base


def test_same_seed_same_losses_other_seed_other_order(tiny_model_dir, dataset, tmp_path):
    runs = {name: _cfg(tiny_model_dir, dataset, tmp_path / name, seed=seed, max_steps=4, save_steps=100)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    for cfg in runs.values():
        run_train(cfg, log=lambda _: None)
    a, b, c = (_losses(tmp_path / n) for n in "abc")
    assert a.equals(b)
    assert not torch.allclose(torch.tensor(a.values), torch.tensor(c.values))


class Interrupt(TrainerCallback):
    """Simulates Ctrl-C after `at` steps."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_and_continues_the_curve(tiny_model, processor, dataset, tmp_path):
    records = read_records(dataset)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    cfg = TrainConfig(max_steps=6, save_steps=2, logging_steps=1, lr=3e-3, seed=0)
    train_side_branch(routing.build(tiny_model, 2), processor, records, cfg, straight)
    with pytest.raises(KeyboardInterrupt):
        train_side_branch(routing.build(tiny_model, 2), processor, records, cfg, broken, callbacks=[Interrupt(5)])
    assert last_complete_checkpoint(broken / "checkpoints").name == "checkpoint-4"
    messages = []
    summary = train_side_branch(routing.build(tiny_model, 2), processor, records, cfg, broken, log=messages.append)
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 6
    assert any("resuming" in m and "from step 4" in m for m in messages), messages
    # the summary's loss covers all six steps, not just the two after the resume
    whole = json.loads((straight / "train_summary.json").read_text())["train_loss"]
    assert summary["train_loss"] == pytest.approx(whole, rel=1e-5)
    resumed, ref = _losses(broken), _losses(straight)
    assert list(resumed.index) == list(range(1, 7))
    assert torch.allclose(torch.tensor(resumed.values), torch.tensor(ref.values), atol=1e-5)


def test_one_epoch_run_finishes_at_the_planned_step_and_a_rerun_is_a_no_op(tiny_model, processor, dataset, tmp_path):
    from routing.jobs.train import planned_steps

    records = read_records(dataset)[:10]  # 3 batches of 4, the last one short
    cfg = TrainConfig(max_steps=-1, save_steps=100, logging_steps=1, lr=3e-3, batch_size=4)
    first = train_side_branch(routing.build(tiny_model, 2), processor, records, cfg, tmp_path, log=lambda _: None)
    assert first["steps"] == planned_steps(len(records), cfg) == 3
    weights = (tmp_path / "routing" / "side_branch.safetensors").read_bytes()
    messages = []
    again = train_side_branch(routing.build(tiny_model, 2), processor, records, cfg, tmp_path, log=messages.append)
    assert again["steps"] == 3 and any("already finished" in m for m in messages)
    assert (tmp_path / "routing" / "side_branch.safetensors").read_bytes() == weights


def test_a_crash_after_the_last_step_writes_the_artifact_from_the_checkpoint(tiny_model, processor, dataset, tmp_path):
    """Training ended, the process died before the artifact: the rerun adds no step (3 is not a whole number of
    2-step epochs, where the Trainer resumed from its final checkpoint would run a 4th)."""
    import shutil

    records = read_records(dataset)[:8]
    cfg = TrainConfig(max_steps=3, save_steps=2, logging_steps=1, lr=3e-3, batch_size=4)
    first = train_side_branch(routing.build(tiny_model, 2), processor, records, cfg, tmp_path, log=lambda _: None)
    weights = (tmp_path / "routing" / "side_branch.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "routing")
    (tmp_path / "train_summary.json").unlink()
    again = train_side_branch(routing.build(tiny_model, 2), processor, records, cfg, tmp_path, log=lambda _: None)
    assert again["steps"] == 3 and again["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)
    assert (tmp_path / "routing" / "side_branch.safetensors").read_bytes() == weights
    assert list(_losses(tmp_path).index) == [1, 2, 3]


def test_half_written_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / DONE_MARKER).write_text("2")
    (tmp_path / "checkpoint-4").mkdir()  # interrupted mid-write: no marker
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()


def test_gradient_checkpointing_gives_the_same_side_gradient(tiny_model, processor, dataset):
    """The paper trains with gradient checkpointing (on CUDA here); it must not change the gradient."""
    from saturation.core.data import collate, encode_record

    batch = collate([encode_record(r, processor) for r in read_records(dataset)[:4]], 0)
    routed = routing.build(tiny_model, 2, "pc").train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            # renamed from gradient_checkpointing_* during transformers 5.x
            enable = getattr(routed, "activation_checkpointing_enable", None) or routed.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            assert routed.side[0].gradient_checkpointing and routed.adapter.layers[-1].gradient_checkpointing
        routed.zero_grad()
        routed(**batch).loss.backward()
        grads.append([p.grad.clone() for p in routed.side.parameters()])
    (getattr(routed, "activation_checkpointing_disable", None) or routed.gradient_checkpointing_disable)()
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_half_precision_side_branch_trains_in_fp32_and_returns_to_its_dtype(tiny_model):
    """AdamW steps of lr 1e-4 round away in bf16 weights: under autocast the side branch's master weights are fp32."""
    import copy

    from routing.jobs.train import fp32_master_weights

    routed = routing.build(copy.deepcopy(tiny_model).to(torch.bfloat16), 2)
    before = [p.clone() for p in routed.side.parameters()]
    with fp32_master_weights(routed.side, enabled=True):
        assert {p.dtype for p in routed.side.parameters()} == {torch.float32}
        assert routed.adapter.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the frozen base stays as it is
    assert all(torch.equal(a, b) and b.dtype == torch.bfloat16 for a, b in zip(before, routed.side.parameters()))
    with fp32_master_weights(routed.side, enabled=False):
        assert {p.dtype for p in routed.side.parameters()} == {torch.bfloat16}


# --- the run folder: its options are recorded, a resume with other options is refused, a finished run is left alone


def _cli_train(out, *extra):
    """`routing train` on the embedded model with a tiny generated set (8 records, 2 batches per epoch)."""
    args = ["train", "--model", "tiny", "--n-train", "8", "--batch-size", "4", "--save-steps", "2", "--out", str(out),
            *extra]
    return runner.invoke(routing_app, args)


def _artifact_bytes(out):
    return {p.name: p.read_bytes() for p in (out / "routing").iterdir()}


def test_resume_with_another_split_is_refused_and_the_run_is_kept(tmp_path):
    out = tmp_path / "run"
    first = _cli_train(out, "--split", "4", "--max-steps", "2")
    assert first.exit_code == 0, first.output
    before = _artifact_bytes(out)
    second = _cli_train(out, "--split", "5", "--max-steps", "2")
    assert second.exit_code == 1
    lines = second.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), second.output
    assert "--split 4 (now 5)" in lines[0] and "--no-resume" in lines[0]
    assert _artifact_bytes(out) == before  # still the split-4 artifact, untouched
    assert json.loads((out / "routing" / "routing.json").read_text())["split"] == 4
    fresh = _cli_train(out, "--split", "5", "--max-steps", "2", "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    assert json.loads((out / "routing" / "routing.json").read_text())["split"] == 5
    assert json.loads((out / "train_summary.json").read_text())["resumed_from"] is None


def test_rerun_of_a_finished_run_does_nothing_and_a_longer_one_resumes(tmp_path):
    out = tmp_path / "run"
    first = _cli_train(out, "--split", "4", "--max-steps", "3")  # 3 steps: not a whole number of epochs
    assert first.exit_code == 0, first.output
    before, summary = _artifact_bytes(out), json.loads((out / "train_summary.json").read_text())
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    again = _cli_train(out, "--split", "4", "--max-steps", "3")
    assert again.exit_code == 0, again.output
    assert "already finished" in again.output and "step 3" in again.output
    assert _artifact_bytes(out) == before
    assert json.loads((out / "train_summary.json").read_text()) == summary and summary["steps"] == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
    shorter = _cli_train(out, "--split", "4", "--max-steps", "2")  # weights of step 3 cannot become a 2-step run
    assert shorter.exit_code == 1 and "trained for 3 steps, more than the 2 asked for" in shorter.output
    assert "Loading weights" not in shorter.output  # refused before the model loads
    longer = _cli_train(out, "--split", "4", "--max-steps", "4")
    assert longer.exit_code == 0, longer.output
    assert "resuming" in longer.output and "from step 3" in longer.output
    after = json.loads((out / "train_summary.json").read_text())
    assert after["steps"] == 4 and after["resumed_from"].endswith("checkpoint-3")


@pytest.mark.parametrize("option, value, message", [
    ("--max-steps", "0", "--max-steps must be -1 (one epoch) or at least 1"),
    ("--max-steps", "-2", "--max-steps must be -1 (one epoch) or at least 1"),
    ("--lr", "-1", "--lr must be a positive number"),
    ("--lr", "0", "--lr must be a positive number"),
    ("--lr", "nan", "--lr must be a positive number"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--save-steps", "0", "--save-steps must be at least 1"),
    ("--n-train", "0", "--n-train must be at least 1"),
])
def test_bad_numbers_are_one_line_before_any_work(tmp_path, option, value, message):
    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--split", "4", "--n-train", "8", "--max-steps", "1", "--out", str(out),
            option, value]
    result = runner.invoke(routing_app, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not out.exists()


def _read_only_place():
    """A folder no one may create entries in, even root (sysfs), where the platform has one."""
    import os
    from pathlib import Path

    place = Path("/sys")
    try:
        (place / "dpvr-write-test").mkdir()
    except OSError:
        return place / "run"
    os.rmdir(place / "dpvr-write-test")
    return None


@pytest.mark.parametrize("case", ["a file", "parent is a file", "read-only"])
def test_unusable_out_is_one_line_before_any_work(tmp_path, case):
    (tmp_path / "file").write_text("keep me")
    out = {"a file": tmp_path / "file", "parent is a file": tmp_path / "file" / "run",
           "read-only": _read_only_place()}[case]
    if out is None:
        pytest.skip("no read-only place on this machine")
    # --split auto with no probe would run the probe first: the check must come before that
    result = runner.invoke(routing_app, ["train", "--model", "tiny", "--split", "auto", "--probe", str(tmp_path / "p"),
                                         "--n-train", "8", "--max-steps", "1", "--out", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(out) in lines[0], result.output
    assert (tmp_path / "file").read_text() == "keep me" and not (tmp_path / "p").exists()


@pytest.mark.parametrize("flag, change", [
    ("--variant", {"variant": "pc"}), ("--fusion-layers", {"fusion_layers": 2}), ("--side-depth", {"side_depth": 2}),
    ("--lr", {"lr": 1e-3}), ("--seed", {"seed": 1}), ("--batch-size", {"batch_size": 2}),
])
def test_every_defining_option_is_checked_on_resume(tiny_model, processor, dataset, tmp_path, flag, change):
    from saturation.core.errors import ToolkitError

    records = read_records(dataset)[:4]
    cfg = TrainConfig(max_steps=1, save_steps=1, logging_steps=1, lr=3e-3, batch_size=4, seed=0)
    train_side_branch(routing.build(tiny_model, 2), processor, records, cfg, tmp_path, log=lambda _: None)
    other = TrainConfig(**(vars(cfg) | change))
    routed = routing.build(tiny_model, 2, other.variant, other.fusion_layers, other.side_depth)
    with pytest.raises(ToolkitError, match=f"{flag} .*--no-resume"):
        train_side_branch(routed, processor, records, other, tmp_path, log=lambda _: None)
    with pytest.raises(ToolkitError, match="data"):  # other records: another data digest
        train_side_branch(routing.build(tiny_model, 2), processor, read_records(dataset)[4:8], cfg, tmp_path,
                          log=lambda _: None)
