"""Fine-tune only the side branch of a routed model with the HF `Trainer` (accelerate underneath).

Paper defaults (DESIGN): AdamW, lr 1e-4 for LF and 5e-5 for PC/KV, cosine schedule, warmup 0.03, weight
decay 0, batch 4, one epoch, bf16 + gradient checkpointing on CUDA. Unlike the paper, the seed reaches the
data order: `transformers.set_seed` runs before the Trainer exists (the paper's Appendix C bug).
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from saturation.data import Record, collate, encode_record, read_records
from saturation.errors import ToolkitError
from saturation.files import write_json, write_text
from saturation.loading import cpu_threads, load_config, load_llava, resolve_name
from saturation.probe import ProbeConfig, run_probe
from saturation.probe import default_out as probe_default_out

from .model import build
from .split import resolve_split, validate_split

PAPER_LR = {"lf": 1e-4, "pc": 5e-5, "kv": 5e-5}
LF_IDEAL_REFUSAL = ("lf-ideal cannot be trained: without a fusion layer the loss has no path to the side branch, "
                    "so its gradient is exactly zero (paper, Appendix A); use --variant lf")
PROBE_ROOT = Path("runs") / "probe"
DONE_MARKER = "checkpoint_complete"  # a checkpoint folder without it was interrupted mid-write


@dataclass
class TrainConfig:
    """Options of `routing train`. `lr=None` takes the paper's rate for the variant; `out=None` a default folder."""

    model: str = "tiny"
    split: str = "auto"  # an integer layer index, or 'auto' (the probe's recommendation)
    probe: Path | None = None  # probe folder for --split auto (default: newest probe of the same model)
    variant: str = "lf"
    fusion_layers: int = 1
    side_depth: int = 1
    data: Path | None = None  # LLaVA JSON; default: a shapes-world training set made on the fly
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

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else PAPER_LR.get(self.variant, PAPER_LR["lf"])


class RecordDataset(Dataset):
    """LLaVA records encoded lazily (LLaVA-1.5 template, assistant-only labels)."""

    def __init__(self, records: list[Record], processor):
        self.records, self.processor = records, processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return encode_record(self.records[i], self.processor)


class SideBranchTrainer(Trainer):
    """A Trainer whose checkpoints hold only the trainable (side-branch) weights, never the frozen base."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        full = self.model.state_dict() if state_dict is None else state_dict
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
        (folder / DONE_MARKER).write_text(str(self.state.global_step))  # written last: the folder is whole


class LogWriter(TrainerCallback):
    """Writes the loss log as CSV and JSON after every logging step (atomically), so a crash keeps it."""

    def __init__(self, out: Path):
        self.out = out

    def on_log(self, args, state, control, logs=None, **kwargs):
        rows = [r for r in state.log_history if "loss" in r]
        write_log(rows, self.out)


def write_log(rows: list[dict], out: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    write_text(out / "train_log.csv", frame.to_csv(index=False))
    write_json(out / "train_log.json", rows)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-N` with its completion marker; half-written ones are removed."""
    done = []
    for ckpt in folder.glob("checkpoint-*"):
        if (ckpt / DONE_MARKER).is_file():
            done.append((int(ckpt.name.split("-")[1]), ckpt))
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
    return max(done)[1] if done else None


def checkpointing_arguments(enabled: bool) -> dict:
    """Gradient checkpointing, the paper's setting (on CUDA): LF barely needs it (almost no backward), PC does.

    transformers renamed it `activation_checkpointing` in 5.x; use whichever this version has.
    """
    names = {f.name for f in fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False}}


def training_arguments(opts: TrainConfig, out: Path, device: torch.device) -> TrainingArguments:
    """The paper's recipe as `TrainingArguments`; bf16 and gradient checkpointing only on CUDA."""
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
    from saturation.loading import resolve_device

    if dtype is None and resolve_device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return dtype


