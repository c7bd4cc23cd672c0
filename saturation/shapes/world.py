"""The shapes world: scenes, their rendering, the questions about them and the words they use.

A scene is a 3x3 grid of 16 px cells (48 px image). Some cells hold one coloured shape (circle, square,
triangle; six colours). Questions ask for the colour of a named shape, the shape of a named colour, a
count, whether an object exists (half "no", mostly near misses as in POPE) and where an object is. Every
answer is one or two words, and every word of the world is in a small word-level vocabulary, so a tiny
LLaVA can be trained from scratch on a CPU in minutes (see ``python -m saturation.shapes --help`` and
``data_samples/README.md``).

Grid cells match the vision tower's 16 px patches, so image token k of a scene is grid cell k
(row-major). Nothing here depends on that for correctness, but it is why the tiny model learns fast.

This module is the bottom of the package: it imports nothing else of the toolkit.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

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


def random_scene(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Scene:
    """1..`max_objects` objects in distinct cells, with distinct (shape, colour) pairs so each is nameable.

    A smaller `max_objects` makes the easy scenes of a training curriculum; the default draws are unchanged.
    """
    n = rng.randint(1, max_objects)
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


def ask_position_shared(scene: Scene, rng: random.Random) -> QA | None:
    """A position question about an object that shares its shape or its colour with another one, so only the
    colour-shape conjunction names it (the case trained models get wrong). For training mixes only."""
    shared = [o for o in scene if any(p != o and (p.shape == o.shape or p.colour == o.colour) for p in scene)]
    if not shared:
        return None
    o = rng.choice(shared)
    return f"where is the {o.colour} {o.shape}?", o.where


def ask_position_colour(scene: Scene, rng: random.Random) -> QA | None:
    """Where the one object of a colour is, named by its colour alone ("where is the red object?"), so the
    position read-out learns to key on colour as well as on shape. For training mixes only."""
    unique = [o for o in scene if sum(p.colour == o.colour for p in scene) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return f"where is the {o.colour} object?", o.where


# Training mixes may also name question kinds the evaluation sets do not draw on their own.
TRAINING_ASK: dict[str, Callable[[Scene, random.Random], QA | None]] = {
    **ASK, "position-shared": ask_position_shared, "position-colour": ask_position_colour}


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
