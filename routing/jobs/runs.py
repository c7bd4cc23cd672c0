"""A `routing train` run folder: what defines the run (``run.json``), and whether a rerun may resume in it.

A run folder (``--out``) holds ``run.json`` (the options that define the run: model, variant, split, K, d_v, pruning,
lr, seed, batch size, data digest, processes), ``checkpoints/`` (a checkpoint counts once its completion marker is
written), ``train_summary.json`` and the artifact ``routing/``. A rerun resumes from the last complete checkpoint only
if its defining options are the same; a finished run is left as it is; the planned steps may grow between runs
(training continues) but not shrink. The generic half of this contract (the folder lock, recorded options, stale
results) is `saturation.core.runs`, which every long job uses.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from routing.artifact import read_manifest
from routing.plan import RoutingPlan
from saturation.core import distributed as dist
from saturation.core import runs as core_runs
from saturation.core.data import Record, image_key
from saturation.core.errors import ToolkitError
from saturation.core.files import write_json

DONE_MARKER = "checkpoint_complete"  # a checkpoint folder without it was interrupted mid-write
RUN_MANIFEST = "run.json"
SUMMARY = "train_summary.json"
# What defines a run (resuming with any of them changed would mix two runs), and the option that sets each.
RUN_OPTIONS = {"model": "--model", "variant": "--variant", "split": "--split", "fusion_layers": "--fusion-layers",
               "side_depth": "--side-depth", "learning_rate": "--lr", "seed": "--seed", "batch_size": "--batch-size",
               "data_sha256": "data (--data/--n-train)", "world_size": "processes (torchrun --nproc_per_node)",
               "prune": "--plan", "prune_layer": "--plan", "keep": "--plan", "rank": "--plan", "prune_args": "--plan"}
# Options an older run.json lacks, and the value it ran with: a run from before `world_size` was recorded ran alone,
# one from before --plan pruned nothing; one from before FastV's rank rules has none (a FastV run from then ranked by
# the text rows with its ratio kept: it does not resume under the new spelling).
RUN_DEFAULTS = {"world_size": 1, "prune": None, "prune_layer": 0, "keep": 1.0, "rank": None, "prune_args": {}}


class RunOptions(Protocol):
    """The training options a run's identity records besides its plan (`routing.jobs.train.TrainConfig` has them)."""

    seed: int
    batch_size: int

    @property
    def learning_rate(self) -> float: ...


