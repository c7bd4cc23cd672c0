"""Every command on every supported family: tiny random LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision checkpoints saved
with save_pretrained (model + processor), loaded by the CLI from disk like a user's ``--model DIR``; images of
different sizes, so anyres batches are ragged. Plus the data plumbing they rest on (image kwargs, NeXT tiles, chat
templates), the offline OneVision processor, the FLOP model over ragged counts and the anyres geometries."""

from __future__ import annotations

import json
import math

import pytest
import torch
from family_fixtures import (
    LLAVA_FAMILIES,
    LLAVA_IMAGE_SIZES,
    QWEN_CHAT_TEMPLATE,
    check_plugin_requests,
    checkpoint_processor,
    run_every_command,
    save_checkpoint,
    write_images_dataset,
)
from PIL import Image
from typer.testing import CliRunner

from saturation.core.data import IGNORE_INDEX, PromptFormat, collate, encode_record, read_records

runner = CliRunner()
CHAT = {"llava_onevision": QWEN_CHAT_TEMPLATE}  # one family through a chat template, the others their adapter's


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module", params=LLAVA_FAMILIES)
def checkpoint(request, tmp_path_factory):
    name = request.param
    return name, save_checkpoint(name, tmp_path_factory.mktemp(name) / "model", chat_template=CHAT.get(name))


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_every_command_runs_on_the_family(checkpoint, data, tmp_path, monkeypatch):
    """probe -> train at --split auto -> eval -> generate -> bench -> analyze (`family_fixtures.run_every_command`)."""
    _, model = checkpoint
    monkeypatch.chdir(tmp_path)  # bench's default folder, anything relative
    run_every_command(model, data, tmp_path, layers=4)


def test_onevision_checkpoint_loads_offline_without_torchvision(tmp_path):
    """AutoProcessor cannot build OneVision's video processor without torchvision; load_model builds the
    image-only processor from the same files, chat template included."""
    import importlib.util

    from saturation.core.loading import ImageOnlyOnevisionProcessor, load_model

    assert importlib.util.find_spec("torchvision") is None  # the toolkit's environment
    folder = save_checkpoint("llava_onevision", tmp_path / "ov", chat_template=QWEN_CHAT_TEMPLATE)
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"
    model, processor = load_model(folder)
    assert isinstance(processor, ImageOnlyOnevisionProcessor) and processor.chat_template == QWEN_CHAT_TEMPLATE
    out = processor(images=[Image.new("RGB", (80, 40))], text=["<image>\nwhat"], return_tensors="pt")
    assert out["image_sizes"].tolist() == [[40, 80]] and out["batch_num_images"].tolist() == [1]
    assert model(**out).logits.shape[:2] == out["input_ids"].shape


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_collated_records_equal_the_processors_own_batch(name, data):
    """Per-record encoding + collate == the processor on the whole batch: ids, NeXT tiles zero-padded to the batch
    max, image_sizes (and OneVision's batch_num_images) concatenated."""
    from family_fixtures import Family

    proc = checkpoint_processor(name)
    fmt = PromptFormat.of(Family(name, proc).model())
    records = read_records(data)[:3]  # three image sizes: 2x2, 1x2 and 2x1 grids
    batch = collate([encode_record(r, proc, fmt=fmt) for r in records], 0, padding_side="right")
    assert set(batch) == {"input_ids", "attention_mask", "labels", *fmt.image_kwargs}
    proc.tokenizer.padding_side = "right"
    pictures = [Image.open(r.image).convert("RGB") for r in records]
    own = proc(images=pictures, text=[f"USER: <image>\n{r.turns[0][0]} ASSISTANT:" if name == "llava_next" else
                                      fmt.template.question(r.turns[0][0], True) for r in records],
               return_tensors="pt", padding=True)
    for key in fmt.image_kwargs:
        assert torch.equal(batch[key], own[key]), key
    tiles = [int((batch["pixel_values"][i].flatten(1).abs().sum(1) > 0).sum()) for i in range(3)]
    assert len(set(tiles)) > 1 and batch["pixel_values"].shape[1] == max(tiles)  # ragged tiles, padded
    counts = (batch["input_ids"] == 4).sum(1).tolist()
    assert len(set(counts)) == 3  # ragged image-token counts


def test_chat_template_prompts_and_labels(data):
    """With a chat template the prompt is the template's, pieces add up to the rendered conversation, and labels
    cover exactly the assistant's words and its end-of-turn token in every turn."""
    from family_fixtures import Family

    proc = checkpoint_processor("llava_onevision", QWEN_CHAT_TEMPLATE)
    fmt = PromptFormat.of(Family("llava_onevision", proc).model())
    assert fmt.chat_template
    record = read_records(data)[1]  # blue, then "yes"
    enc = encode_record(record, proc, fmt=fmt)
    tok = proc.tokenizer
    labelled = [tok.convert_ids_to_tokens(int(i)) for i, lab in zip(enc["input_ids"], enc["labels"])
                if lab != IGNORE_INDEX]
    assert labelled == ["blue", "<|im_end|>", "yes", "<|im_end|>"]
    text = tok.decode(enc["input_ids"][enc["input_ids"] != 4])
    assert text == ("<s> <|im_start|> user what colour is the circle? <|im_end|> <|im_start|> assistant blue "
                    "<|im_end|> <|im_start|> user is the square red? <|im_end|> <|im_start|> assistant yes <|im_end|>")
    from saturation.core.data import encode_prompt

    prompt = encode_prompt(record, proc, fmt=fmt)["input_ids"]
    assert tok.convert_ids_to_tokens(prompt[-2:].tolist()) == ["<|im_start|>", "assistant"]


