"""The FLOP model: the paper's Table 1 at 7B, the order of the variants for any geometry, Gemma 3's sliding windows
counted in original positions, and the train step's cost (issue 18 §2)."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import LAYER_TYPES, WINDOW, gemma_config

import routing
from routing import flops
from routing.plan import kept_tokens, make_plan
from saturation.core.errors import ToolkitError

G7 = flops.LLAVA_15_7B


def test_table_1_lf_at_7b():
    """LF at s=18 with 576 image + 128 text tokens costs ~0.69x the vanilla linear FLOPs."""
    r = flops.ratio(G7, "lf", 18, 576, 128)
    assert r["linear"] == pytest.approx(15616 / 22528)  # token-layers: 18*704 + 13*128 + 704 + 576 over 32*704
    assert 0.68 < r["linear"] < 0.70
    assert r["attention"] < r["linear"]  # the quadratic part shrinks faster


def test_side_branch_size_at_7b():
    """One Llama-7B decoder layer: the paper's 202M trainable parameters."""
    assert G7.layer_params() == pytest.approx(202.4e6, rel=1e-3)


@pytest.mark.parametrize(("geometry", "split"), [(G7, 18), (flops.LLAVA_15_13B, 28),
                                                  (flops.Geometry(12, 256, 688, 4, vocab=512), 8)])
def test_variant_order(geometry, split):
    """lf-ideal < lf < kv < vanilla < pc, in linear and total FLOPs."""
    r = {v: flops.ratio(geometry, v, split, 576, 128) for v in ("lf-ideal", "lf", "kv", "pc")}
    for kind in ("linear", "total"):
        assert r["lf-ideal"][kind] < r["lf"][kind] < r["kv"][kind] < 1.0 < r["pc"][kind]


def test_grouped_query_attention_and_table_rows():
    gqa = flops.Geometry(32, 4096, 14336, 32, kv_heads=8)
    assert gqa.kv_dim == 1024 and gqa.linear_flops() < flops.Geometry(32, 4096, 14336, 32).linear_flops()
    rows = flops.table(G7, 18, 576, 128)
    assert [r["variant"] for r in rows] == ["vanilla", "lf", "lf-ideal", "kv", "pc"]


def test_decode_cost_shrinks_only_in_attention():
    plan = make_plan(32, 18, "lf")
    routed, vanilla = flops.decode_cost(G7, plan, 576, 128), flops.decode_cost(G7, None, 576, 128)
    assert routed.linear == vanilla.linear and routed.attention < vanilla.attention


def test_geometry_from_a_config():
    from transformers import LlamaConfig

    g = flops.Geometry.of(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=48))
    assert (g.num_layers, g.q_dim, g.kv_dim, g.vocab) == (6, 64, 32, 48)


def test_bad_split_is_a_toolkit_error():
    with pytest.raises(ToolkitError):
        flops.ratio(G7, "lf", 31, 576, 128)


@pytest.mark.parametrize("variant", routing.VARIANTS)
def test_the_flop_model_counts_sliding_windows_in_original_positions(variant):
    """routing.flops' attention pairs == pairs counted from explicit masks (image first, then text; a query sees
    at most `window` keys in ORIGINAL positions), prefill and decode, on the fixture's layer pattern."""
    g = flops.Geometry.of(gemma_config().text_config)
    assert g.window == WINDOW and g.sliding == tuple(t == "sliding_attention" for t in LAYER_TYPES)
    image, text = 20, 13
    n = image + text
    plan = make_plan(g.num_layers, 2, variant, fusion_layers=0 if variant == "lf-ideal" else 1)  # Gemma's split 2
    idx = torch.arange(n)
    img = idx < image

    def count(layer: int, queries, keys) -> int:
        seen = idx[None, :] <= idx[:, None]
        if g.window_of(layer) is not None:
            seen &= idx[None, :] > idx[:, None] - g.window_of(layer)
        return int((seen & queries[:, None] & keys[None, :]).sum())

    everything = torch.ones(n, dtype=torch.bool)
    want = sum(count(j, everything, everything) for j in [*plan.shallow, *plan.fusion])
    want += sum(count(j, img, img) for j in plan.side_sources)
    for j in plan.deep:
        want += {"text_only": count(j, ~img, ~img), "reset": count(j, everything, everything),
                 "kv_only": count(j, ~img, everything)}[plan.deep_mode]
    assert flops.prefill_cost(g, plan, image, text).attention == want * g.pair_flops()
    vanilla = sum(count(j, everything, everything) for j in range(g.num_layers))
    assert flops.prefill_cost(g, None, image, text).attention == vanilla * g.pair_flops()
    decode = sum(min(WINDOW if g.window_of(j) else n + 1, text + 1 if plan.layout(j) == "text" else n + 1)
                 for j in range(g.num_layers))
    assert flops.decode_cost(g, plan, image, text).attention == decode * g.pair_flops()


