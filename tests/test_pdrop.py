"""PyramidDrop (PDrop) as its authors wrote it: ``pdrop[:layers=8/16/24,lambda=0.5]`` drops image tokens in stages.

At each stage layer K_i the image tokens are ranked by the attention of the LAST prompt token, recomputed with layer
K_i's own input norm, q/k projections and RoPE (PDrop's ``rank_layer = layer_idx + 1``), softmax over every key in
fp32, head mean; the top int(N lambda^(i+1)) of the ORIGINAL N stay (sorted), text always stays, and layer K_i on
sees only them, at positions renumbered contiguously (its code: ``position_ids[i, :cur_len] = arange(cur_len)``;
decoding shifts a new token's position down by what was dropped).

The reference below is written from that rule on HF's own modules, one row at a time with no padding: an eager
decoder layer after another, the next layer's q/k recomputed by hand at each stage, the kept rows taken out. It gives
each stage's kept set and the prompt's last logits, which the routed model (sdpa, left-padded batches) must match.
"""

from __future__ import annotations

import json

import pytest
import torch
from family_fixtures import family
from routing_fixtures import (
    assert_informative,
    batch_576,
    decode_step_logits,
    llava_576,
    perturb_side,
    pinned_fastv,
    without_labels,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import routing
from routing import flops
from routing.plan import RoutingPlan, pdrop_default_layers
from saturation.core.data import PromptFormat, collate, encode_prompt, read_records
from saturation.core.errors import ToolkitError
from saturation.core.loading import DATA_SAMPLES, load_model

pytestmark = pytest.mark.hf_seam  # HF's decoder layers, run one at a time

IMAGE = 4  # image token id of tiny_llava_config


# ---------------------------------------------------------------- the reference, from PDrop's published rule
def last_token_image_scores(layer, lm, h: torch.Tensor, pos: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The attention the last token pays each image token at `layer` (its input `h` [n, D]): the layer's own input
    norm, q/k projections and RoPE, softmax over every key in fp32, head mean (PDrop's rank step)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h[None])
    q = attn.q_proj(x).view(1, len(h), -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, len(h), -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, pos[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    weights = (q[:, :, -1:] @ k.transpose(2, 3) * attn.scaling).float().softmax(-1)  # the last token sees every key
    return weights.mean(1)[0, 0][image]


def reference_row(model, embeds: torch.Tensor, image: torch.Tensor, stages: tuple[int, ...], lam: float):
    """One unpadded row through HF's eager decoder layers with PDrop's drops: (kept image positions per stage, as
    indices into the row; the last position's logits)."""
    lm = model.model.language_model
    h, original, image = embeds, torch.arange(len(embeds)), image.clone()
    pos = original  # the positions RoPE reads: renumbered 0..n-1 after every drop
    n_image, kept_per_stage = int(image.sum()), []
    for j, layer in enumerate(lm.layers):
        if j in stages:
            budget = max(1, int(n_image * lam ** (stages.index(j) + 1)))
            score = last_token_image_scores(layer, lm, h, pos, image)
            top = image.nonzero().squeeze(1)[score.topk(budget).indices.sort().values]
            stay = ~image
            stay[top] = True
            h, original, image = h[stay], original[stay], image[stay]
            pos = torch.arange(len(h))
            kept_per_stage.append(original[image].clone())
        n = len(h)
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        rope = lm.rotary_emb(h[None], pos[None])
        h = layer(h[None], attention_mask=causal, position_ids=pos[None], position_embeddings=rope)[0]
    return kept_per_stage, model.lm_head(lm.norm(h))[-1]


def reference(model, eager, batch: dict, stages: tuple[int, ...], lam: float = 0.5):
    """Per row: kept image positions per stage (in the padded frame) and the last logits."""
    with torch.no_grad():
        embeds = eager.model(**without_labels(batch), output_hidden_states=True).hidden_states[0]
        out = []
        for b, valid in enumerate(batch["attention_mask"].bool()):
            offset = int((~valid).sum())  # left padding: original positions count from the first real token
            kept, logits = reference_row(eager, embeds[b][valid], batch["input_ids"][b][valid] == IMAGE, stages, lam)
            out.append(([k + offset for k in kept], logits))
    return out


def check_against_reference(model, eager, batch: dict, spec: str, stages: tuple[int, ...], lam: float = 0.5):
    routed = routing.build(model, routing.parse_plan(spec, model))
    per_stage = routing.kept_image_tokens_per_stage(routed, **batch)
    assert len(per_stage) == len(stages)
    with torch.no_grad():
        logits = routed(**without_labels(batch)).logits[:, -1]
    last = routing.kept_image_tokens(routed, **batch)
    for b, (kept, ref_logits) in enumerate(reference(model, eager, batch, stages, lam)):
        for i, ref in enumerate(kept):
            assert torch.equal(per_stage[i][b], ref), (b, i, per_stage[i][b], ref)
        assert torch.equal(last[b], kept[-1])  # kept_image_tokens: what enters the LAST stage
        torch.testing.assert_close(logits[b], ref_logits, rtol=1e-4, atol=1e-4)
    return per_stage


# ---------------------------------------------------------------- the embedded model (12 layers, 9 image tokens)
@pytest.fixture(scope="module")
def embedded():
    model, processor = load_model("tiny")
    eager, _ = load_model("tiny", attn_implementation="eager")
    records = read_records(DATA_SAMPLES / "shapes" / "heldout.json")[:4]
    fmt = PromptFormat.of(model)
    batch = collate([encode_prompt(r, processor, fmt=fmt) for r in records], processor.tokenizer.pad_token_id,
                    padding_side="left")
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1]  # some row is padded
    return model, eager, without_labels(batch)


def test_embedded_default_stages_keep_what_the_published_rule_keeps(embedded):
    model, eager, batch = embedded
    assert pdrop_default_layers(12) == (3, 6, 9)  # 8/16/24 of 32, scaled
    per_stage = check_against_reference(model, eager, batch, "pdrop", (3, 6, 9))
    assert [len(per_stage[i][0]) for i in range(3)] == [4, 2, 1]  # int(9 * 0.5^i)


def test_embedded_explicit_stages_and_lambda(embedded):
    model, eager, batch = embedded
    per_stage = check_against_reference(model, eager, batch, "pdrop:layers=2/5/8,lambda=0.7", (2, 5, 8), 0.7)
    # of the ORIGINAL 9: int(6.3), int(4.41), int(3.087); stage by stage from the survivors would give 6, 4, 2
    assert [len(per_stage[i][0]) for i in range(3)] == [6, 4, 3]


# ---------------------------------------------------------------- LLaVA-1.5's 576 image tokens, random tiny widths
@pytest.fixture(scope="module")
def big():
    return llava_576("sdpa"), llava_576("eager"), batch_576()


def test_576_image_tokens_keep_what_the_published_rule_keeps(big):
    model, eager, batch = big
    assert pdrop_default_layers(6) == (2, 3, 5)
    per_stage = check_against_reference(model, eager, batch, "pdrop", (2, 3, 5))
    assert [[len(k) for k in stage] for stage in per_stage] == [[288] * 3, [144] * 3, [72] * 3]


@pytest.mark.parametrize("spec", ["pdrop", "lf@4+pdrop:layers=2/3/4", "pc@3+pdrop:layers=1/3", "kv@4+pdrop:layers=2/4"])
def test_576_tokens_decode_equals_recomputation(big, spec):
    routed = routing.build(big[0], routing.parse_plan(spec, big[0]))
    if routed.plan.side_depth:
        routed = perturb_side(routed)
    with pinned_fastv(routed):
        new, cached, recomputed = decode_step_logits(routed, big[2], 4)
    assert_informative(new)
    for step, (c, r) in enumerate(zip(cached, recomputed, strict=True)):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.parametrize("spec", ["pdrop", "lf@9+pdrop"])
def test_embedded_decode_equals_recomputation(embedded, spec):
    routed = routing.build(embedded[0], routing.parse_plan(spec, embedded[0]))
    # each stage's cache holds what it saw (under lf@9 the deep layer 9 caches text, the fusion the last stage's)
    assert [x for x in routed.plan.layouts if x.startswith("kept")] == ["kept", "kept1", "kept2"]
    with pinned_fastv(routed):
        _, cached, recomputed = decode_step_logits(routed, embedded[2], 3)
    assert cached
    for step, (c, r) in enumerate(zip(cached, recomputed)):  # generate may stop at the end token first
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")


def test_stages_drop_from_the_previous_stage_s_survivors(big):
    """Each stage's kept set is inside the one before (text is never dropped; a dropped token never returns)."""
    model, _, batch = big
    per_stage = routing.kept_image_tokens_per_stage(routing.build(model, routing.parse_plan("pdrop", model)), **batch)
    for earlier, later in zip(per_stage, per_stage[1:]):
        for a, b in zip(earlier, later):
            assert set(b.tolist()) <= set(a.tolist())


# ---------------------------------------------------------------- the plan: grammar, round trip, refusals
@pytest.mark.parametrize("spec, layers, lam", [
    ("pdrop", (8, 16, 24), 0.5), ("pdrop:layers=8/16/24,lambda=0.5", (8, 16, 24), 0.5),
    ("pdrop:lambda=25%", (8, 16, 24), 0.25), ("pdrop:layers=4/20", (4, 20), 0.5),
    ("lf@24+pdrop", (8, 16, 24), 0.5), ("kv@26+pdrop:layers=2/10,lambda=0.3", (2, 10), 0.3)])
def test_spec_manifest_plan_round_trip(spec, layers, lam):
    from routing.plan import parse_spec, plan_from_spec
    plan = plan_from_spec(parse_spec(spec), 32, None, spec=spec)
    assert plan.stages == layers and dict(plan.prune_args)["lambda"] == lam
    saved = json.loads(json.dumps(plan.to_manifest()))
    assert saved == plan.to_manifest()  # what a run.json / routing.json compares against reads back equal
    back = RoutingPlan.from_manifest(saved)
    assert back == plan and back.spec == plan.spec
    assert plan_from_spec(parse_spec(plan.spec), 32, None) == plan
    stages = ("kept", *[f"kept{i}" for i in range(1, len(layers))])
    # a stage at the split is the side branch's: the deep layers keep their own layout, the fusion the stage's
    assert [x for x in plan.layouts if x.startswith("kept")] == list(stages)


@pytest.mark.parametrize("spec, words", [
    ("pdrop@8", "layers="), ("pdrop:50%", "layers= and lambda="), ("pdrop:layers=16/8", "increase strictly"),
    ("pdrop:layers=0/8", "in 1..31"), ("pdrop:layers=8/32", "in 1..31"), ("pdrop:lambda=1", "(0, 1)"),
    ("pdrop:lambda=0", "(0, 1)"), ("pdrop:foo=1", "layers= and lambda="), ("pdrop:layers=8/x", "separated by '/'"),
    ("lf@6+pdrop", "after the split 6"), ("lf@20+pdrop:layers=8/16/24", "after the split 20"),
    ("pdrop:layers=8/16,layers=4", "twice"), ("pdrop+lf", "one of"), ("pdrop:layers=8,16,24", "separated by '/'")])
def test_bad_specs_are_one_line(spec, words):
    from routing.plan import parse_spec, plan_from_spec
    with pytest.raises(ToolkitError) as err:
        plan_from_spec(parse_spec(spec), 32, None, spec=spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_bad_manifests_are_one_line():
    manifest = routing.make_plan(32, 0, "pdrop").to_manifest()
    for args in ({"layers": [8, "x"]}, {"layers": [16, 8]}, {"lambda": 2}, {"layers": [8], "ratio": 0.5}):
        with pytest.raises(ToolkitError) as err:
            RoutingPlan.from_manifest(manifest | {"prune_args": args})
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- FLOPs: the schedule is priced
def test_flops_price_pdrop_s_schedule():
    g = flops.Geometry(num_layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
    plan = routing.make_plan(32, 0, "pdrop")
    assert plan.image_schedule(576) == flops.pdrop_schedule(32, 576)  # 576*8, 288*8, 144*8, 72*8
    cost = flops.prefill_cost(g, plan, 576, 128)
    scheduled = flops.schedule_prefill_cost(g, flops.pdrop_schedule(32, 576), 128)
    # the schedule plus the three score reads (each: one layer's q/k over the stage's tokens, one query row)
    reads = sum(2.0 * g.hidden * (g.q_dim + g.kv_dim) * (n + 128) for n in (576, 288, 144))
    assert cost.linear == pytest.approx(scheduled.linear + reads)
    assert cost.attention == pytest.approx(scheduled.attention + sum(2.0 * g.q_dim * (n + 128) for n in (576, 288, 144)))
    decode = flops.decode_cost(g, plan, 576, 128)
    keys = sum(n + 128 + 1 for n in flops.pdrop_schedule(32, 576))
    assert decode.attention == pytest.approx(keys * g.pair_flops())
    under_lf = flops.prefill_cost(g, routing.make_plan(32, 24, "lf", prune="pdrop"), 576, 128)
    assert under_lf.total < flops.prefill_cost(g, routing.make_plan(32, 24, "lf"), 576, 128).total


# ---------------------------------------------------------------- other families
@pytest.mark.parametrize("spec", ["pdrop:layers=2/4", "lf@3+pdrop:layers=1/3"])
def test_gemma_decode_equals_recomputation(spec):
    """Gemma 3's sliding windows and image blocks under PDrop's renumbered positions: the windows read the
    renumbered key positions (`Continuation.key_positions` shifted per layout) at every cached step."""
    gemma = family("gemma3")
    model = gemma.model(std=0.2, seed=1, tie=False)
    routed = routing.build(model, routing.parse_plan(spec, model))
    if routed.plan.side_depth:
        routed = perturb_side(routed)
    routed.generation_config.eos_token_id = None
    with pinned_fastv(routed):
        new, cached, recomputed = decode_step_logits(routed, gemma.batch(), 4, gemma.suppressed(model))
    assert_informative(new)
    for step, (c, r) in enumerate(zip(cached, recomputed, strict=True)):
        torch.testing.assert_close(c, r, rtol=0, atol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_m_rope_families_are_refused_in_one_line(name):
    with pytest.raises(ToolkitError) as err:
        routing.parse_plan("pdrop", family(name).config(layers=12))
    assert "renumbers" in str(err.value) and "\n" not in str(err.value)


def test_saved_artifacts_load_back(embedded, tmp_path):
    """``routing save-plan`` of a pdrop plan, and a trained lf@9+pdrop side branch, load back as the same plan."""
    from routing.saved import load, save_plan
    model = embedded[0]
    plan = routing.parse_plan("pdrop", model)
    save_plan(model, plan, tmp_path / "alone")
    assert load(model, tmp_path / "alone").plan == plan
    routed = routing.build(model, routing.parse_plan("lf@9+pdrop", model))
    routed.save_routing(tmp_path / "lf")
    assert load(model, tmp_path / "lf").plan == routed.plan
