"""LLaVA's staging on a text-trained LM: the embedded model trained without any loss on what the probe measures.

One command, four or five stages, each seeded and resumable (``python -m saturation.shapes train-staged``):

0. **Text stage** (`text_stage`): the LM learns the world's lookups from the scene written in words.
1. **Vision tower alone** (`train.train_stage1`): per-patch heads on the tower, thrown away after; they shape the
   tower only, which the probe does not measure.
2. **Alignment**: the projector alone, tower and LM frozen, on image conversations (answer loss). LLaVA aligns
   by captioning; this LM was trained on answers only and cannot describe a scene, so its own task aligns it.
3. **Instruction tuning**: projector + LM on image conversations, answer loss; a `text_mix` share of each batch
   is the text world again, so the lookup is not forgotten. Existence answers are drawn independently per turn.
4. **Polish** (optional, ``polish_steps``): the same losses on fresh batches at a lower learning rate, with its own
   question mix (e.g. more position questions, the type that stage 3 leaves weakest).

The only losses are next-token cross-entropies on assistant tokens (`answer_weight` on image conversations,
`text_weight` on text ones, both in ``recipe.json``); there is no loss on the logit lens, attention or hidden states.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from saturation.core.adapters import adapter_for
from saturation.core.data import Record, collate, encode_record, read_records
from saturation.core.errors import ToolkitError
from saturation.core.files import atomic_write, disk_guard, write_json
from saturation.core.runs import differences, locked, read_manifest

from . import data, world
from .text_stage import (
    TEXT_RECIPES,
    TextCodec,
    batch_at,
    check_mix,
    max_objects_at,
    scene_qas,
    text_accuracy,
    train_text,
)
from .train import (
    Recipe,
    as_json,
    attach_rescale,
    build_model,
    build_processor,
    cosine_factor,
    feature_rms,
    fold_rescale,
    fresh_scene,
    save_model,
    train_stage1,
)


@dataclass
class StagedRecipe:
    """Every knob of the staged run; `text` names the text-stage recipe (`text_stage.TEXT_RECIPES`)."""

    seed: int = 0
    threads: int = 1
    text: str = "answers"
    text_steps: int | None = None  # None: the text recipe's
    stage1_steps: int = 500
    align_steps: int = 400
    align_lr: float = 3e-3
    tune_steps: int = 3000
    lm_lr: float = 5e-4
    projector_lr: float = 1e-3
    warmup: int = 100
    batch: int = 32
    turns: int = 5
    text_mix: float = 0.25  # share of each stage-3 batch that is text-world conversations
    # Question types of image conversations, cycled in a shuffled order: a type named twice is asked more often.
    question_mix: tuple[str, ...] = world.QUESTION_TYPES
    # Stage 4 (optional): more instruction tuning after stage 3 on its own schedule and question mix, at
    # `polish_lr_scale` times stage 3's learning rates (0 steps: no such stage).
    polish_steps: int = 0
    polish_mix: tuple[str, ...] = world.QUESTION_TYPES
    polish_lr_scale: float = 0.5
    # The polish's scene sizes, as `curriculum`; None: stage 3's again (so its first 800 steps are small scenes,
    # as in the shipped model's recipe), () for full-size scenes from its first step.
    polish_curriculum: tuple[tuple[int, int], ...] | None = None
    # ((until_step, max_objects), ...) of stage 3 (stage 2 uses the same schedule).
    curriculum: tuple[tuple[int, int], ...] = ((200, 1), (500, 2), (800, 3))
    # Every loss weight: answer-token cross-entropy on image and on text conversations. There is no other loss.
    answer_weight: float = 1.0
    text_weight: float = 1.0
    log_every: int = 50
    eval_every: int = 250
    eval_n: int = 200  # held-out records scored during training (all of them at the end)
    checkpoint_every: int = 100


# `staged` made data_samples/tiny-staged: instruction tuning, then a polish stage with position questions asked
# more often (the type the tuning leaves weakest). `staged-no-polish` is it without that stage (the first shipped
# model's recipe), `staged-short` that with half the instruction tuning. The `staged-shared*` recipes aim the
# polish at the position questions every model gets wrong, those about an object whose shape another one has
# (`world.TRAINING_ASK`); `-full` draws full-size scenes from the polish's first step, `-lr1` keeps stage 3's
# learning rates, `-colour` also asks position by colour alone. One measured row each in data_samples/README.md
# ("Staged runs").
_POLISH = StagedRecipe(polish_steps=2000, polish_mix=(*world.QUESTION_TYPES, "position"))
_SHARED = replace(_POLISH, polish_mix=(*world.QUESTION_TYPES, "position-shared"))
STAGED_RECIPES: dict[str, StagedRecipe] = {
    "staged": _POLISH,
    "staged-no-polish": StagedRecipe(),
    "staged-short": StagedRecipe(tune_steps=1500),
    "staged-position": replace(_POLISH, text="answers-position"),
    "staged-shared": _SHARED,
    "staged-shared-full": replace(_SHARED, polish_curriculum=()),
    "staged-shared-full-lr1": replace(_SHARED, polish_curriculum=(), polish_lr_scale=1.0),
    "staged-shared-colour": replace(_SHARED, polish_curriculum=(), polish_mix=(*_SHARED.polish_mix, "position-colour")),
    "staged-shared-text": replace(_SHARED, text="answers-shared"),
}

LABELS = {f: f for f in StagedRecipe.__dataclass_fields__ if f not in ("threads", "log_every", "eval_every")}


def image_batch(step: int, stage: str, recipe: StagedRecipe, processor, exclude: frozenset,
                mix: tuple[str, ...] | None = None,
                curriculum: tuple[tuple[int, int], ...] | None = None) -> dict[str, Tensor]:
    """Image conversations of `stage` at `step` (seeded by both), encoded by the model's own processor; question
    types cycle through `mix` (default: the recipe's `question_mix`), scene sizes follow `curriculum` (default:
    the recipe's)."""
    rng = random.Random(f"{stage}-{recipe.seed}-{step}")
    sizes = recipe.curriculum if curriculum is None else curriculum
    examples = []
    for i in range(recipe.batch):
        scene = fresh_scene(rng, exclude, max_objects_at(step, sizes))
        qas = [(q, a) for q, a, _ in scene_qas(scene, rng, recipe.turns, mix or recipe.question_mix)]
        image = world.render(scene, random.Random(rng.getrandbits(32)))
        examples.append(encode_record(Record(f"{stage}-{step}-{i}", Path("scene.png"), tuple(qas)), processor,
                                      image=image))
    tok = processor.tokenizer
    return collate(examples, tok.pad_token_id, tok.convert_tokens_to_ids("<image>"))


def answer_loss(model, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over assistant tokens (what ``labels`` marks)."""
    keys = ("input_ids", "attention_mask", "pixel_values")
    return model(**{k: batch[k] for k in keys if k in batch}, labels=batch["labels"], use_cache=False).loss


def load_text_lm(model, lm_dir: Path) -> None:
    """Copy the text stage's LM weights into the LLaVA's language model (and its tied head)."""
    from safetensors.torch import load_file

    weights = load_file(lm_dir / "model.safetensors")
    inner = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    missing, unexpected = adapter_for(model).text_model.load_state_dict(inner, strict=False)
    if missing or unexpected:
        raise ToolkitError(f"{lm_dir}: its LM does not fit the image model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    model.tie_weights()


class Stage:
    """One resumable optimisation stage: its optimizer and schedule, a checkpoint in ``{name}_state.pt``, and a
    ``{name}.done`` marker with the weights it ends with in ``model_state.pt`` (where the next stage starts)."""

    def __init__(self, name: str, out: Path, recipe: StagedRecipe, model, opt, steps: int, log) -> None:
        self.name, self.out, self.recipe, self.model, self.opt, self.steps, self.log = name, out, recipe, model, opt, steps, log
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, steps, recipe.warmup))
        self.path = out / f"{name}_state.pt"
        self.step = 0

    def resume(self) -> bool:
        """Load this stage's checkpoint if there is one; True when the stage is already finished."""
        if (self.out / f"{self.name}.done").exists():
            return True
        if self.path.exists():
            state = torch.load(self.path, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            self.step = int(state["step"])
            self.log(f"{self.name}: resuming at step {self.step}")
        return False

    def checkpoint(self, done: bool = False) -> None:
        if done:  # the next stage starts from these weights
            atomic_write(self.out / "model_state.pt", lambda tmp: torch.save(self.model.state_dict(), tmp))
            (self.out / f"{self.name}.done").touch()
            self.path.unlink(missing_ok=True)
            return
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                 "step": self.step}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))