# ---------------------------------------------------------------- the train-step FLOP model

G = flops.Geometry(num_layers=4, hidden=8, intermediate=16, heads=2, vocab=10)


def test_train_step_cost_by_hand():
    """4 layers, s=2, K=1, d_v=1 (shallow 0-1, deep 2, fusion 3, side from 2); 2 image + 3 text tokens, 2 labelled.
    Per token-layer: 2(8*8 + 8*8 + 3*8*16) + 2*2*8*8 = 1280 linear FLOPs; per (query, key) pair 4*8 = 32; head 2*8*10
    = 160 per labelled position. Backward: 2x forward for the side branch (its weights), 1x the linear part of
    frozen layers the gradient passes, 2x attention wherever the gradient passes, 1x the head."""
    f, pair, head = 1280, 32, 160
    n, i, t = 5, 2, 3
    full, img, txt = n * (n + 1) // 2, i * (i + 1) // 2, t * (t + 1) // 2  # causal pairs: 15, 3, 6

    def cost(variant):
        return flops.train_step_cost(G, make_plan(4, 2, variant), i, t, labelled=2)

    side_fwd = i * f + img * pair
    fusion_fwd = n * f + full * pair
    # LF: forward = shallow 2 layers + deep (text only) + fusion + side + head
    lf_fwd = 2 * (n * f + full * pair) + (t * f + txt * pair) + fusion_fwd + side_fwd + 2 * head
    lf_bwd = 2 * side_fwd + (n * f + 2 * full * pair) + 2 * head
    assert cost("lf").forward == lf_fwd and cost("lf").backward == lf_bwd
    # PC: deep at full length, its backward like the fusion layer's
    pc_fwd = 2 * (n * f + full * pair) + fusion_fwd + fusion_fwd + side_fwd + 2 * head
    pc_bwd = 2 * side_fwd + 2 * (n * f + 2 * full * pair) + 2 * head
    assert cost("pc").forward == pc_fwd and cost("pc").backward == pc_bwd
    # KV: the deep layer runs text in full, image tokens only project k/v (2*2*8*8 = 256 each); text queries see all
    kv = 256
    kv_deep_pairs = full - img
    kv_fwd = 2 * (n * f + full * pair) + (t * f + i * kv + kv_deep_pairs * pair) + fusion_fwd + side_fwd + 2 * head
    kv_bwd = 2 * side_fwd + (t * f + i * kv + 2 * kv_deep_pairs * pair) + (n * f + 2 * full * pair) + 2 * head
    assert cost("kv").forward == kv_fwd and cost("kv").backward == kv_bwd
    assert cost("lf").total == lf_fwd + lf_bwd
    assert flops.train_step_ratio(G, "lf", 2, i, t, labelled=2) == pytest.approx((lf_fwd + lf_bwd) / (pc_fwd + pc_bwd))
    assert flops.train_step_ratio(G, "pc", 2, i, t, labelled=2) == 1.0


def test_train_step_forward_is_the_prefill_cost_with_the_head_at_labelled_positions():
    """At a real geometry with sliding windows (Gemma 3 4B) and at LLaVA-7B, every variant."""
    from saturation.core.geometry import geometry_config

    for geo in (flops.LLAVA_15_7B, flops.Geometry.of(geometry_config("gemma-3-4b").text_config)):
        for variant in ("lf", "pc", "kv"):
            plan = make_plan(geo.num_layers, 10, variant)
            step = flops.train_step_cost(geo, plan, 576, 40, labelled=8)
            assert step.forward == pytest.approx(flops.prefill_cost(geo, plan, 576, 40, logit_positions=8).total)
            assert step.groups["shallow"][1] == 0 and step.groups["side"][1] == 2 * step.groups["side"][0]
    # 7B, s=18, 576 image + 64 text: in token-layers of linear work (attention ~1% here), LF = 19n + i + 13t forward
    # + 2i + n backward, PC = 32n + i forward + 2i + 14n backward (the rough 0.43 charged 2x for frozen layers)
    n, i, t = 640, 576, 64
    by_hand = (19 * n + i + 13 * t + 2 * i + n) / (32 * n + i + 2 * i + 14 * n)
    assert flops.train_step_ratio(flops.LLAVA_15_7B, "lf", 18, i, t, labelled=8) == pytest.approx(by_hand, abs=0.005)


def test_train_step_cost_refuses_lf_ideal():
    with pytest.raises(ValueError, match="no gradient"):
        flops.train_step_cost(G, make_plan(4, 2, "lf-ideal", fusion_layers=0), 2, 3, labelled=2)


