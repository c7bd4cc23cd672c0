"""Exact-match answering of LLaVA records: greedy, batched, left-padded ``generate``, scored per question type.

Any model with LLaVA's ``generate(input_ids=, pixel_values=, attention_mask=)`` works: a vanilla
``LlavaForConditionalGeneration`` or a routed model (``routing.jobs.evaluate``, ``saturation.shapes.evaluate``).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from saturation.core.data import (
    PromptFormat,
    Record,
    generation_batch,
    load_images,
    no_image_tokens,
    normalize_answer,
    to_model,
)
from saturation.core.lengths import check_prompts, max_positions


@torch.no_grad()
def answers(model, processor, records: list[Record], images: list | None = None, batch_size: int = 100,
            max_new_tokens: int = 4) -> list[str]:
    """Greedy answers to each record's first question, in batches of left-padded prompts. A prompt that with
    `max_new_tokens` needs more positions than the model has is refused, naming the record."""
    out: list[str] = []
    fmt = PromptFormat.of(model)  # the family's prompt and image kwargs (image_sizes, ...)
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        imgs = images[i : i + batch_size] if images is not None else [load_images(r) for r in chunk]
        batch = generation_batch(chunk, processor, imgs, fmt)
        check_prompts(batch["attention_mask"].sum(1).tolist(), [r.id for r in chunk], max_positions(model),
                      max_new_tokens)
        batch = to_model(batch, model.device, model.dtype)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **no_image_tokens(model))
        new = gen[:, batch["input_ids"].shape[1] :]
        out += [normalize_answer(t) for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def by_type(records: list[Record], correct: list[bool]) -> dict[str, float]:
    """Accuracy per ``question_type`` plus ``overall``."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for r, ok in zip(records, correct):
        hits[r.question_type or "?"].append(ok)
    scores = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    scores["overall"] = sum(correct) / len(correct)
    return scores
