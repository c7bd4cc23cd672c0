"""The text stage of the embedded model: its LM learns the shapes world's lookups from the scene written in words.

A small LM trained from scratch on image QA with the answer loss alone does not learn in-context binding (find the
object a question names, read its colour, check a colour-shape conjunction); the image stage can only reuse a
lookup the LM already has. So, as LLaVA starts from a pretrained LLM, the LM is first trained on text: the scene
is written out ("red circle top left . blue square middle center .") where the image would be, in the same chat
template, and only the answers are scored. Measured recipes and their held-out scores are in
``data_samples/README.md``.

Two ingredients beyond the answer loss, both plain LM losses on text (nothing acts on the logit lens, attention
or hidden states):

- a **curriculum**: scenes hold at most 1, 2, 3 objects before given steps, then up to 4;
- **recall and copy pretraining** (`pretrain_steps`): key-value lists ("red two blue four ... blue" -> "four")
  and repeated sequences over the same vocabulary, the tasks on which small transformers form induction heads
  (measured here: the 12-layer LM learns copy within 600 steps, recall not yet; it did not help the lookups).

Every batch is drawn from a generator seeded by (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would. Held-out scenes (`data.held_out_keys`) never occur in training.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from saturation.core.data import IGNORE_INDEX, Record, normalize_answer, pad_stack
from saturation.core.errors import ToolkitError
from saturation.core.files import atomic_write, disk_guard, write_json
from saturation.core.runs import differences, locked, read_manifest

from . import data, world
from .train import as_json, build_processor, cosine_factor, fresh_scene


@dataclass
class TextRecipe:
    """Every knob of a text-stage run. The LM geometry must match the image model it will be transplanted into."""

    seed: int = 0
    threads: int = 1
    hidden: int = 128
    layers: int = 12
    heads: int = 4
    intermediate: int = 344
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    turns: int = 5  # questions per scene, each scored
    # Question types, cycled in a shuffled order per scene: a type named twice is asked more often.
    question_mix: tuple[str, ...] = world.QUESTION_TYPES
    # ((until_step, max_objects), ...): scene size before `until_step`; afterwards up to world.MAX_OBJECTS.
    curriculum: tuple[tuple[int, int], ...] = ((300, 1), (800, 2), (1500, 3))
    # Loss weights. `description_weight` scores the scene's words too (unpredictable: random scenes).
    answer_weight: float = 1.0
    description_weight: float = 0.0
    # Recall/copy pretraining: whole batches for the first `pretrain_steps` steps, then `pretrain_mix` of each.
    pretrain_steps: int = 0
    pretrain_mix: float = 0.0
    log_every: int = 100
    eval_every: int = 500
    checkpoint_every: int = 250


# Named recipes of ``python -m saturation.shapes train-text --recipe NAME``, one per measured row of the README.
TEXT_RECIPES: dict[str, TextRecipe] = {
    "answers": TextRecipe(),
    "answers-recall": TextRecipe(pretrain_steps=400, pretrain_mix=0.25),
    "answers-described": TextRecipe(description_weight=1.0),
    # more questions per scene (more scored tokens per step), no one-object phase (it rewards copying the only
    # object's words, not finding the named one), longer
    "answers-long": TextRecipe(steps=4000, turns=8, curriculum=((1000, 2), (2500, 3))),
    # position (the type every staged model ends weakest on, as text too) asked more often
    "answers-position": TextRecipe(question_mix=(*world.QUESTION_TYPES, "position")),
    # position asked about objects that share a shape or a colour with another one (the text LM's errors)
    "answers-shared": TextRecipe(question_mix=(*world.QUESTION_TYPES, "position-shared")),
}


# --------------------------------------------------------------------------- the text world


def describe(scene: world.Scene) -> str:
    """The scene in words, one phrase per object in grid order: ``red circle top left . blue square ...``."""
    return " ".join(f"{o.colour} {o.shape} {o.where} ." for o in scene)


def scene_qas(scene: world.Scene, rng: random.Random, turns: int,
              mix: tuple[str, ...] = world.QUESTION_TYPES) -> list[tuple[str, str, str]]:
    """`turns` distinct questions, types cycling through `mix` in a shuffled order (a type named twice is asked
    twice where the scene has two distinct such questions); existence answers drawn independently (a
    conversation need not hold one "yes" and one "no", so their pairing cannot stand in for the lookup)."""
    types = list(mix)
    rng.shuffle(types)
    out: list[tuple[str, str, str]] = []
    for k in range(4 * turns):
        if len(out) == turns:
            break
        qtype = types[k % len(types)]
        qa = world.TRAINING_ASK[qtype](scene, rng)
        if qa is not None and qa[0] not in {q for q, _, _ in out}:
            out.append((*qa, qtype))
    return out


class TextCodec:
    """Token ids and labels of text-world conversations in the LLaVA-1.5 template the image model uses
    (``USER: {scene}\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: ...``), the scene's words in place of
    ``<image>``."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids = lru_cache(maxsize=None)(self._ids)

    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False).input_ids)

    def example(self, context: str, qas: list[tuple[str, str]], context_weight: float = 0.0,
                ) -> tuple[list[int], list[int], list[float]]:
        """(ids, labels, weights): labels on each answer and its ``</s>``; the context's words weighted by
        `context_weight` (0: not scored)."""
        eos = self.tok.eos_token_id
        ids, labels, weights = [self.tok.bos_token_id], [IGNORE_INDEX], [0.0]

        def add(tokens, scored: float) -> None:
            ids.extend(tokens)
            labels.extend(tokens if scored else [IGNORE_INDEX] * len(tokens))
            weights.extend([scored] * len(tokens))

        for k, (q, a) in enumerate(qas):
            if k == 0:
                add(self.ids("USER:"), 0.0)
                add(self.ids(context), context_weight)
                add(self.ids(f"{q} ASSISTANT:"), 0.0)
            else:
                add(self.ids(f"USER: {q} ASSISTANT:"), 0.0)
            add((*self.ids(a), eos), 1.0)
        return ids, labels, weights

    def prompt(self, context: str, question: str) -> list[int]:
        """The ids up to the assistant cue of a single-turn question (what greedy evaluation continues)."""
        return [self.tok.bos_token_id, *self.ids("USER:"), *self.ids(context), *self.ids(f"{question} ASSISTANT:")]


