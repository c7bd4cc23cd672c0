"""Held-out evaluation of a LLaVA on shapes-world questions, by question type.

Three scores per type, all exact match after `normalize_answer`:
- **model**: greedy answers to the real image (batched, left-padded `generate`);
- **blank**: the same questions with a blank (background-only) image, i.e. how much of the score the
  language prior alone earns;
- **blind**: the most frequent answer of that type *in the evaluated set itself*, an upper bound on any
  image-free guesser, so the margins reported against it are conservative.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from saturation.core.answers import answers, by_type
from saturation.core.data import Record, normalize_answer

from . import world
from .world import blank_image


def blind_answers(records: list[Record]) -> list[str]:
    """The most frequent gold answer of each record's question type (ties: alphabetical)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        counts[r.question_type][normalize_answer(r.turns[0][1])] += 1
    top = {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items()}
    return [top[r.question_type] for r in records]


def position_errors(records: list[Record], answers: list[str]) -> dict[str, int]:
    """Whose cell each wrong answer to a position question names: another object of the same shape, of the same
    colour, any other object, or no object; and how the questions whose object shares its shape with another one
    fare (`shape_shared`, `shape_shared_right`). Records without scene objects, or whose question names none of
    them, are skipped."""
    out = dict.fromkeys(("wrong", "same_shape", "same_colour", "other_object", "no_object", "shape_shared",
                         "shape_shared_right"), 0)
    for record, answer in zip(records, answers):
        objs = [world.Obj(**o) for o in record.extra.get("objects", ())]
        target = next((o for o in objs if f"where is the {o.colour} {o.shape}?" == record.turns[0][0]), None)
        if record.question_type != "position" or target is None:
            continue
        others = [o for o in objs if o != target]
        right = normalize_answer(answer) == normalize_answer(target.where)
        if any(o.shape == target.shape for o in others):
            out["shape_shared"] += 1
            out["shape_shared_right"] += right
        if right:
            continue
        out["wrong"] += 1
        named = [o for o in others if o.where == normalize_answer(answer)]
        kind = ("no_object" if not named else "same_shape" if named[0].shape == target.shape
                else "same_colour" if named[0].colour == target.colour else "other_object")
        out[kind] += 1
    return out


def evaluate(model, processor, records: list[Record], batch_size: int = 100) -> dict[str, dict[str, float]]:
    """``{"model": {...}, "blank": {...}, "blind": {...}, "n": {...}}``, each a per-type accuracy map, and
    ``position_errors`` (`position_errors` of the model's answers)."""
    gold = [normalize_answer(r.turns[0][1]) for r in records]
    real = answers(model, processor, records, batch_size=batch_size)
    blank = answers(model, processor, records, [blank_image()] * len(records), batch_size)
    blind = blind_answers(records)
    n = Counter(r.question_type for r in records)
    return {
        "model": by_type(records, [a == g for a, g in zip(real, gold)]),
        "blank": by_type(records, [a == g for a, g in zip(blank, gold)]),
        "blind": by_type(records, [a == g for a, g in zip(blind, gold)]),
        "n": {**dict(sorted(n.items())), "overall": len(records)},
        "position_errors": position_errors(records, real),
    }


def markdown_table(result: dict[str, dict[str, float]]) -> str:
    """The result as a Markdown table: one row per question type, ``overall`` last."""
    types = [t for t in result["model"] if t != "overall"] + ["overall"]
    rows = ["| question type | n | model | blank image | blind (majority) |", "|---|---:|---:|---:|---:|"]
    for t in types:
        rows.append(f"| {t} | {result['n'][t]} | {result['model'][t]:.3f} | {result['blank'][t]:.3f} "
                    f"| {result['blind'][t]:.3f} |")
    return "\n".join(rows)
