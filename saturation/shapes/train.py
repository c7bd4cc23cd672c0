"""Build and train the embedded tiny LLaVA on the shapes world: a staged recipe.

Naive joint training of a tiny LLaVA from scratch learns only the language prior (blind answers), so, as
LLaVA itself does, training is staged:

1. **Vision tower alone.** Linear heads on each patch feature (the layer the projector reads) predict that
   cell's colour, shape and index. Seconds on a CPU; the tower then encodes exactly what questions ask.
2. **Frozen tower, projector + LM.** Tower features are rescaled to per-dimension RMS 1 (raw features are
   tens of times the norm of word embeddings, and the LM would treat them as constants). The rescale is folded
   into the projector's first linear layer at save time, so plain ``from_pretrained`` reproduces it.
   Multi-turn QA records with balanced types, a cosine schedule and three auxiliary losses: a logit-lens
   loss on the image tokens (each non-empty cell's token must read as its colour, shape, row and column
   words), and two small attention-supervision terms, question words onto matching cells (layer 1) and
   answer-predicting tokens onto the object the question names (layer 3). They turn weeks of CPU into
   minutes, and they shape what the probe sees at those places: see ``data_samples/README.md``.
   The ``tiny-clean`` recipe (`RECIPES`) sets all three to 0 and uses a curriculum from one-object scenes
   instead, so nothing but the answer loss acts on the LM; its model is weaker (README: "The clean model").

Everything is seeded: the same `Recipe` gives the same weights, and an interrupted run resumes from
``OUT/train_state.pt`` at the step it stopped.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from saturation.core.adapters import adapter_for
from saturation.core.data import IGNORE_INDEX, Record, collate, encode_record
from saturation.core.errors import ToolkitError
from saturation.core.files import atomic_write, disk_guard, write_json
from saturation.core.runs import differences, locked, read_manifest
from saturation.core.tiny import tiny_llava_config, tiny_processor

from . import data, world


@dataclass
class Recipe:
    """Every knob of the training run. The defaults are the shipped model's recipe."""

    seed: int = 0
    # One thread: a model this small gains little from a second one, and on a shared machine threads that
    # spin-wait for a busy core made training steps 2-4x slower (measured here).
    threads: int = 1
    # geometry: 9 image tokens (one per grid cell), 12-layer LM
    vision_hidden: int = 64
    vision_layers: int = 2
    hidden: int = 128
    layers: int = 12
    heads: int = 4
    intermediate: int = 344
    # stage 1: vision tower with per-patch heads
    stage1_steps: int = 500
    stage1_batch: int = 64
    stage1_lr: float = 3e-3
    stage1_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-patch colour, shape, cell heads
    # stage 2: frozen tower; projector + LM on multi-turn QA
    train_scenes: int = 16_000
    turns: int = 5
    steps: int = 1200
    batch: int = 32
    lm_lr: float = 1e-3
    projector_lr: float = 3e-3
    warmup: int = 100
    # Curriculum: ((until_step, max_objects), ...): before `until_step`, scenes hold at most `max_objects`
    # objects (a pool of `curriculum_scenes` per stage); afterwards the full pool. () = no curriculum.
    curriculum: tuple[tuple[int, int], ...] = ()
    curriculum_scenes: int = 4000
    # Text world: for the first `text_world_steps` steps, a `text_world` fraction of each batch shows the scene
    # as text instead of an image: image token k becomes the sum of the word embeddings of cell k's colour,
    # shape, row and column (row and column only when empty). Only the answer loss trains on these examples.
    text_world: float = 0.0
    text_world_steps: int = 0
    # Every loss weight of stage 2 (0 = unused). Only the answer loss leaves the LM's internals to the data.
    answer_weight: float = 1.0  # next-token loss on assistant tokens
    aux_weight: float = 1.0  # logit-lens loss on image tokens
    attn_weight: float = 0.1  # attention supervision of question words onto matching cells
    attn_layer: int = 1
    lookup_weight: float = 0.1  # attention supervision of answer-predicting tokens onto the named object
    lookup_layer: int = 3
    rms_scenes: int = 512  # scenes used to measure the per-dimension feature RMS
    log_every: int = 100
    checkpoint_every: int = 250


