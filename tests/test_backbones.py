"""One suite over every backbone family (issue 11 §3): LLaVA-1.5, LLaVA-NeXT (Mistral LM, anyres + image_newline),
LLaVA-OneVision (SigLIP, Qwen2 LM with q/k/v biases). Tiny random models built in code (tests/backbone_fixtures)."""

from __future__ import annotations

import pytest
import torch
from backbone_fixtures import FAMILIES, IMAGE_SIZES, family, hf_logits, image_counts, image_kwargs
from PIL import Image
from routing_fixtures import SHARP_STD, assert_informative, decode_step_logits, naive_logits, perturb_side
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

import routing
from saturation.core.adapters import LlavaNext, LlavaOnevision, adapter_for
from saturation.core.errors import ToolkitError
from saturation.core.geometry import image_tokens_of
from saturation.core.loading import load_model, resolve_name

SPLIT = 2
NEW = 5


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    return family(request.param)


@pytest.fixture(scope="module")
def model(fam):
    return fam.model()


@pytest.fixture(scope="module")
def sharp_model(fam):
    """Language-model init std 0.2: greedy continuations vary, so a wrong decode position changes an argmax."""
    return fam.model(std=SHARP_STD, seed=1)


def with_labels(batch: dict) -> dict:
    """The batch with the last two real tokens of each row labelled (left padding: the row's end)."""
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]
    return batch | {"labels": labels}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_anatomy_walk_equals_hf_forward_bit_for_bit(fam, attn):
    model = fam.model(attn, seed=2)
    batch = fam.batch()
    with torch.no_grad():
        assert torch.equal(adapter_for(model).forward(**batch), hf_logits(model, batch))


def test_image_token_counts_come_from_the_adapter(fam, model):
    """The adapter's count (geometry, FLOP model) equals the processor's placeholders and the merge's mask; anyres
    families give per-image counts, so one batch is ragged."""
    batch = fam.batch()
    counts = image_counts(model, batch)
    assert counts == [image_tokens_of(model.config, size) for size in IMAGE_SIZES]
    with torch.no_grad():
        _, mask = adapter_for(model).embed(batch["input_ids"], **image_kwargs(batch))
    assert mask.sum(1).tolist() == counts
    assert (len(set(counts)) > 1) == (fam.name != "llava")


@pytest.mark.parametrize("variant", routing.VARIANTS)
def test_no_image_tokens_routed_equals_hf(fam, model, variant):
    batch = fam.batch(images=False)
    routed = perturb_side(routing.build(model, SPLIT, variant))
    with torch.no_grad():
        assert torch.equal(routed(**batch).logits, hf_logits(model, batch))