def metrics_line(out: Path, row: dict, log) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    log(json.dumps(row))


@torch.no_grad()
def image_accuracy(model, processor, records: list[Record]) -> dict[str, float]:
    """Greedy exact match per type on held-out image records (the toolkit's own `answers`)."""
    from saturation.core.answers import answers, by_type
    from saturation.core.data import normalize_answer

    was = model.training
    model.eval()
    got = answers(model, processor, records)
    model.train(was)
    return by_type(records, [a == normalize_answer(r.turns[0][1]) for a, r in zip(got, records)])


def train_staged(out_dir: str | Path, recipe: StagedRecipe, log=print, resume: bool = True,
                 heldout: str | Path = data.SAMPLES_DIR / "heldout.json") -> Path:
    """Run the staged recipe into `out_dir` (fp16 ``save_pretrained`` + ``recipe.json`` + ``metrics.jsonl``)."""
    out = Path(out_dir)
    with locked(out), disk_guard(out):
        return _train_staged(out, recipe, log, resume, read_records(heldout))


def _train_staged(out: Path, recipe: StagedRecipe, log, resume: bool, heldout: list[Record]) -> Path:
    plain = as_json(asdict(recipe))
    if recipe.text not in TEXT_RECIPES:
        raise ToolkitError(f"unknown text recipe {recipe.text!r}; choose one of {', '.join(TEXT_RECIPES)}")
    check_mix("question_mix", recipe.question_mix)
    check_mix("polish_mix", recipe.polish_mix)
    finished = read_manifest(out / "recipe.json") if resume else None
    if finished is not None:
        if not (diffs := differences(finished, plain, LABELS)):
            log(f"{out}: already trained with this recipe; nothing to do (--no-resume to train again)")
            return out
        raise ToolkitError(f"{out} holds a model trained with another recipe: {', '.join(diffs)}; pass --no-resume")
    started = read_manifest(out / "staged.json") if resume else None
    if started is not None and (diffs := differences(started, plain, LABELS)):
        raise ToolkitError(f"{out} holds a run of another recipe: {', '.join(diffs)}; pass --no-resume")
    if not resume:
        for f in (*out.glob("*_state.pt"), *out.glob("*.done"), out / "metrics.jsonl", out / "model_state.pt"):
            f.unlink(missing_ok=True)
    (out / "recipe.json").unlink(missing_ok=True)
    write_json(out / "staged.json", plain)
    torch.set_num_threads(recipe.threads)
    t0 = time.time()
    text_recipe = replace(TEXT_RECIPES[recipe.text], seed=recipe.seed, threads=recipe.threads,
                          **({"steps": recipe.text_steps} if recipe.text_steps else {}))
    train_text(out / "text-lm", text_recipe, log, resume, heldout)

    processor = build_processor()
    codec = TextCodec(processor.tokenizer)
    vision = Recipe(seed=recipe.seed, threads=recipe.threads, stage1_steps=recipe.stage1_steps,
                    hidden=text_recipe.hidden, layers=text_recipe.layers, heads=text_recipe.heads,
                    intermediate=text_recipe.intermediate)
    model = build_model(vision, len(processor.tokenizer))
    exclude = data.held_out_keys()
    a = adapter_for(model)
    if (out / "model_state.pt").exists():
        model.load_state_dict(torch.load(out / "model_state.pt", weights_only=True))
        rms = torch.load(out / "rms.pt", weights_only=True)
    else:
        load_text_lm(model, out / "text-lm")
        train_stage1(model, processor, vision, exclude, log)
        rms = feature_rms(model, processor, vision, exclude)
        atomic_write(out / "rms.pt", lambda tmp: torch.save(rms, tmp))
        atomic_write(out / "model_state.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    a.vision_encoder.requires_grad_(False).eval()
    hook = attach_rescale(model, rms)
    monitor = heldout[: recipe.eval_n]

    # Stage 2: the projector alone.
    a.text_model.requires_grad_(False)
    opt = torch.optim.AdamW(a.projector.parameters(), lr=recipe.align_lr, weight_decay=0.0)
    stage = Stage("align", out, recipe, model, opt, recipe.align_steps, log)
    run_stage(stage, lambda s: recipe.answer_weight * answer_loss(
        model, image_batch(s, "align", recipe, processor, exclude)), processor, codec, monitor)

    # Stage 3: projector + LM, text world mixed back in.
    a.text_model.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": list(a.text_model.parameters()), "lr": recipe.lm_lr},
                             {"params": list(a.projector.parameters()), "lr": recipe.projector_lr}], weight_decay=0.0)
    stage = Stage("tune", out, recipe, model, opt, recipe.tune_steps, log)
    n_text = round(recipe.text_mix * recipe.batch)
    mixed = replace(text_recipe, batch=n_text, curriculum=recipe.curriculum, pretrain_steps=0, pretrain_mix=0.0,
                    description_weight=0.0)

    def tune_loss(s: int, name: str = "tune", mix: tuple[str, ...] | None = None, text_seed: int = 1,
                  curriculum: tuple[tuple[int, int], ...] | None = None) -> Tensor:
        sizes = recipe.curriculum if curriculum is None else curriculum
        loss = recipe.answer_weight * answer_loss(model, image_batch(s, name, recipe, processor, exclude, mix, sizes))
        if n_text:
            text = batch_at(s, replace(mixed, seed=recipe.seed + text_seed, curriculum=sizes), codec, exclude)
            loss = loss + recipe.text_weight * answer_loss(model, text)
        return loss

    run_stage(stage, tune_loss, processor, codec, monitor)

    # Stage 4: the same losses on fresh data, its own question mix and a lower learning rate.
    if recipe.polish_steps:
        scale = recipe.polish_lr_scale
        opt = torch.optim.AdamW([{"params": list(a.text_model.parameters()), "lr": recipe.lm_lr * scale},
                                 {"params": list(a.projector.parameters()), "lr": recipe.projector_lr * scale}],
                                weight_decay=0.0)
        stage = Stage("polish", out, recipe, model, opt, recipe.polish_steps, log)
        run_stage(stage, lambda s: tune_loss(s, "polish", recipe.polish_mix, 2, recipe.polish_curriculum), processor,
                  codec, monitor)
    hook.remove()
    fold_rescale(model, rms)
    save_model(model, processor, out)
    final = {"stage": "final", "heldout": image_accuracy(model, processor, heldout),
             "text": text_accuracy(model, codec, heldout),
             "seconds": round(time.time() - t0)}
    metrics_line(out, final, log)
    # The text stage's recipe and log travel with the model; its fp32 weights stay in OUT/text-lm (git-ignored).
    shutil.copyfile(out / "text-lm" / "recipe.json", out / "text_recipe.json")
    shutil.copyfile(out / "text-lm" / "metrics.jsonl", out / "text_metrics.jsonl")
    write_json(out / "recipe.json", plain)  # written last: marks a finished model
    for f in (out / "model_state.pt", out / "rms.pt", out / "staged.json", *out.glob("*.done")):
        f.unlink(missing_ok=True)
    return out


def run_stage(stage: Stage, loss_of, processor, codec, monitor: list[Record]) -> None:
    """Optimise `stage` to its last step, logging the loss and held-out accuracy (image and text)."""
    if stage.resume():
        return
    model, recipe, t0, running = stage.model, stage.recipe, time.time(), []
    params = [p for g in stage.opt.param_groups for p in g["params"]]
    model.train()
    adapter_for(model).vision_encoder.eval()
    while stage.step < stage.steps:
        loss = loss_of(stage.step)
        stage.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        stage.opt.step()
        stage.sched.step()
        stage.step += 1
        running.append(loss.item())
        if stage.step % recipe.log_every == 0 or stage.step == stage.steps:
            row = {"stage": stage.name, "step": stage.step, "loss": round(sum(running) / len(running), 4),
                   "seconds": round(time.time() - t0, 1)}
            running = []
            if stage.step % recipe.eval_every == 0 or stage.step == stage.steps:
                row["heldout"] = image_accuracy(model, processor, monitor)
                row["text"] = text_accuracy(model, codec, monitor)
            metrics_line(stage.out, row, stage.log)
        if stage.step % recipe.checkpoint_every == 0 and stage.step < stage.steps:
            stage.checkpoint()
    stage.checkpoint(done=True)
