"""The synthetic shapes world and the embedded tiny LLaVA trained on it.

A scene is a 3x3 grid of 16 px cells (48 px image). Some cells hold one coloured shape (circle, square,
triangle; six colours). Questions ask for the colour of a named shape, the shape of a named colour, a
count, whether an object exists (half "no", mostly near misses as in POPE) and where an object is. Every
answer is one or two words, and every word of the world is in a small word-level vocabulary, so a tiny
LLaVA can be trained from scratch on a CPU in minutes (see ``python -m saturation.shapes --help`` and
``data_samples/README.md``).

Grid cells match the vision tower's 16 px patches, so image token k of a scene is grid cell k
(row-major). Nothing here depends on that for correctness, but it is why the tiny model learns fast.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
GRID = 3
CELL = IMAGE_SIZE // GRID
BACKGROUND = (236, 236, 236)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
    "purple": (140, 60, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "count", "exist", "position")
MAX_OBJECTS = 4

# Seeds of the shipped sample sets. Training skips their scenes, so "held-out" means unseen scenes.
PROBE_SEED = 1001
HELDOUT_SEED = 2002

QUESTION_WORDS = ("what", "colour", "shape", "is", "the", "object", "how", "many", "shapes", "are", "there", "a", "an",
                  "where", "circles", "squares", "triangles")
ANSWER_WORDS = ("yes", "no", *COLOURS, *SHAPES, *ROWS, *COLS, *NUMBERS)


def vocabulary() -> list[str]:
    """Every word that a question or answer of the shapes world can contain (no duplicates, fixed order)."""
    return list(dict.fromkeys((*QUESTION_WORDS, *ANSWER_WORDS)))


@dataclass(frozen=True)
class Obj:
    """One object of a scene: its shape, colour name and grid cell."""

    shape: str
    colour: str
    row: int
    col: int

    @property
    def cell(self) -> int:
        """Row-major grid index, which is also the index of the image token that covers it."""
        return self.row * GRID + self.col

    @property
    def where(self) -> str:
        """The two-word position answer, e.g. ``"top left"``."""
        return f"{ROWS[self.row]} {COLS[self.col]}"


Scene = tuple[Obj, ...]


def random_scene(rng: random.Random) -> Scene:
    """1..MAX_OBJECTS objects in distinct cells, with distinct (shape, colour) pairs so each is nameable."""
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), n)
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLOURS], n)
    objs = [Obj(s, c, cell // GRID, cell % GRID) for (s, c), cell in zip(pairs, cells)]
    return tuple(sorted(objs, key=lambda o: o.cell))


def scene_key(scene: Scene) -> tuple:
    """A hashable identity of a scene's content (rendering jitter aside), used to keep held-out scenes out."""
    return tuple((o.shape, o.colour, o.cell) for o in scene)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw `scene` as a 48 px RGB image; size, offset and hue jitter come from `rng`.

    Each shape stays inside its own cell, so it never leaks into a neighbouring patch.
    """
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene:
        size = rng.randint(10, 14)
        x0 = o.col * CELL + rng.randint(1, CELL - size - 1)
        y0 = o.row * CELL + rng.randint(1, CELL - size - 1)
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        fill = _jitter(COLOURS[o.colour], rng)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + (size - 1) / 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=fill)
    return img


def blank_image() -> Image.Image:
    """The empty scene: background only. Used to measure how much the model's answers depend on the image."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)


# --- questions: each returns (question, answer) or None when the scene does not support that type ---

QA = tuple[str, str]


