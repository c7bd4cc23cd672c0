"""Data parallelism through real launchers: `torchrun --nproc_per_node 2` subprocesses on CPU (gloo).

Each multi-process run costs ~15-25 s here (two interpreters importing torch and transformers), so runs are few
and small, and every one has a timeout and its own free port: a hung collective fails the test, never the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cli import routing_app
from saturation.core.loading import DATA_SAMPLES
from saturation.probe import ProbeConfig, run_probe

BIN = Path(sys.executable).parent
runner = CliRunner()
TIMEOUT = 120  # seconds per launcher run: far above the ~25 s it takes, far below a hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args, nproc: int = 2, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc <console script> args` on its own port, killed after `TIMEOUT`."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "300", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(BIN / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=cwd)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_two_process_probe_equals_one_process_and_resumes_per_shard(tmp_path):
    single = run_probe(ProbeConfig(model="tiny", n=8, out=tmp_path / "one", progress=False))
    out = tmp_path / "two"
    proc = torchrun("saturation", "probe", "-n", 8, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("recommended split") == 1  # rank 0 alone reports
    assert proc.stderr.count("probe ━") <= 1 or "4/4" in proc.stderr  # one progress bar (rank 0's)
    shards = sorted(p.name for p in (out / "samples").glob("shard-*.parquet"))
    assert shards == ["shard-r0-00000.parquet", "shard-r1-00000.parquet"]  # each rank its own files
    for name in ("per_sample.parquet", "summary.csv", "recommendation.json", "figure2.png", "figure2.pdf"):
        assert (out / name).stat().st_size > 0, name

    a = pd.read_parquet(single.table_path)
    b = pd.read_parquet(out / "per_sample.parquet")
    keys = ["sample", "sample_id", "layer", "modality", "metric"]
    assert a[keys].astype(str).equals(b[keys].astype(str))  # the same samples, rows in the same order
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-5, atol=1e-6, equal_nan=True)
    sa, sb = pd.read_csv(single.summary_path), pd.read_csv(out / "summary.csv")
    assert sa[["layer", "modality", "metric"]].equals(sb[["layer", "modality", "metric"]])
    np.testing.assert_allclose(sb[["median", "q25", "q75"]], sa[["median", "q25", "q75"]], atol=1e-5, equal_nan=True)
    rec_a, rec_b = single.recommendation, json.loads((out / "recommendation.json").read_text())
    assert rec_b["split"] == rec_a["split"] and rec_b["alternatives"] == rec_a["alternatives"]

    # rank 1 "was killed": its shard is gone. A restart of all ranks probes only its samples again.
    (out / "samples" / "shard-r1-00000.parquet").unlink()
    (out / "per_sample.parquet").unlink()
    again = torchrun("saturation", "probe", "-n", 8, "--out", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(4 probed now, 4 from shards" in again.stdout
    np.testing.assert_allclose(pd.read_parquet(out / "per_sample.parquet")["value"], a["value"], rtol=1e-5,
                               atol=1e-6, equal_nan=True)


def test_an_error_on_one_rank_stops_all_ranks_with_one_line(tmp_path):
    """A broken image in one rank's share: that rank fails while probing, the other ends quietly at the barrier,
    and no merged result is written."""
    data = tmp_path / "data"
    shutil.copytree(DATA_SAMPLES / "shapes" / "images", data / "images")
    records = json.loads((DATA_SAMPLES / "shapes" / "probe.json").read_text())[:4]
    (data / records[0]["image"]).write_bytes(b"not an image")
    (data / "probe.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    proc = torchrun("saturation", "probe", "-n", 4, "--batch-size", 1, "--data", data / "probe.json", "--out", out)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and "cannot read image" in lines[0], proc.stderr[-3000:]
    assert "saturation/probe.py" not in proc.stderr  # no traceback from our code on any rank
    assert not (out / "per_sample.parquet").exists() and not (out / "recommendation.json").exists()


def _side_update(run: Path, split: int) -> dict[str, torch.Tensor]:
    """The trained side branch minus its initial weights (a copy of layer `split` of the embedded model)."""
    from safetensors.torch import load_file

    side = load_file(run / "routing" / "side_branch.safetensors")
    base = load_file(DATA_SAMPLES / "tiny-llava" / "model.safetensors")
    layer = {k.split(f"layers.{split}.", 1)[1]: v for k, v in base.items() if "language_model" in k and f"layers.{split}." in k}
    return {k: side[k] - layer[k.split(".", 1)[1]] for k in side}


def test_two_process_ddp_update_equals_one_process_with_twice_the_batch(tmp_path):
    """2 gloo processes x batch 2 see the samples of 1 process x batch 4 per step, so 3 steps of side-branch updates
    agree; rank 0 alone writes; the run folder records its world size and refuses another one in one line."""
    opts = ["--split", 5, "--n-train", 16, "--max-steps", 3, "--lr", "1e-3", "--save-steps", 2]
    one = tmp_path / "one"
    single = runner.invoke(routing_app, ["train", *map(str, opts), "--batch-size", "4", "--out", str(one)])
    assert single.exit_code == 0, single.output
    two = tmp_path / "two"
    proc = torchrun("routing", "train", *opts, "--batch-size", 2, "--out", two, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained to step 3") == 1 and proc.stdout.count("split 5 (from") == 1  # rank 0 reports

    a, b = _side_update(one, 5), _side_update(two, 5)
    assert a.keys() == b.keys()
    norm = torch.sqrt(sum((v ** 2).sum() for v in a.values()))
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    assert norm > 1e-4 and diff / norm <= 1e-3, (float(norm), float(diff))
    loss_a = json.loads((one / "train_summary.json").read_text())["train_loss"]
    loss_b = json.loads((two / "train_summary.json").read_text())["train_loss"]
    assert loss_b == pytest.approx(loss_a, rel=1e-4)  # the global mean loss, not rank 0's share

    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    ckpt = two / "checkpoints" / "checkpoint-2"
    assert (ckpt / "checkpoint_complete").is_file() and (ckpt / "loss_sum.json").is_file()
    assert {"loss.png", "train_log.csv", "train_summary.json"} <= {p.name for p in two.iterdir()}

    alone = runner.invoke(routing_app, ["train", *map(str, opts), "--max-steps", "4", "--batch-size", "2",
                                        "--out", str(two)])
    assert alone.exit_code == 1
    lines = alone.output.strip().splitlines()
    assert len(lines) == 1 and "nproc_per_node) 2 (now 1)" in lines[0], alone.output


FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: {port}
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 1
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_use_orig_params: true
  fsdp_state_dict_type: {state_dict}
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_accelerate_launch_with_fsdp_on_cpu_is_one_line_before_any_work(tmp_path):
    """The real `accelerate launch` with the README's FSDP config: accelerate's FSDP plugin has no CPU backend (it
    raised deep inside the Trainer on every rank); now rank 0 says so in one line, nothing is written."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG.format(port=free_port(), state_dict="FULL_STATE_DICT"))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), str(BIN / "routing"), "train",
           "--split", "4", "--n-train", "4", "--max-steps", "1", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "FSDP needs GPUs" in lines[0], proc.stderr[-3000:]
    assert "routing/train.py" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("env", "message"), [
    ({"FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, "set fsdp_state_dict_type: FULL_STATE_DICT"),
    ({"FSDP_VERSION": "2"}, "set fsdp_state_dict_type: FULL_STATE_DICT"),  # FSDP2's default is sharded
    ({"FSDP_USE_ORIG_PARAMS": "false"}, "fsdp_use_orig_params: true"),
])
def test_fsdp_configs_that_cannot_save_the_side_branch_are_refused(env, message):
    from routing.jobs.train import check_sharding_engine
    from saturation.core.errors import ToolkitError

    check_sharding_engine({})  # no FSDP: nothing to check
    with pytest.raises(ToolkitError, match=message):
        check_sharding_engine({"ACCELERATE_USE_FSDP": "true"} | env)