def records_digest(records: list[Record], data: object = None) -> str:
    """A digest of what training reads: ids, image file names (or a hash of in-memory images), turns, question
    types (not folders, so a moved data set or run folder keeps its digest); and for a dataset `data` (a
    `saturation.core.sources.DataSpec`) the split, subset and columns it was read with, and its name where it is
    not a local path (a hub dataset, an lmms-eval task). LLaVA JSON keeps the digest it always had."""
    h = hashlib.sha256()
    read_with = _read_with(data)
    if read_with:
        h.update(json.dumps(read_with, sort_keys=True).encode())
    for r in records:
        h.update(json.dumps([r.id, image_key(r), r.turns, r.question_type]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _read_with(data: object) -> dict:
    """What the digest records of how `data` was read, beyond its records (empty: a plain path)."""
    options = getattr(data, "options", None)
    if options is None:
        return {}
    source = str(data.source)
    chosen = {k: v for k, v in options().items() if v is not None}
    if not Path(source).expanduser().exists():
        chosen["source"] = source
    return chosen


def run_identity(model_id: str, plan: RoutingPlan, opts: RunOptions, records: list[Record] | None = None) -> dict:
    """The options that define a run (`RUN_OPTIONS`); without `records`, all but the data digest (`with_data`
    adds it once the records are read)."""
    identity = {"model": model_id, "variant": plan.variant, "split": plan.split, "fusion_layers": plan.fusion_layers,
                "side_depth": plan.side_depth, "learning_rate": opts.learning_rate, "seed": opts.seed,
                "batch_size": opts.batch_size, "prune": plan.prune, "prune_layer": plan.prune_layer, "keep": plan.keep,
                "rank": plan.rank,
                "prune_args": plan.args_json,  # divprune's count, visionzip's dominant/contextual, pdrop's stages
                # the global batch is world_size x batch_size and the optimizer state is per process layout:
                # checkpoints resume only under the same number of processes
                "world_size": dist.world_size()}
    return identity if records is None else with_data(identity, records)


def with_data(identity: dict, records: list[Record], data: object = None) -> dict:
    """`identity` with the digest of the records the run trains on (and how `data` was read: `records_digest`)."""
    return identity | {"data_sha256": records_digest(records, data)}


def _same(key: str, before, now) -> bool:
    return Path(str(before)).name == Path(str(now)).name if key == "model" else before == now  # a local copy


def _differences(old: dict, new: dict) -> list[str]:
    """``--split 4 (now 5)`` for each defining option of `new` that `old` has otherwise."""
    return core_runs.differences(old, new, RUN_OPTIONS, RUN_DEFAULTS, _same)


def check_run(out: Path, identity: dict) -> None:
    """Refuse to resume in `out` when its `run.json` records other defining options than `identity`."""
    fresh = "pass --no-resume to start fresh there (its checkpoints are deleted), or choose another --out"
    if core_runs.check_manifest(out, identity, RUN_OPTIONS, RUN_MANIFEST, RUN_DEFAULTS, _same, fresh) is None \
            and any((out / "checkpoints").glob("checkpoint-*")):
        raise ToolkitError(f"{out} holds checkpoints but no {RUN_MANIFEST} saying which options made them "
                           f"(an older toolkit?): {fresh}")


def resumable(out: Path, identity: dict, planned: int) -> bool:
    """Whether a run of `identity` ending at step `planned` may resume in `out` (nothing there counts as yes)."""
    try:
        check_run(out, identity)
        check_not_past(out, planned)
    except ToolkitError:
        return False
    return True


def open_run(out: Path, identity: dict, resume: bool, log: Callable[[str], None] = print, write: bool = True) -> None:
    """Record the run's options in `out/run.json`: after checking them (resume), or dropping old checkpoints.
    `write=False` only checks (the other processes of a torchrun run: rank 0 writes)."""
    if resume:
        check_run(out, identity)
    if not write:
        return
    if not resume and (out / "checkpoints").exists():
        log(f"starting afresh in {out} (--no-resume): its old checkpoints are deleted")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    write_json(out / RUN_MANIFEST, identity)


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def finished_summary(out: Path, identity: dict, planned: int) -> dict | None:
    """The summary of a finished run of these options in `out` (artifact written), else None."""
    try:
        summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("run"), dict) or summary.get("steps") != planned:
        return None
    if _differences(summary["run"], identity):
        return None
    last = last_complete_checkpoint(out / "checkpoints")
    if last is not None and checkpoint_step(last) != planned:  # a fresh (--no-resume) run of the same options is under way
        return None
    try:
        read_manifest(out / "routing")
    except ToolkitError:
        return None
    return summary


def check_not_past(out: Path, planned: int) -> Path | None:
    """The newest complete checkpoint in `out` (None if none), refusing one beyond the step the run ends at."""
    last = last_complete_checkpoint(out / "checkpoints")
    if last is not None and checkpoint_step(last) > planned:
        raise ToolkitError(f"{out} already holds a run trained for {checkpoint_step(last)} steps, more than the "
                           f"{planned} asked for: pass a larger --max-steps, or --no-resume to start fresh there")
    return last


def finished_message(out: Path, summary: dict) -> str:
    return (f"{out}: already finished at step {summary['steps']} with these options; nothing to do "
            f"(--max-steps larger to train on, --no-resume to start fresh)")



def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-N` with its completion marker; half-written ones are removed."""
    done = []
    for ckpt in folder.glob("checkpoint-*"):
        if (ckpt / DONE_MARKER).is_file():
            done.append((int(ckpt.name.split("-")[1]), ckpt))
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
    return max(done)[1] if done else None
