"""The FLOP model: the paper's Table 1 at 7B, the order of the variants for any geometry, Gemma 3's sliding windows
counted in original positions, and the train step's cost (issue 18 §2)."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import LAYER_TYPES, WINDOW, gemma_config

import routing
from routing import flops
from routing.plan import make_plan
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
