"""The plan is the object: `routing.parse_plan` reads every spec the command line takes, once, against the model;
`routing.build(model, plan)` routes along it (as the older `build(model, split, ...)` does); `to_manifest` /
`from_manifest` write and read it as a saved artifact's ``routing.json`` does."""

from __future__ import annotations

import json
import re

import pytest
import torch

import routing
from routing import RoutingPlan, parse_plan
from routing.plan import ALL_VARIANTS, make_plan, parse_spec, split_specs
from saturation.core.data import PromptFormat, collate, encode_prompt, read_records
from saturation.core.errors import ToolkitError
from saturation.core.loading import DATA_SAMPLES, load_config, load_model

SPLIT = 5  # fills a spec written without @S

# spec -> (variant, split, fusion_layers, side_depth, prune, prune_layer, keep) on the 12-layer embedded model;
# FastV's R is the share DROPPED (its own notation): keep = 1 - R
SPECS = {
    "lf@6": ("lf", 6, 1, 1, None, 0, 1.0),
    "pc@6": ("pc", 6, 1, 1, None, 0, 1.0),
    "kv@6": ("kv", 6, 1, 1, None, 0, 1.0),
    "lf-ideal@6": ("lf-ideal", 6, 0, 1, None, 0, 1.0),
    "vtw@6": ("vtw", 6, 0, 0, None, 0, 1.0),
    "fastv@2:R=50%": ("fastv", 12, 0, 0, "fastv", 2, 0.5),
    "fastv@2:R=0.75": ("fastv", 12, 0, 0, "fastv", 2, 0.25),
    "fastv@3:R=75%,rank=all": ("fastv", 12, 0, 0, "fastv", 3, 0.25),
    "prune-pre:25%": ("prune-pre", 12, 0, 0, "prune-pre", 0, 0.25),
    "pool:0.25": ("pool", 12, 0, 0, "pool", 0, 0.25),
    "lf@6+prune-pre:50%": ("lf", 6, 1, 1, "prune-pre", 0, 0.5),
    "lf@6+fastv@2:R=50%": ("lf", 6, 1, 1, "fastv", 2, 0.5),
    "lf@6+fastv@2:R=50%,rank=text": ("lf", 6, 1, 1, "fastv", 2, 0.5),
    "lf": ("lf", SPLIT, 1, 1, None, 0, 1.0),
    "vtw": ("vtw", SPLIT, 0, 0, None, 0, 1.0),
    "lf+pool:50%": ("lf", SPLIT, 1, 1, "pool", 0, 0.5),
}
FIELDS = ("variant", "split", "fusion_layers", "side_depth", "prune", "prune_layer", "keep")


@pytest.fixture(scope="module")
def tiny():
    model, processor = load_model("tiny")
    return model, processor


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def batch(tiny):
    """Two held-out questions of the embedded shapes set, left-padded, as generation feeds them."""
    model, processor = tiny
    records = read_records(DATA_SAMPLES / "shapes" / "heldout.json")[:2]
    fmt = PromptFormat.of(model)
    rows = [encode_prompt(r, processor, fmt=fmt) for r in records]
    return collate(rows, processor.tokenizer.pad_token_id, padding_side="left")


def test_the_embedded_model_has_twelve_layers(model):
    assert model.config.text_config.num_hidden_layers == 12


def test_vanilla_is_no_plan(model):
    assert parse_plan("vanilla", model) is None
    assert parse_plan(" vanilla ", model, split=3) is None


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_reads_as_its_plan(model, spec):
    plan = parse_plan(spec, model, split=SPLIT)
    assert isinstance(plan, RoutingPlan) and plan.num_layers == 12
    assert tuple(getattr(plan, f) for f in FIELDS) == SPECS[spec]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_manifest_round_trip(model, spec):
    plan = parse_plan(spec, model, split=SPLIT)
    manifest = plan.to_manifest()
    assert RoutingPlan.from_manifest(manifest) == plan
    assert RoutingPlan.from_manifest(json.loads(json.dumps(manifest))) == plan  # through the JSON file's types
    assert parse_plan(manifest["spec"], model) == plan  # the spec it writes reads back without --split


