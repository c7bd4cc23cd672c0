"""The pre-LLM pruners current papers compare against, as their authors wrote them: DivPrune and VisionZip.

References are written here from the published rules, in plain loops over numpy arrays, on what HF's own model
gives (``get_image_features``; the vision tower with ``output_attentions``/``output_hidden_states`` and the keys
recomputed from that layer's input): the embedded ``tiny`` model (9 image tokens, CLIP with [CLS]) and a random
tiny LLaVA at CLIP 336/14 (576 image tokens per image, the authors' setting). Routed logits equal the shorter
prompt built by hand and fed to HF's model as ``inputs_embeds``; cached decoding equals recomputation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_fixtures import family
from routing_fixtures import (
    IMAGE,
    assert_informative,
    decode_step_logits,
    make_batch,
    perturb_side,
    tiny_llava,
    without_labels,
)
from transformers import LlavaForConditionalGeneration

import routing
from routing.plan import parse_spec, plan_from_spec
from saturation.core.adapters import adapter_for, position_ids_from_mask
from saturation.core.errors import ToolkitError
from saturation.core.tiny import tiny_llava_config

hf_seam = pytest.mark.hf_seam  # the tests that hand HF a model's internals; CI runs them on the oldest transformers too


# ---------------------------------------------------------------- models and batches
@pytest.fixture(scope="module")
def embedded():
    from saturation.core.loading import load_model

    return load_model("tiny")[0]


@pytest.fixture(scope="module")
def llava576():
    """A random tiny LLaVA-1.5 with the real image geometry: CLIP at 336 px, patch 14 (576 patches + [CLS])."""
    cfg = tiny_llava_config(40, image_size=336, patch_size=14, vision_hidden=32, vision_layers=3, hidden=64,
                            layers=4, heads=4, kv_heads=2, intermediate=128)
    cfg.text_config.initializer_range = 0.2
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def image_batch(model, rows=((3, 5), (1, 7), (6, 2)), seed: int = 0) -> dict:
    """One image per row between (before, after) text tokens, left-padded; random pixels."""
    n = adapter_for(model).image_tokens(model.config)
    image = adapter_for(model).image_token_id
    seqs = [[1] + list(range(10, 10 + b)) + [image] * n + list(range(20, 20 + a)) for b, a in rows]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(seqs), 3, size, size, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def build(model, spec: str):
    return routing.build(model, routing.parse_plan(spec, model))


# ---------------------------------------------------------------- references (numpy, from the published rules)
def divprune_reference(features: np.ndarray, k: int) -> list[int]:
    """DivPrune: d = 1 - cos; first the token whose nearest OTHER token is farthest; then the token whose minimum
    distance to the chosen ones is largest; sorted."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    d = 1.0 - x @ x.T
    n = len(x)
    if k >= n:
        return list(range(n))
    nearest = [min(d[i, j] for j in range(n) if j != i) for i in range(n)]
    chosen = [int(np.argmax(nearest))]
    while len(chosen) < k:
        score = [min(d[c, j] for c in chosen) if j not in chosen else -np.inf for j in range(n)]
        chosen.append(int(np.argmax(score)))
    return sorted(chosen)