# ---------------------------------------------------------------- the peers' published FLOP figures (their conventions)

G13 = flops.LLAVA_15_13B


def test_fastv_eq5_by_hand():
    """Eq. 5 written out in integers at 7B (T=32, d=4096, m=11008, n = 36 system + 576 image tokens)."""
    n, d, m = 612, 4096, 11008
    assert flops.fastv_eq5(G7, n) == 32 * (4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m)
    pruned = 2 * (4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m) + 30 * (4 * 324 * d**2 + 2 * 324**2 * d + 2 * 324 * d * m)
    assert flops.fastv_eq5_pruned(G7, n, k=2, r=0.5) == pruned  # K=2, R=50%: 612 - 288 = 324 tokens after layer 2


@pytest.mark.parametrize(("geometry", "published"), [(G7, 99.3), (G13, 154.6)])
def test_fastv_published_vanilla_tflops(geometry, published):
    """FastV's vanilla LLaVA-1.5 figures (99.3 / 154.6 "TFLOPs") are one layer's Eq. 5 bracket at n = 36 + 576 in
    1e9 multiply-adds: no question tokens (one more token already reads 99.5 / 154.9), no factor T."""
    assert round(flops.fastv_reported(geometry), 1) == published
    assert round(flops.fastv_reported(geometry, flops.FASTV_SYSTEM_TOKENS + flops.LLAVA_IMAGE_TOKENS + 1), 1) != published
    assert flops.fastv_eq5(geometry, 612) == pytest.approx(geometry.num_layers * published * 1e9, rel=1e-3)


def test_fastv_published_ratios():
    """FastV's README: 7B K=3 R=50% runs at "FLOPS=57%"; its abstract: a 45% FLOP reduction at 13B (its title's
    K=2, R=50%). Both need the pruned layers at n - R·576 (only image tokens go): pruning R of all 612 tokens
    would read 54% and 48%."""
    assert round(100 * flops.fastv_eq5_ratio(G7, k=3, r=0.5)) == 57
    assert round(100 * (1 - flops.fastv_eq5_ratio(G13, k=2, r=0.5))) == 45
    all_tokens = flops.fastv_eq5_pruned(G7, 612, 3, 0.5, image_tokens=612) / flops.fastv_eq5(G7, 612)
    assert round(100 * all_tokens) == 54


def test_pdrop_published_tflops():
    """PyramidDrop's appendix table (LLaVA-1.5-7B): vanilla 3.82 T, lambda=0.5 with 4 stages ([8,16,24]) 1.78 T: its
    Section 3.1 count over the 576 image tokens only, stages of 8 layers; its "average tokens" is 270 there."""
    schedule = flops.pdrop_schedule(32, 576)
    assert schedule[7:9] == [576, 288] and schedule[-1] == 72
    assert round(flops.pdrop_macs(G7, [576] * 32) / 1e12, 2) == 3.82
    assert round(flops.pdrop_macs(G7, schedule) / 1e12, 2) == 1.78
    assert flops.average_tokens(schedule) == 270


def test_divprune_published_ratio():
    """DivPrune's README: LLaVA 1.5-7B at its default ratio runs at "TFLOP 15%": FastV's Eq. 5, 56 of 576 image
    tokens kept (plus the 36 system tokens), prefill, the LLM only."""
    kept = kept_tokens("prune-pre", 576, 0.098)
    assert kept == 56
    assert round(100 * flops.fastv_eq5(G7, 36 + kept) / flops.fastv_eq5(G7, 612)) == 15


def test_schedule_prefill_cost_is_the_toolkit_count():
    """A constant schedule is the vanilla prefill (LLaVA-7B and Gemma 3's windows), and pre-LLM pruning priced by
    `prefill_cost` is the constant schedule at the kept count; a pyramid costs less than its first stage."""
    gemma = flops.Geometry.of(gemma_config().text_config)
    for g, image, text in ((G7, 576, 128), (gemma, 20, 13)):
        assert flops.schedule_prefill_cost(g, [image] * g.num_layers, text) == flops.prefill_cost(g, None, image, text)
    plan = make_plan(32, 0, "prune-pre", keep=56 / 576)
    assert flops.prefill_cost(G7, plan, 576, 128).total == pytest.approx(
        flops.schedule_prefill_cost(G7, [56] * 32, 128).total)
    pyramid = flops.schedule_prefill_cost(G7, flops.pdrop_schedule(32, 576), 128)
    assert pyramid.total < flops.prefill_cost(G7, None, 576, 128).total
    with pytest.raises(ValueError, match="one image-token count per layer"):
        flops.schedule_prefill_cost(G7, [576] * 31, 128)