@pytest.mark.parametrize("spec", ["lf@6", "fastv@2:R=50%", "lf+pool:50%", "vtw"])
def test_a_config_reads_a_plan_as_its_model_does(model, spec):
    """save-plan and train check the plan before any weights load, from the config alone."""
    assert parse_plan(spec, load_config("tiny"), split=SPLIT) == parse_plan(spec, model, split=SPLIT)


def test_plans_differ_where_their_specs_do(model):
    plans = [parse_plan(s, model, split=SPLIT) for s in SPECS]
    assert len(set(plans)) == len(SPECS)  # SPLIT is not 6: `lf` and `vtw` are other plans than lf@6 and vtw@6
    assert parse_plan("lf", model, split=6) == parse_plan("lf@6", model)
    assert parse_plan("lf@6", model) != parse_plan("lf@7", model)
    assert parse_plan("fastv@2:R=50%", model) != parse_plan("fastv@2:R=75%", model)
    assert parse_plan("fastv@2:R=50%", model) != parse_plan("fastv@2:R=50%,rank=all", model)
    assert parse_plan("fastv@2:R=50%", model) == parse_plan("fastv@2:R=0.5,rank=last", model)


BAD_SPECS = [  # (spec, --split, the refusal); every suggestion a refusal prints must itself parse (below)
    ("lf", None, r"plan 'lf' needs its split: write e.g. lf@6 \(or pass --split S\)"),
    ("lf@11", None, "split 11 is out of range for a 12-layer model: choose 1..10"),
    ("lf@0", None, "split 0 is out of range for a 12-layer model: choose 1..10"),
    ("vtw@12", None, "split 12 is out of range for a 12-layer model with K=0"),
    ("quantize:50%", None, "cannot read plan"),
    ("lf:50%", None, "takes no keep ratio"),
    ("fastv@2", None, "fastv needs R, the share of image tokens dropped"),
    ("fastv:R=50%", None, "fastv needs its layer"),
    ("fastv@12:R=50%", None, "FastV's layer K must be in 1..11"),
    ("fastv@2:25%", None, r"'fastv@2:25%' is the old spelling \(it KEPT 25%\); FastV's R is the share dropped: "
                          r"write fastv@2:R=75%$"),
    ("lf@6+fastv@2:50%", None, r"write lf@6\+fastv@2:R=50%$"),
    ("fastv@2:R=100%", None, r"R \(the share dropped\) must be in \[0, 1\)"),
    ("fastv@2:R=50%,rank=first", None, "unknown FastV rank rule 'first': use one of last, all, text"),
    ("fastv@2:R=50%,keep=5%", None, "fastv takes R .* and rank, not keep"),
    ("fastv@2:R=50%,R=25%", None, "gives 'R' twice"),
    ("fastv@2:R=50%;rank=all", None, "parameters are key=value pairs"),
    ("fastv@2:R=half", None, "'half' is not a ratio"),
    ("fastv@2:R=50%,rank", None, "parameters are key=value pairs"),
    ("prune-pre:rank=all", None, "prune-pre takes a keep ratio"),
    ("prune-pre:150%", None, r"keep ratio R must be in \(0, 1\]"),
    ("lf@3+fastv@5:R=50%", None, "comes after the split 3"),
    ("lf@3+pool@2:50%", None, "takes no layer"),
    ("lf", 40, "split 40 is out of range"),
    # issue 28: ASCII digits only (int() reads ６ and ٦ as 6), numbers of any length, compositions the grammar names
    ("vtw@６", None, "'６' is not an ASCII digit"),
    ("vtw@٦", None, "'٦' is not an ASCII digit"),
    ("prune-pre:５0%", None, "'５' is not an ASCII digit"),
    ("divprune:keep=٥%", None, "'٥' is not an ASCII digit"),
    ("fastv@2:R=٥0%", None, "'٥' is not an ASCII digit"),
    ("vtw@auto:n=٣", None, "'٣' is not an ASCII digit"),
    ("vtw@auto:n=1_0", None, "n must be an integer"),
    ("vtw@auto:eta=1_0", None, "eta must be a number"),
    ("lf@" + "9" * 5000, None, "layer 999999999999... .5000 characters. is far past any model's depth"),
    ("fastv@" + "9" * 5000 + ":R=50%", None, "far past any model's depth"),
    ("pool:" + "9" * 5000 + "%", None, r"keep ratio R must be in \(0, 1\]"),
    ("lf@", None, "'@' is not a layer number"),
    ("lf@x6", None, "'@x6' is not a layer number"),
    ("fastv@2:R=1.2.3%", None, "'1.2.3%' is not a ratio"),
    ("pool:.%", None, "'.%' is not a ratio"),
    ("fastv@2:1.2.3%", None, "'1.2.3%' is not a ratio"),
    ("fastv@2:150%", None, r"old spelling .a kept share, here out of range.*write e.g. fastv@2:R=50%$"),
    ("fastv@2:0%", None, "old spelling .a kept share, here out of range"),
    ("vtw@6+fastv@2:R=50%", None, "after lf/pc/kv/lf-ideal"),
    ("vtw+pool:50%", 5, "after lf/pc/kv/lf-ideal"),
    ("fastv@2:R=50%+pool:50%", None, "after lf/pc/kv/lf-ideal"),
    ("lf@6:50%", None, r"composes after it with \+, e.g. lf@6\+prune-pre:50%"),
    ("vtw@auto", None, "KL search on data: write a layer .e.g. vtw@6."),
]


