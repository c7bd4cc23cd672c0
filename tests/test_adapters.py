"""saturation.core.adapters: the adapter walks a LLaVA exactly as transformers does, for any geometry; adapter_for
refuses what it does not know; geometry from the config; the RoPE tables. Every family's contract:
tests/test_adapter_contract.py."""

import pytest
import torch
from conftest import make_model
from PIL import Image
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaOnevisionConfig,
)

from saturation import ToolkitError
from saturation.core.adapters import (
    LLAVA_15,
    LLAVA_NEXT,
    LLAVA_ONEVISION,
    adapter_for,
    position_ids_from_mask,
    spec_for_config,
)
from saturation.core.tiny import tiny_llava_config, tiny_processor

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)

TEXTS = [
    "USER: <image>\nwhat colour is the circle? ASSISTANT: red</s>",
    "USER: <image>\nwhat ASSISTANT:",
    "USER: how many are there <image>\nis the square blue? ASSISTANT: no",  # image token mid-sequence
]


def _batch(processor, side):
    processor.tokenizer.padding_side = side
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]
    return processor(images=images, text=TEXTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_anatomy_forward_is_bit_identical_to_model(processor, side, attn):
    model = make_model(processor, seed=1)
    model.set_attn_implementation(attn)
    batch = _batch(processor, side)
    pos = position_ids_from_mask(batch["attention_mask"])
    with torch.no_grad():
        ref = model(**batch, position_ids=pos).logits
        got = adapter_for(model).forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        last = adapter_for(model).forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                          logits_to_keep=2)
    assert torch.equal(ref, got)
    assert torch.equal(last, ref[:, -2:])  # the head on the last positions only (VTW's search reads one)


def test_embed_marks_exactly_the_image_tokens(processor, tiny_model):
    batch = _batch(processor, "right")
    embeds, image_mask = adapter_for(tiny_model).embed(batch["input_ids"], batch["pixel_values"])
    assert image_mask.sum(1).tolist() == [4, 4, 4]  # 32 px / patch 16 → 4 tokens per image
    text_embeds = adapter_for(tiny_model).embed_tokens(batch["input_ids"])
    assert torch.equal(embeds[~image_mask], text_embeds[~image_mask])
    assert not torch.equal(embeds[image_mask], text_embeds[image_mask])


def test_image_tokens_without_pixels_is_a_clear_error(processor, tiny_model):
    batch = _batch(processor, "right")
    with pytest.raises(ToolkitError, match="no pixel_values"):
        adapter_for(tiny_model).embed(batch["input_ids"], None)


def test_hook_points_use_transformer_lens_names(tiny_model):
    points = adapter_for(tiny_model).hook_points()
    assert points["blocks.5.hook_resid_post"] is adapter_for(tiny_model).layers[5]
    assert points["blocks.0.attn.hook_pattern"] is adapter_for(tiny_model).layers[0].self_attn
    assert "blocks.6.hook_resid_post" not in points


def test_not_llava_is_refused():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ToolkitError, match="not a LLaVA model: model_type is 'llama'"):
        adapter_for(llama)


def test_backbone_specs_cover_llava_next_and_onevision():
    assert spec_for_config(LlavaConfig()) is LLAVA_15
    assert spec_for_config(LlavaNextConfig()) is LLAVA_NEXT
    assert spec_for_config(LlavaOnevisionConfig()) is LLAVA_ONEVISION


def test_geometry_comes_from_the_config_not_constants():
    """A 48 px / patch 16 model (9 image tokens, 3 layers) works through the same code: nothing assumes 576 or 32."""
    proc = tiny_processor(["what"], image_size=48, patch_size=16)
    cfg = tiny_llava_config(len(proc.tokenizer), image_size=48, patch_size=16, layers=3, kv_heads=1)
    model = LlavaForConditionalGeneration(cfg).eval()
    batch = proc(images=[Image.new("RGB", (48, 48))], text=["USER: <image>\nwhat ASSISTANT:"], return_tensors="pt")
    a = adapter_for(model)
    assert a.num_layers == 3
    with torch.no_grad():
        _, mask = a.embed(batch["input_ids"], batch["pixel_values"])
    assert int(mask.sum()) == 9


