"""Records with several images, or none (issue 26 item 4): read from LLaVA JSON (a list in ``image``, no ``image``),
encoded with one image slot per image on every family (the processor and the model's own forward agree on the count),
collated with text-only rows, probed, routed (a text-only record is vanilla), and refused in one line naming the
record where a consumer cannot take them. Tiny random models built in code (`family_fixtures`, conftest's LLaVA)."""

from __future__ import annotations

import json

import pytest
import torch
from family_fixtures import FAMILIES, QWEN_FAMILIES, Family, checkpoint_processor
from PIL import Image
from routing_fixtures import perturb_side
from test_bad_input import one_line_error
from typer.testing import CliRunner

import routing
from cli import routing_app, saturation_app
from routing.jobs.evaluate import evaluate
from routing.jobs.train import training_records
from saturation.core.adapters import adapter_for
from saturation.core.data import PromptFormat, Record, collate, encode_prompt, encode_record, read_records
from saturation.core.errors import ToolkitError

runner = CliRunner()
QUESTION = (("what colour is the circle ?", "red"),)


def _run(app, *args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request) -> tuple[Family, torch.nn.Module]:
    name = request.param
    f = Family(name, checkpoint_processor(name))  # knows the template's words (no <unk> in a family's prompt)
    return f, f.model()


def _pictures(name: str) -> tuple[Image.Image, Image.Image]:
    size = (32, 32) if name in QWEN_FAMILIES else (40, 40)  # Qwen: 2x2 merged tokens; NeXT: a 2x2 anyres grid
    return Image.new("RGB", size, "red"), Image.new("RGB", size, "blue")


def _encoded(f: Family, model, images: tuple) -> dict:
    return encode_record(Record("r", images, QUESTION), f.processor, fmt=PromptFormat.of(model))


def _image_tokens(model, example: dict) -> int:
    return int((example["input_ids"] == adapter_for(model).image_token_id).sum())


@torch.no_grad()
def _forward(f: Family, model, examples: list[dict]) -> tuple[dict, torch.Tensor]:
    pad = f.processor.tokenizer.pad_token_id or 0
    batch = collate(examples, pad, padding_side="left")
    batch.pop("labels")
    return batch, f.hf_logits(model, batch)


def test_one_image_slot_per_image_and_none_for_text(fam):
    """Two images: twice one image's tokens (the model's own forward checks the count against its features); none:
    no image token and no image input. OneVision gives a multi-image prompt the base tile only (HF's design)."""
    f, model = fam
    one, two = _pictures(f.name)
    none_, single, double = (_encoded(f, model, ims) for ims in ((), (one,), (one, two)))
    assert _image_tokens(model, none_) == 0 and set(none_) == {"input_ids", "labels"}
    n1, n2 = _image_tokens(model, single), _image_tokens(model, double)
    if f.name == "llava_onevision":
        assert 0 < n2 < 2 * n1 and n2 % 2 == 0
    else:
        assert n2 == 2 * n1 > 0
    for example in (none_, single, double):
        _forward(f, model, [example])  # raises where placeholders and image features disagree


def test_a_mixed_batch_gives_each_record_its_own_logits(fam):
    """Two images, none and one in one left-padded batch (image_sizes, batch_num_images, image_grid_thw and
    per-token inputs joined by `collate`) give each row the logits of its record alone."""
    f, model = fam
    one, two = _pictures(f.name)
    examples = [_encoded(f, model, ims) for ims in ((one, two), (), (two,))]
    _, together = _forward(f, model, examples)
    for row, example in enumerate(examples):
        _, alone = _forward(f, model, [example])
        n = alone.shape[1]
        torch.testing.assert_close(together[row, -n:], alone[0], atol=2e-5, rtol=1e-4)


# --- LLaVA JSON ---


def _write_json(folder, records: list[dict]):
    (folder / "images").mkdir(exist_ok=True)
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), colour).save(folder / "images" / f"{i}.png")
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def _conv(question: str, answer: str = "red") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


TWO = {"id": "m0", "image": ["images/0.png", "images/1.png"], "conversations": _conv("<image>\n<image>\nwhat colour is the circle?")}
TEXT = {"id": "t0", "conversations": _conv("what colour is the circle?")}
ONE = {"id": "s0", "image": "images/0.png", "conversations": _conv("<image>\nwhat colour is the circle?")}


def test_llava_json_takes_a_list_of_images_and_text_only_rows(tmp_path):
    records = read_records(_write_json(tmp_path, [TWO, TEXT, ONE]))
    assert [len(r.images) for r in records] == [2, 0, 1]
    assert records[0].images == (tmp_path / "images" / "0.png", tmp_path / "images" / "1.png")
    assert records[1].image is None and records[2].image == tmp_path / "images" / "0.png"  # one image: as before
    assert records[0].turns == records[2].turns == (("what colour is the circle?", "red"),)


