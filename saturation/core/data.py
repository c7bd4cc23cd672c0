"""LLaVA-665k-format data (other forms: `saturation.core.sources`): validated records, each family's prompt (chat template or the adapter's), labels, and
padded batches that carry the family's image inputs (``image_sizes``, ``batch_num_images``, ``image_grid_thw``, ...)."""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from saturation.core.adapters.base import LLAVA_TEMPLATE, PromptTemplate
from saturation.core.errors import ToolkitError, first_line
from saturation.core.files import read_json

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100


ImageRef = Path | bytes | Image.Image  # a file, encoded bytes (a dataset's ``{"bytes": ...}``), or decoded


@dataclass(frozen=True)
class Record:
    """One conversation about one image, several, or none. `turns` are (question, answer) pairs, placeholders
    stripped. `image` is a file (LLaVA JSON, a dataset's path column), encoded bytes (a dataset's image column) or a
    PIL image (lmms-eval's ``doc_to_visual``); a tuple of them for several images (in placeholder order), None for a
    text-only record. `images` is always the tuple; `load_images` opens them."""

    id: str
    image: ImageRef | tuple[ImageRef, ...] | None
    turns: tuple[tuple[str, str], ...]
    question_type: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # one shape per case, so a one-image record is the same whether its source held a list or a value
        image = tuple(self.image) if isinstance(self.image, (list, tuple)) else self.image
        if isinstance(image, tuple):
            image = None if not image else image[0] if len(image) == 1 else image
        object.__setattr__(self, "image", image)

    @property
    def images(self) -> tuple[ImageRef, ...]:
        """The record's images in placeholder order: () for a text-only record."""
        if self.image is None:
            return ()
        return self.image if isinstance(self.image, tuple) else (self.image,)


def _parse_record(raw: object, index: int, image_folder: Path) -> Record:
    where = f"record {index}"
    if not isinstance(raw, dict):
        raise ToolkitError(f"{where}: expected an object with id, image and conversations")
    rid = str(raw.get("id", index))
    where = f"record {index} (id {rid})"
    # no 'image': a text-only record (LLaVA-665k's ShareGPT rows); a list: several (LLaVA-OneVision's interleave data)
    image = raw.get("image", [])
    paths = image if isinstance(image, list) and image else [image]
    if "image" in raw and not all(isinstance(p, str) and p.strip() for p in paths):  # null, a number, []
        raise ToolkitError(f"{where}: 'image' must be a relative file path or a list of them, got {json.dumps(image)}")
    images = tuple(image_folder / p for p in paths) if "image" in raw else ()
    turns = parse_turns(raw.get("conversations"), where, len(images))
    known = {"id", "image", "conversations", "question_type"}
    return Record(rid, images, turns, raw.get("question_type"), {k: v for k, v in raw.items() if k not in known})


def parse_turns(convs: object, where: str, n_images: int = 1) -> tuple[tuple[str, str], ...]:
    """LLaVA's ``conversations`` (alternating human/gpt, one ``<image>`` per image, all in the first question) as
    (question, answer) pairs, placeholders stripped; `where` names the record in the one-line error. The prompt
    puts the images back together before the first question (`conversation_segments`), so an interleaved layout
    (text between images) is not kept."""
    if not isinstance(convs, list) or len(convs) < 2:
        raise ToolkitError(f"{where}: 'conversations' must be a list of human/gpt turns")
    turns = []
    for k in range(0, len(convs) - 1, 2):
        human, gpt = convs[k], convs[k + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)) or (human.get("from"), gpt.get("from")) != ("human", "gpt"):
            raise ToolkitError(f"{where}: turns must alternate 'human' then 'gpt'")
        turns.append((str(human.get("value", "")), str(gpt.get("value", ""))))
    first = turns[0][0].count(IMAGE_PLACEHOLDER)
    if n_images and not first:
        raise ToolkitError(f"{where}: the first human turn has no '{IMAGE_PLACEHOLDER}' placeholder")
    total = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in turns)
    if total != n_images:
        raise ToolkitError(f"{where}: {total} '{IMAGE_PLACEHOLDER}' placeholders for {n_images} image(s); "
                           f"each image needs one")
    if first != total:
        raise ToolkitError(f"{where}: '{IMAGE_PLACEHOLDER}' in a later turn; every image must be in the first "
                           f"human turn")
    return tuple((q.replace(IMAGE_PLACEHOLDER, "").strip(), a.strip()) for q, a in turns)


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
            for image in r.images:
                if not image.is_file():
                    raise ToolkitError(f"record {r.id}: image file not found: {image}")
    return records


