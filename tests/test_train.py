"""`routing train`: split handling, the paper's recipe on the HF Trainer, seeds, checkpoints and resume."""

import json

import pandas as pd
import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

import routing
from cli import routing_app
from routing.train import DONE_MARKER, TrainConfig, last_complete_checkpoint, run_train, train_side_branch
from saturation.data import read_records

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
    summary = train_side_branch(routing.build(tiny_model, 2), processor, records, cfg, broken)
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 6
    resumed, ref = _losses(broken), _losses(straight)
    assert list(resumed.index) == list(range(1, 7))
    assert torch.allclose(torch.tensor(resumed.values), torch.tensor(ref.values), atol=1e-5)


def test_half_written_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / DONE_MARKER).write_text("2")
    (tmp_path / "checkpoint-4").mkdir()  # interrupted mid-write: no marker
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()


def test_gradient_checkpointing_gives_the_same_side_gradient(tiny_model, processor, dataset):
    """The paper trains with gradient checkpointing (on CUDA here); it must not change the gradient."""
    from saturation.data import collate, encode_record

    batch = collate([encode_record(r, processor) for r in read_records(dataset)[:4]], 0)
    routed = routing.build(tiny_model, 2, "pc").train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            # renamed from gradient_checkpointing_* during transformers 5.x
            enable = getattr(routed, "activation_checkpointing_enable", None) or routed.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            assert routed.side[0].gradient_checkpointing and routed.anatomy.layers[-1].gradient_checkpointing
        routed.zero_grad()
        routed(**batch).loss.backward()
        grads.append([p.grad.clone() for p in routed.side.parameters()])
    (getattr(routed, "activation_checkpointing_disable", None) or routed.gradient_checkpointing_disable)()
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_half_precision_side_branch_trains_in_fp32_and_returns_to_its_dtype(tiny_model):
    """AdamW steps of lr 1e-4 round away in bf16 weights: under autocast the side branch's master weights are fp32."""
    import copy

    from routing.train import fp32_master_weights

    routed = routing.build(copy.deepcopy(tiny_model).to(torch.bfloat16), 2)
    before = [p.clone() for p in routed.side.parameters()]
    with fp32_master_weights(routed.side, enabled=True):
        assert {p.dtype for p in routed.side.parameters()} == {torch.float32}
        assert routed.anatomy.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the frozen base stays as it is
    assert all(torch.equal(a, b) and b.dtype == torch.bfloat16 for a, b in zip(before, routed.side.parameters()))
    with fp32_master_weights(routed.side, enabled=False):
        assert {p.dtype for p in routed.side.parameters()} == {torch.bfloat16}