def test_llava_15_7b_geometry_on_meta_device():
    """The real llava-hf/llava-1.5-7b-hf architecture, built from its config values without weights."""
    cfg = LlavaConfig(
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32),
        vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                       "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                       "projection_dim": 768},
        image_token_index=32000,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    a = adapter_for(model)
    assert (a.num_layers, a.image_token_id) == (32, 32000)
    assert a.layers[0].self_attn.q_proj.weight.shape == (4096, 4096)
    assert a.lm_head.weight.shape == (32064, 4096)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_mask_shortcut_agrees_with_transformers(tiny_model, attn):
    """`causal_mask` answers None itself where HF would (sdpa, nothing padded, a prompt or one new token) and
    leaves every other case to HF: padding, several new tokens on a cache, no mask with gapped positions."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask

    from saturation.core.hf_compat import cache_kwargs

    tiny_model.set_attn_implementation(attn)
    a = adapter_for(tiny_model)
    filled = DynamicCache()
    for i in range(a.num_layers):
        filled.update(torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 8), i)
    ones, padded = torch.ones(2, 6, dtype=torch.long), torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    cases = [  # (queries, 2D mask, cache)
        (6, ones, None), (6, padded, None), (6, ones, DynamicCache()), (1, None, filled),
        (1, torch.ones(2, 6, dtype=torch.long), filled), (1, torch.tensor([[0] + [1] * 5, [1] * 6]), filled),
        (3, None, filled), (3, torch.ones(2, 8, dtype=torch.long), filled), (4, None, None)]
    try:
        for q, mask, cache in cases:
            x = torch.zeros(2, q, a.text_config.hidden_size)
            past = 0 if cache is None else cache.get_seq_length(0)
            pos = torch.arange(past, past + q).expand(2, -1) * (2 if mask is None and q > 1 else 1)  # gaps: packed
            ours = a.causal_mask(x, mask, pos, cache)
            theirs = create_causal_mask(config=a.text_config, inputs_embeds=x, attention_mask=mask,
                                        position_ids=pos, layer_idx=0, **cache_kwargs(cache))
            assert (ours is None) == (theirs is None), (q, mask, attn)
            assert ours is None or torch.equal(ours, theirs)
    finally:
        tiny_model.set_attn_implementation("sdpa")


@pytest.mark.parametrize(("family", "head_dim"), [("llava", 16), ("llava", 24), ("gemma3", None)])
def test_rope_table_is_the_rotary_modules_own_output(processor, family, head_dim):
    """`rope` answers 2D positions on CPU from a table of the rotary module's output: bit for bit what the module
    returns, for padded rows, positions past the first table (it grows), an odd head size (24: rows end inside a
    vector block), after the model changes dtype and back (bf16 rounds the frequencies: a new buffer must mean a
    new table), and per layer type (Gemma 3)."""
    if family == "llava":
        model = make_model(processor, seed=3, hidden=head_dim * 4, heads=4)
        module = adapter_for(model).rotary_emb
        kinds = [()]
    else:
        from family_fixtures import family

        model = family("gemma3").model()
        module = adapter_for(model).rotary_emb
        kinds = [(k,) for k in sorted(set(adapter_for(model).text_config.layer_types))]
    a = adapter_for(model)
    mask = torch.ones(3, 37, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    cases = [position_ids_from_mask(mask), torch.tensor([[0, 1, 600, 601, 1023]]), torch.tensor([[3]])]
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        model.to(dtype)
        h = torch.zeros(1, 1, 8, dtype=dtype)
        for pos in cases:
            got = a.rope(h, pos)
            for kind in kinds:
                want = module(h, pos, *kind)
                table = got[kind[0]] if kind else got
                assert all(torch.equal(g, w) and g.dtype == dtype for g, w in zip(table, want, strict=True))
    assert max(t[1].shape[0] for t in a._rope_tables.values()) >= 1024
