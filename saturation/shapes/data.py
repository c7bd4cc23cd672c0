"""Datasets of the shapes world: seeded scene samples, LLaVA-1.5 records and the shipped sample sets.

Imports only `world`; training and evaluation build on this module, never the other way round.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from .world import (
    ASK,
    MAX_OBJECTS,
    QA,
    QUESTION_TYPES,
    Scene,
    ask_exist,
    random_scene,
    render,
    scene_key,
    scene_questions,
)

# Seeds of the shipped sample sets. Training skips their scenes, so "held-out" means unseen scenes.
PROBE_SEED = 1001
HELDOUT_SEED = 2002
SAMPLES_DIR = Path(__file__).resolve().parents[2] / "data_samples" / "shapes"


def typed_scene(
    qtype: str,
    rng: random.Random,
    exclude: set | frozenset = frozenset(),
    answer: str | None = None,
    max_objects: int = MAX_OBJECTS,
) -> tuple[Scene, QA]:
    """A fresh scene (not in `exclude`) that supports a question of `qtype`, with that question.

    `answer` forces the yes/no answer of an existence question.
    """
    while True:
        scene = random_scene(rng, max_objects)
        if scene_key(scene) in exclude:
            continue
        qa = ask_exist(scene, rng, answer) if qtype == "exist" else ASK[qtype](scene, rng)
        if qa is not None:
            return scene, qa


def sample_scenes(
    n: int, seed: int, turns: int = 1, exclude: set | frozenset = frozenset(), max_objects: int = MAX_OBJECTS
) -> Iterator[dict]:
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
            scene, (q, a) = typed_scene(qtype, rng, exclude, answer, max_objects)
            qas = [(q, a, qtype)]
        else:
            scene = random_scene(rng, max_objects)
            while scene_key(scene) in exclude:
                scene = random_scene(rng, max_objects)
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


def build_samples(out_dir: str | Path = SAMPLES_DIR, n: int = 500) -> tuple[Path, Path]:
    """Write the shipped sample sets: ``probe.json`` and ``heldout.json`` (single-turn, types balanced)."""
    probe = make_dataset(out_dir, n, PROBE_SEED, name="probe")
    heldout = make_dataset(out_dir, n, HELDOUT_SEED, name="heldout")
    return probe, heldout