@pytest.mark.parametrize(("spec", "split", "message"), BAD_SPECS, ids=[b[0][:40] for b in BAD_SPECS])
def test_a_bad_spec_is_one_line(model, spec, split, message):
    with pytest.raises(ToolkitError, match=message) as err:
        parse_plan(spec, model, split=split)
    assert "\n" not in str(err.value)


PLAN_NAMES = "|".join(sorted(("vanilla",) + ALL_VARIANTS, key=len, reverse=True))


def suggestions(message: str) -> list[str]:
    """The specs a refusal suggests: each word that starts with a plan name followed by @, : or + (the user's own
    spec is quoted, 'like this', and left out)."""
    words = (w.strip("`(),;?") for w in message.split())
    return [w.rstrip(".") if not w.endswith("%") else w for w in words
            if not w.startswith("'") and re.match(rf"(?:{PLAN_NAMES})[@:+]", w)]


def test_every_suggestion_a_refusal_prints_parses(model):
    """A refusal that says "write X" or "e.g. X" must name a spec that parses (issue 28: `fastv@2` once suggested
    `fastv:50%`, itself refused); checked over every refusal above and the ones save-plan and train add."""
    from routing.saved import training_free_plan

    messages = []
    for spec, split, _ in BAD_SPECS:
        with pytest.raises(ToolkitError) as err:
            parse_plan(spec, model, split=split)
        messages.append(str(err.value))
    for spec in ("lf@6", "pc@4+pool:50%", "vanilla"):
        with pytest.raises(ToolkitError) as err:
            training_free_plan(spec, model)
        messages.append(str(err.value))
    found = [s for m in messages for s in suggestions(m)]
    assert len(found) >= 20, found  # the extraction sees the suggestions (EXAMPLES alone holds five)
    for suggestion in found:
        parse_spec(suggestion)  # raises on a suggestion that does not parse
    assert suggestions("write lf@S or fastv@K:R=D% (see 'lf@x')") == ["lf@S", "fastv@K:R=D%"]  # would fail above


def test_vtw_takes_no_pruning_in_a_plan_made_from_parts():
    with pytest.raises(ToolkitError, match="vtw takes no pruning"):
        make_plan(12, 6, "vtw", prune="fastv", prune_layer=2, keep=0.5)


def test_k_and_d_v_reach_the_plan(model):
    plan = parse_plan("pc", model, split=4, fusion_layers=2, side_depth=3)
    assert (plan.split, plan.fusion_layers, plan.side_depth) == (4, 2, 3)
    with pytest.raises(ToolkitError, match="with K=2 fusion layer"):
        parse_plan("lf@10", model, fusion_layers=2)