# --------------------------------------------------------------------------- recall and copy tasks

_CONTENT = (*world.COLOURS, *world.SHAPES, *world.ROWS, *world.COLS, *world.NUMBERS)
# Keys and values from disjoint words: were a key word also a value, only the parity of its position would say
# which occurrence is the key, which attention reads poorly (a first version of this task was not learned).
_KEYS = (*world.COLOURS, *world.SHAPES)
_VALUES = (*world.ROWS, *world.COLS, *world.NUMBERS)


def recall_example(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """A key-value list and the value of one key: ``red two blue four ...`` then ``blue`` -> ``four``."""
    n = rng.randint(2, 8)
    keys = rng.sample(_KEYS, n)
    values = [rng.choice(_VALUES) for _ in keys]
    probe = rng.randrange(n)
    return " ".join(f"{k} {v}" for k, v in zip(keys, values)), [(keys[probe], values[probe])]


def copy_example(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """A random word sequence, then the same sequence as the answer (an induction head's task)."""
    words = " ".join(rng.choice(_CONTENT) for _ in range(rng.randint(2, 10)))
    return words, [("", words)]


# --------------------------------------------------------------------------- batches


def max_objects_at(step: int, curriculum: tuple[tuple[int, int], ...]) -> int:
    """The scene size at `step` of a curriculum ((until_step, max_objects), ...); afterwards the world's maximum."""
    return next((m for until, m in curriculum if step < until), world.MAX_OBJECTS)


def batch_at(step: int, recipe: TextRecipe, codec: TextCodec, exclude: frozenset) -> dict[str, Tensor]:
    """The training batch of `step`, drawn from a generator seeded by (seed, step) alone."""
    rng = random.Random(recipe.seed * 1_000_003 + step)
    synthetic = recipe.batch if step < recipe.pretrain_steps else round(recipe.pretrain_mix * recipe.batch)
    rows = []
    for i in range(recipe.batch):
        if i < synthetic:
            context, qas = (recall_example if i % 2 == 0 else copy_example)(rng)
            rows.append(codec.example(context, qas))
        else:
            scene = fresh_scene(rng, exclude, max_objects_at(step, recipe.curriculum))
            qas = [(q, a) for q, a, _ in scene_qas(scene, rng, recipe.turns, recipe.question_mix)]
            rows.append(codec.example(describe(scene), qas, recipe.description_weight))
    pad = codec.tok.pad_token_id
    return {
        "input_ids": pad_stack([torch.tensor(r[0]) for r in rows], pad, "right"),
        "attention_mask": pad_stack([torch.ones(len(r[0]), dtype=torch.long) for r in rows], 0, "right"),
        "labels": pad_stack([torch.tensor(r[1]) for r in rows], IGNORE_INDEX, "right"),
        "weights": pad_stack([torch.tensor(r[2]) for r in rows], 0.0, "right"),
    }


def weighted_loss(model, batch: dict[str, Tensor]) -> Tensor:
    """Next-token cross-entropy, each target weighted (answers 1, scene words `description_weight`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels, weights = batch["labels"][:, 1:], batch["weights"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten().clamp(min=0),
                                            reduction="none").view_as(labels)
    weights = weights * (labels != IGNORE_INDEX)
    return (nll * weights).sum() / weights.sum().clamp(min=1)


# --------------------------------------------------------------------------- evaluation


def scene_of(record: Record) -> world.Scene:
    """The ground-truth scene a shapes record carries in its ``objects``."""
    objects = record.extra.get("objects")
    if objects is None:
        raise ToolkitError(f"record {record.id}: no 'objects' field; the text world needs shapes-world records")
    return tuple(world.Obj(**o) for o in objects)


@torch.no_grad()
def text_accuracy(model, codec: TextCodec, records: list[Record], batch_size: int = 250) -> dict[str, float]:
    """Greedy exact match per question type (and ``overall``) on single-turn records, the scene given as text."""
    tok = codec.tok
    hits: dict[str, list[bool]] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [torch.tensor(codec.prompt(describe(scene_of(r)), r.turns[0][0])) for r in chunk]
        ids = pad_stack(prompts, tok.pad_token_id, "left")
        mask = pad_stack([torch.ones_like(p) for p in prompts], 0, "left")
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        for r, a in zip(chunk, answers):
            hits.setdefault(r.question_type, []).append(normalize_answer(a) == normalize_answer(r.turns[0][1]))
    model.train(was_training)
    scores = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    scores["overall"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return scores


# --------------------------------------------------------------------------- the run


def build_lm(recipe: TextRecipe, vocab_size: int):
    """A random `LlamaForCausalLM` with exactly the text config of the tiny LLaVA of the same geometry."""
    from transformers import AutoModelForCausalLM

    from saturation.core.tiny import tiny_llava_config

    cfg = tiny_llava_config(vocab_size, image_size=world.IMAGE_SIZE, patch_size=world.CELL, hidden=recipe.hidden,
                            layers=recipe.layers, heads=recipe.heads, intermediate=recipe.intermediate,
                            tie_word_embeddings=True).text_config
    cfg.tie_word_embeddings = True
    torch.manual_seed(recipe.seed)
    return AutoModelForCausalLM.from_config(cfg)


LABELS = {f: f for f in TextRecipe.__dataclass_fields__ if f not in ("threads", "log_every", "eval_every")}
# What a manifest written before a field existed means by its absence.
DEFAULTS = {"question_mix": list(world.QUESTION_TYPES)}


def check_mix(name: str, mix: tuple[str, ...]) -> None:
    """One error line when a question mix names a type the world does not ask."""
    if unknown := [t for t in mix if t not in world.TRAINING_ASK]:
        raise ToolkitError(f"{name} names {unknown[0]!r}; question types are {', '.join(world.TRAINING_ASK)}")


def train_text(out_dir: str | Path, recipe: TextRecipe, log=print, resume: bool = True,
               eval_records: list[Record] | None = None) -> Path:
    """Train the text-stage LM into `out_dir` (``save_pretrained`` + ``recipe.json`` + ``metrics.jsonl``).

    Resumable from ``OUT/text_state.pt``; a rerun with the same recipe resumes (a finished run is kept), another
    recipe is refused in one line unless `resume` is False. `eval_records` (single-turn shapes records) are scored
    every ``eval_every`` steps and at the end.
    """
    out = Path(out_dir)
    with locked(out), disk_guard(out):
        return _train_text(out, recipe, log, resume, eval_records or [])


def _train_text(out: Path, recipe: TextRecipe, log, resume: bool, eval_records: list[Record]) -> Path:
    check_mix("question_mix", recipe.question_mix)
    finished = read_manifest(out / "recipe.json") if resume else None
    if finished is not None:
        if not (diffs := differences(finished, as_json(asdict(recipe)), LABELS, DEFAULTS)):
            log(f"{out}: already trained with this recipe; nothing to do (--no-resume to train again)")
            return out
        raise ToolkitError(f"{out} holds an LM trained with another recipe: {', '.join(diffs)}; pass --no-resume "
                           "to train afresh there, or choose another --out")
    state_path = out / "text_state.pt"
    state = torch.load(state_path, weights_only=True) if resume and state_path.exists() else None
    if state is not None and (diffs := differences(json.loads(state["recipe"]), as_json(asdict(recipe)), LABELS, DEFAULTS)):
        raise ToolkitError(f"{state_path} was written by another recipe: {', '.join(diffs)}; pass --no-resume to "
                           "train afresh there, or choose another --out")
    (out / "recipe.json").unlink(missing_ok=True)
    torch.set_num_threads(recipe.threads)
    processor = build_processor()
    codec = TextCodec(processor.tokenizer)
    model = build_lm(recipe, len(processor.tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, recipe.steps, recipe.warmup))
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = int(state["step"])
        log(f"resuming at step {step}")
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    exclude = data.held_out_keys()
    model.train()
    t0, running = time.time(), []
    while step < recipe.steps:
        loss = recipe.answer_weight * weighted_loss(model, batch_at(step, recipe, codec, exclude))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        running.append(loss.item())
        row = None
        if step % recipe.log_every == 0 or step == recipe.steps:
            row = {"step": step, "loss": sum(running) / len(running), "lr": sched.get_last_lr()[0],
                   "seconds": round(time.time() - t0, 1)}
            running = []
        if eval_records and (step % recipe.eval_every == 0 or step == recipe.steps):
            row = (row or {"step": step}) | {"eval": text_accuracy(model, codec, eval_records)}
        if row is not None:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            log(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                         if k != "eval") + ("" if "eval" not in row else " | eval " + " ".join(
                             f"{t} {a:.3f}" for t, a in row["eval"].items())))
        if step % recipe.checkpoint_every == 0 and step < recipe.steps:
            state = {"recipe": json.dumps(asdict(recipe)), "model": model.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "step": step}
            atomic_write(state_path, lambda tmp, state=state: torch.save(state, tmp))
    model.eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    write_json(out / "recipe.json", asdict(recipe))
    state_path.unlink(missing_ok=True)
    log(f"trained in {time.time() - t0:.0f}s; saved to {out}")
    return out


def recipe_named(name: str, **overrides) -> TextRecipe:
    """A named recipe with `overrides` (None values ignored); an unknown name is one line listing the names."""
    if name not in TEXT_RECIPES:
        raise ToolkitError(f"unknown text recipe {name!r}; choose one of {', '.join(TEXT_RECIPES)}")
    return replace(TEXT_RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