def tower_internals(model, pixel_values):
    """HF's vision tower, eager, with attentions and hidden states; the keys of the layer the projector reads
    recomputed from its input (layer_norm1, k_proj, heads averaged). -> numpy attn [N,H,S,S], hidden, keys."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    previous = model.config.vision_config._attn_implementation
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
            encoder = getattr(tower, "vision_model", tower).encoder  # older transformers wrap it in vision_model
            block = encoder.layers[layer]  # hidden_states[-2] is the output of layers[-2]
            k = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer - 1]))
    finally:
        model.set_attn_implementation({"vision_config": previous})
    heads = model.config.vision_config.num_attention_heads
    k = k.view(*k.shape[:2], heads, -1).mean(2)
    return out.attentions[layer].double().numpy(), out.hidden_states[layer].double().numpy(), k.double().numpy()


def visionzip_reference(attn, hidden, keys, dominant: int, contextual: int):
    """VisionZip for one image (numpy): returns the dominant + contextual vision tokens, before the projector."""
    s = hidden.shape[0]
    cls_row = attn[:, 0, 1:].sum(0)  # summed over heads
    top = sorted(int(i) + 1 for i in np.argsort(-cls_row, kind="stable")[: dominant - 1])
    dom = [0] + top
    rest = [i for i in range(s) if i not in dom]
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    groups = {t: [] for t in targets}
    for j in range(len(rest)):
        if j in groups:
            continue
        sims = [unit[rest[j]] @ unit[rest[t]] for t in targets]
        groups[targets[int(np.argmax(sims))]].append(rest[j])
    merged = [hidden[rest[t]] + (np.mean([hidden[i] for i in groups[t]], axis=0) if groups[t] else 0.0)
              for t in targets]
    return np.stack([hidden[i] for i in dom] + merged), [i - 1 for i in dom] + [rest[t] - 1 for t in targets]


def kept_image_offsets(routed, batch) -> list[list[int]]:
    """Each row's kept image tokens, as offsets into its image (from the routed model's own pruning)."""
    a = adapter_for(routed.base)
    h, image = a.embed(batch["input_ids"], batch["pixel_values"])
    kept, _ = routed._prune_pre(h, image, batch["attention_mask"], batch["pixel_values"], {})
    full = torch.zeros_like(image).reshape(-1).index_fill(0, kept.flat[kept.valid.reshape(-1)], True).view(image.shape)
    return [((full[b] & image[b]).nonzero().squeeze(1) - image[b].nonzero()[0, 0]).tolist() for b in range(len(image))]


def short_prompt_logits(model, batch, image_features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The shorter prompt by hand: each row's text embeddings with its image's (pruned or merged) features in the
    image's place, left-padded, through HF's own forward with ``inputs_embeds``. -> logits and text mask."""
    embed = model.get_input_embeddings()
    rows, texts = [], []
    for b in range(len(batch["input_ids"])):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        image = (ids == adapter_for(model).image_token_id).nonzero().squeeze(1)
        e = embed(ids)
        rows.append(torch.cat([e[: image[0]], image_features[b].to(e.dtype), e[image[-1] + 1:]]))
        texts.append(torch.cat([torch.ones(int(image[0]), dtype=torch.bool), torch.zeros(len(image_features[b]),
                                dtype=torch.bool), torch.ones(len(ids) - int(image[-1]) - 1, dtype=torch.bool)]))
    width = max(len(r) for r in rows)
    h = torch.zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    text = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (r, t) in enumerate(zip(rows, texts)):
        h[b, width - len(r):], mask[b, width - len(r):], text[b, width - len(r):] = r, 1, t
    with torch.no_grad():
        logits = model(inputs_embeds=h, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return logits, text


# ---------------------------------------------------------------- DivPrune
@hf_seam
@pytest.mark.parametrize("which,spec,k", [("embedded", "divprune:keep=50%", 4), ("embedded", "divprune:keep=3", 3),
                                          ("embedded", "divprune", 1), ("llava576", "divprune", 56),
                                          ("llava576", "divprune:keep=25%", 144)])
def test_divprune_keeps_the_authors_max_min_diverse_set(request, which, spec, k):
    model = request.getfixturevalue(which)
    batch = image_batch(model)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        routed = build(model, spec)
        got = kept_image_offsets(routed, batch)
    for b, f in enumerate(features):
        assert routed.plan.kept_tokens(len(f)) == k
        assert got[b] == divprune_reference(f.double().numpy(), k)


@hf_seam
@pytest.mark.parametrize("which,spec", [("embedded", "divprune:keep=50%"), ("llava576", "divprune")])
def test_divprune_is_the_shorter_prompt_through_hf(request, which, spec):
    model = request.getfixturevalue(which)
    batch = image_batch(model)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        routed = build(model, spec)
        logits = routed(**batch).logits
    kept = [f[divprune_reference(f.double().numpy(), routed.plan.kept_tokens(len(f)))] for f in features]
    reference, text_short = short_prompt_logits(model, batch, kept)
    text = batch["attention_mask"].bool() & (batch["input_ids"] != adapter_for(model).image_token_id)
    torch.testing.assert_close(logits[text], reference[text_short], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- VisionZip
@hf_seam
@pytest.mark.parametrize("which,spec", [("embedded", "visionzip:dominant=4,contextual=2"),
                                        ("embedded", "visionzip:dominant=1,contextual=3"),
                                        ("llava576", "visionzip:dominant=54,contextual=10"),
                                        ("llava576", "visionzip:dominant=20,contextual=7")])
def test_visionzip_merges_as_the_authors_and_the_llm_sees_only_those(request, which, spec):
    model = request.getfixturevalue(which)
    batch = image_batch(model)
    routed = build(model, spec)
    options = dict(routed.plan.prune_args)
    attn, hidden, keys = tower_internals(model, batch["pixel_values"])
    merged, sources = zip(*(visionzip_reference(attn[i], hidden[i], keys[i], options["dominant"],
                                                options["contextual"]) for i in range(len(attn))))
    with torch.no_grad():
        features = [model.model.multi_modal_projector(torch.tensor(m, dtype=torch.float32)) for m in merged]
        a = adapter_for(model)
        h, image = a.embed(batch["input_ids"], batch["pixel_values"])
        kept, h = routed._prune_pre(h, image, batch["attention_mask"], batch["pixel_values"], {})
        logits = routed(**batch).logits
    m = options["dominant"] + options["contextual"]
    short, short_image = kept.take(h), kept.take(image)
    starts = image.int().argmax(1)
    origin = kept.sources().view(short_image.shape) % image.shape[1]  # flat [B*N] -> positions in the row
    for b in range(len(image)):
        assert int(short_image[b].sum()) == m == routed.plan.kept_tokens(int(image[b].sum()))
        torch.testing.assert_close(short[b][short_image[b]], features[b], rtol=1e-5, atol=1e-5)
        # kept_image_tokens' report: dominant patches at their own position, contextual at their target's, [CLS]
        # at the image's first
        expected = [int(starts[b]) + max(s, 0) for s in sources[b]]
        assert origin[b][short_image[b]].tolist() == expected
    reported = routing.kept_image_tokens(routed, **batch)  # the public name reports the same positions, as a set
    assert [r.tolist() for r in reported] == [
        sorted({int(starts[b]) + max(s, 0) for s in sources[b]}) for b in range(len(image))]
    reference, text_short = short_prompt_logits(model, batch, features)
    text = batch["attention_mask"].bool() & (batch["input_ids"] != adapter_for(model).image_token_id)
    torch.testing.assert_close(logits[text], reference[text_short], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- decoding, composition
@pytest.fixture(scope="module")
def sharp():
    """The routing fixtures' tiny LLaVA (16 image tokens an image, 6 layers) whose greedy decoding is informative."""
    return tiny_llava(layers=6, std=0.2, seed=2)


@hf_seam
@pytest.mark.parametrize("spec", ["divprune:keep=50%", "divprune:keep=3", "visionzip:dominant=4,contextual=3",
                                  "lf@3+divprune:keep=25%", "lf@3+visionzip:dominant=3,contextual=2",
                                  "kv@3+divprune:keep=50%"])
@pytest.mark.parametrize("kind", ["plain", "mixed"])
def test_cached_decoding_equals_recomputation(sharp, spec, kind):
    routed = perturb_side(build(sharp, spec))
    batch = without_labels(make_batch(kind))
    new, cached, recomputed = decode_step_logits(routed, batch, 5)
    assert_informative(new)
    for step, (c, r) in enumerate(zip(cached, recomputed)):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4, msg=f"{spec} step {step}")


@pytest.mark.parametrize("spec,kept", [("lf@3+divprune:keep=25%", 4), ("lf@3+visionzip:dominant=3,contextual=2", 5)])
def test_composed_side_branch_sees_only_the_kept_tokens(sharp, spec, kept):
    routed = build(sharp, spec)
    shapes = []
    handle = routed.side[0].register_forward_hook(lambda _m, args, out: shapes.append(out.shape))
    try:
        grad = routed.train().side_gradient_norm(**make_batch("uniform"))  # the side branch trains on them
    finally:
        handle.remove()
        routed.eval()
    assert shapes == [torch.Size([3, kept, 64])]
    assert grad > 0


def test_divprune_keeps_everything_at_100_percent_bit_for_bit(sharp):
    batch = without_labels(make_batch("mixed"))
    with torch.no_grad():
        routed = build(sharp, "divprune:keep=100%")(**batch).logits
    vanilla = adapter_for(sharp).forward(**batch)
    valid = batch["attention_mask"].bool()
    assert torch.equal(routed[valid], vanilla[valid])


def test_generate_keeps_the_pixels_visionzip_reads(sharp):
    """generate() pre-encodes the images; VisionZip recomputes inside the tower, so it must still get pixels."""
    batch = without_labels(make_batch("plain"))
    out = build(sharp, "visionzip:dominant=4,contextual=3").generate(**batch, max_new_tokens=2, do_sample=False,
                                                                      suppress_tokens=[IMAGE])
    assert out.shape[1] == batch["input_ids"].shape[1] + 2


# ---------------------------------------------------------------- other families
@hf_seam
@pytest.mark.parametrize("name", ["llava_next", "llava_onevision", "gemma3"])
def test_divprune_on_other_families_prunes_each_image_and_decodes_exactly(name):
    fam = family(name)
    model = fam.model(std=0.2)
    batch = fam.batch()
    g = torch.Generator().manual_seed(0)  # the fixtures' one-colour pictures make every patch alike: tie everywhere
    batch["pixel_values"] = batch["pixel_values"] + torch.randn(batch["pixel_values"].shape, generator=g)
    routed = build(model, "divprune:keep=50%")
    a = adapter_for(model)
    kw = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        e = a.encode(batch["input_ids"], batch["pixel_values"], **kw)
        kept, _ = routed._prune_pre(e.inputs_embeds, e.image_mask, batch["attention_mask"], batch["pixel_values"], kw)
    from routing.prepruners import image_runs

    flat = e.inputs_embeds.reshape(-1, e.inputs_embeds.shape[-1])
    chosen = set(kept.flat[kept.valid.reshape(-1)].tolist())
    for run in image_runs(e.image_mask):  # every image (NeXT: crops and newlines together) pruned on its own
        expected = divprune_reference(flat[run].double().numpy(), routed.plan.kept_tokens(len(run)))
        assert sorted(i for i, p in enumerate(run.tolist()) if p in chosen) == expected
    # the LLM sees the shorter prompt: HF's own forward on it (Gemma: each image's kept tokens one block, from
    # token_type_ids of the shorter prompt; without them this fails)
    short, short_image, mask = kept.take(e.inputs_embeds), kept.take(e.image_mask), kept.valid.long()
    blocks = {"token_type_ids": short_image.long()} if name == "gemma3" else {}
    with torch.no_grad():
        reference = model(inputs_embeds=short, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          **blocks).logits
        logits = routed(**batch).logits
    text = batch["attention_mask"].bool() & ~e.image_mask
    torch.testing.assert_close(logits[text], reference[kept.valid & ~short_image], rtol=1e-4, atol=1e-4)
    new, cached, recomputed = decode_step_logits(routed, batch, 3, suppress=fam.suppressed(model))
    for step, (c, r) in enumerate(zip(cached, recomputed)):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4, msg=f"{name} step {step}")


@pytest.mark.parametrize("name,spec,message", [
    ("llava_onevision", "visionzip", r"no \[CLS\] token"), ("gemma3", "visionzip", r"no \[CLS\] token"),
    ("qwen2_5_vl", "visionzip", r"no \[CLS\] token"), ("qwen3_vl", "divprune", "positions read the image grid"),
    ("qwen2_5_vl", "lf@2+divprune:keep=50%", "positions read the image grid"),
    ("llava_next", "visionzip:dominant=4,contextual=2", "anyres crops"),
])
def test_unsupported_families_are_refused_from_the_config(name, spec, message):
    config = family(name).config()
    with pytest.raises(ToolkitError, match=message) as err:
        routing.parse_plan(spec, config)  # before any weight is loaded
    assert "\n" not in str(err.value)


def test_build_refuses_them_too():
    model = family("gemma3").model()
    plan = plan_from_spec(parse_spec("visionzip"), 6, None)
    with pytest.raises(ToolkitError, match=r"no \[CLS\] token"):
        routing.build(model, plan)


# ---------------------------------------------------------------- the plan's grammar
@pytest.mark.parametrize("spec", ["divprune:keep=9.8%", "divprune:keep=56", "divprune:keep=50%",
                                  "visionzip:dominant=54,contextual=10", "visionzip:dominant=4,contextual=2",
                                  "lf@3+divprune:keep=50%", "kv@4+visionzip:dominant=4,contextual=2",
                                  "pc@3+divprune:keep=7"])
def test_specs_and_manifests_round_trip(spec):
    plan = plan_from_spec(parse_spec(spec), 6, 3)
    assert plan.spec == spec
    assert routing.RoutingPlan.from_manifest(plan.to_manifest()) == plan
    assert plan_from_spec(parse_spec(plan.spec), 6, 3) == plan


def test_defaults_are_the_authors():
    divprune = plan_from_spec(parse_spec("divprune"), 32, None)
    assert divprune.spec == "divprune:keep=9.8%" and divprune.kept_tokens(576) == 56
    visionzip = plan_from_spec(parse_spec("visionzip"), 32, None)
    assert visionzip.spec == "visionzip:dominant=54,contextual=10" and visionzip.kept_tokens(576) == 64
    assert plan_from_spec(parse_spec("visionzip:contextual=20"), 32, None).kept_tokens(576) == 74
    assert plan_from_spec(parse_spec("divprune:keep=600"), 32, None).kept_tokens(576) == 576
    assert "keep=56" in plan_from_spec(parse_spec("lf@6+divprune:keep=56"), 32, None).describe()


@pytest.mark.parametrize("spec,message", [
    ("divprune:50%", "explicit options"), ("divprune:keep=0.5", "share with %"), ("divprune:keep=0%", r"\(0%, 100%\]"),
    ("divprune:keep=150%", r"\(0%, 100%\]"), ("divprune:keep=0", "integer >= 1"), ("divprune:ratio=5%", "takes keep="),
    ("divprune:keep=5%,keep=6%", "takes keep="), ("divprune@2:keep=5%", "takes no layer"),
    ("visionzip:dominant=0,contextual=10", "integer >= 1"), ("visionzip:dominant=5.5", "token counts"),
    ("visionzip:keep=5%", "takes dominant="), ("visionzip:dominant=4,contextual=", "takes dominant="),
    ("lf@3+divprune:keep=abc", "takes keep="), ("divprune+lf@3", "cannot read plan"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(ToolkitError, match=message) as err:
        plan_from_spec(parse_spec(spec), 6, 3)
    assert "\n" not in str(err.value)


def test_visionzip_refuses_a_budget_larger_than_the_image(embedded):
    batch = image_batch(embedded)
    with pytest.raises(ToolkitError, match="need at least 10 patches"):
        build(embedded, "visionzip:dominant=8,contextual=3")(**batch)


# ---------------------------------------------------------------- routing compare
def test_compare_lists_keyed_plans_whose_options_hold_commas():
    from routing.jobs.compare import parse_plans

    plans = "vanilla,visionzip:dominant=54,contextual=10,divprune:keep=9.8%,lf@3+divprune:keep=56"
    assert [p["text"] for p in parse_plans(plans)] == ["vanilla", "visionzip:dominant=54,contextual=10",
                                                       "divprune:keep=9.8%", "lf@3+divprune:keep=56"]


def test_compare_runs_them_on_the_embedded_model(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from cli import routing_app

    plans = "vanilla,divprune:keep=50%,visionzip:dominant=4,contextual=2"
    result = CliRunner().invoke(routing_app, ["compare", "--plans", plans, "--n", "4", "--train-steps", "2",
                                              "--repeats", "1", "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "cmp" / "frontier.csv").set_index("plan")
    assert table["accuracy"].notna().all()
    flops = table["flops_ratio"]
    assert flops["divprune:keep=50%"] < 1 and flops["visionzip:dominant=4,contextual=2"] < 1
    assert table.loc["visionzip:dominant=4,contextual=2", "params"] == "dominant=4,contextual=2"


def test_compare_geometry_refuses_visionzip_it_has_no_pixels(tmp_path):
    from typer.testing import CliRunner

    from cli import routing_app

    result = CliRunner().invoke(routing_app, ["compare", "--geometry", "tiny", "--plans",
                                              "vanilla,visionzip:dominant=4,contextual=2", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "real pixels" in result.output


@pytest.mark.parametrize("spec", ["divprune:keep=50%", "visionzip:dominant=4,contextual=2"])
def test_save_plan_then_eval_and_generate_take_it(embedded, tmp_path, spec):
    """`routing save-plan` writes the keyed plan; `routing.load` rebuilds it; eval and generate run it (real
    pixels through the processor, generate() pre-encoding the images)."""
    import json

    from typer.testing import CliRunner

    from cli import routing_app
    from saturation.core.data import read_records
    from saturation.core.loading import DATA_SAMPLES

    runner = CliRunner()
    saved = runner.invoke(routing_app, ["save-plan", "--out", str(tmp_path / "plan"), "--plan", spec])
    assert saved.exit_code == 0, saved.output
    assert json.loads((tmp_path / "plan" / "routing.json").read_text())["spec"] == spec
    assert routing.load(embedded, tmp_path / "plan").plan == routing.parse_plan(spec, embedded)
    out = runner.invoke(routing_app, ["eval", "--routing", str(tmp_path / "plan"), "--n", "4"])
    assert out.exit_code == 0, out.output
    image = read_records(DATA_SAMPLES / "shapes" / "heldout.json")[0].image
    gen = runner.invoke(routing_app, ["generate", "--routing", str(tmp_path / "plan"), "--image", str(image),
                                      "--prompt", "what colour is the circle?"])
    assert gen.exit_code == 0, gen.output


def test_a_training_run_knows_its_keyed_options():
    """Resuming `routing train --plan lf@3+divprune:keep=7` in a run of keep=3 would mix two runs: refused."""
    from types import SimpleNamespace

    from routing.jobs.runs import _differences, run_identity

    opts = SimpleNamespace(learning_rate=1e-4, seed=0, batch_size=2)
    ids = [run_identity("tiny", plan_from_spec(parse_spec(s), 6, 3), opts) for s in
           ("lf@3+divprune:keep=3", "lf@3+divprune:keep=7", "lf@3+divprune:keep=3")]
    assert _differences(ids[0], ids[1]) == ["--plan {'count': 3} (now {'count': 7})"]
    assert _differences(ids[0], ids[2]) == []
    from routing.jobs.train import default_out

    plan = plan_from_spec(parse_spec("lf@3+visionzip:dominant=4,contextual=2"), 6, 3)
    assert default_out("tiny", "lf", 3, plan).name == "lf-s3_visionzip-dominant4-contextual2"
