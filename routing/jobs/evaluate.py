"""Exact-match evaluation of a (routed or vanilla) LLaVA: greedy, KV-cached, batched answers."""

from __future__ import annotations

import pandas as pd

from routing.plan import check_records
from saturation.core.answers import answers, by_type
from saturation.core.data import Record, normalize_answer


def evaluate(model, processor, records: list[Record], batch_size: int = 16, max_new_tokens: int = 8
             ) -> tuple[dict, pd.DataFrame]:
    """``({"accuracy", "by_type", "n"}, per-sample table)`` for the first question of each record.

    `model` is anything with ``generate(input_ids=, pixel_values=, attention_mask=, max_new_tokens=,
    do_sample=False)``: a `LlavaForConditionalGeneration` or a routed model.
    """
    check_records(getattr(model, "plan", None), records)  # vanilla has no plan: every record runs
    predicted = answers(model, processor, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    gold = [normalize_answer(r.turns[0][1]) for r in records]
    correct = [p == g for p, g in zip(predicted, gold)]
    scores = by_type(records, correct)
    typed = any(r.question_type for r in records)
    result = {
        "accuracy": scores.pop("overall"),
        "by_type": scores if typed else {},
        "n": len(records),
    }
    table = pd.DataFrame({
        "id": [r.id for r in records],
        "question_type": [r.question_type for r in records],
        "question": [r.turns[0][0] for r in records],
        "answer": gold,
        "prediction": predicted,
        "correct": correct,
    })
    return result, table
