"""What only the Qwen families have (the contract all families keep: tests/test_adapter_contract.py): M-RoPE
positions [3, B, T] from the model's own index (text after a grid resumes at start + the grid's width), the rope delta
carried by the cache, beams over rows with several image sizes, Qwen3-VL's DeepStack (and the splits it forbids),
videos refused, Qwen's prompt. Tiny random models built in code (tests/family_fixtures): two or three image grids in
one left-padded batch, text after the image."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import (
    ASSISTANT,
    DEEPSTACK,
    MERGE,
    PATCH,
    QWEN_FAMILIES,
    QWEN_IMAGE,
    QWEN_IMAGE_SIZES,
    QWEN_PICTURE,
    QWEN_VIDEO,
    USER,
    family,
    image_kwargs,
)
from PIL import Image
from routing_fixtures import SHARP_STD, perturb_side

import routing
from saturation.core.adapters import Qwen3VL, Qwen25VL, adapter_for, position_ids_from_mask
from saturation.core.errors import ToolkitError
from saturation.core.hf_compat import cache_of

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)

SPLIT = 2  # Qwen3-VL's tiny DeepStack covers layers 0..1: the first allowed split
NEW = 4


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def fam(request):
    return family(request.param)


@pytest.fixture(scope="module")
def model(fam):
    return fam.model()


@pytest.fixture(scope="module")
def batch(fam):
    return fam.batch()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_walk_needs_the_models_positions_and_deepstack(fam, batch, attn):
    """The walk equals HF's forward (tests/test_adapter_contract.py), which computes M-RoPE from mm_token_type_ids
    over the real tokens; it would differ with 1D positions and, for Qwen3-VL, without the DeepStack injection: both
    are in play here."""
    model = fam.model(attn, seed=2)
    a = adapter_for(model)
    with torch.no_grad():
        hf = model(**batch).logits
        flat = a.forward(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]))
    assert not torch.allclose(flat, hf, atol=1e-4)
    if fam.name == "qwen3_vl":
        a.injecting = lambda e: a.__class__.injecting(a, type(e)(e.inputs_embeds, e.image_mask))  # no DeepStack
        with torch.no_grad():
            assert not torch.allclose(a.forward(**batch), hf, atol=1e-4)


def test_positions_are_the_models_and_text_resumes_after_the_grid(fam, model, batch):
    """[3, B, T] from the model's get_rope_index; mm_token_type_ids may be left out (derived from the image tokens,
    where HF would silently fall back to 1D); text after a 2x4 grid resumes at start + 4, not start + 8."""
    a = adapter_for(model)
    image = batch["input_ids"] == a.image_token_id
    kw = image_kwargs(batch)
    pos = a.positions(batch["attention_mask"], image_mask=image, **kw)
    want, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                         attention_mask=batch["attention_mask"])
    assert pos.shape == (3, *image.shape) and torch.equal(pos, want)
    kw.pop("mm_token_type_ids")
    assert torch.equal(a.positions(batch["attention_mask"], image_mask=image, **kw), want)
    row = 0  # 32x64 px: a 2x4 merged grid
    first = int(image[row].nonzero()[0])
    end = first + int(image[row].sum())
    assert pos[:, row, end].tolist() == [pos[0, row, first] + 4] * 3
    with pytest.raises(ToolkitError, match="other tokens than the image tokens"):
        a.positions(batch["attention_mask"], image_mask=image, **kw, mm_token_type_ids=batch["attention_mask"])


def test_image_token_counts_come_from_the_adapter(fam, model, batch):
    """Per image: the adapter's count == the processor's placeholders == image_grid_thw / merge^2; ragged."""
    counts = [int(n) for n in (batch["input_ids"] == adapter_for(model).image_token_id).sum(1)]
    pixels = (16 * 16, 64 * 64)  # the fixture processor's bounds
    assert counts == [type(adapter_for(model)).image_tokens(model.config, size, pixels) for size in QWEN_IMAGE_SIZES]
    assert counts == (batch["image_grid_thw"].prod(-1) // MERGE**2).tolist()
    assert len(set(counts)) == 3
    assert Qwen25VL.image_tokens(family("qwen2_5_vl").config(layers=1)) == (448 // (PATCH * MERGE)) ** 2


@pytest.fixture(scope="module")
def sharp_model(fam):
    """Language-model init std 0.2: greedy continuations vary, so a wrong decode position changes the logits."""
    return fam.model(std=SHARP_STD, seed=1)


def test_decoding_carries_the_rope_delta_in_the_cache(fam, sharp_model, batch):
    """The delta lives on the routed cache (text after an image sits below its index), not on HF's model.model."""
    routed = routing.build(sharp_model, SPLIT, "lf")
    sharp_model.model.rope_deltas = torch.full((3, 1), 1000)  # stale HF state must not matter
    out = routed(**batch, use_cache=True)
    state = routing.generation.state_of(cache_of(out))  # `cache` from transformers 5.24, `past_key_values` before
    _, deltas = sharp_model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                 batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    assert torch.equal(state.position_delta, deltas[:, 0]) and bool((deltas < 0).all())


