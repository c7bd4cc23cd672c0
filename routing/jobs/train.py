"""Fine-tune only the side branch of a routed model with the HF `Trainer` (accelerate underneath).

The paper's recipe as defaults: AdamW, lr 1e-4 for LF and 5e-5 for PC/KV, cosine schedule, warmup 0.03, weight
decay 0, batch 4, one epoch, bf16 + gradient checkpointing on CUDA. Unlike the paper, the seed reaches the
data order: `transformers.set_seed` runs before the Trainer exists (the paper's Appendix C bug).

The plan trained is one `RoutingPlan` (``--plan``, or ``--variant`` at ``--split``), made and checked once from the
model's config before any weights load. A run folder (``--out``) holds ``run.json``, ``checkpoints/``, the logs,
``train_summary.json`` and the artifact ``routing/``; what defines a run and when a rerun resumes is
`routing.jobs.runs`. ``--max-steps`` may grow between runs (training continues) but not shrink.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed

from routing.artifact import _base_id
from routing.jobs import runs
from routing.jobs.runs import (
    DONE_MARKER,
    SUMMARY,
    check_not_past,
    check_run,
    checkpoint_step,
    finished_message,
    finished_summary,
    open_run,
    run_identity,
    with_data,
)
from routing.jobs.split import find_split
from routing.model import build
from routing.plan import RoutingPlan, check_records, parse_plan, parse_spec, plan_for
from saturation.core import distributed as dist
from saturation.core.data import PromptFormat, Record, collate, encode_record, read_records, sequence_keys
from saturation.core.errors import ToolkitError
from saturation.core.files import disk_guard, ensure_output_dir, write_json, write_text
from saturation.core.lengths import fit_example, max_positions
from saturation.core.loading import check_placement, cpu_threads, load_config, load_model, resolve_name
from saturation.core.runs import locked
from saturation.core.sources import DataSpec, load_records
from saturation.probe import ProbeConfig, run_probe
from saturation.probe import default_out as probe_default_out
from saturation.recommend import split_range

PAPER_LR = {"lf": 1e-4, "pc": 5e-5, "kv": 5e-5}
RUN_MANIFEST, last_complete_checkpoint = runs.RUN_MANIFEST, runs.last_complete_checkpoint  # importable here as before
LF_IDEAL_REFUSAL = ("lf-ideal cannot be trained: without a fusion layer the loss has no path to the side branch, "
                    "so its gradient is exactly zero (paper, Appendix A); use --variant lf")
PROBE_ROOT = Path("runs") / "probe"
LOSS_FILE = "loss_sum.json"  # per checkpoint: summed per-step loss so far, so a resumed run's mean covers every step


@dataclass
class TrainConfig:
    """Options of `routing train`. `lr=None` takes the paper's rate for the variant; `out=None` a default folder."""

    model: str = "tiny"
    split: str = "auto"  # an integer layer index, or 'auto' (the probe's recommendation)
    probe: Path | None = None  # probe folder for --split auto (default: newest probe of the same model)
    variant: str = "lf"
    plan: str | None = None  # a plan spec (lf@6+prune-pre:50%, pc+fastv@2:R=75%): variant, split and pruning in one
    fusion_layers: int = 1
    side_depth: int = 1
    data: Path | str | DataSpec | None = None  # LLaVA JSON or a dataset (saturation.core.sources); default: a
    # shapes-world training set made on the fly
    n_train: int = 2000  # records of that generated set (4 QA turns each)
    out: Path | None = None
    lr: float | None = None
    batch_size: int = 4
    epochs: float = 1.0
    max_steps: int = -1
    save_steps: int = 50
    logging_steps: int = 5
    warmup: float = 0.03
    seed: int = 0
    resume: bool = True
    dtype: str | None = None
    device: str | None = None
    # accelerate places the base across GPUs, CPU and disk (a base larger than one device). Not a defining option
    # (not in run.json): placement moves weights, not results, so a run resumes under another placement.
    device_map: str | None = None
    max_memory: str | None = None  # with device_map: per-device caps, "0=20GiB,1=20GiB,cpu=64GiB"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else PAPER_LR.get(self.variant, PAPER_LR["lf"])


