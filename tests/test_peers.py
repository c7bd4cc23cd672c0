"""Training-free peers as routing plans (issue 17): VTW, FastV, pre-LLM pruning and pooling, alone and under LF.

References: R = 100% is vanilla bit for bit; VTW is LF-ideal's text path; FastV's kept set is an eager
model's own attention read; FastV and pre-LLM pruning equal slow full-sequence references (a mask over the dropped
keys; the shorter prompt through HF's own forward); every decode step equals recomputation.
"""

from __future__ import annotations

import pytest
import torch
from routing_fixtures import (
    IMAGE,
    assert_informative,
    decode_step_logits,
    fastv_kept,
    layer_mask,
    make_batch,
    perturb_side,
    pinned_fastv,
    tiny_llava,
    without_labels,
)

import routing
from routing.plan import parse_spec, plan_from_spec
from saturation.core.adapters import adapter_for, position_ids_from_mask
from saturation.core.errors import ToolkitError

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=6, std=0.2, seed=2)  # seed 2: every plan decodes informatively (assert_informative)


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava("eager", layers=6, std=0.2, seed=2)


def build(model, spec: str, split: int = 3):
    return routing.build(model, **_kwargs(spec, split))


def _kwargs(spec: str, split: int) -> dict:
    p = parse_spec(spec)
    pruner = p["variant"] in routing.plan.PRUNERS
    return {"split": split if p["split"] is None else p["split"], "variant": p["variant"],
            "prune": None if pruner else p["prune"], "prune_layer": p["prune_layer"], "keep": p["keep"],
            "rank": p["rank"]}


def text_positions(batch) -> torch.Tensor:
    return batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)


