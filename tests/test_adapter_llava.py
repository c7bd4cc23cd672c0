"""What only the LLaVA families have (the contract all families keep: tests/test_adapter_contract.py): per-image
anyres counts (LLaVA-NeXT's tiles + image_newline, OneVision's anyres_max_9 cap), NeXT's image_sizes, Mistral's
sliding window refused, and each family's own image kwargs. Tiny random models built in code (tests/family_fixtures)."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import LLAVA_FAMILIES, LLAVA_IMAGE_SIZES, family, image_counts, image_kwargs
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

import routing
from saturation.core.adapters import LlavaNext, LlavaOnevision, adapter_for
from saturation.core.errors import ToolkitError
from saturation.core.geometry import image_tokens_of

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)

SPLIT = 2


@pytest.fixture(scope="module", params=LLAVA_FAMILIES)
def fam(request):
    return family(request.param)


@pytest.fixture(scope="module")
def model(fam):
    return fam.model()


def test_image_token_counts_come_from_the_adapter(fam, model):
    """The adapter's count (geometry, FLOP model) equals the processor's placeholders and the merge's mask; anyres
    families give per-image counts, so one batch is ragged."""
    batch = fam.batch()
    counts = image_counts(model, batch)
    assert counts == [image_tokens_of(model.config, size) for size in LLAVA_IMAGE_SIZES]
    with torch.no_grad():
        _, mask = adapter_for(model).embed(batch["input_ids"], **image_kwargs(batch))
    assert mask.sum(1).tolist() == counts
    assert (len(set(counts)) > 1) == (fam.name != "llava")


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
