"""What only Gemma 3 has (the contract all families keep: tests/test_adapter_contract.py): bidirectional image
blocks, sliding-window layers (window 8, shorter than an image block and than every sequence here), per-layer-type
RoPE; masks built directly that equal HF's own construction, FastV at sliding layers, the sliding cache refused. A
tiny random model built in code (tests/family_fixtures): two images in one row, one image then long text in the
other, left padded."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import GEMMA_BOI as BOI
from family_fixtures import GEMMA_EOI as EOI
from family_fixtures import GEMMA_IMAGE as IMAGE
from family_fixtures import TOKENS_PER_IMAGE, WINDOW, family, gemma_config, gemma_naive_logits
from routing_fixtures import (
    SHARP_STD,
    assert_informative,
    decode_step_logits,
    fastv_kept,
    fastv_reference_scores,
    perturb_side,
    pinned_fastv,
)
from transformers import DynamicCache
from transformers.masking_utils import blockwise_overlay, create_causal_mask, sliding_window_overlay

import routing
from saturation.core.adapters import Gemma3, adapter_for, position_ids_from_mask
from saturation.core.adapters.gemma3 import FULL, SLIDING, block_ids
from saturation.core.errors import ToolkitError
from saturation.core.hf_compat import cache_kwargs

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)

GEMMA = family("gemma3")
SPLIT = 2  # shallow: sliding, sliding; side branch from layer 2 (global); deep 2..4; fusion 5 (global)
NEW = 4


@pytest.fixture(scope="module")
def model():
    return GEMMA.model()


@pytest.fixture(scope="module")
def batch():
    return GEMMA.batch()


def generate_positions(batch: dict) -> torch.Tensor:
    return position_ids_from_mask(batch["attention_mask"])


def test_the_fixture_exercises_windows_and_blocks(model, batch):
    """The window is shorter than an image block and than the text after row 1's image; row 0 has two blocks."""
    image = batch["input_ids"] == IMAGE
    assert image.sum(1).tolist() == [2 * TOKENS_PER_IMAGE, TOKENS_PER_IMAGE] and TOKENS_PER_IMAGE > WINDOW
    after = batch["attention_mask"][1].bool() & (image[1].long().cumsum(0) == TOKENS_PER_IMAGE) & ~image[1]
    assert int(after.sum()) > 2 * WINDOW
    assert {"sliding_attention", "full_attention"} == set(model.config.text_config.layer_types)
    assert torch.equal(batch["token_type_ids"] == 1, image)
    assert GEMMA.batch(images=False)["attention_mask"].sum(1).min() > 2 * WINDOW  # text only: longer than windows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_walk_takes_the_blocks_from_the_image_tokens(batch, attn):
    """The walk equals HF's forward with token_type_ids and generate's positions (tests/test_adapter_contract.py).
    It takes its blocks from the image tokens, so it equals HF with token_type_ids even without them (not HF without
    them, a plain causal mask)."""
    model = GEMMA.model(attn, seed=2)
    a = adapter_for(model)
    pos = generate_positions(batch)
    without = {k: v for k, v in batch.items() if k != "token_type_ids"}
    with torch.no_grad():
        hf = model(**batch, position_ids=pos).logits
        causal_only = model(**without, position_ids=pos).logits
        assert torch.equal(a.forward(**without), hf)
    assert not torch.allclose(causal_only, hf, atol=1e-3)


def test_the_window_and_the_rope_bases_are_in_play(batch):
    """Widening the window or giving both layer types one RoPE base changes HF's output: both are really tested."""
    model = GEMMA.model()
    with torch.no_grad():
        want = adapter_for(model).forward(**batch)
        model.config.text_config.sliding_window = 1000
        wide = adapter_for(model).forward(**batch)
        model.config.text_config.sliding_window = WINDOW
        rotary = adapter_for(model).rotary_emb
        rotary.sliding_attention_inv_freq, saved = rotary.full_attention_inv_freq, rotary.sliding_attention_inv_freq
        one_base = adapter_for(model).forward(**batch)
        rotary.sliding_attention_inv_freq = saved
    assert not torch.allclose(wide, want, atol=1e-3)
    assert not torch.allclose(one_base, want, atol=1e-3)


def test_windows_in_subset_indices_would_be_caught(model, batch, monkeypatch):
    """The naive reference tells a window counted in subset indices from one in original positions (LF's text after
    row 1's image sits TOKENS_PER_IMAGE positions further than its subset index says)."""
    routed = perturb_side(routing.build(model, SPLIT, "lf"))
    a = adapter_for(model)
    monkeypatch.setattr(type(a), "near", lambda self, q, k: (  # subset indices instead of positions
        torch.arange(k.shape[1])[None, None, None, :] > torch.arange(q.shape[1])[None, None, :, None] - self.window))
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        got = routed(**batch).logits[valid]
    assert not torch.allclose(got, gemma_naive_logits(routed, **batch)[valid], atol=1e-3)