def test_probe_of_a_ragged_padded_batch_equals_each_sample_alone(data):
    """A NeXT batch of three image sizes (24, 14 and 14 image tokens in different places) right-padded: every
    sample gets the numbers it gets alone."""
    from family_fixtures import Family

    from saturation.core.adapters import adapter_for
    from saturation.probe import LayerReducer, eager_attention, encode_batch, probe_batch

    proc = checkpoint_processor("llava_next")
    model = Family("llava_next", proc).model(std=0.2)
    a = adapter_for(model)
    fmt = PromptFormat.of(a)
    records = read_records(data)[:3]
    with eager_attention(model), LayerReducer(a) as reducer:
        batch = probe_batch(a, reducer, encode_batch(records, proc, a.image_token_id, fmt))
        alone = [probe_batch(a, reducer, encode_batch([r], proc, a.image_token_id, fmt)) for r in records]
    for key, values in batch.items():
        for i, one in enumerate(alone):
            torch.testing.assert_close(values[i], one[key][0], rtol=1e-4, atol=1e-5, equal_nan=True,
                                       msg=lambda m, key=key, i=i: f"{key} sample {i}: {m}")


def test_flop_ratio_over_ragged_samples():
    from routing import flops
    from routing.flops import Geometry

    g = Geometry(num_layers=8, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=100)
    same = flops.sample_ratio(g, "lf", 4, [(24, 10), (24, 10)])
    assert same == pytest.approx(flops.ratio(g, "lf", 4, 24, 10))
    ragged = [(24, 10), (200, 10)]
    mixed = flops.sample_ratio(g, "lf", 4, ragged)["total"]
    each = [flops.ratio(g, "lf", 4, i, t)["total"] for i, t in ragged]
    assert min(each) < mixed < max(each)
    assert not math.isclose(mixed, flops.ratio(g, "lf", 4, 112, 10)["total"], rel_tol=1e-3)  # not the mean's


@pytest.mark.parametrize("name, tokens", [("llava-next-7b", 2340), ("llava-onevision-7b", 2929),
                                          ("llava-1.5-7b", 576)])
def test_geometry_processor_counts_what_the_adapter_counts(name, tokens):
    """The geometries' processors tile a 480x640 photo into as many <image> tokens as the adapter prices (no
    weights are built: 7B widths)."""
    from saturation.core.geometry import REPRESENTATIVE_IMAGE, geometry_config, geometry_processor, image_tokens_of

    config = geometry_config(name, layers=3)
    assert config.text_config.num_hidden_layers == 3
    proc = geometry_processor(config, ["what"])
    h, w = REPRESENTATIVE_IMAGE
    ids = proc(images=[Image.new("RGB", (w, h))], text=["<image>\nwhat"], return_tensors="pt")["input_ids"]
    assert int((ids == proc.tokenizer.convert_tokens_to_ids("<image>")).sum()) == image_tokens_of(
        config, REPRESENTATIVE_IMAGE) == tokens


def test_image_sizes_travel_with_the_records(data):
    """A record's image_sizes are its own image's (H, W), in batch order."""
    from family_fixtures import Family

    proc = checkpoint_processor("llava_next")
    fmt = PromptFormat.of(Family("llava_next", proc).model())
    batch = collate([encode_record(r, proc, fmt=fmt) for r in read_records(data)[:3]], 0)
    assert batch["image_sizes"].tolist() == [list(s) for s in LLAVA_IMAGE_SIZES]


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_lmms_plugin_carries_the_family_prompt_and_image_kwargs(name):
    """The lmms-eval plugin's request handling on anyres families: the family's prompt, image_sizes (and
    batch_num_images) with the pixels; two image sizes in one batch answer as each alone; loglikelihood runs."""
    from family_fixtures import Family

    import routing
    from routing.lmms.plugin import llava_prompt

    proc = checkpoint_processor(name, CHAT.get(name))
    routed = routing.build(Family(name, proc).model(std=0.2), 2).eval()
    fmt = PromptFormat.of(routed)
    prompt = llava_prompt("what colour is the circle?", 1, proc, fmt)
    assert prompt == (proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]}], add_generation_prompt=True)
        if name in CHAT else fmt.template.question("what colour is the circle?", True))
    pictures = [[Image.new("RGB", (40, 40), "red")], [Image.new("RGB", (80, 40), "blue")]]
    check_plugin_requests(routed, proc, pictures)