def check_options(opts: TrainConfig) -> None:
    """One line for a numeric option out of range, before any work (HF itself trains one step at max_steps 0
    and crashes deep inside on a negative lr or a zero batch size)."""
    if opts.variant == "lf-ideal":
        raise ToolkitError(LF_IDEAL_REFUSAL)
    if opts.max_steps != -1 and opts.max_steps < 1:
        raise ToolkitError(f"--max-steps must be -1 (one epoch) or at least 1 (got {opts.max_steps})")
    if opts.lr is not None and not (math.isfinite(opts.lr) and opts.lr > 0):
        raise ToolkitError(f"--lr must be a positive number (got {opts.lr})")
    for flag, value in (("--batch-size", opts.batch_size), ("--save-steps", opts.save_steps),
                        ("--n-train", opts.n_train), ("logging_steps", opts.logging_steps)):
        if value < 1:
            raise ToolkitError(f"{flag} must be at least 1 (got {value})")
    if not (math.isfinite(opts.epochs) and opts.epochs > 0):
        raise ToolkitError(f"epochs must be a positive number (got {opts.epochs})")
    if not (math.isfinite(opts.warmup) and opts.warmup >= 0):
        raise ToolkitError(f"warmup must be a ratio in [0, 1) or a number of steps (got {opts.warmup})")
    check_training_placement(opts)
    check_sharding_engine()


def check_sharding_engine(env: Mapping[str, str] = os.environ) -> None:
    """`accelerate launch` with an FSDP config, refused in one line where it cannot work: accelerate's FSDP plugin
    needs an accelerator (it raises deep inside the Trainer on CPU), and only a full state dict gives the
    side-branch-only checkpoints and artifact (a sharded one is saved by accelerate in its own layout)."""
    if env.get("ACCELERATE_USE_FSDP", "false").lower() not in ("true", "1"):
        return
    version = env.get("FSDP_VERSION", "1")
    default = "FULL_STATE_DICT" if version == "1" else "SHARDED_STATE_DICT"  # accelerate's, per FSDP version
    kind = env.get("FSDP_STATE_DICT_TYPE", default)
    if env.get("FSDP_USE_ORIG_PARAMS", "true").lower() == "false" and version == "1":
        raise ToolkitError("FSDP needs fsdp_use_orig_params: true here: the frozen base and the trainable side branch "
                           "share wrapped modules")
    if kind != "FULL_STATE_DICT":
        raise ToolkitError(f"FSDP with fsdp_state_dict_type {kind} is not supported: routing saves only the side "
                           "branch, from a full state dict; set fsdp_state_dict_type: FULL_STATE_DICT")
    if not torch.cuda.is_available():
        raise ToolkitError("FSDP needs GPUs (accelerate's FSDP plugin has no CPU backend); on CPU use data "
                           "parallelism: torchrun --nproc_per_node N routing train ...")


def check_training_placement(opts: TrainConfig) -> None:
    """--device or --device-map/--max-memory as the loader takes them; a device map not under torchrun."""
    if opts.device_map is None and opts.max_memory is None:
        return  # --device alone: checked where it is used (each torchrun rank takes its own GPU)
    check_placement(opts.device, opts.device_map, opts.max_memory)
    if dist.world_size() > 1:
        raise ToolkitError("--device-map under torchrun is not supported: DDP gives each process one device and "
                           "a whole model; train a model that fits one device with torchrun, or a larger one in "
                           "one process with --device-map")


def planned_steps(n_records: int, opts: TrainConfig, world_size: int | None = None) -> int:
    """The optimizer step the run ends at: `max_steps`, or `epochs` passes over the data as the Trainer counts
    them (the last batch may be short; under torchrun each of `world_size` processes takes its share)."""
    if opts.max_steps > 0:
        return opts.max_steps
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    return math.ceil(opts.epochs * math.ceil(n_records / (opts.batch_size * world)))