# The named recipes of ``python -m saturation.shapes train --recipe NAME``. `tiny` made data_samples/tiny-llava
# (with losses on the LM's image tokens and attention); `tiny-clean` trains the LM side on the answer loss
# alone, so every probe curve of its model is emergent (data_samples/README.md compares the two).
RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(),
    "tiny-clean": Recipe(aux_weight=0.0, attn_weight=0.0, lookup_weight=0.0,
                         curriculum=((200, 1), (500, 2), (800, 3)), steps=1200),
}


# --------------------------------------------------------------------------- model and processor


def build_processor() -> LlavaProcessor:
    """The offline processor: 48 px PIL image processor and a word tokenizer over the shapes vocabulary."""
    return tiny_processor(world.vocabulary(), image_size=world.IMAGE_SIZE, patch_size=world.CELL)


def build_model(recipe: Recipe, vocab_size: int) -> LlavaForConditionalGeneration:
    """A randomly initialised `LlavaForConditionalGeneration` of the recipe's geometry (seeded)."""
    cfg = tiny_llava_config(
        vocab_size,
        image_size=world.IMAGE_SIZE,
        patch_size=world.CELL,
        vision_hidden=recipe.vision_hidden,
        vision_layers=recipe.vision_layers,
        hidden=recipe.hidden,
        layers=recipe.layers,
        heads=recipe.heads,
        intermediate=recipe.intermediate,
        tie_word_embeddings=True,
    )
    torch.manual_seed(recipe.seed)
    return LlavaForConditionalGeneration(cfg)


def patch_features(model: LlavaForConditionalGeneration, pixel_values: Tensor) -> Tensor:
    """The tower features the projector reads: ``vision_feature_layer``, CLS dropped. [B,3,H,W] -> [B,9,Dv]."""
    return adapter_for(model).vision_hidden(pixel_values)


def pixels(processor: LlavaProcessor, images: list) -> Tensor:
    """Normalised pixel values exactly as the processor makes them for the model. [B, 3, 48, 48]."""
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def render_batch(scenes: list[world.Scene], rng: random.Random) -> list:
    """Render scenes with render jitter drawn from `rng`."""
    return [world.render(s, random.Random(rng.getrandbits(32))) for s in scenes]


# --------------------------------------------------------------------------- stage 1: the vision tower


def cell_targets(scenes: list[world.Scene]) -> tuple[Tensor, Tensor]:
    """Per-cell colour and shape classes (0 = empty cell). Two [B, 9] long tensors."""
    colours = torch.zeros(len(scenes), world.GRID**2, dtype=torch.long)
    kinds = torch.zeros_like(colours)
    names = list(world.COLOURS)
    for i, scene in enumerate(scenes):
        for o in scene:
            colours[i, o.cell] = 1 + names.index(o.colour)
            kinds[i, o.cell] = 1 + world.SHAPES.index(o.shape)
    return colours, kinds


def stage1_heads(recipe: Recipe) -> nn.ModuleDict:
    """Linear probes on each patch feature: colour (+empty), shape (+empty) and cell index."""
    d, cells = recipe.vision_hidden, world.GRID**2
    return nn.ModuleDict({
        "colour": nn.Linear(d, len(world.COLOURS) + 1),
        "shape": nn.Linear(d, len(world.SHAPES) + 1),
        "cell": nn.Linear(d, cells),
    })


def stage1_loss(
    feats: Tensor, heads: nn.ModuleDict, colours: Tensor, kinds: Tensor, weights: tuple[float, ...] = (1.0, 1.0, 1.0)
) -> tuple[Tensor, float]:
    """Weighted cross-entropy of the three per-patch heads, and the fraction of patches fully right."""
    b, n, _ = feats.shape
    cells = torch.arange(n).expand(b, n)
    loss, right = 0.0, torch.ones(b, n, dtype=torch.bool)
    for w, (name, target) in zip(weights, (("colour", colours), ("shape", kinds), ("cell", cells))):
        logits = heads[name](feats)
        loss = loss + w * nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        right &= logits.argmax(-1) == target
    return loss, right.float().mean().item()


