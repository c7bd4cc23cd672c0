"""FastV as its authors wrote it: ``fastv@K:R=50%`` drops the share R of the image tokens that layer K-1's attention
ranks lowest, R in FastV's own notation (its scripts: rank = (1 - R) * 576).

References are written from the published rules on an eager model's own attention (``output_attentions=True``,
layer K-1, head mean): ``rank=last`` the last prompt token's row (FastV's code), ``rank=all`` every other token's
(the paper's sentence), ``rank=text`` the text rows' mean (the toolkit's rule before). They are checked on the
embedded model (9 image tokens, held-out shapes prompts) and on a random tiny LLaVA with LLaVA-1.5's 576 image
tokens (CLIP 336 / patch 14), left-padded; `routing.kept_image_tokens` is the routed model's own recorded choice.
"""

from __future__ import annotations

import json

import pytest
import torch
from routing_fixtures import (
    assert_informative,
    assert_keeps_the_top,
    batch_576,
    decode_step_logits,
    fastv_reference_scores,
    llava_576,
    make_batch,
    perturb_side,
    pinned_fastv,
    tiny_llava,
    without_labels,
)

import routing
from saturation.core.adapters import adapter_for, position_ids_from_mask
from saturation.core.data import PromptFormat, collate, encode_prompt, read_records
from saturation.core.errors import ToolkitError
from saturation.core.loading import DATA_SAMPLES, load_model

pytestmark = pytest.mark.hf_seam  # an eager model's attentions are HF's

IMAGE = 4  # image token id of tiny_llava_config
RANKS = ("last", "all", "text")


def eager_scores(eager, batch: dict, layer: int, rank: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference scores [B, N] of `rank` at layer `layer` (= K-1) and the image mask, from HF's own forward."""
    mask = batch["attention_mask"]
    with torch.no_grad():
        attn = eager(**without_labels(batch), position_ids=position_ids_from_mask(mask),
                     output_attentions=True).attentions
    image = adapter_for(eager).embed(batch["input_ids"], batch["pixel_values"])[1]
    return fastv_reference_scores(attn[layer].mean(1), mask, image, rank), image


# ---------------------------------------------------------------- the embedded model (9 image tokens)
@pytest.fixture(scope="module")
def embedded():
    model, processor = load_model("tiny")
    eager, _ = load_model("tiny", attn_implementation="eager")
    records = read_records(DATA_SAMPLES / "shapes" / "heldout.json")[:6]
    fmt = PromptFormat.of(model)
    rows = [encode_prompt(r, processor, fmt=fmt) for r in records]
    batch = collate(rows, processor.tokenizer.pad_token_id, padding_side="left")
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1]  # some row is padded
    return model, eager, batch


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("drop", [0.5, 0.75])
@pytest.mark.parametrize("layer", [2, 3])
def test_embedded_model_keeps_what_the_published_rule_keeps(embedded, layer, drop, rank):
    model, eager, batch = embedded
    routed = routing.build(model, routing.parse_plan(f"fastv@{layer}:R={100 * drop:g}%,rank={rank}", model))
    scores, image = eager_scores(eager, batch, layer - 1, rank)
    assert_keeps_the_top(routing.kept_image_tokens(routed, **batch), scores, image, drop)


def test_the_old_rule_is_not_fastvs(embedded):
    """rank=text (what fastv@K:R% did before) and FastV's own rule (rank=last) choose other tokens."""
    model, _, batch = embedded
    kept = {rank: routing.kept_image_tokens(routing.build(model, routing.parse_plan(
        f"fastv@2:R=50%,rank={rank}", model)), **batch) for rank in ("text", "last")}
    assert any(not torch.equal(a, b) for a, b in zip(kept["text"], kept["last"]))


# ---------------------------------------------------------------- LLaVA-1.5's 576 image tokens, random tiny widths
@pytest.fixture(scope="module")
def big():
    return llava_576("sdpa"), llava_576("eager"), batch_576()


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("drop", [0.5, 0.75])
@pytest.mark.parametrize("layer", [2, 3])
def test_576_image_tokens_keep_what_the_published_rule_keeps(big, layer, drop, rank):
    model, eager, batch = big
    routed = routing.build(model, routing.parse_plan(f"fastv@{layer}:R={100 * drop:g}%,rank={rank}", model))
    kept = routing.kept_image_tokens(routed, **batch)
    assert [len(k) for k in kept] == [round(576 * (1 - drop))] * 3  # 288 / 144, as FastV's scripts
    scores, image = eager_scores(eager, batch, layer - 1, rank)
    assert_keeps_the_top(kept, scores, image, drop)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("spec", ["fastv@2:R=75%", "lf@3+fastv@2:R=50%"])
def test_576_tokens_decode_equals_recomputation(big, spec, rank):
    routed = perturb_side(routing.build(big[0], routing.parse_plan(f"{spec},rank={rank}", big[0])))
    with pinned_fastv(routed):
        new, cached, recomputed = decode_step_logits(routed, big[2], 4)
    assert_informative(new)
    for step, (c, r) in enumerate(zip(cached, recomputed, strict=True)):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")


# ---------------------------------------------------------------- kept_image_tokens for every plan
@pytest.fixture(scope="module")
def small():
    return tiny_llava(layers=6, std=0.2, seed=2)


def test_kept_image_tokens_of_the_other_plans(small):
    batch = make_batch("plain")
    image = batch["input_ids"] == IMAGE
    every = [row.nonzero().squeeze(1) for row in image]
    assert all(torch.equal(a, b) for a, b in zip(routing.kept_image_tokens(routing.build(small, 3), **batch), every))
    # pool writes each image's pooled grid into its first tokens; prune-pre keeps the tower's top [CLS] scores
    pooled = routing.kept_image_tokens(routing.build(small, routing.parse_plan("pool:25%", small)), **batch)
    assert all(torch.equal(p, e[:4]) for p, e in zip(pooled, every))
    scores = adapter_for(small).patch_scores(batch["pixel_values"])
    pre = routing.kept_image_tokens(routing.build(small, routing.parse_plan("prune-pre:25%", small)), **batch)
    for b, (p, e) in enumerate(zip(pre, every)):
        assert torch.equal(p, e[scores[b].topk(4).indices.sort().values])


def test_an_old_fastv_artifact_is_refused_in_one_line(small, tmp_path):
    """Its ratio meant the share KEPT and its ranking the text rows: reread under FastV's R it would flip."""
    routing.build(small, routing.parse_plan("fastv@2:R=75%", small)).save_routing(tmp_path / "r")
    path = tmp_path / "r" / "routing.json"
    manifest = json.loads(path.read_text())
    assert (manifest["drop"], manifest["rank"], manifest["spec"]) == (0.75, "last", "fastv@2:R=75%")
    for key in ("drop", "rank"):
        del manifest[key]
    path.write_text(json.dumps(manifest | {"spec": "fastv@2:25%"}))
    with pytest.raises(ToolkitError, match=r"routing.json: this FastV plan \(fastv@2:25%\) was saved under the old "
                                           r"spelling.*fastv@2:R=75%,rank=text") as err:
        routing.load(small, tmp_path / "r")
    assert "\n" not in str(err.value)