@pytest.mark.parametrize(("record", "message"), [
    (TWO | {"conversations": _conv("<image>\nwhat colour is the circle?")}, "1 '<image>' placeholders for 2 image"),
    (TEXT | {"conversations": _conv("<image>\nwhat?")}, "1 '<image>' placeholders for 0 image"),
    (TWO | {"image": ["images/0.png", "images/9.png"]}, "image file not found"),
])
def test_a_placeholder_count_that_does_not_match_is_one_line(tmp_path, record, message):
    with pytest.raises(ToolkitError, match=message):
        read_records(_write_json(tmp_path, [record]))


# --- consumers ---


def test_the_probe_runs_on_two_image_records(tiny_model_dir, tmp_path):
    """Image tokens are every image position, whatever the number of images: the probe measures them together."""
    data = _write_json(tmp_path, [TWO, TWO | {"id": "m1"}])
    result = _run(saturation_app, "probe", "--model", tiny_model_dir, "--data", data, "--n", "2", "--batch-size", "2",
                  "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "per_sample.parquet").is_file()


def test_the_probe_refuses_a_text_only_record_naming_it(tiny_model_dir, tmp_path):
    data = _write_json(tmp_path, [ONE, TEXT])
    one_line_error(_run(saturation_app, "probe", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "p"),
                   "record t0", "no image", "text-only")
    assert not (tmp_path / "p").exists()


def test_a_text_only_record_routed_is_vanilla(tiny_model, processor):
    """Nothing to route: LF's logits and answers on a text-only record are vanilla's, bit for bit."""
    records = [Record("t0", None, QUESTION), Record("t1", None, (("how many circle ?", "a"),))]
    batch = collate([encode_prompt(r, processor) for r in records], processor.tokenizer.pad_token_id,
                    padding_side="left")
    assert "pixel_values" not in batch
    routed = perturb_side(routing.build(tiny_model, 3, "lf"))
    with torch.no_grad():
        assert torch.equal(routed(**batch).logits, adapter_for(tiny_model).forward(**batch))
    assert evaluate(routed, processor, records)[1]["prediction"].tolist() == \
        evaluate(tiny_model, processor, records)[1]["prediction"].tolist()


@pytest.mark.parametrize("spec", ["lf@3", "fastv@2:R=50%", "pdrop", "lf@3+prune-pre:50%", "pool:25%"])
def test_in_llm_plans_and_fixed_block_prunings_take_two_images(tiny_model, processor, spec):
    """A two-image record routes with both images' tokens together (FastV/PDrop budget the row's image tokens;
    prune-pre and pool prune each image's block): kept image tokens are among both images' positions, and a
    two-image row's logits equal that row alone in a batch with a one-image row."""
    ims = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    records = [Record("m0", tuple(ims), QUESTION), Record("s0", ims[0], QUESTION)]
    routed = routing.build(tiny_model, routing.parse_plan(spec, tiny_model))
    batch = collate([encode_prompt(r, processor) for r in records], processor.tokenizer.pad_token_id,
                    padding_side="left")
    image = batch["input_ids"] == adapter_for(tiny_model).image_token_id
    assert image.sum(1).tolist() == [8, 4]
    kept = routing.kept_image_tokens(routed, **batch)
    assert all(bool(image[row, k].all()) for row, k in enumerate(kept))
    if "prune-pre" in spec or "pool" in spec:  # per image: half of each image's 4 tokens, a quarter
        per_image = 2 if "prune-pre" in spec else 1
        assert [len(k) for k in kept] == [2 * per_image, per_image]
    alone = collate([encode_prompt(records[0], processor)], processor.tokenizer.pad_token_id, padding_side="left")
    with torch.no_grad():
        torch.testing.assert_close(routed(**batch).logits[0, -alone["input_ids"].shape[1]:],
                                   routed(**alone).logits[0], atol=2e-5, rtol=1e-4)


def test_divprune_refuses_a_two_image_record_naming_it(tiny_model_dir, tmp_path):
    """DivPrune and VisionZip compress one image's run of tokens at a time: several images are one line."""
    saved = _run(routing_app, "save-plan", "--model", tiny_model_dir, "--out", tmp_path / "plan",
                 "--plan", "divprune:keep=50%")
    assert saved.exit_code == 0, saved.output
    data = _write_json(tmp_path, [ONE, TWO])
    one_line_error(_run(routing_app, "eval", "--model", tiny_model_dir, "--routing", tmp_path / "plan", "--data", data),
                   "record m0", "2 images", "divprune", strict=False)


def test_eval_runs_on_two_image_and_text_only_records(tiny_model_dir, tmp_path):
    data = _write_json(tmp_path, [ONE, TWO, TEXT])
    result = _run(routing_app, "eval", "--model", tiny_model_dir, "--data", data)
    assert result.exit_code == 0, result.output


def test_training_leaves_text_only_records_out_in_one_line(tmp_path, capsys):
    data = _write_json(tmp_path, [ONE, TEXT, TWO])
    assert [r.id for r in training_records(data, tmp_path, 0, 0)] == ["s0", "m0"]
    assert "1 text-only records of 3 left out of training" in capsys.readouterr().err
    only_text = tmp_path / "text"
    only_text.mkdir()
    with pytest.raises(ToolkitError, match="every record is text-only"):
        training_records(_write_json(only_text, [TEXT]), tmp_path, 0, 0)