@pytest.mark.parametrize("spec", ["fastv@2:R=0%", "prune-pre:100%", "pool:100%", "fastv@1:R=0%"])
@pytest.mark.parametrize("kind", ["plain", "mixed"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keeping_everything_is_vanilla_bit_for_bit(spec, kind, attn):
    model = tiny_llava(attn, layers=6, std=0.2)
    batch = without_labels(make_batch(kind))
    vanilla = adapter_for(model).forward(**batch)
    with torch.no_grad():
        routed = build(model, spec)(**batch).logits
    valid = batch["attention_mask"].bool()
    assert torch.equal(routed[valid], vanilla[valid])


@pytest.mark.parametrize("kind", ["plain", "mixed"])
def test_vtw_is_lf_ideal_with_an_untrained_side_branch(model, kind):
    batch = without_labels(make_batch(kind))
    with torch.no_grad():
        vtw = build(model, "vtw@3")(**batch).logits
        ideal = routing.build(model, 3, "lf-ideal")(**batch).logits
    text = text_positions(batch)
    assert torch.equal(vtw[text], ideal[text])
    assert build(model, "vtw@3").trainable_parameters().trainable == 0


@pytest.mark.parametrize("layer,keep", [(2, 0.5), (1, 0.25), (4, 0.75)])
@pytest.mark.parametrize("kind", ["plain", "mixed"])
def test_fastv_rank_text_keeps_what_an_eager_attention_read_ranks_highest(model, eager_model, layer, keep, kind):
    """rank=text (the toolkit's rule before FastV's own spelling): HF's own eager attention probabilities at layer
    K-1, averaged over heads and text queries, top round(n (1 - R)) image tokens per row."""
    batch = without_labels(make_batch(kind))
    kept = fastv_kept(build(model, f"fastv@{layer}:R={1 - keep},rank=text"), batch)
    mask = batch["attention_mask"]
    with torch.no_grad():
        attn = eager_model(**batch, position_ids=position_ids_from_mask(mask), output_attentions=True).attentions
    probs = attn[layer - 1].mean(1)  # [B, N, N]
    image, text = batch["input_ids"] == IMAGE, text_positions(batch)
    for b in range(len(mask)):
        received = probs[b][text[b]].mean(0)
        columns = image[b].nonzero().squeeze(1)
        budget = max(1, int(keep * len(columns) + 0.5 + 1e-9)) if len(columns) else 0
        expected = set(columns[received[columns].topk(budget).indices].tolist())
        assert set((kept[b] & image[b]).nonzero().squeeze(1).tolist()) == expected
        assert torch.equal(kept[b] & ~image[b], mask[b].bool() & ~image[b])  # every text token stays


def _naive_pruned(model, batch, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """FastV as full-sequence layer loops: after layer K-1 nobody attends to a dropped key; original positions."""
    a = adapter_for(model)
    h, _ = a.embed(batch["input_ids"], batch["pixel_values"])
    pos = position_ids_from_mask(batch["attention_mask"])
    rope = a.rotary_emb(h, pos)
    n = h.shape[1]
    full = torch.ones(n, n, dtype=torch.bool).tril()[None] & batch["attention_mask"].bool()[:, None, :]
    eye = torch.eye(n, dtype=torch.bool)[None]
    with torch.no_grad():
        for i, module in enumerate(a.layers):
            allowed = full if i < layer else full & kept[:, None, :]
            h = module(h, attention_mask=layer_mask(allowed | eye, model), position_ids=pos, position_embeddings=rope)
        return a.unembed(h)


@pytest.mark.parametrize("kind", ["plain", "mixed"])
def test_fastv_equals_a_masked_full_sequence_reference(model, kind):
    batch = without_labels(make_batch(kind))
    routed = build(model, "fastv@2:R=50%")
    kept = fastv_kept(routed, batch)
    with torch.no_grad():
        logits = routed(**batch).logits
    reference = _naive_pruned(model, batch, 2, kept)
    text = text_positions(batch)
    torch.testing.assert_close(logits[text], reference[text], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["prune-pre:25%", "pool:25%", "prune-pre:50%"])
def test_pre_llm_pruning_is_the_shorter_prompt_through_hf(model, spec):
    """The LLM sees only the kept (or pooled) image tokens: HF's own forward on that shorter, left-padded prompt."""
    batch = without_labels(make_batch("plain"))
    routed = build(model, spec)
    a = adapter_for(model)
    h, image = a.embed(batch["input_ids"], batch["pixel_values"])
    kept, h = routed._prune_pre(h, image, batch["attention_mask"], batch["pixel_values"], {})
    short, mask = kept.take(h), kept.valid.long()
    with torch.no_grad():
        reference = model(inputs_embeds=short, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        logits = routed(**batch).logits
    n_image = int(image[0].sum())
    assert int((kept.valid & kept.take(image)).sum(1)[0]) == routed.plan.kept_tokens(n_image) == {
        "prune-pre:25%": 4, "pool:25%": 4, "prune-pre:50%": 8}[spec]
    text_short = kept.valid & ~kept.take(image)
    torch.testing.assert_close(logits[text_positions(batch)], reference[text_short], rtol=1e-4, atol=1e-4)


def test_prune_pre_keeps_the_top_cls_attention_tokens(model):
    batch = without_labels(make_batch("uniform"))
    scores = adapter_for(model).patch_scores(batch["pixel_values"])
    routed = build(model, "prune-pre:25%")
    a = adapter_for(model)
    h, image = a.embed(batch["input_ids"], batch["pixel_values"])
    kept, _ = routed._prune_pre(h, image, batch["attention_mask"], batch["pixel_values"], {})
    full = torch.zeros_like(image).reshape(-1).index_fill(0, kept.flat[kept.valid.reshape(-1)], True).view(image.shape)
    for b in range(len(image)):
        chosen = (full[b] & image[b]).nonzero().squeeze(1) - image[b].nonzero()[0, 0]
        assert set(chosen.tolist()) == set(scores[b].topk(4).indices.tolist())


@pytest.mark.parametrize("spec", ["vtw@3", "fastv@2:R=50%", "prune-pre:25%", "pool:25%", "lf@3+fastv@2:R=50%",
                                  "lf@3+prune-pre:50%", "kv@3+fastv@3:R=75%", "pc@3+pool:25%",
                                  "fastv@2:R=50%,rank=all", "fastv@2:R=50%,rank=text", "lf@3+fastv@2:R=75%,rank=all",
                                  "lf@3+fastv@2:R=50%,rank=text"])
@pytest.mark.parametrize("kind", ["plain", "mixed"])
def test_cached_decoding_equals_recomputation_at_every_step(model, spec, kind):
    routed = perturb_side(build(model, spec))
    batch = without_labels(make_batch(kind))
    with pinned_fastv(routed):
        new, cached, recomputed = decode_step_logits(routed, batch, 5)
    assert_informative(new)
    for step, (c, r) in enumerate(zip(cached, recomputed)):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4, msg=f"{spec} step {step}")


@pytest.mark.parametrize("spec,kept", [("lf@3+prune-pre:25%", 4), ("lf@3+fastv@2:R=50%", 8)])
def test_composed_side_branch_sees_only_kept_tokens_and_trains(model, spec, kept):
    routed = build(model, spec)
    batch = make_batch("uniform")
    shapes = []
    handle = routed.side[0].register_forward_hook(lambda _m, args, out: shapes.append(out.shape))
    try:
        grad = routed.train().side_gradient_norm(**batch)
    finally:
        handle.remove()
        routed.eval()
    assert shapes == [torch.Size([3, kept, 64])]
    assert grad > 0
    opt = torch.optim.AdamW([p for p in routed.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in routed.side.parameters()]
    routed.train()
    loss = routed(**batch).loss
    loss.backward()
    opt.step()
    routed.eval()
    assert any(not torch.equal(b, p) for b, p in zip(before, routed.side.parameters()))


@pytest.mark.parametrize("spec", ["fastv@2:R=50%", "prune-pre:25%", "vtw@3", "lf@3+fastv@2:R=50%",
                                  "fastv@2:R=75%,rank=all", "lf@3+pool:25%"])
def test_every_plan_saves_and_loads(model, tmp_path, spec):
    routed = perturb_side(build(model, spec))
    routed.save_routing(tmp_path / "r")
    loaded = routing.load(model, tmp_path / "r")
    assert loaded.plan == routed.plan and loaded.plan.spec == spec
    batch = without_labels(make_batch("plain"))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, routed(**batch).logits)


def test_untrainable_peers_refuse_training(model):
    batch = make_batch("uniform")
    for spec in ("vtw@3", "fastv@2:R=50%"):
        routed = build(model, spec).train()
        try:
            with pytest.raises(ToolkitError, match="cannot be trained"):
                routed(**batch)
        finally:
            routed.eval()


@pytest.mark.parametrize("spec,message", [
    ("fastv@2", "needs R"), ("fastv:R=50%", "needs its layer"), ("fastv@0:R=50%", "must be in 1..5"),
    ("fastv@2:R=100%", r"must be in \[0, 1\)"), ("pool:150%", r"must be in \(0, 1\]"),
    ("lf@2+fastv@4:R=50%", "after the split"), ("fastv@2:50%", "old spelling .* write fastv@2:R=50%"),
    ("lf:50%", "takes no keep ratio"), ("fastv@2:R=50%+lf", "cannot read plan"), ("lf@3+lf@4", "cannot read plan"),
    ("flash", "cannot read plan"), ("lf@3+pool@2:50%", "takes no layer"), ("lf@x", "cannot read plan"),
])
def test_bad_plans_are_one_line_errors(spec, message):
    with pytest.raises(ToolkitError, match=message) as err:
        plan_from_spec(parse_spec(spec), 6, 3)
    assert "\n" not in str(err.value)


def test_specs_round_trip():
    for spec in ("lf@3", "vtw@3", "fastv@2:R=50%", "prune-pre:25%", "pool:25%", "lf@3+prune-pre:50%",
                 "lf@3+fastv@2:R=50%", "kv@4+pool:25%", "fastv@2:R=75%,rank=all", "lf@3+fastv@1:R=25%,rank=text"):
        assert plan_from_spec(parse_spec(spec), 6, 3).spec == spec
    assert plan_from_spec(parse_spec("vanilla"), 6, 3) is None
    assert plan_from_spec(parse_spec("lf"), 6, 3).split == 3  # no @: the default (recommended) split
    assert plan_from_spec(parse_spec("prune-pre:0.25"), 6, 3).keep == 0.25


def test_the_flop_model_prices_pruning_per_sample():
    from routing.flops import LLAVA_15_7B as g
    from routing.flops import decode_cost, plan_ratios, prefill_cost

    def plan(spec):
        return plan_from_spec(parse_spec(spec), 32, 18)
    # pre-LLM pruning is vanilla on the shorter prompt; keeping everything costs exactly vanilla
    assert prefill_cost(g, plan("prune-pre:25%"), 576, 40) == prefill_cost(g, None, 144, 40)
    assert decode_cost(g, plan("pool:25%"), 576, 40) == decode_cost(g, None, 144, 40)
    assert plan_ratios(g, plan("prune-pre:100%"), [(576, 40)]) == {"prefill": 1.0, "decode": 1.0}
    # FastV: two full layers, then 30 on the kept half; its score read makes R=100% cost a little more than vanilla
    fastv = prefill_cost(g, plan("fastv@2:R=50%"), 576, 40).linear
    assert fastv > (2 * 616 + 30 * 328) * g.linear_flops()
    assert 1.0 < plan_ratios(g, plan("fastv@2:R=0%"), [(576, 40)])["prefill"] < 1.01
    # composition compounds: LF on the pruned half is cheaper than either alone
    both = plan_ratios(g, plan("lf@18+prune-pre:50%"), [(576, 40)])["prefill"]
    assert both < min(plan_ratios(g, plan(s), [(576, 40)])["prefill"] for s in ("lf@18", "prune-pre:50%"))
