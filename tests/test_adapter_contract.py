"""The contract every family's adapter and routed model keep, one suite over all six: LLaVA-1.5, LLaVA-NeXT
(Mistral LM, anyres + image_newline), LLaVA-OneVision (SigLIP, Qwen2 LM with q/k/v biases), Qwen2.5-VL and Qwen3-VL
(M-RoPE positions, ragged grids, Qwen3's DeepStack and q/k norms), Gemma 3 (bidirectional image blocks, sliding
windows shorter than an image block, per-layer-type RoPE). Tiny random models built in code (tests/family_fixtures),
each family's models built once per module; what only one family has is in tests/test_adapter_<family>.py.

The walk equals HF's forward bit for bit, a prompt without images routes to HF's logits, every variant equals the
naive full-sequence reference on a ragged batch, every cached decode step equals recomputation, PC equals KV at text
positions, the side branch trains (LF-ideal gets no gradient), and a routing saves and loads.
"""

from __future__ import annotations

import pytest
import torch
from family_fixtures import FAMILIES, QWEN_FAMILIES, family, hf_logits
from routing_fixtures import SHARP_STD, assert_informative, decode_step_logits, perturb_side

import routing
from saturation.core.adapters import adapter_for
from saturation.core.errors import ToolkitError

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)

SPLIT = 2  # Qwen3-VL's tiny DeepStack covers layers 0..1: the first allowed split
NEW = {"llava": 5, "llava_next": 5, "llava_onevision": 5}  # decode steps (4 on Qwen and Gemma)
# Real text tokens before each row's first image token, at least (Gemma's row 1 opens with its image)
TEXT_BEFORE_THE_IMAGE = {"llava": 2, "llava_next": 2, "llava_onevision": 2, "qwen2_5_vl": 3, "qwen3_vl": 3}
VARIANTS = [(v, 0 if v == "lf-ideal" else 1) for v in routing.VARIANTS]  # (variant, fusion_layers)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    return family(request.param)


@pytest.fixture(scope="module")
def model(fam):
    return fam.model()


@pytest.fixture(scope="module")
def batch(fam):
    return fam.batch()


@pytest.fixture(scope="module")
def sharp_model(fam):
    """Language-model init std 0.2 (Gemma: and an untied lm_head): greedy continuations vary, so a wrong decode
    position or mask changes the logits."""
    return fam.model(std=SHARP_STD, seed=1, tie=False)


def with_labels(batch: dict) -> dict:
    """The batch with the last two real tokens of each row labelled (left padding: the row's end)."""
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]
    return batch | {"labels": labels}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_anatomy_walk_equals_hf_forward_bit_for_bit(fam, batch, attn):
    """With images, as generate runs HF's forward: positions cumsum(mask) - 1 (LLaVA, Gemma with token_type_ids:
    its blocks and windows, per-type RoPE), or none passed (Qwen computes its M-RoPE from mm_token_type_ids over the
    real tokens; DeepStack injected). tests/test_adapter_qwen.py and test_adapter_gemma3.py show both matter."""
    model = fam.model(attn, seed=2)
    with torch.no_grad():
        assert torch.equal(adapter_for(model).forward(**batch), fam.hf_logits(model, batch))


@pytest.mark.parametrize(("variant", "fusion_layers"), [*VARIANTS, ("lf-ideal", 1)])
def test_no_image_tokens_routed_equals_hf(fam, model, variant, fusion_layers):
    """Text only (Gemma: 24 and 18 tokens against a window of 8): every layer sees the sequence as HF does."""
    batch = fam.batch(images=False)
    routed = perturb_side(routing.build(model, SPLIT, variant, fusion_layers=fusion_layers))
    with torch.no_grad():
        assert torch.equal(routed(**batch).logits, hf_logits(model, batch))