@pytest.mark.parametrize(("variant", "fusion_layers"), [("lf", 1), ("lf-ideal", 0), ("pc", 1), ("kv", 1)])
def test_variants_equal_the_naive_reference_on_a_ragged_batch(fam, model, variant, fusion_layers):
    """Two (three) image sizes in one left-padded batch: ragged image-token counts (NeXT/OneVision), image_newline
    positions routed with the image."""
    batch = fam.batch()
    routed = perturb_side(routing.build(model, SPLIT, variant, fusion_layers=fusion_layers))
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        got = routed(**batch).logits[valid]
    torch.testing.assert_close(got, naive_logits(routed, **batch)[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", routing.VARIANTS)
def test_every_decode_step_logits_equal_recomputation(fam, sharp_model, variant):
    """HF generate() with the family's image kwargs (image_sizes, batch_num_images named in the routed forward's
    signature) then the cached steps, logit for logit against recomputation."""
    routed = perturb_side(routing.build(sharp_model, SPLIT, variant, fusion_layers=0 if variant == "lf-ideal" else 1))
    routed.generation_config.eos_token_id = None
    new, cached, recomputed = decode_step_logits(routed, fam.batch(), NEW, [adapter_for(sharp_model).image_token_id])
    assert_informative(new)
    for step, (got, want) in enumerate(zip(cached, recomputed, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, step=step: f"decode step {step}: {m}")


def test_pc_equals_kv_at_text_and_text_before_the_image_is_unchanged(fam, model):
    batch = fam.batch()
    image = batch["input_ids"] == adapter_for(model).image_token_id
    text = batch["attention_mask"].bool() & ~image
    before = text & (image.long().cumsum(1) == 0)  # real text before each row's first image token
    assert before.sum(1).min() >= 2
    with torch.no_grad():
        pc = perturb_side(routing.build(model, SPLIT, "pc"))
        kv = perturb_side(routing.build(model, SPLIT, "kv"))
        lf = perturb_side(routing.build(model, SPLIT, "lf"))
        pc_logits, kv_logits, lf_logits = (r(**batch).logits for r in (pc, kv, lf))
        vanilla = hf_logits(model, batch)
    torch.testing.assert_close(pc_logits[text], kv_logits[text], atol=2e-5, rtol=1e-4)
    for routed_logits in (pc_logits, kv_logits, lf_logits):
        torch.testing.assert_close(routed_logits[before], vanilla[before], atol=2e-5, rtol=1e-4)


def test_one_layer_trains_with_a_gradient_and_lf_ideal_refuses(fam, model):
    batch = with_labels(fam.batch())
    routed = routing.build(model, SPLIT, "lf")
    layer = sum(p.numel() for p in adapter_for(model).layers[SPLIT].parameters())
    assert routed.trainable_parameters().trainable == layer
    assert routed.side_gradient_norm(**batch) > 0
    assert routed._no_split_modules == [type(adapter_for(model).layers[0]).__name__]
    ideal = routing.build(model, SPLIT, "lf-ideal", fusion_layers=0).train()
    assert ideal.side_gradient_norm(**batch) == 0.0
    with pytest.raises(ToolkitError, match="cannot be trained"):
        ideal(**batch)


def test_save_load_round_trip_and_another_architecture_is_refused(fam, model, tmp_path):
    batch = fam.batch()
    routed = perturb_side(routing.build(model, SPLIT, "kv"))
    routed.save_routing(tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(routing.load(model, tmp_path / "r")(**batch).logits, routed(**batch).logits)
    other = family(FAMILIES[(FAMILIES.index(fam.name) + 1) % len(FAMILIES)]).model()
    with pytest.raises(ToolkitError) as err:
        routing.load(other, tmp_path / "r")
    assert "\n" not in str(err.value) and "model_type" in str(err.value)


def test_an_image_kwarg_of_another_family_is_refused(model, fam):
    batch = fam.batch()
    foreign = {"llava": "image_sizes", "llava_next": "batch_num_images", "llava_onevision": "image_grid_thw"}[fam.name]
    routed = routing.build(model, SPLIT, "lf")
    with pytest.raises(ToolkitError, match=f"takes no {foreign}"):
        routed(**batch, **{foreign: torch.ones(3, 2, dtype=torch.long)})


def test_missing_image_sizes_is_one_line():
    """NeXT pixels without image_sizes: HF's own error, not a count mismatch deep in the merge."""
    fam = family("llava_next")
    batch = fam.batch()
    batch.pop("image_sizes")
    with pytest.raises((ToolkitError, TypeError, ValueError)):
        adapter_for(fam.model()).embed(batch["input_ids"], batch["pixel_values"])


def test_onevision_caps_large_grids_as_the_model_does():
    """anyres_max_9 shrinks a grid larger than 9 tiles: the adapter's count equals the processor's and the merge's."""
    fam = family("llava_onevision")
    pinpoints = [[16 * i, 16 * j] for i in range(1, 5) for j in range(1, 5)]
    proc = fam.processor
    proc.image_processor.image_grid_pinpoints = pinpoints
    try:
        torch.manual_seed(0)
        config = fam.config(layers=1)
        config.image_grid_pinpoints = pinpoints
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        proc.tokenizer.padding_side = "left"
        batch = dict(proc(images=[Image.new("RGB", (64, 64))], text=["USER: <image>\nwhat ASSISTANT:"],
                          return_tensors="pt"))
        expected = LlavaOnevision.image_tokens(config, (64, 64))
        assert expected < 4 + 8 * 9  # the 8x8 grid was shrunk
        assert image_counts(model, batch) == [expected]
        with torch.no_grad():
            _, mask = adapter_for(model).embed(batch["input_ids"], **image_kwargs(batch))
        assert int(mask.sum()) == expected
    finally:
        proc.image_processor.image_grid_pinpoints = family("llava_onevision").config().image_grid_pinpoints


def test_sliding_window_language_models_are_refused():
    """A Mistral LM with a sliding window needs another mask; the adapter refuses it rather than walk it wrong."""
    config = family("llava_next").config(layers=1)
    config.text_config.sliding_window = 8
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    with pytest.raises(ToolkitError, match="sliding-window"):
        adapter_for(model)


def test_next_counts_match_the_processor_for_many_sizes():
    config = family("llava_next").config(layers=1)
    proc = family("llava_next").processor
    for size in ((16, 16), (20, 50), (50, 20), (33, 31), (32, 64)):
        ids = proc(images=[Image.new("RGB", size[::-1])], text=["<image>"], return_tensors="pt")["input_ids"]
        assert int((ids == 4).sum()) == LlavaNext.image_tokens(config, size), size


NEW_ALIASES = {"llava-next-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
               "llava-next-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
               "llava-onevision-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
               "llava-onevision-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"}


@pytest.mark.parametrize("alias", NEW_ALIASES)
def test_aliases_resolve_and_fail_offline_in_one_line(alias):
    assert resolve_name(alias) == NEW_ALIASES[alias]
    with pytest.raises(ToolkitError, match=rf"cannot load '{NEW_ALIASES[alias]}'.*--model PATH") as err:
        load_model(alias)
    assert "\n" not in str(err.value)


def test_a_local_llava_next_checkpoint_loads(tmp_path):
    """load_model accepts the llava_next model type (it said "not a LLaVA model" before the adapters)."""
    fam = family("llava_next")
    model = fam.model()
    model.save_pretrained(tmp_path)
    fam.processor.save_pretrained(tmp_path)
    loaded, processor = load_model(tmp_path, device="cpu")
    batch = fam.batch()
    assert type(adapter_for(loaded)) is LlavaNext
    assert torch.equal(hf_logits(loaded, batch), hf_logits(model, batch))
    assert type(processor).__name__ == "LlavaNextProcessor"