def test_beam_search_with_two_images_in_a_row_scores_each_beam_as_recomputed(fam, sharp_model):
    """Beams (and num_return_sequences) expand the batch: a row holding two grids of different sizes needs its
    grids repeated as a group, [A, B, A, B], or the expanded rows' positions read the wrong grid (it crashed in
    HF's M-RoPE index). Each returned beam's score (length_penalty 0: the sum of its tokens' log-probabilities) must
    equal that sum recomputed from scratch on its own, unexpanded prompt."""
    routed = perturb_side(routing.build(sharp_model, SPLIT, "lf"))
    routed.generation_config.eos_token_id = None
    texts = [f"{USER}{QWEN_PICTURE}what colour {QWEN_PICTURE}is the circle ?{ASSISTANT}", f"{USER}how many {QWEN_PICTURE}?{ASSISTANT}"]
    images = [[Image.new("RGB", (64, 32), "red"), Image.new("RGB", (32, 48), "blue")],
              [Image.new("RGB", (32, 32), "green")]]
    fam.processor.tokenizer.padding_side = "left"
    batch = dict(fam.processor(images=images, text=texts, return_tensors="pt", padding=True))
    grids = batch["image_grid_thw"]
    assert grids[0].tolist() != grids[1].tolist()  # two sizes in the first row: the order matters
    _, expanded = routed._expand_inputs_for_generation(2, input_ids=batch["input_ids"], image_grid_thw=grids)
    assert expanded["image_grid_thw"].tolist() == grids[[0, 1, 0, 1, 2, 2]].tolist()

    beams, n = 3, batch["input_ids"].shape[1]
    out = routed.generate(**batch, max_new_tokens=NEW, num_beams=beams, num_return_sequences=beams, do_sample=False,
                          length_penalty=0.0, output_scores=True, return_dict_in_generate=True,
                          suppress_tokens=[QWEN_IMAGE, QWEN_VIDEO])
    for row, (text, pictures) in enumerate(zip(texts, images)):
        alone = dict(fam.processor(images=[pictures], text=[text], return_tensors="pt"))
        pads = n - alone["input_ids"].shape[1]
        for k in range(row * beams, (row + 1) * beams):
            ids = out.sequences[k:k + 1, pads:]
            assert torch.equal(ids[:, :n - pads], alone["input_ids"])
            types = torch.cat([alone["mm_token_type_ids"], torch.zeros_like(ids[:, n - pads:])], 1)
            with torch.no_grad():
                logits = routed(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=alone["pixel_values"],
                                image_grid_thw=alone["image_grid_thw"], mm_token_type_ids=types).logits
            logp = logits[0, n - pads - 1:-1].float().log_softmax(-1).gather(1, ids[0, n - pads:, None]).sum()
            torch.testing.assert_close(out.sequences_scores[k], logp, atol=1e-4, rtol=0, msg=f"beam {k}")
    assert len({tuple(s.tolist()) for s in out.sequences[:beams]}) == beams  # real beams, not one sequence thrice


def test_a_split_inside_the_deepstack_layers_is_refused_in_one_line():
    model = family("qwen3_vl").model()
    assert adapter_for(model).min_split == DEEPSTACK
    with pytest.raises(ToolkitError) as err:
        routing.build(model, DEEPSTACK - 1, "lf")
    assert "\n" not in str(err.value) and f"first allowed split is {DEEPSTACK}" in str(err.value)
    assert adapter_for(family("qwen2_5_vl").model(layers=2)).min_split == 1  # no DeepStack: only the usual range


def test_videos_are_refused_in_one_line(fam, model, batch):
    routed = routing.build(model, SPLIT, "lf")
    with pytest.raises(ToolkitError, match="video inputs are not supported"):
        routed(**batch, pixel_values_videos=batch["pixel_values"], video_grid_thw=batch["image_grid_thw"])
    ids = batch["input_ids"].clone()
    ids[0, -1] = model.config.video_token_id
    with pytest.raises(ToolkitError, match="video inputs are not supported"):
        adapter_for(model).forward(**(batch | {"input_ids": ids}))


def test_adapters_are_registered_with_qwens_prompt(fam, model):
    a = adapter_for(model)
    assert type(a) is {"qwen2_5_vl": Qwen25VL, "qwen3_vl": Qwen3VL}[fam.name]
    assert a.question_text("what", first=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what<|im_end|>\n<|im_start|>assistant\n")


def test_the_probe_walks_with_the_models_positions_and_deepstack(fam, batch):
    """probe_batch's forward equals HF's: M-RoPE positions (it passed 1D ones before) and DeepStack; its
    hook_resid_post hooks run after the injection."""
    from saturation.probe import LayerReducer, eager_attention, probe_batch

    model = fam.model()
    a = adapter_for(model)
    seen = {}
    forward = a.forward
    a.forward = lambda *args, **kw: seen.setdefault("logits", forward(*args, **kw))
    with eager_attention(model):
        with torch.no_grad():
            want = model(**batch).logits
        with LayerReducer(a) as reducer:
            probe_batch(a, reducer, batch)
    assert torch.equal(seen["logits"], want)