def sample_indices(num_rows: int, n: int | None, seed: int) -> list[int]:
    """The rows ``--n n --seed s`` takes of `num_rows`: `n` drawn without replacement in a seed-determined order
    (all, in order, when `n` is None). Every data source draws through here, so the same records give the same
    sample whichever form holds them (`saturation.core.sources.selection`)."""
    if n is None:
        return list(range(num_rows))
    if n < 1:
        raise ToolkitError(f"n must be at least 1 (got {n})")
    if n > num_rows:
        raise ToolkitError(f"asked for n={n} samples but the data has only {num_rows}")
    return random.Random(seed).sample(range(num_rows), n)


def sample_records(records: list[Record], n: int | None, seed: int) -> list[Record]:
    """`n` records drawn without replacement, in a seed-determined order; all of them when `n` is None."""
    return [records[i] for i in sample_indices(len(records), n, seed)]


def load_images(record: Record) -> list[Image.Image]:
    """The record's images as RGB, in placeholder order ([] for a text-only record); an unreadable file or
    undecodable bytes is a one-line error naming the record."""
    return [_open_image(image, record.id) for image in record.images]


def load_image(record: Record) -> Image.Image:
    """The image of a one-image record as RGB (`load_images` for any number)."""
    if len(record.images) != 1:
        raise ToolkitError(f"record {record.id}: {len(record.images)} images where one is expected")
    return _open_image(record.image, record.id)