def train_stage1(model, processor, recipe: Recipe, exclude: frozenset, log) -> None:
    """Train the vision tower (and throw-away heads) until each patch encodes its cell's content."""
    torch.manual_seed(recipe.seed + 1)
    heads = stage1_heads(recipe)
    tower = adapter_for(model).vision_encoder
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.stage1_lr, weight_decay=0.0)
    sched = cosine_schedule(opt, recipe.stage1_steps, warmup=20)
    tower.train()
    for step in range(recipe.stage1_steps):
        rng = random.Random(f"stage1-{recipe.seed}-{step}")
        scenes = [fresh_scene(rng, exclude) for _ in range(recipe.stage1_batch)]
        colours, kinds = cell_targets(scenes)
        feats = patch_features(model, pixels(processor, render_batch(scenes, rng)))
        loss, acc = stage1_loss(feats, heads, colours, kinds, recipe.stage1_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % recipe.log_every == 0 or step == recipe.stage1_steps - 1:
            log(f"stage1 step {step} loss {loss.item():.4f} patch_acc {acc:.3f}")
    tower.eval()


def fresh_scene(rng: random.Random, exclude: frozenset, max_objects: int = world.MAX_OBJECTS) -> world.Scene:
    """A random scene (at most `max_objects` objects) that is not one of the held-out scenes."""
    while True:
        scene = world.random_scene(rng, max_objects)
        if world.scene_key(scene) not in exclude:
            return scene


# --------------------------------------------------------------------------- stage 2: projector + LM


@torch.no_grad()
def feature_rms(model, processor, recipe: Recipe, exclude: frozenset) -> Tensor:
    """Per-dimension RMS of the frozen tower's patch features over `rms_scenes` scenes. [Dv]."""
    rng = random.Random(f"rms-{recipe.seed}")
    scenes = [fresh_scene(rng, exclude) for _ in range(recipe.rms_scenes)]
    feats = patch_features(model, pixels(processor, render_batch(scenes, rng)))
    return feats.pow(2).mean(dim=(0, 1)).sqrt().clamp_min(1e-6)


def attach_rescale(model, rms: Tensor):
    """Divide the projector's input by `rms` (a hook for training; see `fold_rescale` for saving)."""
    return adapter_for(model).projector.register_forward_pre_hook(lambda _m, args: (args[0] / rms, *args[1:]))


@torch.no_grad()
def fold_rescale(model, rms: Tensor) -> None:
    """Bake ``x / rms`` into the projector's first linear layer: ``W (x / r) = (W / r) x``."""
    adapter_for(model).projector_in.weight.div_(rms)


def aux_targets(scene: world.Scene, tokenizer) -> Tensor:
    """Word ids each image token's logit lens should read: colour, shape, row, column; -100 on empty cells. [9, 4]."""
    out = torch.full((world.GRID**2, 4), IGNORE_INDEX, dtype=torch.long)
    for o in scene:
        words = (o.colour, o.shape, world.ROWS[o.row], world.COLS[o.col])
        out[o.cell] = torch.tensor(tokenizer.convert_tokens_to_ids(list(words)))
    return out


def cell_words(scene: world.Scene, tokenizer) -> Tensor:
    """Each cell as words, for the text world: colour, shape, row, column ids; -100 for an empty cell's colour
    and shape. [9, 4]."""
    out = torch.full((world.GRID**2, 4), IGNORE_INDEX, dtype=torch.long)
    for cell in range(world.GRID**2):
        out[cell, 2:] = torch.tensor(tokenizer.convert_tokens_to_ids([world.ROWS[cell // world.GRID],
                                                                      world.COLS[cell % world.GRID]]))
    for o in scene:
        out[o.cell, :2] = torch.tensor(tokenizer.convert_tokens_to_ids([o.colour, o.shape]))
    return out


def text_world_embeds(model, input_ids: Tensor, image_mask: Tensor, words: Tensor) -> Tensor:
    """The LM's input embeddings with image token k replaced by the sum of cell k's word embeddings. [B, T, D].

    input_ids, image_mask [B, T]; words [B * 9, 4] from `cell_words` (-100 = no word).
    """
    embed = model.get_input_embeddings()
    keep = (words != IGNORE_INDEX).unsqueeze(-1)
    cells = (embed(words.clamp_min(0)) * keep).sum(-2)
    return embed(input_ids).masked_scatter(image_mask.unsqueeze(-1), cells)


def attention_targets(input_ids: Tensor, labels: Tensor, scene: world.Scene, tokenizer) -> Tensor:
    """Which image cells each question word should attend to, per supervised head. [T, 3, 9] bool.

    Head 0: a colour word looks at the cells of that colour. Head 1: a shape word (plurals too) looks at
    the cells of that shape. Head 2: the shape word of a "colour shape" pair looks at the one cell holding
    both (the object lookup behind position and existence questions). Words naming something absent from
    the scene, and answer tokens, get no target.
    """
    cells = torch.zeros(len(input_ids), 3, world.GRID**2, dtype=torch.bool)
    words, labels = _words(input_ids, tokenizer), labels.tolist()  # lists: per-element tensor access is slow
    for t, word in enumerate(words):
        if labels[t] != IGNORE_INDEX:
            continue
        if word in world.COLOURS:
            cells[t, 0, [o.cell for o in scene if o.colour == word]] = True
        elif word in world.SHAPES:
            cells[t, 1, [o.cell for o in scene if o.shape == word]] = True
            cells[t, 2, [o.cell for o in scene if o.shape == word and o.colour == words[t - 1]]] = True
    return cells


def _words(input_ids: Tensor, tokenizer) -> list[str]:
    """Tokens as words, plural shape words folded to their singular."""
    return [w.removesuffix("s") if w.removesuffix("s") in world.SHAPES else w
            for w in tokenizer.convert_ids_to_tokens(input_ids.tolist())]


def lookup_targets(input_ids: Tensor, labels: Tensor, scene: world.Scene, tokenizer) -> Tensor:
    """The cell that each answer-predicting token should attend to, when the question names one object. [T, 9].

    The answer cue (``:`` after ``ASSISTANT``) of a question about one object (its colour, shape, position,
    or "is there" with answer yes) looks at that object's cell; so does a position answer's row word,
    which predicts the column: without this the column tends to come from another object in the same row.
    """
    cells = torch.zeros(len(input_ids), world.GRID**2, dtype=torch.bool)
    words, labels = _words(input_ids, tokenizer), labels.tolist()
    named: set[str] = set()
    for t in range(len(words) - 1):
        if words[t] == "USER":
            named = set()
        elif words[t] == "how":  # counting questions look at every match, not one object
            named = {"<count>"}
        elif labels[t] == IGNORE_INDEX and (words[t] in world.COLOURS or words[t] in world.SHAPES):
            named.add(words[t])
        answer_next = labels[t] == IGNORE_INDEX and labels[t + 1] != IGNORE_INDEX
        row_word = labels[t] != IGNORE_INDEX and words[t] in world.ROWS
        hits = [o.cell for o in scene if named and named <= {o.colour, o.shape}]
        if (answer_next or row_word) and len(hits) == 1:
            cells[t, hits] = True
    return cells


def build_pool(
    processor, n: int, seed: int, recipe: Recipe, exclude: frozenset, log, max_objects: int = world.MAX_OBJECTS
) -> list[dict]:
    """Encode `n` multi-turn records (the LLaVA-1.5 template of `saturation.core.data`) in memory."""
    t0 = time.time()
    pool = []
    for i, s in enumerate(data.sample_scenes(n, seed, recipe.turns, exclude, max_objects)):
        record = Record(f"train-{i}", Path(f"train-{i}.png"), tuple((q, a) for q, a, _ in s["qas"]))
        image = world.render(s["scene"], random.Random(s["render_seed"]))
        example = encode_record(record, processor, image=image)
        example["aux"] = aux_targets(s["scene"], processor.tokenizer)
        example["cell_words"] = cell_words(s["scene"], processor.tokenizer)
        args = (example["input_ids"], example["labels"], s["scene"], processor.tokenizer)
        example["attn_cells"] = attention_targets(*args)
        example["lookup_cells"] = lookup_targets(*args)[:, None]  # one supervised head
        example["types"] = [t for _, _, t in s["qas"]]
        pool.append(example)
    log(f"encoded {len(pool)} records in {time.time() - t0:.0f}s")
    return pool


def make_batch(pool: list[dict], step: int, recipe: Recipe, image_token_id: int) -> dict[str, Tensor]:
    """Batch `step`: a seeded draw from the pool, so a resumed run sees the same batches."""
    rng = random.Random(f"batch-{recipe.seed}-{step}")
    batch = batch_of([pool[rng.randrange(len(pool))] for _ in range(recipe.batch)], image_token_id)
    if step < recipe.text_world_steps:  # the first examples of the batch see the scene as text
        batch["text_world"] = round(recipe.text_world * recipe.batch)
    return batch


def batch_of(examples: list[dict], image_token_id: int) -> dict[str, Tensor]:
    """Right-padded batch of encoded records plus their auxiliary and attention targets."""
    batch = collate(examples, pad_token_id=0, image_token_id=image_token_id)
    batch["aux"] = torch.cat([e["aux"] for e in examples])
    batch["cell_words"] = torch.cat([e["cell_words"] for e in examples])
    width = batch["input_ids"].shape[1]
    for key in ("attn_cells", "lookup_cells"):  # [B, T, heads, 9]
        batch[key] = torch.stack([nn.functional.pad(e[key], (0, 0, 0, 0, 0, width - len(e[key]))) for e in examples])
    return batch


def lens_loss(model, image_embeds: Tensor, targets: Tensor) -> Tensor:
    """Auxiliary logit-lens loss: mean NLL of the target words under ``lm_head(norm(h))`` at image tokens.

    image_embeds [N, D] (image tokens at the LM input), targets [N, 4] word ids or -100.
    """
    logp = adapter_for(model).unembed(image_embeds).log_softmax(-1)
    keep = targets != IGNORE_INDEX
    return -logp.gather(-1, targets.clamp_min(0))[keep].mean()


def attention_loss(model, layer_input: Tensor, batch: dict[str, Tensor], targets: Tensor, layer_idx: int) -> Tensor:
    """-log of the attention mass that supervised tokens put on their target cells, in one layer.

    targets [B, T, h, 9]: cells that head j < h of the token at [b, t] should attend to (none: no loss).
    Recomputes only the supervised rows of that layer's attention (its own q/k projections and RoPE, as the
    layer does with right padding), so it works with any attention implementation. layer_input [B, T, D].
    """
    a = adapter_for(model)
    t = layer_input.shape[1]
    q, k, scale = a.queries_keys(layer_idx, layer_input, a.rope(layer_input, torch.arange(t).unsqueeze(0)))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    rows, pos, heads = targets.any(-1).nonzero(as_tuple=True)
    if len(rows) == 0:
        return layer_input.sum() * 0.0
    scores = torch.einsum("nd,ntd->nt", q[rows, heads, pos], k[rows, heads]) * scale
    visible = (torch.arange(t) <= pos[:, None]) & batch["attention_mask"][rows].bool()
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    image_probs = probs[batch["image_mask"][rows]].view(len(rows), -1)  # [N, 9], cells in row-major order
    mass = (image_probs * targets[rows, pos, heads]).sum(-1)
    return -mass.clamp_min(1e-6).log().mean()


def stage2_loss(model, batch: dict[str, Tensor], recipe: Recipe) -> dict[str, Tensor]:
    """The answer loss, the auxiliary lens and attention losses, and their weighted sum (``total``)."""
    k = batch.get("text_world", 0)
    if k:  # the first k examples as text, the rest as images; the answer loss is their example-weighted mean
        cells = world.GRID**2
        text = model(inputs_embeds=text_world_embeds(model, batch["input_ids"][:k], batch["image_mask"][:k],
                                                     batch["cell_words"][: k * cells]),
                     attention_mask=batch["attention_mask"][:k], labels=batch["labels"][:k], use_cache=False)
        rest = {key: v[k:] for key, v in batch.items() if key not in ("text_world", "aux", "cell_words")}
        rest.update(aux=batch["aux"][k * cells:], cell_words=batch["cell_words"][k * cells:])
        losses = stage2_loss(model, rest, recipe)
        share = k / len(batch["input_ids"])
        losses["total"] = (1 - share) * losses["total"] + share * recipe.answer_weight * text.loss
        return {**losses, "text": text.loss}
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        labels=batch["labels"],
        output_hidden_states=True,
        use_cache=False,
    )
    losses = {"answer": out.loss, "lens": lens_loss(model, out.hidden_states[0][batch["image_mask"]], batch["aux"])}
    total = recipe.answer_weight * out.loss
    if recipe.aux_weight > 0:
        total = total + recipe.aux_weight * losses["lens"]
    if recipe.attn_weight > 0:
        layer = recipe.attn_layer
        losses["attn"] = attention_loss(model, out.hidden_states[layer], batch, batch["attn_cells"], layer)
        total = total + recipe.attn_weight * losses["attn"]
    if recipe.lookup_weight > 0:
        layer = recipe.lookup_layer
        losses["lookup"] = attention_loss(model, out.hidden_states[layer], batch, batch["lookup_cells"], layer)
        total = total + recipe.lookup_weight * losses["lookup"]
    return {"total": total, **losses}


@torch.no_grad()
def answer_accuracy(model, examples: list[dict], image_token_id: int) -> dict[str, float]:
    """Teacher-forced exact match per question type: an answer counts when every label token is the argmax."""
    batch = batch_of(examples, image_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    wrong = (logits.argmax(-1) != labels) & (labels != IGNORE_INDEX)
    # Answers are the runs of labelled tokens, in turn order.
    starts = (labels != IGNORE_INDEX) & nn.functional.pad(labels[:, :-1] == IGNORE_INDEX, (1, 0), value=True)
    run_id = starts.long().cumsum(-1) - 1
    hits: dict[str, list[bool]] = {}
    for row, example in enumerate(examples):
        labelled = labels[row] != IGNORE_INDEX
        bad = set(run_id[row][labelled & wrong[row]].tolist())
        for k, qtype in enumerate(example["types"]):
            hits.setdefault(qtype, []).append(k not in bad)
    scores = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    scores["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return scores


def cosine_factor(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at `step`: linear warm-up then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def cosine_schedule(opt, total: int, warmup: int):
    """Linear warm-up then cosine decay to zero."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, total, warmup))


def stage2_optimizer(model, recipe: Recipe):
    """AdamW with the projector at its own (higher) rate; the vision tower is frozen."""
    a = adapter_for(model)
    a.vision_encoder.requires_grad_(False)
    projector = list(a.projector.parameters())
    lm = list(a.text_model.parameters())  # lm_head is tied to embed_tokens
    return torch.optim.AdamW(
        [{"params": lm, "lr": recipe.lm_lr}, {"params": projector, "lr": recipe.projector_lr}],
        weight_decay=0.0,
    )


# --------------------------------------------------------------------------- the whole recipe


def save_state(path: Path, **state) -> None:
    """Write a resumable training state atomically (a crash mid-write leaves the old one intact)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train(out_dir: str | Path, recipe: Recipe | None = None, log=print, resume: bool = True) -> Path:
    """Run the full recipe into `out_dir` (model + processor via ``save_pretrained``, fp16). Resumable.

    Returns `out_dir`. The run-folder contract of every long job (`saturation.core.runs`): one process per folder;
    ``train_state.pt`` holds the progress and ``recipe.json`` (written last) marks a finished model. A rerun with
    the same recipe resumes (a finished one is left as it is); one with another recipe is refused in one line naming
    each difference, unless `resume` is False (``--no-resume``), which starts over.
    """
    recipe = recipe or Recipe()
    out = Path(out_dir)
    with locked(out), disk_guard(out):
        return _train(out, recipe, log, resume)


RECIPE_LABELS = {f: f for f in Recipe.__dataclass_fields__}  # the recipe's fields are its options


def as_json(obj) -> dict:
    """As JSON reads it back (tuples become lists), so a recorded recipe compares equal to its own."""
    return json.loads(json.dumps(obj))


def _train(out: Path, recipe: Recipe, log, resume: bool) -> Path:
    state_path = out / "train_state.pt"
    finished = read_manifest(out / "recipe.json") if resume else None
    if finished is not None:
        diffs = differences(finished, as_json(asdict(recipe)), RECIPE_LABELS)
        if not diffs:
            log(f"{out}: already trained with this recipe; nothing to do (--no-resume to train again)")
            return out
        raise ToolkitError(f"{out} holds a model trained with another recipe: {', '.join(diffs)}; pass "
                           "--no-resume to train afresh there, or choose another --out")
    state = torch.load(state_path, weights_only=True) if resume and state_path.exists() else None
    if state is not None and (diffs := differences(as_json(state["recipe"]), as_json(asdict(recipe)), RECIPE_LABELS)):
        raise ToolkitError(f"{state_path} was written by another recipe: {', '.join(diffs)}; pass --no-resume to "
                           "train afresh there, or choose another --out")
    (out / "recipe.json").unlink(missing_ok=True)  # the model files about to change are not that recipe's any more
    torch.set_num_threads(recipe.threads)
    processor = build_processor()
    model = build_model(recipe, len(processor.tokenizer))
    exclude = data.held_out_keys()
    t0 = time.time()
    if state is None:
        train_stage1(model, processor, recipe, exclude, log)
        rms = feature_rms(model, processor, recipe, exclude)
        step = 0
    else:
        model.load_state_dict(state["model"])
        rms, step = state["rms"], state["step"]
        log(f"resuming at stage-2 step {step}")

    adapter_for(model).vision_encoder.eval()
    hook = attach_rescale(model, rms)
    opt = stage2_optimizer(model, recipe)
    sched = cosine_schedule(opt, recipe.steps, recipe.warmup)
    if state is not None:
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    # Training and validation scenes get seeds of their own, apart from the model's and stage 1's.
    pool = build_pool(processor, recipe.train_scenes, recipe.seed + 7, recipe, exclude, log)
    easy = [(until, build_pool(processor, recipe.curriculum_scenes, recipe.seed + 13 + k, recipe, exclude, log, m))
            for k, (until, m) in enumerate(recipe.curriculum)]
    val = build_pool(processor, 200, recipe.seed + 11, recipe, exclude, log)  # teacher-forced progress check
    image_token_id = model.config.image_token_id
    adapter_for(model).text_model.train()
    while step < recipe.steps:
        batch = make_batch(next((p for until, p in easy if step < until), pool), step, recipe, image_token_id)
        losses = stage2_loss(model, batch, recipe)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % recipe.log_every == 0 or step == recipe.steps:
            model.eval()
            acc = answer_accuracy(model, val, image_token_id)
            adapter_for(model).text_model.train()
            log(f"stage2 step {step} " + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items() if k != "total")
                + " | val " + " ".join(f"{k} {v:.2f}" for k, v in acc.items())
                + f" | lr {sched.get_last_lr()[0]:.1e} {time.time() - t0:.0f}s")
        if step % recipe.checkpoint_every == 0 and step < recipe.steps:
            save_state(state_path, recipe=asdict(recipe), model=model.state_dict(), opt=opt.state_dict(),
                       sched=sched.state_dict(), rms=rms, step=step)
    hook.remove()
    fold_rescale(model, rms)
    save_model(model, processor, out)
    write_json(out / "recipe.json", asdict(recipe))
    state_path.unlink(missing_ok=True)
    log(f"trained in {time.time() - t0:.0f}s; saved to {out}")
    return out


def save_model(model, processor, out: Path) -> None:
    """Save in fp16 (half the bytes; answers are checked to match fp32 loading) with the processor beside it."""
    model.eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    processor.save_pretrained(out)
