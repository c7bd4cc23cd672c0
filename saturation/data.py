"""LLaVA-665k-format data: validated records, the LLaVA-1.5 prompt, labels and padded batches."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import ToolkitError
from .files import read_json

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Record:
    """One conversation about one image. `turns` are (question, answer) pairs, placeholder stripped."""

    id: str
    image: Path
    turns: tuple[tuple[str, str], ...]
    question_type: str | None = None
    extra: dict = field(default_factory=dict, compare=False)


def _parse_record(raw: object, index: int, image_folder: Path) -> Record:
    where = f"record {index}"
    if not isinstance(raw, dict):
        raise ToolkitError(f"{where}: expected an object with id, image and conversations")
    rid = str(raw.get("id", index))
    where = f"record {index} (id {rid})"
    if "image" not in raw:
        raise ToolkitError(f"{where}: no 'image' field")
    image = raw["image"]
    if not isinstance(image, str) or not image.strip():  # null, a number, a list: never a path to open
        raise ToolkitError(f"{where}: 'image' must be a relative file path, got {json.dumps(image)}")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or len(convs) < 2:
        raise ToolkitError(f"{where}: 'conversations' must be a list of human/gpt turns")
    turns = []
    for k in range(0, len(convs) - 1, 2):
        human, gpt = convs[k], convs[k + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)) or (human.get("from"), gpt.get("from")) != ("human", "gpt"):
            raise ToolkitError(f"{where}: turns must alternate 'human' then 'gpt'")
        turns.append((str(human.get("value", "")), str(gpt.get("value", ""))))
    first_q = turns[0][0]
    if IMAGE_PLACEHOLDER not in first_q:
        raise ToolkitError(f"{where}: the first human turn has no '{IMAGE_PLACEHOLDER}' placeholder")
    if sum(q.count(IMAGE_PLACEHOLDER) for q, _ in turns) != 1:
        raise ToolkitError(f"{where}: exactly one '{IMAGE_PLACEHOLDER}' per record is supported")
    turns = [(q.replace(IMAGE_PLACEHOLDER, "").strip(), a.strip()) for q, a in turns]
    known = {"id", "image", "conversations", "question_type"}
    return Record(rid, image_folder / image, tuple(turns), raw.get("question_type"),
                  {k: v for k, v in raw.items() if k not in known})


def read_records(json_path: str | Path, image_folder: str | Path | None = None, *, check_images: bool = True) -> list[Record]:
    """Read and validate a LLaVA JSON list. Images are relative to `image_folder` (default: the JSON's folder).

    Every problem is a `ToolkitError` with one line: missing file, malformed JSON (with line and column),
    a record without ``<image>``, a missing image file.
    """
    path = Path(json_path)
    if not path.is_file():
        raise ToolkitError(f"data file not found: {path}")
    raw = read_json(path)
    if not isinstance(raw, list) or not raw:
        raise ToolkitError(f"{path}: expected a non-empty JSON list of records")
    folder = Path(image_folder) if image_folder is not None else path.parent
    records = [_parse_record(r, i, folder) for i, r in enumerate(raw)]
    if check_images:
        for r in records:
            if not r.image.is_file():
                raise ToolkitError(f"record {r.id}: image file not found: {r.image}")
    return records


def sample_records(records: list[Record], n: int | None, seed: int) -> list[Record]:
    """`n` records drawn without replacement, in a seed-determined order; all of them when `n` is None."""
    if n is None:
        return list(records)
    if n < 1:
        raise ToolkitError(f"n must be at least 1 (got {n})")
    if n > len(records):
        raise ToolkitError(f"asked for n={n} samples but the data has only {len(records)}")
    return random.Random(seed).sample(records, n)


def load_image(record: Record) -> Image.Image:
    """The record's image as RGB; an unreadable file is a one-line error."""
    try:
        with Image.open(record.image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ToolkitError(f"record {record.id}: image file not found: {record.image}") from None
    except Image.DecompressionBombError as err:  # over 2x MAX_IMAGE_PIXELS: PIL refuses before decoding
        raise ToolkitError(f"record {record.id}: image {record.image} is too large to open safely: "
                           f"{_first_line(err)}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ToolkitError(f"record {record.id}: cannot read image {record.image}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def question_text(question: str, first: bool) -> str:
    """The human half of a LLaVA-1.5 turn, ending with the assistant cue."""
    return f"USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:" if first else f"USER: {question} ASSISTANT:"


def encode_record(record: Record, processor, *, image: Image.Image | None = None) -> dict[str, Tensor]:
    """Token ids, labels and pixels for one record, LLaVA-1.5 template, all turns labelled.

    ``USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>``; labels are −100 except on
    the assistant's answer tokens and their ``</s>``. The processor expands ``<image>`` to the model's
    number of image tokens, so nothing here knows that number.
    """
    image = load_image(record) if image is None else image
    tok = processor.tokenizer
    first = processor(images=[image], text=[question_text(record.turns[0][0], True)], return_tensors="pt")
    ids, labels = [first["input_ids"][0]], [torch.full_like(first["input_ids"][0], IGNORE_INDEX)]
    for k, (q, a) in enumerate(record.turns):
        if k > 0:
            q_ids = torch.tensor(tok(question_text(q, False), add_special_tokens=False)["input_ids"], dtype=torch.long)
            ids.append(q_ids)
            labels.append(torch.full_like(q_ids, IGNORE_INDEX))
        a_ids = torch.tensor(tok(f" {a}{tok.eos_token}", add_special_tokens=False)["input_ids"], dtype=torch.long)
        ids.append(a_ids)
        labels.append(a_ids)
    return {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "pixel_values": first["pixel_values"][0]}


def pad_stack(rows: list[Tensor], value: int, side: str) -> Tensor:
    """Stack 1D tensors into [batch, max_len], padding on `side` ('left' or 'right')."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if side == "left":
            out[i, width - len(r):] = r
        else:
            out[i, : len(r)] = r
    return out


def collate(examples: list[dict[str, Tensor]], pad_token_id: int, image_token_id: int | None = None,
            padding_side: str = "right") -> dict[str, Tensor]:
    """A batch: input_ids, attention_mask, labels (if present), pixel_values and image_mask (if id given)."""
    ids = [e["input_ids"] for e in examples]
    batch = {
        "input_ids": pad_stack(ids, pad_token_id, padding_side),
        "attention_mask": pad_stack([torch.ones_like(i) for i in ids], 0, padding_side),
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
    }
    if all("labels" in e for e in examples):
        batch["labels"] = pad_stack([e["labels"] for e in examples], IGNORE_INDEX, padding_side)
    if image_token_id is not None:
        batch["image_mask"] = batch["input_ids"] == image_token_id
    return batch


def encode_prompt(record: Record, processor, *, image: Image.Image | None = None) -> dict[str, Tensor]:
    """The first question only, up to ``ASSISTANT:``, for generation or probing."""
    image = load_image(record) if image is None else image
    enc = processor(images=[image], text=[question_text(record.turns[0][0], True)], return_tensors="pt")
    return {"input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"][0]}


def generation_batch(records: list[Record], processor, images: list[Image.Image] | None = None) -> dict[str, Tensor]:
    """Left-padded prompts (first question of each record) for batched generation."""
    images = images or [None] * len(records)
    examples = [encode_prompt(r, processor, image=im) for r, im in zip(records, images)]
    return collate(examples, processor.tokenizer.pad_token_id, padding_side="left")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation at the ends and fold white space, for exact-match scoring."""
    return " ".join(text.lower().strip().strip(".!?,;:").split())