def _open_image(image: ImageRef, rid: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes):
        try:
            with Image.open(io.BytesIO(image)) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ToolkitError(f"record {rid}: cannot decode its image ({len(image)} bytes): "
                               f"{first_line(err)}") from None
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ToolkitError(f"record {rid}: image file not found: {image}") from None
    except Image.DecompressionBombError as err:  # over 2x MAX_IMAGE_PIXELS: PIL refuses before decoding
        raise ToolkitError(f"record {rid}: image {image} is too large to open safely: "
                           f"{first_line(err)}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ToolkitError(f"record {rid}: cannot read image {image}: {first_line(err)}") from None


def image_key(record: Record) -> str:
    """What a digest records of the images: a file's name (so a moved folder keeps its digest), else a hash of the
    encoded bytes or of the decoded pixels; several joined by ``+``, empty for a text-only record."""
    def one(image: ImageRef) -> str:
        if isinstance(image, Path):
            return image.name
        data = image if isinstance(image, bytes) else image.tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    return "+".join(one(image) for image in record.images)


def question_text(question: str, first: bool) -> str:
    """The human half of a LLaVA-1.5 turn, ending with the assistant cue."""
    return f"USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:" if first else f"USER: {question} ASSISTANT:"


def sequence_keys() -> tuple[str, ...]:
    """The image kwargs with one entry per token (1 = image, 0 = text), as the adapters declare them
    (`Adapter.sequence_kwargs`): padded like input_ids, not joined along images. Also `SEQUENCE_KEYS`."""
    from saturation.core.adapters import SEQUENCE_KWARGS

    return SEQUENCE_KWARGS


def image_input_keys() -> tuple[str, ...]:
    """``pixel_values`` and every image kwarg some backbone adapter declares (``image_sizes``, ``batch_num_images``,
    ``image_grid_thw``, ...): what a batch carries besides ids, mask and labels. A new adapter's kwargs flow
    through encoding and collation with no change here."""
    from saturation.core.adapters import IMAGE_KWARGS

    return ("pixel_values", *IMAGE_KWARGS)


def __getattr__(name: str):
    """`SEQUENCE_KEYS`: `sequence_keys()`, read when asked for (the registry is imported on first use only)."""
    if name == "SEQUENCE_KEYS":
        return sequence_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class PromptFormat:
    """How a conversation becomes text for one family, and which processor outputs its forward takes.

    `template` is the adapter's (LLaVA-1.5's ``USER: <image>\\n… ASSISTANT:`` by default); with `chat_template`
    the checkpoint's own chat template is used instead whenever the processor (or its tokenizer) has one.
    `image_kwargs` are the processor outputs kept besides ids and mask (None: every one in `image_input_keys`).
    The default is the LLaVA-1.5 format the embedded model and the shapes data use.
    """

    template: PromptTemplate = LLAVA_TEMPLATE
    image_kwargs: tuple[str, ...] | None = None
    chat_template: bool = False

    @classmethod
    def of(cls, model_or_backbone) -> PromptFormat:
        """The format of a model (vanilla or routed) or of a backbone adapter; LLaVA-1.5's for a stand-in without
        a config (anything with LLaVA's ``generate``)."""
        from saturation.core.adapters import Adapter, adapter_for

        a = model_or_backbone
        if not isinstance(a, Adapter):
            routed = getattr(a, "anatomy", None)  # a routed model carries its base's adapter
            if not isinstance(routed, Adapter) and getattr(a, "config", None) is None:
                return cls()
            a = routed if isinstance(routed, Adapter) else adapter_for(a)
        return cls(a.template, ("pixel_values", *a.image_kwargs), bool(getattr(a, "chat_template", True)))

    def keys(self) -> tuple[str, ...]:
        return self.image_kwargs if self.image_kwargs is not None else image_input_keys()


def _chat_renderer(processor, fmt: PromptFormat):
    """``render(messages, add_generation_prompt) -> str`` from the processor's chat template, or its tokenizer's
    (content as plain text, the image as ``<image>\\n``); None when the format keeps its own template."""
    if not fmt.chat_template:
        return None
    if getattr(processor, "chat_template", None):
        return lambda msgs, gen: processor.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    tok = getattr(processor, "tokenizer", processor)
    if getattr(tok, "chat_template", None):
        def plain(msgs):
            return [{"role": m["role"], "content": "".join(f"{IMAGE_PLACEHOLDER}\n" if c["type"] == "image"
                                                           else c["text"] for c in m["content"])} for m in msgs]
        return lambda msgs, gen: tok.apply_chat_template(plain(msgs), add_generation_prompt=gen, tokenize=False)
    return None


def question_prompt(question: str, processor, fmt: PromptFormat = PromptFormat(), n_images: int = 1) -> str:
    """One user turn up to the assistant cue in the family's format, with `n_images` image placeholders before
    the question unless it places ``<image>`` itself (lmms-eval contexts may). LLaVA-1.5:
    ``USER: <image>\\n{question} ASSISTANT:``."""
    render = _chat_renderer(processor, fmt)
    placed = IMAGE_PLACEHOLDER in question
    if render is None:
        if n_images and not placed:  # the family's image slot (Qwen, Gemma), else LLaVA's placeholders
            slot = fmt.template.image
            question = (slot * n_images if slot is not None
                        else " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n") + question
        return f"{fmt.template.user}{question}{fmt.template.assistant}"
    images = [] if placed else [{"type": "image"}] * n_images
    return render([{"role": "user", "content": [*images, {"type": "text", "text": question}]}], True)


def process(processor, texts: list[str], images: list | None, fmt: PromptFormat = PromptFormat(),
            **kwargs) -> dict[str, Tensor]:
    """The processor on `texts` and `images`, keeping ids, mask and the family's image inputs only (a forward
    refuses image kwargs of another family). Text that a chat template began with BOS gets no second one."""
    tok = processor.tokenizer
    if tok.bos_token and texts and all(t.startswith(tok.bos_token) for t in texts):
        kwargs["add_special_tokens"] = False
    out = processor(images=images or None, text=texts, return_tensors="pt", **kwargs)
    keep = ("input_ids", "attention_mask", *fmt.keys())
    return {k: v for k, v in out.items() if k in keep}


def _messages(turns, n_images: int = 1) -> list[dict]:
    """Chat messages of `turns`, the images in the first user turn (the form llava-hf's chat templates take)."""
    msgs = []
    for k, (q, a) in enumerate(turns):
        image = [{"type": "image"}] * n_images if k == 0 else []
        msgs += [{"role": "user", "content": [*image, {"type": "text", "text": q}]},
                 {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    return msgs


def conversation_segments(turns, processor, fmt: PromptFormat = PromptFormat(), answers: bool = True,
                          n_images: int = 1) -> list[tuple[str, bool]]:
    """The conversation as consecutive ``(text, is_answer)`` pieces; the first holds the `n_images` image slots
    (``<image>`` each; none for a text-only record).

    With answers: question, answer, question, answer, ... (answers are what the labels cover: the assistant's
    words and the template's end-of-turn token). Without: the first question up to the assistant cue.
    Through a chat template each piece is the difference between renderings of growing prefixes (prompt with the
    generation cue, then with the answer), so the pieces add up to exactly the rendered conversation.
    """
    render = _chat_renderer(processor, fmt)
    turns = list(turns) if answers else list(turns[:1])
    if render is None:
        eos = getattr(processor, "tokenizer", processor).eos_token or ""
        segments = []
        for k, (q, a) in enumerate(turns):
            segments.append((fmt.template.question(q, k == 0, n_images=n_images), False))
            if answers:
                segments.append((f" {a}{eos}", True))
        return segments
    msgs = _messages(turns, n_images)
    if not answers:
        return [(render(msgs[:1], True), False)]
    segments, done = [], ""
    for k in range(len(turns)):
        prompt, full = render(msgs[: 2 * k + 1], True), render(msgs[: 2 * k + 2], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ToolkitError("the checkpoint's chat template does not render a conversation as a growing prefix "
                               "(question, then answer), so answer tokens cannot be told apart for the labels")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def _tokens(tok, text: str) -> Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _encode_segments(segments: list[tuple[str, bool]], processor, images: list[Image.Image], fmt: PromptFormat,
                     label: bool) -> dict[str, Tensor]:
    """Token ids (and labels) of `segments`, the first through the processor with the images (which expands each
    ``<image>`` to the model's image tokens, so nothing here knows that number), the rest through the tokenizer.
    Image inputs keep the processor's leading image dimension; per-token ones are extended with 0 (text). A
    text-only record (no images) has no image inputs."""
    tok = processor.tokenizer
    first_text = segments[0][0]
    extra = {}
    if tok.bos_token and first_text.startswith(tok.bos_token):  # a chat template that writes BOS itself
        extra["add_special_tokens"] = False
    # one list of images for the one prompt: Gemma 3 and OneVision count images per prompt (batch_num_images)
    first = processor(images=[images] if images else None, text=[first_text], return_tensors="pt", **extra)
    ids = [first["input_ids"][0]]
    labels = [ids[0].clone() if segments[0][1] else torch.full_like(ids[0], IGNORE_INDEX)]
    for text, is_answer in segments[1:]:
        piece = _tokens(tok, text)
        ids.append(piece)
        labels.append(piece if is_answer else torch.full_like(piece, IGNORE_INDEX))
    out = {"input_ids": torch.cat(ids)}
    if label:
        out["labels"] = torch.cat(labels)
    added = len(out["input_ids"]) - len(ids[0])
    for key in fmt.keys() if images else ():  # a text-only record: ids only, as vanilla's text prompt
        if key not in first:
            continue
        value = first[key]
        if key in sequence_keys():
            value = torch.cat([value[0], value.new_zeros(added)])
        out[key] = value
    return out


def _given_images(record: Record, image) -> list[Image.Image]:
    """The images to encode: `image` as given (one or a list, already loaded), else the record's own."""
    if image is None:
        return load_images(record)
    return list(image) if isinstance(image, (list, tuple)) else [image]


def encode_record(record: Record, processor, *, image: Image.Image | list[Image.Image] | None = None,
                  fmt: PromptFormat | None = None) -> dict[str, Tensor]:
    """Token ids, labels and image inputs for one record, all turns labelled, in the family's format `fmt`
    (default: LLaVA-1.5's; `PromptFormat.of(model)` for any backbone).

    LLaVA-1.5: ``USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>``; labels are −100 except on
    the assistant's answer tokens and their ``</s>``. Image inputs (``pixel_values`` [1, ...], ``image_sizes``
    [1, 2], ...) keep the processor's leading image dimension; `collate` joins them. One slot per image of the record
    (`image`: them already loaded), none for a text-only record.
    """
    images = _given_images(record, image)
    fmt = fmt or PromptFormat()
    segments = conversation_segments(record.turns, processor, fmt, n_images=len(images))
    return _encode_segments(segments, processor, images, fmt, label=True)


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


def pad_cat(parts: list[Tensor]) -> Tensor:
    """Concatenate along dim 0, zero-padding every later dim to the largest (LLaVA-NeXT's tiles per image:
    [1, tiles, 3, H, W] -> [n, max tiles, 3, H, W], as its processor pads a batch)."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        pad = [x for d in reversed(range(1, p.dim())) for x in (0, shape[d - 1] - p.shape[d])]
        padded.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
    return torch.cat(padded)


def collate(examples: list[dict[str, Tensor]], pad_token_id: int, image_token_id: int | None = None,
            padding_side: str = "right") -> dict[str, Tensor]:
    """A batch: input_ids, attention_mask, labels (if present), the image inputs and image_mask (if id given).

    Image inputs are joined along their leading dimension (images; Qwen's patches), later dims zero-padded;
    per-token ones (`sequence_keys`) are padded like input_ids. A text-only example adds no image (its per-token
    inputs are all 0, text); per-prompt counts (OneVision's ``batch_num_images``) are only read summed over
    images, so it needs no 0 entry. Other keys of the examples are left to the caller.
    """
    ids = [e["input_ids"] for e in examples]
    batch = {
        "input_ids": pad_stack(ids, pad_token_id, padding_side),
        "attention_mask": pad_stack([torch.ones_like(i) for i in ids], 0, padding_side),
    }
    if all("labels" in e for e in examples):
        batch["labels"] = pad_stack([e["labels"] for e in examples], IGNORE_INDEX, padding_side)
    for key in image_input_keys():
        have = [e[key] for e in examples if key in e]
        if not have:
            continue
        if key in sequence_keys():
            rows = [e[key] if key in e else torch.zeros_like(e["input_ids"]) for e in examples]
            batch[key] = pad_stack(rows, 0, padding_side)
        else:
            batch[key] = pad_cat(have)
    if image_token_id is not None:
        batch["image_mask"] = batch["input_ids"] == image_token_id
    return batch


def image_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``pixel_values`` and the family's image kwargs of a batch: what a forward takes besides ids and mask."""
    keys = image_input_keys()
    return {k: v for k, v in batch.items() if k in keys}


def to_model(batch: dict[str, Tensor], device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor of `batch` on `device`; floating image inputs (pixel values) in the model's `dtype`."""
    keys = image_input_keys()
    return {k: v.to(device, dtype) if k in keys and v.is_floating_point() else v.to(device)
            for k, v in batch.items()}


def encode_prompt(record: Record, processor, *, image: Image.Image | list[Image.Image] | None = None,
                  fmt: PromptFormat | None = None) -> dict[str, Tensor]:
    """The first question only, up to the assistant cue, for generation or probing (ids and image inputs)."""
    images = _given_images(record, image)
    fmt = fmt or PromptFormat()
    segments = conversation_segments(record.turns, processor, fmt, answers=False, n_images=len(images))
    return _encode_segments(segments, processor, images, fmt, label=False)


def no_image_tokens(model) -> dict:
    """``generate`` kwargs that keep the image placeholder out of an answer: it is never a word, and a routed
    model refuses image tokens after the prompt (a random or barely trained model may emit one)."""
    image_id = getattr(getattr(model, "config", None), "image_token_id", None)
    return {"suppress_tokens": [int(image_id)]} if image_id is not None else {}


def generation_batch(records: list[Record], processor, images: list | None = None,
                     fmt: PromptFormat | None = None) -> dict[str, Tensor]:
    """Left-padded prompts (first question of each record) for batched generation; `images`: each record's
    already loaded (an image or a list, `load_images`)."""
    images = images or [None] * len(records)
    examples = [encode_prompt(r, processor, image=im, fmt=fmt) for r, im in zip(records, images)]
    return collate(examples, processor.tokenizer.pad_token_id, padding_side="left")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation at the ends and fold white space, for exact-match scoring."""
    return " ".join(text.lower().strip().strip(".!?,;:").split())
