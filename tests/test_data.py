"""LLaVA-format data: validation errors, the LLaVA-1.5 template, labels and padding."""

import json

import pytest
import torch

from saturation import ToolkitError
from saturation.core.data import (
    IGNORE_INDEX,
    collate,
    encode_record,
    generation_batch,
    load_image,
    normalize_answer,
    read_records,
    sample_records,
)

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)


def _write(tmp_path, records):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    return path


def _record(image="images/0.png", q="<image>\nwhat colour is the circle?", extra_turns=()):
    convs = [{"from": "human", "value": q}, {"from": "gpt", "value": "red"}, *extra_turns]
    return {"id": "r0", "image": image, "conversations": convs}


def test_reads_records_relative_to_json(dataset):
    records = read_records(dataset)
    assert len(records) == 12 and records[0].image.is_file()
    assert records[0].turns == (("what colour is the circle?", "red"),)
    assert records[0].question_type == "colour"


def test_missing_file(tmp_path):
    with pytest.raises(ToolkitError, match="data file not found"):
        read_records(tmp_path / "nope.json")


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": 1,\n "image": }]')
    with pytest.raises(ToolkitError, match=r"malformed JSON in .*bad.json: .* at line 2 column"):
        read_records(path)


def test_record_without_image_placeholder(tmp_path, dataset):
    path = _write(tmp_path, [_record(image=str(dataset.parent / "images/0.png"), q="what colour?")])
    with pytest.raises(ToolkitError, match=r"record 0 \(id r0\): the first human turn has no '<image>'"):
        read_records(path)


def test_missing_image_file(tmp_path):
    path = _write(tmp_path, [_record(image="images/missing.png")])
    with pytest.raises(ToolkitError, match="image file not found: .*missing.png"):
        read_records(path)


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = read_records(_write(tmp_path, [_record(image="broken.png")]))
    with pytest.raises(ToolkitError, match="cannot read image .*broken.png"):
        load_image(records[0])


def test_decompression_bomb_is_one_line_naming_the_record(dataset, monkeypatch):
    """PIL raises DecompressionBombError (not an OSError) past 2 x MAX_IMAGE_PIXELS; 32x32 = 1024 > 2 x 100."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    record = read_records(dataset)[0]
    with pytest.raises(ToolkitError, match=rf"record {record.id}: image .*0.png is too large to open safely"):
        load_image(record)


@pytest.mark.parametrize("image", [None, "", 3, [], ["a.png", 3]])  # a list of paths is several images
def test_image_that_is_not_a_path(tmp_path, image):
    path = _write(tmp_path, [_record(image=image)])
    with pytest.raises(ToolkitError, match=r"record 0 \(id r0\): 'image' must be a relative file path"):
        read_records(path)


def test_n_larger_than_data_says_how_many(dataset):
    with pytest.raises(ToolkitError, match="n=50 .* only 12"):
        sample_records(read_records(dataset), 50, seed=0)


def test_sampler_is_seeded(dataset):
    records = read_records(dataset)
    a, b, c = (sample_records(records, 5, s) for s in (0, 0, 1))
    assert [r.id for r in a] == [r.id for r in b] != [r.id for r in c]


def test_labels_cover_only_assistant_tokens_in_every_turn(tmp_path, dataset, processor):
    turns = ({"from": "human", "value": "what shape is the circle?"}, {"from": "gpt", "value": "circle"})
    rec = _record(image=str(dataset.parent / "images/0.png"), extra_turns=turns)
    enc = encode_record(read_records(_write(tmp_path, [rec]))[0], processor)
    tok = processor.tokenizer
    answer_tokens = [tok.decode([i]) for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert answer_tokens == ["red", "</s>", "circle", "</s>"]
    assert tok.decode(enc["input_ids"][:3]) == "<s> USER :"
    assert int((enc["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 4


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_on_the_requested_side(dataset, processor, side):
    records = read_records(dataset)[:3]
    short = encode_record(records[0], processor)
    long = dict(short, input_ids=torch.cat([short["input_ids"], short["input_ids"][-3:]]),
                labels=torch.cat([short["labels"], short["labels"][-3:]]))
    batch = collate([short, long], pad_token_id=0, image_token_id=4, padding_side=side)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    pad_col = 0 if side == "left" else -1
    assert batch["attention_mask"][0, pad_col] == 0 and batch["labels"][0, pad_col] == IGNORE_INDEX
    assert torch.equal(batch["image_mask"], batch["input_ids"] == 4)


def test_generation_batch_is_left_padded_prompt(dataset, processor):
    batch = generation_batch(read_records(dataset)[:2], processor)
    assert processor.tokenizer.decode(batch["input_ids"][0, -2:]) == "ASSISTANT :"
    assert "labels" not in batch


def test_normalize_answer():
    assert normalize_answer("  Red. ") == "red"
    assert normalize_answer("Top  Left") == "top left"