class RecordDataset(Dataset):
    """LLaVA records encoded lazily in the family's prompt format (assistant-only labels, its image kwargs). A record
    longer than `limit` positions (the model's) is cut from the right, as LLaVA's training truncates, with one
    warning on stderr per record (`saturation.core.lengths.fit_example`), on a line of its own above the Trainer's
    progress bar."""

    def __init__(self, records: list[Record], processor, fmt: PromptFormat | None = None, limit: int | None = None,
                 image_token_id: int | None = None):
        self.records, self.processor, self.fmt = records, processor, fmt
        self.limit, self.image_token_id, self.warned = limit, image_token_id, set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        record = self.records[i]
        example = encode_record(record, self.processor, fmt=self.fmt)
        example, cut = fit_example(example, self.limit, record.id, self.image_token_id, sequence_keys())
        if cut and record.id not in self.warned:  # once per record, not once per epoch
            self.warned.add(record.id)
            tqdm.write(f"warning: record {record.id} is {cut + self.limit:,} tokens, more than the model's "
                       f"{self.limit:,} positions: its last {cut:,} tokens are cut for training", file=sys.stderr)
        return example


class SideBranchTrainer(Trainer):
    """A Trainer whose checkpoints hold only the trainable (side-branch) weights, never the frozen base, and the
    summed loss of every step so far (HF's own ``training_loss`` covers only the steps since a resume)."""

    loss_before: float | None = 0.0  # summed loss of the steps before this call (from the resumed checkpoint)
    _loss_now: torch.Tensor | None = None  # summed loss of this call's steps, on the device (no sync per step)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        step = loss.detach().float()
        self._loss_now = step if self._loss_now is None else self._loss_now + step
        return loss

    def loss_sum(self) -> float | None:
        """Summed per-step loss of the whole run up to now (None when the resumed checkpoint did not record it).

        Under DDP each rank's step loss is its share of the global one (times the world size): the mean over ranks
        is the global loss. A collective, so every rank calls it (checkpoint saves and the end of training do)."""
        now = self._loss_now if self._loss_now is not None else torch.zeros((), device=self.args.device)
        if self.args.world_size > 1:
            now = self.accelerator.reduce(now.to(self.args.device), reduction="mean")
        if self.loss_before is None:
            return None
        return self.loss_before + float(now)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        full = self.model.state_dict() if state_dict is None else state_dict
        with warnings.catch_warnings():  # HF warns about offloaded modules (device map); only the side branch is saved
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            super()._save(output_dir, state_dict={k: v.contiguous() for k, v in full.items() if k in trainable})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load only the side branch back (the frozen base is not in our checkpoints), strictly."""
        from safetensors.torch import load_file

        model = self.model if model is None else model
        weights = load_file(str(Path(resume_from_checkpoint) / "model.safetensors"), device=str(self.args.device))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != trainable:
            raise ToolkitError(f"checkpoint {resume_from_checkpoint} does not match this routed model "
                               "(different variant or side depth?); use --no-resume or another --out")
        model.load_state_dict(weights, strict=False)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        loss_sum = self.loss_sum()  # every rank: it is a collective
        self.accelerator.wait_for_everyone()  # every rank's part of the checkpoint (its RNG state) is on disk
        if self.args.should_save:  # rank 0 alone finishes the folder
            write_json(folder / LOSS_FILE, {"step": self.state.global_step, "loss_sum": loss_sum})
            (folder / DONE_MARKER).write_text(str(self.state.global_step))  # written last: the folder is whole


def checkpoint_loss_sum(folder: Path) -> float | None:
    """The summed loss recorded in checkpoint `folder` (None if it has none)."""
    try:
        value = json.loads((folder / LOSS_FILE).read_text())["loss_sum"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


class LogWriter(TrainerCallback):
    """Writes the loss log as CSV and JSON after every logging step (atomically), so a crash keeps it."""

    def __init__(self, out: Path):
        self.out = out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        rows = [r for r in state.log_history if "loss" in r]
        write_log(rows, self.out)


def write_log(rows: list[dict], out: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    write_text(out / "train_log.csv", frame.to_csv(index=False))
    write_json(out / "train_log.json", rows)


def checkpointing_arguments(enabled: bool) -> dict:
    """Gradient checkpointing, the paper's setting (on CUDA): LF barely needs it (almost no backward), PC does.

    Only layers with a backward recompute: HF's ``GradientCheckpointingLayer`` (5.24) checkpoints only while
    gradients are enabled, and the routed model runs the shallow stack (and LF's text-only deep stack) under
    ``no_grad`` (tests/test_routing_model.py counts the recomputes).

    transformers renamed it `activation_checkpointing` in 5.x; use whichever this version has.
    """
    names = {f.name for f in fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False}}


def training_arguments(opts: TrainConfig, out: Path, device: torch.device) -> TrainingArguments:
    """The paper's recipe as `TrainingArguments`; bf16 and gradient checkpointing only on CUDA.

    Under torchrun the Trainer runs DDP (NCCL on CUDA, gloo on CPU): `per_device_train_batch_size` per process,
    so the global batch is world size x `batch_size`. Only the side branch needs gradients; DDP registers only
    parameters that require them, and every side-branch parameter is used in each step, so no search for unused
    ones.
    """
    cuda = device.type == "cuda"
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=opts.batch_size,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps,
        learning_rate=opts.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=opts.warmup,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=opts.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=2,
        seed=opts.seed,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        **checkpointing_arguments(cuda),
        use_cpu=not cuda,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        ddp_backend=None if cuda or dist.world_size() == 1 else "gloo",
        ddp_find_unused_parameters=False,
    )


@contextmanager
def fp32_master_weights(module: torch.nn.Module, enabled: bool):
    """Keep `module`'s trainable weights in fp32 while the Trainer autocasts, then return them to their dtype.

    AdamW steps of lr 1e-4 on weights of size ~0.02 are about one bf16 ulp (and a few fp16 ulps): trained in half
    precision, most updates round away. The frozen base stays in its own dtype; autocast runs the matmuls in bf16.
    """
    dtypes = {p.dtype for p in module.parameters()}
    if not enabled or dtypes == {torch.float32}:
        yield
        return
    (dtype,) = dtypes
    module.float()
    try:
        yield
    finally:
        module.to(dtype)


def training_dtype(dtype: str | None, device: str | None) -> str | None:
    """The paper trains in bf16: on a CUDA device that has it, load the base in bf16 unless `dtype` is given."""
    from saturation.core.loading import resolve_device

    if dtype is None and resolve_device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return dtype


def train_side_branch(routed, processor, records: list[Record], opts: TrainConfig, out: Path,
                      callbacks=(), log: Callable[[str], None] = print, restart_other: bool = False) -> dict:
    """Train `routed`'s side branch on `records` in run folder `out`; returns a summary dict and writes the
    routing artifact. Resumes a run of the same options; refuses one of other options (`restart_other`: starts it
    afresh instead, as a part of a larger job does); a finished one is left, its side branch loaded into `routed`."""
    check_options(opts)
    identity = run_identity(_base_id(routed.base), routed.plan, opts, records)
    out = Path(out)
    with run_folder(out, routed):
        if opts.resume and restart_other and not runs.resumable(out, identity, planned_steps(len(records), opts)):
            log(f"{out} holds a run with other options: starting it afresh")
            opts = replace(opts, resume=False)
        return _train(routed, processor, records, opts, out, identity, callbacks, log)


def checkpoint_bytes(routed) -> int:
    """About what one checkpoint takes: the side branch's weights and AdamW's two moments, in fp32."""
    return 12 * sum(p.numel() for p in routed.parameters() if p.requires_grad)


@contextmanager
def run_folder(out: Path, routed=None):
    """`out` locked for this run (rank 0 holds the lock under torchrun), and a full disk while the run writes
    there one line: half-written checkpoints are removed (they would be on the next run anyway)."""
    with ExitStack() as stack:
        if dist.is_main():
            stack.enter_context(locked(out))
        needed = checkpoint_bytes(routed) if routed is not None else None
        stack.enter_context(disk_guard(out, needed, cleanup=lambda: last_complete_checkpoint(out / "checkpoints")))
        yield


def _train(routed, processor, records: list[Record], opts: TrainConfig, out: Path, identity: dict,
           callbacks=(), log: Callable[[str], None] = print) -> dict:
    """`train_side_branch` once `opts` are checked and the run's `identity` is known (`run_train` has both)."""
    check_records(routed.plan, records)
    trainable = [p for p in routed.parameters() if p.requires_grad]
    if not trainable:
        raise ToolkitError("the routed model has no trainable parameters")
    out.mkdir(parents=True, exist_ok=True)
    device = next(iter(trainable)).device
    args = training_arguments(opts, out, device)
    main = args.process_index == 0  # under torchrun, rank 0 alone writes the run folder
    open_run(out, identity, opts.resume, log, write=main)
    planned = planned_steps(len(records), opts)
    if opts.resume and (done := finished_summary(out, identity, planned)) is not None:
        log(finished_message(out, done))
        from routing.saved import load

        routed.side.load_state_dict(load(routed.base, out / "routing").side.state_dict())  # the trained branch
        return done | {"unchanged": True}
    resume = check_not_past(out, planned) if opts.resume else None
    done_steps = checkpoint_step(resume) if resume else 0
    set_seed(opts.seed)  # before the Trainer: the seed must reach the data order
    pad_id = processor.tokenizer.pad_token_id
    with fp32_master_weights(routed.side, enabled=args.bf16):
        trainer = SideBranchTrainer(
            model=routed,
            args=args,
            train_dataset=RecordDataset(records, processor, PromptFormat.of(routed), max_positions(routed),
                                        getattr(routed.config, "image_token_id", None)),
            data_collator=lambda rows: collate(rows, pad_id, padding_side="right"),
            callbacks=[LogWriter(out), *callbacks],
        )
        trainer.loss_before = checkpoint_loss_sum(resume) if resume else 0.0
        start = time.perf_counter()
        if resume is not None and done_steps == planned:
            # Training ended but the artifact was not written (a crash in between). The Trainer, resumed from its
            # final checkpoint, would add a step whenever max_steps is not a whole number of epochs: load instead.
            log(f"{out}: training finished at step {done_steps}; writing the artifact from {resume.name}")
            trainer._load_from_checkpoint(str(resume))
            trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        else:
            if resume is not None:
                log(f"resuming {out} from step {done_steps} ({resume.name}), training on to step {planned}")
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.perf_counter() - start
    rows = [r for r in trainer.state.log_history if "loss" in r]
    if main:
        routed.save_routing(out / "routing")
        write_log(rows, out)
    steps = trainer.state.global_step
    loss_sum = trainer.loss_sum()
    summary = {
        "variant": opts.variant,
        "plan": routed.plan.spec,  # lf@6, or with its pruning: lf@6+prune-pre:50%
        "split": routed.plan.split,
        "fusion_layers": routed.plan.fusion_layers,
        "side_depth": routed.plan.side_depth,
        "steps": steps,
        "resumed_from": str(resume) if resume else None,
        "train_loss": loss_sum / steps if loss_sum is not None and steps else None,  # mean over every step of the run
        "final_logged_loss": rows[-1]["loss"] if rows else None,
        "seconds": seconds,
        "learning_rate": opts.learning_rate,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_share": routed.trainable_parameters().share,
        "records": len(records),
        "run": identity,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
    }
    if main:
        write_json(out / SUMMARY, summary)
    return summary


def training_records(data: Path | str | DataSpec | None, out: Path, n: int, seed: int) -> list[Record]:
    """Every record of `data` (`saturation.core.sources`: LLaVA JSON, a dataset, lmms:TASK), or a fresh shapes-world
    training set (held-out scenes excluded), made once per (seed, n) in `out`."""
    if data is not None:
        records = load_records(data, None, seed)[1]
        with_images = [r for r in records if r.images]
        if not with_images:
            raise ToolkitError(f"--data {data}: every record is text-only; the side branch learns from image tokens")
        if len(with_images) < len(records):  # LLaVA-665k's text-only rows: no image tokens to route or learn from
            print(f"warning: {len(records) - len(with_images):,} text-only records of {len(records):,} left out of "
                  f"training (the side branch learns from image tokens)", file=sys.stderr)
        return with_images
    from saturation import shapes

    folder = out / f"train_data_seed{seed}_n{n}"  # one set per (seed, size): a new --n-train is a new set
    path = folder / "train.json"
    if not path.is_file():
        tmp = folder / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's partial set (the run folder's lock is held)
        # about 1.5 KB per scene (its PNG and four QA turns): what a full disk message says is needed
        with disk_guard(folder, needed=1500 * n, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
            made = shapes.make_dataset(tmp, n, seed + 7919, name="train", turns=4, exclude=shapes.held_out_keys())
            shutil.rmtree(folder / "images", ignore_errors=True)
            os.replace(tmp / "images", folder / "images")
            os.replace(made, path)
        shutil.rmtree(tmp, ignore_errors=True)
    return read_records(path)


def default_out(model: str, variant: str, split: int, plan: RoutingPlan | None = None) -> Path:
    """``runs/train/<model>/<variant>-s<split>``, next to the probe's ``runs/probe/<model>``; a pruned plan's
    folder names its pruning too (``lf-s6_prune-pre-50``)."""
    name = f"{variant}-s{split}"
    if plan is not None and plan.prune is not None:
        name = plan.spec.replace("@", "-s").replace(":", "-").replace("%", "").replace("+", "_").replace(
            "=", "").replace(",", "-")  # lf-s6_visionzip-dominant54-contextual10
    return Path("runs") / "train" / probe_default_out(model).name / name


def plan_options(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `--plan`'s variant and split in place (its pruning is read again with the model's geometry, in
    `training_plan`). A plan with no side branch to train, or one that contradicts --variant or --split, is one
    line."""
    if cfg.plan is None:
        return cfg
    parsed = parse_spec(cfg.plan)
    variant = parsed["variant"]
    if variant not in PAPER_LR:
        what = "vanilla" if variant is None else variant
        raise ToolkitError(f"--plan {cfg.plan}: {what} has no side branch to train (training takes lf, pc or kv, "
                           "optionally + a pruning); save a training-free plan with `routing save-plan`")
    if cfg.variant not in ("lf", variant):
        raise ToolkitError(f"--plan {cfg.plan} is a {variant} plan but --variant says {cfg.variant}: give one")
    split = cfg.split
    if parsed["split"] is not None:
        if cfg.split not in ("auto", str(parsed["split"])):
            raise ToolkitError(f"--plan {cfg.plan} splits at {parsed['split']} but --split says {cfg.split}: give one")
        split = str(parsed["split"])
    return replace(cfg, variant=variant, split=split)


def training_plan(cfg: TrainConfig, config, split: int) -> RoutingPlan:
    """The plan `cfg` trains: `--plan` (its pruning included) or `--variant`, at `split`, with K and d_v; the one
    place the split is checked (against the model's depth and first allowed split, from its `config`)."""
    if cfg.plan is not None:
        return parse_plan(cfg.plan, config, split=split, fusion_layers=cfg.fusion_layers, side_depth=cfg.side_depth)
    return plan_for(config, split, cfg.variant, cfg.fusion_layers, cfg.side_depth)


def resolve_training_split(cfg: TrainConfig, num_layers: int, log=print) -> tuple[int, str]:
    """The split to train at (checked by the plan made from it, `training_plan`) and where it came from, running the
    probe first when `--split auto` finds no recommendation."""
    split_range(num_layers, cfg.fusion_layers, cfg.side_depth)  # a K or d_v that leaves no split: before any probe
    split, source = find_split(cfg.split, num_layers, resolve_name(cfg.model), cfg.probe, PROBE_ROOT)
    if source != "missing":
        return split, source
    log(f"no saturation probe found for '{cfg.model}' under {PROBE_ROOT}: running `saturation probe` first")
    result = run_probe(ProbeConfig(model=cfg.model, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device))
    return result.recommendation["split"], str(result.recommendation_path)


def run_train(cfg: TrainConfig, log=print) -> dict:
    """`routing train`: resolve the split, route the model, train the side branch, write the artifact and logs.

    Every check that needs no weights (numbers, --out, the plan, a resume with other options) runs first, each once.
    Under torchrun every rank trains (DDP) and rank 0 alone logs and writes.
    """
    if not dist.is_main():
        log = lambda msg: None  # noqa: E731 - one report, rank 0's
    try:
        cfg = plan_options(cfg)
        check_options(cfg)
    except ToolkitError as err:  # options and launcher: every rank fails alike, before any collective
        err.quiet = not dist.is_main()  # so rank 0 alone prints the one line
        raise
    if cfg.out is not None:
        ensure_output_dir(cfg.out)  # a bad --out fails now, not after loading and training
    config = load_config(cfg.model)
    split, source = resolve_training_split(cfg, config.text_config.num_hidden_layers, log)
    plan = training_plan(cfg, config, split)
    out = Path(cfg.out) if cfg.out is not None else ensure_output_dir(default_out(cfg.model, cfg.variant, split, plan))
    with run_folder(out):  # one process per run folder: a second `routing train` there is refused, data included
        return _run_train(cfg, plan, split, source, out, log)


def _run_train(cfg: TrainConfig, plan: RoutingPlan, split: int, source: str, out: Path, log) -> dict:
    """`run_train` once the plan is made and the run folder `out` is locked."""
    model_id = resolve_name(cfg.model)
    identity = run_identity(model_id, plan, cfg)  # the data digest joins once the records are read
    if cfg.resume:  # other options than the run in --out: refuse before making data or loading weights
        check_run(out, identity)
    dist.init(dist.rank_device(cfg.device))
    # rank 0 makes the generated training set once; the others read it after (`together` is a barrier)
    records = dist.together(lambda: training_records(cfg.data, out, cfg.n_train, cfg.seed) if dist.is_main() else None)
    records = records or training_records(cfg.data, out, cfg.n_train, cfg.seed)
    identity = with_data(identity, records, cfg.data)
    if cfg.resume:
        planned = planned_steps(len(records), cfg)
        if (done := finished_summary(out, identity, planned)) is not None:
            log(finished_message(out, done))
            return done | {"unchanged": True}
        check_not_past(out, planned)
    device = dist.rank_device(cfg.device)  # under torchrun on GPUs: this rank's GPU
    # layers a device map puts on disk live in a temporary folder for the run (not the run folder: it is the base)
    with tempfile.TemporaryDirectory(prefix="dpvr-offload-") as offload:
        model, processor = load_model(cfg.model, dtype=training_dtype(cfg.dtype, device), device=device,
                                      device_map=cfg.device_map, max_memory=cfg.max_memory, offload_folder=offload)
        routed = build(model, plan)
        log(f"split {split} (from {source})\n{routed.plan.describe()}\ntrainable: {routed.trainable_parameters()}")
        with cpu_threads(model, None):
            summary = _train(routed, processor, records, cfg, out, identity, log=log)
    if summary.pop("unchanged", False):
        return summary | {"unchanged": True}
    summary |= {"model": resolve_name(cfg.model), "split_source": source, "out": str(out)}
    if dist.is_main():  # torchrun: rank 0 writes
        write_json(out / SUMMARY, summary)
    return summary