@pytest.mark.parametrize(("spec", "old"), [
    ("lf@6", dict(split=6)),
    ("pc@4", dict(split=4, variant="pc")),
    ("vtw@6", dict(split=6, variant="vtw")),
    ("lf@6+fastv@2:R=50%", dict(split=6, prune="fastv", prune_layer=2, keep=0.5)),
    ("fastv@2:R=75%,rank=all", dict(split=0, variant="fastv", prune_layer=2, keep=0.25, rank="all")),
    ("pool:25%", dict(split=0, variant="pool", keep=0.25)),
])
def test_build_along_a_plan_is_the_older_form(model, batch, spec, old):
    plan = parse_plan(spec, model)
    new = routing.build(model, plan)
    assert new.plan == plan
    with torch.no_grad():
        ours = new(**batch).logits
        theirs = routing.build(model, **old)(**batch).logits
        vanilla = model(**batch).logits
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, vanilla, atol=1e-4)  # the plan changed something: the test can tell them apart


def test_build_takes_the_plan_whole(model):
    plan = parse_plan("lf@6", model)
    with pytest.raises(ToolkitError, match="the plan holds them"):
        routing.build(model, plan, "pc")
    with pytest.raises(ToolkitError, match="the plan holds them"):
        routing.build(model, plan, split=4)
    with pytest.raises(ToolkitError, match="needs a RoutingPlan"):
        routing.build(model)


def test_build_refuses_a_plan_made_for_another_depth(model):
    other = routing.make_plan(6, 3)
    with pytest.raises(ToolkitError, match="plan lf@3 is for a 6-layer model; this one has 12") as err:
        routing.build(model, other)
    assert "\n" not in str(err.value)


def test_the_older_form_still_checks_its_split(model):
    with pytest.raises(ToolkitError, match="split 11 is out of range"):
        routing.build(model, 11)
    assert routing.build(model, split=6).plan == parse_plan("lf@6", model)


@pytest.mark.parametrize("spec", ["lf@6", "lf@4+fastv@2:R=50%", "fastv@3:R=75%", "fastv@3:R=70%,rank=all",
                                  "lf@4+fastv@2:R=25%,rank=text", "vtw@5", "pool:50%"])
def test_a_saved_routing_json_reads_back_as_its_plan(model, spec, tmp_path):
    plan = parse_plan(spec, model)
    routing.build(model, plan).save_routing(tmp_path / "r")
    manifest = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert manifest["spec"] == plan.spec and manifest["format"] == "dpvr-routing/1"
    assert RoutingPlan.from_manifest(manifest) == plan
    assert routing.load(model, tmp_path / "r").plan == plan


def test_a_manifest_from_before_pruning_reads(model):
    """Artifacts written before pruning existed have no prune, prune_layer, keep or spec: they prune nothing."""
    old = {"format": "dpvr-routing/1", "variant": "pc", "split": 3, "fusion_layers": 1, "side_depth": 2,
           "num_layers": 12, "base_model": "x", "base_geometry": {}, "base_fingerprint": [0.1]}
    assert RoutingPlan.from_manifest(old) == parse_plan("pc@3", model, side_depth=2)