def train_side_branch(routed, processor, records: list[Record], opts: TrainConfig, out: Path,
                      callbacks=()) -> dict:
    """Train `routed`'s side branch on `records`; returns a summary dict and writes the routing artifact."""
    if opts.variant == "lf-ideal":
        raise ToolkitError(LF_IDEAL_REFUSAL)
    trainable = [p for p in routed.parameters() if p.requires_grad]
    if not trainable:
        raise ToolkitError("the routed model has no trainable parameters")
    out.mkdir(parents=True, exist_ok=True)
    set_seed(opts.seed)  # before the Trainer: the seed must reach the data order
    device = next(iter(trainable)).device
    pad_id = processor.tokenizer.pad_token_id
    args = training_arguments(opts, out, device)
    with fp32_master_weights(routed.side, enabled=args.bf16):
        trainer = SideBranchTrainer(
            model=routed,
            args=args,
            train_dataset=RecordDataset(records, processor),
            data_collator=lambda rows: collate(rows, pad_id, padding_side="right"),
            callbacks=[LogWriter(out), *callbacks],
        )
        resume = last_complete_checkpoint(out / "checkpoints") if opts.resume else None
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.perf_counter() - start
    routed.save_routing(out / "routing")
    rows = [r for r in trainer.state.log_history if "loss" in r]
    write_log(rows, out)
    summary = {
        "variant": opts.variant,
        "split": routed.plan.split,
        "fusion_layers": routed.plan.fusion_layers,
        "side_depth": routed.plan.side_depth,
        "steps": trainer.state.global_step,
        "resumed_from": str(resume) if resume else None,
        "train_loss": result.training_loss,
        "final_logged_loss": rows[-1]["loss"] if rows else None,
        "seconds": seconds,
        "learning_rate": opts.learning_rate,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_share": routed.trainable_parameters().share,
        "records": len(records),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
    }
    write_json(out / "train_summary.json", summary)
    return summary


def training_records(data: Path | None, out: Path, n: int, seed: int) -> list[Record]:
    """`data` as records, or a fresh shapes-world training set (held-out scenes excluded), made once per seed."""
    if data is not None:
        return read_records(data)
    from saturation import shapes

    folder = out / f"train_data_seed{seed}"
    path = folder / "train.json"
    if not path.is_file():
        made = shapes.make_dataset(folder / "tmp", n, seed + 7919, name="train", turns=4,
                                   exclude=shapes.held_out_keys())
        shutil.rmtree(folder / "images", ignore_errors=True)
        os.replace(folder / "tmp" / "images", folder / "images")
        os.replace(made, path)
        shutil.rmtree(folder / "tmp", ignore_errors=True)
    return read_records(path)


def default_out(model: str, variant: str, split: int) -> Path:
    """``runs/train/<model>/<variant>-s<split>``, next to the probe's ``runs/probe/<model>``."""
    return Path("runs") / "train" / probe_default_out(model).name / f"{variant}-s{split}"


def resolve_training_split(cfg: TrainConfig, num_layers: int, log=print) -> tuple[int, str]:
    """The split to train at, running the probe first when `--split auto` finds no recommendation."""
    split, source = resolve_split(cfg.split, num_layers, resolve_name(cfg.model), cfg.probe, PROBE_ROOT,
                                  cfg.fusion_layers, cfg.side_depth)
    if source != "missing":
        return split, source
    log(f"no saturation probe found for '{cfg.model}' under {PROBE_ROOT}: running `saturation probe` first")
    result = run_probe(ProbeConfig(model=cfg.model, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device))
    return (validate_split(result.recommendation["split"], num_layers, cfg.fusion_layers, cfg.side_depth),
            str(result.recommendation_path))


def run_train(cfg: TrainConfig, log=print) -> dict:
    """`routing train`: resolve the split, route the model, train the side branch, write the artifact and logs."""
    if cfg.variant == "lf-ideal":
        raise ToolkitError(LF_IDEAL_REFUSAL)
    config = load_config(cfg.model)
    split, source = resolve_training_split(cfg, config.text_config.num_hidden_layers, log)
    model, processor = load_llava(cfg.model, dtype=training_dtype(cfg.dtype, cfg.device), device=cfg.device)
    routed = build(model, split, cfg.variant, cfg.fusion_layers, cfg.side_depth)
    out = Path(cfg.out) if cfg.out is not None else default_out(cfg.model, cfg.variant, split)
    log(f"split {split} (from {source})\n{routed.plan.describe()}\ntrainable: {routed.trainable_parameters()}")
    records = training_records(cfg.data, out, cfg.n_train, cfg.seed)
    with cpu_threads(model, None):
        summary = train_side_branch(routed, processor, records, cfg, out)
    summary |= {"model": resolve_name(cfg.model), "split_source": source, "out": str(out)}
    write_json(out / "train_summary.json", summary)
    return summary