def side_outputs(routed, batch: dict, row: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The side branch's output [batch, image tokens, D] as is, and with its INPUT changed at image token `index` of
    `row` (subset order = original order): only the side branch's own mask decides where the change goes."""
    outs, shift = [], {}

    def change(_module, args):
        if shift:
            bump = torch.zeros_like(args[0])
            bump[row, index] = 1.0
            return (args[0] + bump, *args[1:])
        return None

    handles = [routed.side[0].register_forward_pre_hook(change),
               routed.side[0].register_forward_hook(lambda _m, _a, out: outs.append(out))]
    try:
        with torch.no_grad():
            routed(**batch)
            shift["on"] = True
            routed(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return outs[0], outs[1]


def test_the_side_branch_sees_each_image_both_ways(model, batch):
    """Changing the LAST token of row 0's first image changes the side output at that image's FIRST token (a causal
    mask would not); changing the last token of the second image leaves the whole first image alone (one block per
    image, not one bidirectional image subset); the other row never moves."""
    routed = perturb_side(routing.build(model, SPLIT, "lf"))
    n = TOKENS_PER_IMAGE
    before, after = side_outputs(routed, batch, 0, n - 1)
    assert not torch.allclose(before[0, 0], after[0, 0], atol=1e-4)
    torch.testing.assert_close(before[1], after[1])
    before, after = side_outputs(routed, batch, 0, 2 * n - 1)
    assert not torch.allclose(before[0, n], after[0, n], atol=1e-4)
    torch.testing.assert_close(before[0, :n], after[0, :n])


@pytest.fixture(scope="module")
def sharp_model():
    """Init std 0.2 and an untied lm_head: greedy continuations vary, so a wrong decode mask changes the logits."""
    return GEMMA.model(std=SHARP_STD, seed=1, tie=False)


@pytest.mark.parametrize("rank", ["last", "all", "text"])
@pytest.mark.parametrize("layer", [2, 3])  # K-1 = 1 (sliding: the window hides most image keys), 2 (global)
def test_fastv_keeps_what_an_eager_attention_read_ranks_highest(model, batch, layer, rank):
    """FastV's scores read layer K-1's own mask: on a sliding layer a text query far after the image gives its
    keys nothing (scored causally they would). Reference: HF's eager attention probabilities at that layer, head
    mean, the rank rule's rows (`fastv_reference_scores`); R=75% dropped. Where the rule's rows see fewer image
    tokens than the budget (the last row on a sliding layer), ties at zero decide and the check is skipped."""
    routed = routing.build(model, split=4, variant="fastv", prune_layer=layer, keep=0.25, rank=rank)
    kept = fastv_kept(routed, batch)
    with torch.no_grad():
        attn = GEMMA.model("eager")(**batch, position_ids=generate_positions(batch), output_attentions=True).attentions
    image = batch["input_ids"] == IMAGE
    scores = fastv_reference_scores(attn[layer - 1].mean(1), batch["attention_mask"], image, rank)
    checked = 0
    for b in range(len(image)):
        received, columns = scores[b], image[b].nonzero().squeeze(1)
        budget = routed.plan.kept_tokens(len(columns))
        if not 0 < budget < int((received[columns] > 0).sum()):  # ties at zero would decide the set
            assert rank == "last" and layer == 2
            continue
        expected = set(columns[received[columns].topk(budget).indices].tolist())
        assert set((kept[b] & image[b]).nonzero().squeeze(1).tolist()) == expected
        checked += 1
    assert checked > 0 or (rank, layer) == ("last", 2)  # the last row's window holds no image token


@pytest.mark.parametrize("rank", ["last", "all", "text"])
@pytest.mark.parametrize("spec", [{"variant": "fastv", "split": 4},
                                  {"variant": "lf", "split": SPLIT, "prune": "fastv"}])
def test_fastv_decode_steps_equal_recomputation(sharp_model, spec, rank):
    """FastV on Gemma (alone and under LF): the kept layout's keys keep their original positions, so windows and
    image blocks hold at every cached step."""
    routed = perturb_side(routing.build(sharp_model, **spec, prune_layer=2, keep=0.5, rank=rank))
    routed.generation_config.eos_token_id = None
    with pinned_fastv(routed):
        new, cached, recomputed = decode_step_logits(routed, GEMMA.batch(), NEW, [IMAGE, BOI, EOI])
    assert_informative(new)
    for step, (got, want) in enumerate(zip(cached, recomputed, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, step=step: f"decode step {step}: {m}")


def hf_window(q_pos: torch.Tensor, k_pos: torch.Tensor, q_offset: int = 0):
    """HF's sliding-window overlay read in ORIGINAL positions, as an and_mask_function (HF expands it under vmap)."""
    inner = sliding_window_overlay(WINDOW)
    return lambda b, h, q, kv: inner(b, h, q_pos[b, q - q_offset], k_pos[b, kv])


def subset(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The `chosen` tokens of every row [B, n], in original order, left-aligned, padded to the longest row."""
    order = torch.argsort((~chosen).to(torch.uint8), dim=1, stable=True)[:, : int(chosen.sum(1).max())]
    return x.gather(1, order)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_subset_masks_equal_hfs_own_construction(batch, attn):
    """A prompt's subset masks (image only: two blocks in row 0; text only, padded; the whole sequence), built
    directly, equal HF's create_causal_mask with blockwise_overlay and the window as its mask functions, bit for bit."""
    a = adapter_for(GEMMA.model(attn))
    image, valid = batch["input_ids"] == IMAGE, batch["attention_mask"].bool()
    pos = generate_positions(batch)
    for chosen in (image & valid, ~image & valid, valid):
        sub_valid, sub_pos = subset(chosen, chosen), subset(pos, chosen)
        sub_image = subset(image, chosen) & sub_valid
        x = torch.zeros(*sub_valid.shape, 8)
        kw = dict(config=a.text_config, inputs_embeds=x, attention_mask=sub_valid, position_ids=sub_pos, layer_idx=0,
                  **cache_kwargs(None))
        blocks = blockwise_overlay(block_ids(sub_image, sub_pos)) if bool(sub_image.any()) else None
        got = a.subset_causal_mask(x, sub_valid, bool(sub_valid.all()), sub_pos, image_mask=sub_image)
        assert torch.equal(got[SLIDING], create_causal_mask(**kw, or_mask_function=blocks,
                                                            and_mask_function=hf_window(sub_pos, sub_pos)))
        assert torch.equal(got[FULL], create_causal_mask(**kw, or_mask_function=blocks))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("new", [1, 3])
def test_decode_sliding_mask_equals_hfs_own_construction(attn, new):
    """New tokens against a cache layout whose keys are out of order (row 0: image keys first, as KV caches them)
    and padded (row 1): the directly built sliding mask equals HF's with the window as and_mask_function."""
    a = adapter_for(GEMMA.model(attn))
    c = a.text_config
    generated = 2 + new
    prompt = torch.tensor([[*range(5, 25), *range(5), *range(25, 31)], [0] * 4 + list(range(27))])
    after = prompt.max(1).values[:, None] + 1 + torch.arange(generated)[None]
    keys = torch.cat([prompt, after], 1)
    mask = torch.ones_like(keys)
    mask[1, :4] = 0
    past = keys.shape[1] - new
    cache = DynamicCache()
    cache.update(torch.zeros(2, c.num_key_value_heads, past, c.head_dim), torch.zeros(2, c.num_key_value_heads, past,
                                                                                       c.head_dim), 0)
    queries, x = keys[:, past:], torch.zeros(2, new, c.hidden_size)
    want = create_causal_mask(config=c, inputs_embeds=x, attention_mask=mask, position_ids=queries,
                              **cache_kwargs(cache), layer_idx=0, and_mask_function=hf_window(queries, keys, past))
    got = a.decode_mask(x, mask, queries, cache, 0, keys)[SLIDING]
    assert torch.equal(got, want)
    assert not bool(a.allowed(want)[0, 0, 0, :20].all())  # the window really cuts row 0's image keys


def test_a_sliding_cache_is_refused_in_one_line(model, batch):
    routed = routing.build(model, SPLIT, "lf")
    with pytest.raises(ToolkitError, match="keep every key") as err:
        routed(**batch, cache=DynamicCache(config=model.config.text_config), use_cache=True)
    assert "\n" not in str(err.value)


def test_token_type_ids_must_mark_the_image_tokens(model, batch):
    wrong = batch["token_type_ids"].roll(1, dims=1)
    with pytest.raises(ToolkitError, match="token_type_ids marks other tokens"):
        routing.build(model, SPLIT, "lf")(**(batch | {"token_type_ids": wrong}))


def test_adapter_is_registered_with_gemmas_prompt_and_counts(model):
    a = adapter_for(model)
    assert type(a) is Gemma3
    assert a.question_text("what", first=True) == (
        "<start_of_turn>user\n<start_of_image>what<end_of_turn>\n<start_of_turn>model\n")
    assert Gemma3.image_tokens(gemma_config(layers=1)) == TOKENS_PER_IMAGE
    assert [a.layer_type(i) for i in range(a.num_layers)] == model.config.text_config.layer_types
    assert type(a.layers[0]).__name__ == "Gemma3DecoderLayer"  # what routed models name in _no_split_modules