def _lf6() -> dict:
    return routing.make_plan(12, 6).to_manifest()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.pop("split"), "lacks split"),
    (lambda m: m.update(split=True), "'split' must be a JSON int, got True"),
    (lambda m: m.update(split="6"), "'split' must be a JSON int"),
    (lambda m: m.update(variant=6), "'variant' must be a JSON str"),
    (lambda m: m.update(split=11), "split 11 is out of range for a 12-layer model"),
    (lambda m: m.update(variant="lf-super"), "unknown routing variant 'lf-super'"),
    (lambda m: m.update(prune="fastv", prune_layer="2", keep=0.5), "malformed pruning"),
    (lambda m: m.update(prune="fastv", prune_layer=9, keep=0.5, drop=0.5, rank="last"), "comes after the split 6"),
    (lambda m: m.update(prune="fastv", prune_layer=2, keep=0.25), r"saved under the old spelling, whose ratio was "
     r"the share KEPT, ranked by the text rows: save it again as fastv@2:R=75%,rank=text \(the same rule\)"),
    (lambda m: m.update(prune="fastv", prune_layer=2, keep=0.25, drop=0.5, rank="last"), "malformed FastV pruning"),
    (lambda m: m.update(prune="fastv", prune_layer=2, keep=0.25, drop=0.75, rank="any"), "unknown FastV rank"),
    (lambda m: m.update(prune="pool", prune_layer=0, keep=0.5, rank="last"), "FastV's ranking rule; pool takes none"),
    (lambda m: m.update(prune="pool", prune_layer=0, keep=2), r"keep ratio R must be in \(0, 1\]"),
    (lambda m: m.update(fusion_layers=0), "needs fusion_layers >= 1"),
])
def test_a_bad_manifest_is_one_line(edit, message):
    manifest = _lf6()
    edit(manifest)
    with pytest.raises(ToolkitError, match=message) as err:
        RoutingPlan.from_manifest(manifest)
    assert "\n" not in str(err.value)


def test_a_manifest_that_is_not_an_object_is_one_line():
    with pytest.raises(ToolkitError, match="JSON object"):
        RoutingPlan.from_manifest(["lf", 6])


@pytest.mark.parametrize("plan", [None, "lf@2+pool:50%"])
def test_one_train_run_makes_its_plan_and_checks_its_options_once(tiny_model_dir, dataset, tmp_path, monkeypatch,
                                                                  plan):
    """`routing train` checks the split (in the plan), its options and its run identity once each, not per stage."""
    import routing.jobs.split as split
    import routing.jobs.train as train
    import routing.plan as plans

    calls = {}

    def counted(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(train, "check_options")
    counted(train, "run_identity")
    counted(plans, "make_plan")
    counted(split, "validate_split")
    summary = train.run_train(train.TrainConfig(model=str(tiny_model_dir), split="2", plan=plan, data=dataset,
                                                out=tmp_path / "run", max_steps=1, save_steps=1, batch_size=2,
                                                device="cpu"), log=lambda _m: None)
    assert calls == {"check_options": 1, "run_identity": 1, "make_plan": 1}
    assert summary["plan"] == (plan or "lf@2")
    assert RoutingPlan.from_manifest(json.loads((tmp_path / "run" / "routing" / "routing.json").read_text())) == \
        routing.make_plan(6, 2, prune="pool" if plan else None, keep=0.5 if plan else 1.0)


def test_fastv_is_written_in_its_authors_terms(model):
    """FastV's R is the share dropped (its scripts: rank = (1-R) * 576); every label says so."""
    plan = parse_plan("lf@6+fastv@2:R=75%", model)
    assert plan.spec == "lf@6+fastv@2:R=75%" and plan.rank == "last" and plan.drop == 0.75
    assert plan.pruning_terms == "K=2, R=75% dropped, rank=last"
    assert "fastv K=2, R=75% dropped, rank=last" in plan.describe()
    assert parse_plan("fastv@2:R=50%,rank=all", model).spec == "fastv@2:R=50%,rank=all"
    manifest = plan.to_manifest()
    assert (manifest["drop"], manifest["rank"], manifest["keep"]) == (0.75, "last", 0.25)
    # FastV keeps round(n (1 - R)) (halves up, at least 1): 576 at R=75% -> 144, 9 at 50% -> 5, 9 at 95% -> 1
    assert [parse_plan(f"fastv@2:R={r}", model).kept_tokens(n) for r, n in
            (("75%", 576), ("50%", 576), ("50%", 9), ("75%", 9), ("95%", 9))] == [144, 288, 5, 2, 1]


def test_a_list_of_specs_keeps_each_specs_parameters():
    assert split_specs("vanilla,fastv@2:R=75%,rank=all,lf@6+fastv@2:R=50%,rank=text,pool:25%") == [
        "vanilla", "fastv@2:R=75%,rank=all", "lf@6+fastv@2:R=50%,rank=text", "pool:25%"]