@pytest.mark.parametrize(("variant", "fusion_layers"), VARIANTS)
def test_variants_equal_the_naive_reference_on_a_ragged_batch(fam, model, batch, variant, fusion_layers):
    """Image sizes or counts differ per row of one left-padded batch: ragged image tokens, NeXT's image_newline
    routed with the image. Subsets carry their ORIGINAL positions (Qwen's M-RoPE sliced from [3, B, T], Gemma's
    blocks and windows), never renumbered; DeepStack stays in the shallow stack."""
    routed = perturb_side(routing.build(model, SPLIT, variant, fusion_layers=fusion_layers))
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        got = routed(**batch).logits[valid]
    torch.testing.assert_close(got, fam.naive_logits(routed, **batch)[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("variant", "fusion_layers"), VARIANTS)
def test_every_decode_step_logits_equal_recomputation(fam, sharp_model, variant, fusion_layers):
    """HF generate() with the family's image kwargs (image_sizes, batch_num_images, image_grid_thw: generate
    pre-encodes Qwen's images; token_type_ids), then the cached steps (Qwen: at cumsum(mask) - 1 + the prompt's rope
    delta; Gemma: windows in original positions, every key kept) logit for logit against recomputation."""
    routed = perturb_side(routing.build(sharp_model, SPLIT, variant, fusion_layers=fusion_layers))
    routed.generation_config.eos_token_id = None
    new, cached, recomputed = decode_step_logits(routed, fam.batch(), NEW.get(fam.name, 4),
                                                 fam.suppressed(sharp_model))
    assert_informative(new)
    for step, (got, want) in enumerate(zip(cached, recomputed, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, step=step: f"decode step {step}: {m}")


def test_pc_equals_kv_at_text_and_text_before_the_image_is_unchanged(fam, model, batch):
    """KV's image keys come from the adapter (biases, Qwen3's k_norm, the image rows of the RoPE tables); PC runs
    the layer itself: equal at every text position. Text before each row's first image token equals vanilla."""
    image = batch["input_ids"] == adapter_for(model).image_token_id
    text = batch["attention_mask"].bool() & ~image
    before = text & (image.long().cumsum(1) == 0)  # real text before each row's first image token
    if fam.name in TEXT_BEFORE_THE_IMAGE:
        assert before.sum(1).min() >= TEXT_BEFORE_THE_IMAGE[fam.name]
    with torch.no_grad():
        pc, kv, lf = (perturb_side(routing.build(model, SPLIT, v))(**batch).logits for v in ("pc", "kv", "lf"))
        vanilla = fam.hf_logits(model, batch)
    torch.testing.assert_close(pc[text], kv[text], atol=2e-5, rtol=1e-4)
    for logits in (pc, kv, lf):
        torch.testing.assert_close(logits[before], vanilla[before], atol=2e-5, rtol=1e-4)


def test_one_layer_trains_with_a_gradient_and_lf_ideal_refuses(fam, model, batch):
    batch = with_labels(batch)
    routed = routing.build(model, SPLIT, "lf")
    layer = sum(p.numel() for p in adapter_for(model).layers[SPLIT].parameters())
    assert routed.trainable_parameters().trainable == layer
    assert routed.side_gradient_norm(**batch) > 0
    assert routed._no_split_modules == [type(adapter_for(model).layers[0]).__name__]
    ideal = routing.build(model, SPLIT, "lf-ideal", fusion_layers=0).train()
    try:
        assert ideal.side_gradient_norm(**batch) == 0.0
        with pytest.raises(ToolkitError, match="cannot be trained"):
            ideal(**batch)
    finally:
        ideal.eval()  # the module's base model stays in eval mode for the tests after this one


def test_save_load_round_trip_and_another_architecture_is_refused(fam, model, batch, tmp_path):
    routed = perturb_side(routing.build(model, SPLIT, "kv"))
    routed.save_routing(tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(routing.load(model, tmp_path / "r")(**batch).logits, routed(**batch).logits)
    other = family(FAMILIES[(FAMILIES.index(fam.name) + 1) % len(FAMILIES)]).model()
    with pytest.raises(ToolkitError) as err:
        routing.load(other, tmp_path / "r")
    assert "\n" not in str(err.value) and "model_type" in str(err.value)


def test_the_families_are_the_supported_ones():
    """The suite covers every family the adapters know, Qwen's two among them."""
    from saturation.core.adapters import Gemma3, LlavaNext, LlavaOnevision, Qwen3VL, Qwen25VL

    kinds = {name: type(adapter_for(family(name).model(layers=2))).__name__ for name in FAMILIES}
    assert set(QWEN_FAMILIES) < set(FAMILIES) and len(set(kinds.values())) == len(FAMILIES)
    assert {LlavaNext.__name__, LlavaOnevision.__name__, Qwen25VL.__name__, Qwen3VL.__name__,
            Gemma3.__name__} < set(kinds.values())