def ask_colour(scene: Scene, rng: random.Random) -> QA | None:
    """Colour of a shape that occurs exactly once."""
    unique = [o for o in scene if sum(p.shape == o.shape for p in scene) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return f"what colour is the {o.shape}?", o.colour


def ask_shape(scene: Scene, rng: random.Random) -> QA | None:
    """Shape of the one object with a given colour."""
    unique = [o for o in scene if sum(p.colour == o.colour for p in scene) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return f"what shape is the {o.colour} object?", o.shape


def ask_count(scene: Scene, rng: random.Random) -> QA:
    """Either all objects (1..4) or one kind of shape (0..3)."""
    if rng.random() < 0.5:
        return "how many shapes are there?", NUMBERS[len(scene)]
    shape = rng.choice(SHAPES)
    return f"how many {shape}s are there?", NUMBERS[sum(o.shape == shape for o in scene)]


def ask_exist(scene: Scene, rng: random.Random, answer: str | None = None) -> QA | None:
    """Is there a <colour> <shape>? Half "no"; most "no"s are near misses (the colour or the shape is present)."""
    answer = answer or rng.choice(("yes", "no"))
    present = {(o.shape, o.colour) for o in scene}
    if answer == "yes":
        shape, colour = rng.choice(sorted(present))
    else:
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present]
        near = [(s, c) for s, c in absent if any(o.shape == s or o.colour == c for o in scene)]
        shape, colour = rng.choice(near if near and rng.random() < 0.8 else absent)
    article = "an" if colour[0] in "aeiou" else "a"
    return f"is there {article} {colour} {shape}?", answer


def ask_position(scene: Scene, rng: random.Random) -> QA:
    """Where a named object is, as "row column" (e.g. "middle center")."""
    o = rng.choice(scene)
    return f"where is the {o.colour} {o.shape}?", o.where


ASK: dict[str, Callable[[Scene, random.Random], QA | None]] = {
    "colour": ask_colour,
    "shape": ask_shape,
    "count": ask_count,
    "exist": ask_exist,
    "position": ask_position,
}


def scene_questions(scene: Scene, rng: random.Random, turns: int) -> list[tuple[str, str, str]]:
    """Up to `turns` distinct (question, answer, type) triples about one scene, types spread evenly, in random order.

    With `turns` >= 4, two of them are a POPE-style existence pair (one "yes", one adversarial "no"); the rest
    cycle through the other types, skipping types the scene cannot support. A small scene supports only so
    many distinct questions, so a large `turns` can give fewer.
    """
    out: list[tuple[str, str, str]] = []
    if turns >= 4:
        pair = [("exist", *ask_exist(scene, rng, "yes")), ("exist", *ask_exist(scene, rng, "no"))]
        rng.shuffle(pair)
        out += [(q, a, t) for t, q, a in pair]
    others = [t for t in QUESTION_TYPES if t != "exist" or turns < 4]
    rng.shuffle(others)
    for _ in range(4 * turns):  # rounds; a small scene may run out of distinct questions
        if len(out) >= turns:
            break
        for t in others:
            qa = ASK[t](scene, rng)
            if qa is not None and len(out) < turns and qa[0] not in {q for q, _, _ in out}:
                out.append((*qa, t))
    order = list(range(len(out)))
    rng.shuffle(order)
    return [out[i] for i in order]


def typed_scene(
    qtype: str, rng: random.Random, exclude: set | frozenset = frozenset(), answer: str | None = None
) -> tuple[Scene, QA]:
    """A fresh scene (not in `exclude`) that supports a question of `qtype`, with that question.

    `answer` forces the yes/no answer of an existence question.
    """
    while True:
        scene = random_scene(rng)
        if scene_key(scene) in exclude:
            continue
        qa = ask_exist(scene, rng, answer) if qtype == "exist" else ASK[qtype](scene, rng)
        if qa is not None:
            return scene, qa


def sample_scenes(n: int, seed: int, turns: int = 1, exclude: set | frozenset = frozenset()) -> Iterator[dict]:
    """`n` scenes with their questions, deterministic per `seed`.

    With ``turns == 1`` question types cycle so each type gets n/5 samples; with more turns each scene gets
    `turns` questions from :func:`scene_questions`. Yields dicts with ``scene``, ``qas`` [(q, a, type)] and
    ``render_seed``.
    """
    rng = random.Random(seed)
    for i in range(n):
        if turns == 1:
            qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
            # Existence answers alternate so that exactly half are "no", as in POPE.
            answer = ("yes", "no")[(i // len(QUESTION_TYPES)) % 2] if qtype == "exist" else None
            scene, (q, a) = typed_scene(qtype, rng, exclude, answer)
            qas = [(q, a, qtype)]
        else:
            scene = random_scene(rng)
            while scene_key(scene) in exclude:
                scene = random_scene(rng)
            qas = scene_questions(scene, rng, turns)
        yield {"scene": scene, "qas": qas, "render_seed": rng.getrandbits(32)}


def llava_record(rec_id: str, image: str, qas: list[tuple[str, str, str]], scene: Scene) -> dict:
    """One LLaVA-1.5 record. ``question_type`` is the first turn's type; ``objects`` is the ground truth."""
    conv = []
    for k, (q, a, _) in enumerate(qas):
        conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    return {
        "id": rec_id,
        "image": image,
        "conversations": conv,
        "question_type": qas[0][2],
        "question_types": [t for _, _, t in qas],
        "objects": [asdict(o) for o in scene],
    }


def make_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    *,
    name: str = "shapes",
    turns: int = 1,
    exclude: set | frozenset = frozenset(),
) -> Path:
    """Write `n` scenes as PNGs under ``out_dir/images/`` and their LLaVA-1.5 JSON as ``out_dir/{name}.json``.

    Deterministic per `seed` (same bytes for the same arguments). Image paths in the JSON are relative to
    the JSON's folder. Returns the JSON's path.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, s in enumerate(sample_scenes(n, seed, turns, exclude)):
        rel = f"images/{name}_{i:05d}.png"
        render(s["scene"], random.Random(s["render_seed"])).save(out_dir / rel, optimize=True)
        records.append(llava_record(f"{name}-{i:05d}", rel, s["qas"], s["scene"]))
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def held_out_keys(n: int = 500) -> frozenset:
    """Scene keys of the shipped probe and held-out sets, which training must never see."""
    keys = set()
    for seed in (PROBE_SEED, HELDOUT_SEED):
        keys |= {scene_key(s["scene"]) for s in sample_scenes(n, seed)}
    return frozenset(keys)


# --------------------------------------------------------------------------- command line

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "data_samples" / "shapes"


def build_samples(out_dir: str | Path = SAMPLES_DIR, n: int = 500) -> tuple[Path, Path]:
    """Write the shipped sample sets: ``probe.json`` and ``heldout.json`` (single-turn, types balanced)."""
    probe = make_dataset(out_dir, n, PROBE_SEED, name="probe")
    heldout = make_dataset(out_dir, n, HELDOUT_SEED, name="heldout")
    return probe, heldout


def main(argv: list[str] | None = None) -> None:
    """``python -m saturation.shapes {build-samples,train,evaluate}``; see ``data_samples/README.md``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m saturation.shapes", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build-samples", help="write data_samples/shapes/{probe,heldout}.json and their images")
    p.add_argument("--out", default=str(SAMPLES_DIR))
    p.add_argument("--n", type=int, default=500)
    p = sub.add_parser("dataset", help="write any number of scenes as LLaVA JSON (for training other models)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="shapes")
    p.add_argument("--turns", type=int, default=1)
    p = sub.add_parser("train", help="train the tiny LLaVA from scratch (resumable); save it to --out")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's)")
    p.add_argument("--eval", default=str(SAMPLES_DIR / "heldout.json"), help="JSON to evaluate on afterwards")
    p = sub.add_parser("evaluate", help="held-out accuracy by question type vs blank image and blind baseline")
    p.add_argument("--model", default="tiny")
    p.add_argument("--data", default=str(SAMPLES_DIR / "heldout.json"))
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or float16")
    args = parser.parse_args(argv)

    if args.command == "build-samples":
        for path in build_samples(args.out, args.n):
            print(path)
    elif args.command == "dataset":
        print(make_dataset(args.out, args.n, args.seed, name=args.name, turns=args.turns, exclude=held_out_keys()))
    elif args.command == "train":
        from .shapes_train import Recipe, train

        overrides = {k: v for k, v in (("steps", args.steps), ("threads", args.threads)) if v}
        recipe = Recipe(seed=args.seed, **overrides)
        out = train(args.out, recipe, log=lambda msg: print(msg, flush=True))
        if args.eval and Path(args.eval).is_file():
            _print_eval(str(out), args.eval, None)
    else:
        _print_eval(args.model, args.data, args.dtype)


def _print_eval(model_name: str, data: str, dtype: str | None) -> None:
    import torch

    from .data import read_records
    from .loading import load_llava
    from .shapes_eval import evaluate, markdown_table

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, processor = load_llava(model_name, dtype=dtype, device="cpu")
    result = evaluate(model, processor, read_records(data))
    print(markdown_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    import sys

    from .errors import ToolkitError

    try:
        main()
    except (ToolkitError, ValueError) as err:  # bad input: one plain line, no traceback
        sys.exit(f"error: {err}")
