"""The embedded model's text stage and LLaVA staging (saturation.shapes.text_stage, saturation.shapes.staged)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from saturation.core.data import IGNORE_INDEX, Record, encode_record, read_records
from saturation.core.errors import ToolkitError
from saturation.shapes import data, world
from saturation.shapes.staged import STAGED_RECIPES, StagedRecipe, answer_loss, image_batch, load_text_lm, train_staged
from saturation.shapes.text_stage import (
    TEXT_RECIPES,
    TextCodec,
    TextRecipe,
    batch_at,
    build_lm,
    describe,
    scene_qas,
    text_accuracy,
    train_text,
)
from saturation.shapes.train import Recipe, build_model, build_processor

SMALL = TextRecipe(hidden=32, layers=2, heads=2, intermediate=64, batch=4, steps=6, warmup=2, log_every=1,
                   eval_every=3, checkpoint_every=2, curriculum=((2, 1),))


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def codec(processor):
    return TextCodec(processor.tokenizer)


def test_text_world_uses_the_image_models_template(processor, codec):
    """A text conversation is the image conversation's ids with the image tokens replaced by the scene's words,
    labelled on the same answer tokens: the LM learns in the format the image stage feeds it."""
    scene = world.random_scene(random.Random(3))
    qas = [(q, a) for q, a, _ in scene_qas(scene, random.Random(4), 3)]
    image = encode_record(Record("r", Path("x.png"), tuple(qas)), processor, image=world.render(scene, random.Random(5)))
    ids, labels, _ = codec.example(describe(scene), qas)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    words = list(codec.ids(describe(scene)))
    want_ids, want_labels = [], []
    for i, label in zip(image["input_ids"].tolist(), image["labels"].tolist()):
        if i != image_id:
            want_ids.append(i)
            want_labels.append(label)
        elif not want_ids or want_ids[-1] != -1:
            want_ids.append(-1)
            want_labels.append(IGNORE_INDEX)
    k = want_ids.index(-1)
    assert ids == want_ids[:k] + words + want_ids[k + 1:]
    assert labels == want_labels[:k] + [IGNORE_INDEX] * len(words) + want_labels[k + 1:]
    answers = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert answers == [t for q, a in qas for t in (*codec.ids(a), processor.tokenizer.eos_token_id)]


def test_batches_are_seeded_by_step_and_never_hold_held_out_scenes(codec):
    exclude = data.held_out_keys()
    recipe = replace(TEXT_RECIPES["answers"], batch=8)
    a, b = batch_at(7, recipe, codec, exclude), batch_at(7, recipe, codec, exclude)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], batch_at(8, recipe, codec, exclude)["input_ids"])
    # the curriculum: one object per scene before step 300 ("." closes each object's phrase)
    dot = codec.ids(".")[0]
    first_turn = [row[: row.tolist().index(codec.ids("?")[0])] for row in a["input_ids"]]
    assert all(int((row == dot).sum()) == 1 for row in first_turn)
    # scenes of held-out questions are excluded (a held-out scene drawn is redrawn)
    held = read_records(data.SAMPLES_DIR / "heldout.json", check_images=False)
    assert world.scene_key(tuple(world.Obj(**o) for o in held[0].extra["objects"])) in exclude


def test_existence_answers_are_not_paired_within_a_conversation():
    """Conversations with two existence questions are not always one yes and one no (the shortcut tiny-clean
    learned); each answer is drawn on its own."""
    rng = random.Random(0)
    pairs = []
    for _ in range(400):
        qas = scene_qas(world.random_scene(rng), rng, 5)
        exist = [a for _, a, t in qas if t == "exist"]
        if len(exist) == 2:
            pairs.append(tuple(sorted(exist)))
    assert pairs and {("no", "no"), ("yes", "yes")} & set(pairs)


def test_question_mix_asks_a_type_named_twice_more_often():
    """`question_mix` weights the question types of image conversations (a doubled type is asked twice where the
    scene has two distinct questions of it: 1.4x over random scenes); the default mix draws exactly what the
    shipped models were trained on (the same shuffle of the same five types)."""
    def counts(mix):
        rng, seen = random.Random(0), []
        for _ in range(300):
            seen += [t for _, _, t in scene_qas(world.random_scene(rng), rng, 5, mix)]
        return {t: seen.count(t) for t in world.QUESTION_TYPES}

    plain, doubled = counts(world.QUESTION_TYPES), counts((*world.QUESTION_TYPES, "position"))
    assert doubled["position"] > 1.3 * plain["position"] and doubled["colour"] < plain["colour"]
    rng_a, rng_b, scene = random.Random(5), random.Random(5), world.random_scene(random.Random(6))
    assert scene_qas(scene, rng_a, 5) == scene_qas(scene, rng_b, 5, tuple(world.QUESTION_TYPES))


def test_training_only_position_kinds():
    """The training-only kind `position-shared` asks where an object is whose shape or colour another object
    has (the case trained models answered with the other object's cell); nothing where every feature is unique.
    The evaluation sets' generators (`world.ASK`) do not draw it."""
    rng, asked = random.Random(0), 0
    for _ in range(300):
        scene = world.random_scene(rng)
        qa = world.TRAINING_ASK["position-shared"](scene, rng)
        features = [f for o in scene for f in (o.shape, o.colour)]
        if len(set(features)) == len(features):
            assert qa is None
            continue
        asked += 1
        target = next(o for o in scene if qa[0] == f"where is the {o.colour} {o.shape}?")
        assert qa[1] == target.where
        assert any(o != target and (o.shape == target.shape or o.colour == target.colour) for o in scene)
    assert asked > 100 and "position-shared" not in world.ASK
    # `position-colour` names an object by its colour alone, only where that colour is unique
    for _ in range(100):
        scene = world.random_scene(rng)
        qa = world.TRAINING_ASK["position-colour"](scene, rng)
        named = [o for o in scene if qa and qa[0] == f"where is the {o.colour} object?"]
        assert (qa is None) == all(sum(p.colour == o.colour for p in scene) > 1 for o in scene)
        assert qa is None or (len(named) == 1 and qa[1] == named[0].where)
    mixed = [t for _, _, t in scene_qas(world.random_scene(rng, 2), rng, 5, ("position-shared",) * 2)]
    assert set(mixed) <= {"position-shared"}


def test_staged_refuses_an_unknown_question_type_in_one_line(tmp_path):
    with pytest.raises(ToolkitError, match=r"question_mix names 'weight'; question types are colour, shape"):
        train_staged(tmp_path / "m", StagedRecipe(question_mix=("colour", "weight")), log=lambda _: None)
    assert not (tmp_path / "m" / "staged.json").exists()


def test_the_text_stage_asks_its_question_mix(codec):
    """`TextRecipe.question_mix` weights the text world's questions as `StagedRecipe.question_mix` does the
    image conversations'; the default draws the batches the shipped text stages were trained on."""
    exclude, where = data.held_out_keys(), codec.ids("where")[0]
    plain = replace(TEXT_RECIPES["answers"], batch=32)
    shifted = replace(TEXT_RECIPES["answers-position"], batch=32)
    assert all(torch.equal(batch_at(900, plain, codec, exclude)[k],
                           batch_at(900, replace(plain, question_mix=world.QUESTION_TYPES), codec, exclude)[k])
               for k in ("input_ids", "labels"))
    asked = [int((batch_at(s, r, codec, exclude)["input_ids"] == where).sum()) for r in (plain, shifted)
             for s in (900, 901)]
    assert asked[2] + asked[3] > 1.3 * (asked[0] + asked[1])


def test_the_text_stage_refuses_an_unknown_question_type_and_reads_older_manifests(tmp_path):
    with pytest.raises(ToolkitError, match=r"^question_mix names 'size'; question types are colour, shape"):
        train_text(tmp_path / "lm", replace(SMALL, question_mix=("size",)), log=lambda _: None)
    assert not (tmp_path / "lm").exists() or not any((tmp_path / "lm").iterdir())
    # a text LM recorded before question_mix existed counts as trained with the default mix
    train_text(tmp_path / "old", SMALL, log=lambda _: None)
    manifest = json.loads((tmp_path / "old" / "recipe.json").read_text())
    del manifest["question_mix"]
    (tmp_path / "old" / "recipe.json").write_text(json.dumps(manifest))
    said: list[str] = []
    train_text(tmp_path / "old", SMALL, log=said.append)
    assert said == [f"{tmp_path / 'old'}: already trained with this recipe; nothing to do (--no-resume to train again)"]
    with pytest.raises(ToolkitError, match=r"question_mix colour,shape,count,exist,position \(now colour,shape,"):
        train_text(tmp_path / "old", replace(SMALL, question_mix=TEXT_RECIPES["answers-position"].question_mix))


def test_recall_pretraining_batches_score_the_value(codec):
    recipe = replace(SMALL, pretrain_steps=1)
    batch = batch_at(0, recipe, codec, frozenset())
    row, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    scored = [t for t, label in zip(row, labels) if label != IGNORE_INDEX]
    words = codec.tok.convert_ids_to_tokens(row)
    key = words[words.index("ASSISTANT") - 1]
    pairs = words[3:words.index("ASSISTANT") - 1]
    value = dict(zip(pairs[::2], pairs[1::2]))[key]
    assert codec.tok.convert_ids_to_tokens(scored) == [value, "</s>"]


def test_text_stage_resumes_to_the_same_weights(tmp_path, codec):
    held = read_records(data.SAMPLES_DIR / "heldout.json", check_images=False)[:10]

    def stop_at_5(msg: str) -> None:
        if msg.startswith("step 5 "):
            raise KeyboardInterrupt

    train_text(tmp_path / "full", SMALL, log=lambda _: None, eval_records=held)
    with pytest.raises(KeyboardInterrupt):
        train_text(tmp_path / "resumed", SMALL, log=stop_at_5, eval_records=held)
    assert (tmp_path / "resumed" / "text_state.pt").is_file()
    train_text(tmp_path / "resumed", SMALL, log=lambda _: None, eval_records=held)
    full, resumed = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("full", "resumed"))
    assert full == resumed
    assert not (tmp_path / "resumed" / "text_state.pt").exists()


def test_text_stage_refuses_another_recipe_in_one_line(tmp_path, capsys):
    from saturation.shapes.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train-text", "--out", str(tmp_path / "lm"), "--steps", "2", "--eval", ""])
    assert exit_.value.code == 0
    before = (tmp_path / "lm" / "model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["train-text", "--out", str(tmp_path / "lm"), "--steps", "3", "--eval", ""])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'lm'} holds an LM trained with another recipe: steps 2 (now 3); pass "
                   "--no-resume to train afresh there, or choose another --out"]
    assert (tmp_path / "lm" / "model.safetensors").read_bytes() == before
    with pytest.raises(SystemExit):
        main(["train-text", "--out", str(tmp_path / "x"), "--recipe", "nope"])
    assert capsys.readouterr().err.startswith("error: unknown text recipe 'nope'; choose one of answers")


def test_text_accuracy_scores_exact_answers(codec):
    """A model that answers every question right scores 1 per type; the scorer reads greedy continuations."""
    held = read_records(data.SAMPLES_DIR / "heldout.json", check_images=False)[:20]

    class Oracle(torch.nn.Module):
        training = False

        def generate(self, input_ids, **_):
            rows = [list(codec.ids(r.turns[0][1])) + [codec.tok.eos_token_id] for r in held]
            width = max(map(len, rows))
            tail = torch.tensor([r + [codec.tok.pad_token_id] * (width - len(r)) for r in rows])
            return torch.cat([input_ids, tail], 1)

    scores = text_accuracy(Oracle(), codec, held, batch_size=len(held))
    assert scores["overall"] == 1.0 and set(scores) == {*(r.question_type for r in held), "overall"}


def test_the_text_lm_transplants_into_the_image_model(tmp_path, processor, codec):
    """The LLaVA built from the text stage answers text exactly as the text LM: same logits."""
    train_text(tmp_path / "lm", replace(SMALL, steps=2), log=lambda _: None)
    lm = build_lm(SMALL, len(processor.tokenizer))
    from safetensors.torch import load_file

    lm.load_state_dict(load_file(tmp_path / "lm" / "model.safetensors"), strict=False)
    lm.tie_weights()
    llava = build_model(Recipe(hidden=32, layers=2, heads=2, intermediate=64, vision_hidden=32),
                        len(processor.tokenizer))
    load_text_lm(llava, tmp_path / "lm")
    ids = torch.tensor([codec.example(describe(world.random_scene(random.Random(1))), [("how many shapes are "
                                                                                         "there?", "two")])[0]])
    torch.testing.assert_close(llava(input_ids=ids).logits, lm.eval()(input_ids=ids).logits, rtol=0, atol=0)


def test_image_batches_hold_the_scene_as_image_tokens(processor):
    recipe = StagedRecipe(batch=3, curriculum=())
    batch = image_batch(0, "tune", recipe, processor, frozenset())
    assert batch["pixel_values"].shape[0] == 3
    assert int(batch["image_mask"].sum()) == 3 * world.GRID**2
    again = image_batch(0, "tune", recipe, processor, frozenset())
    assert torch.equal(batch["pixel_values"], again["pixel_values"])
    model = build_model(Recipe(hidden=32, layers=2, heads=2, intermediate=64, vision_hidden=32),
                        len(processor.tokenizer))
    loss = answer_loss(model, batch)
    assert torch.isfinite(loss) and loss > 0


def test_a_polish_curriculum_sets_the_scene_sizes(processor):
    """`polish_curriculum=()` draws full-size scenes from the polish's first step; None repeats stage 3's
    curriculum (one object before step 200), as the shipped model's recipe did."""
    import re

    def totals(curriculum) -> set[str]:
        batch = image_batch(0, "polish", StagedRecipe(batch=24), processor, frozenset(), ("count",), curriculum)
        text = processor.tokenizer.decode(batch["input_ids"].flatten().tolist())
        return set(re.findall(r"how many shapes are there\? ASSISTANT ?: (\w+)", text))

    assert totals(None) == {"one"}
    assert len(totals(())) > 1


def test_the_stage_loss_reads_the_answer_tokens_only(processor):
    """No loss on what the probe measures: labels mark the assistant's answers and their </s> and nothing else (no
    image token, no question word), and the stage loss is the plain mean cross-entropy over exactly those tokens."""
    recipe = StagedRecipe(batch=3, curriculum=())
    batch = image_batch(2, "tune", recipe, processor, frozenset())
    labelled = batch["labels"] != IGNORE_INDEX
    assert not (labelled & batch["image_mask"]).any()
    words = [processor.tokenizer.convert_ids_to_tokens(row[mask].tolist())
             for row, mask in zip(batch["input_ids"], labelled)]
    answer_words = set(world.ANSWER_WORDS) | {"</s>"}
    assert all(set(w) <= answer_words and w[-1] == "</s>" for w in words)
    model = build_model(Recipe(hidden=32, layers=2, heads=2, intermediate=64, vision_hidden=32),
                        len(processor.tokenizer))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    targets = batch["labels"][:, 1:]
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][targets != IGNORE_INDEX], targets[targets != IGNORE_INDEX])
    torch.testing.assert_close(answer_loss(model, batch), by_hand)
    assert set(STAGED_RECIPES["staged"].__dataclass_fields__) & {"lens_weight", "attention_weight"} == set()


STAGED = data.SAMPLES_DIR.parent / "tiny-staged"


def test_the_staged_model_has_answer_losses_only_and_loads_offline(monkeypatch):
    """`tiny-staged`: every loss weight recorded, none on the logit lens, attention or hidden states; plain
    `from_pretrained` loads it offline; fp16 within 12 MiB; 12 LM layers."""
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from saturation.core.loading import resolve_name

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_name("tiny-staged")) == STAGED
    assert (STAGED / "model.safetensors").stat().st_size <= 12 * 2**20
    recipe = json.loads((STAGED / "recipe.json").read_text())
    assert {k for k in recipe if k.endswith("_weight")} == {"answer_weight", "text_weight"} and recipe["answer_weight"] > 0
    # the named recipe rebuilds it: `train-staged --out data_samples/tiny-staged` (README's command)
    assert recipe == json.loads(json.dumps(asdict_of(STAGED_RECIPES["staged"])))
    text = json.loads((STAGED / "text_recipe.json").read_text())
    assert text == json.loads(json.dumps(asdict_of(TEXT_RECIPES[recipe["text"]], seed=recipe["seed"],
                                                   threads=recipe["threads"])))
    model = LlavaForConditionalGeneration.from_pretrained(STAGED)
    assert model.dtype == torch.float16 and model.config.text_config.num_hidden_layers >= 12
    assert AutoProcessor.from_pretrained(STAGED).tokenizer.pad_token_id == 0


def asdict_of(recipe, **overrides) -> dict:
    from dataclasses import asdict

    return asdict(replace(recipe, **overrides))


def test_the_staged_model_reads_the_image(tmp_path):
    """On fresh scenes (a seed used nowhere else) it answers from the image: accurate, and far above a blank image."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from saturation.core.answers import answers, by_type

    records = read_records(data.make_dataset(tmp_path, 100, seed=5151, name="fresh"))
    model = LlavaForConditionalGeneration.from_pretrained(STAGED, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(STAGED)
    gold = [r.turns[0][1] for r in records]
    acc = by_type(records, [a == g for a, g in zip(answers(model, processor, records), gold)])
    blank = answers(model, processor, records, [world.blank_image()] * len(records))
    acc_blank = by_type(records, [a == g for a, g in zip(blank, gold)])["overall"]
    assert acc["overall"] >= 0.85 and acc["overall"] - acc_blank >= 0.35, (acc, acc_blank)


@pytest.fixture
def small_staged(monkeypatch, tmp_path):
    """A staged recipe small enough for a test, on a small registered text recipe, and a 10-question held-out set."""
    import saturation.shapes.staged as staged

    monkeypatch.setitem(staged.TEXT_RECIPES, "small", replace(SMALL, steps=3, eval_every=3))
    recipe = StagedRecipe(text="small", stage1_steps=2, align_steps=4, tune_steps=6, batch=4, turns=2, warmup=2,
                          log_every=1, eval_every=3, eval_n=4, checkpoint_every=2, curriculum=((2, 1),))
    heldout = data.make_dataset(tmp_path / "held", 10, seed=77, name="held")
    return recipe, heldout


def test_staged_training_resumes_to_the_same_weights(tmp_path, small_staged):
    """Interrupted in instruction tuning and again in the polish stage, and restarted each time, it ends with the
    weights of an uninterrupted run; the finished folder keeps the text stage's recipe and log and no progress
    files."""
    from saturation.shapes.staged import train_staged

    recipe, heldout = small_staged
    recipe = replace(recipe, polish_steps=4, polish_mix=(*world.QUESTION_TYPES, "position"))

    def stop_at(stage: str, step: int):
        def log(msg: str) -> None:
            if f'"stage": "{stage}", "step": {step}' in msg:
                raise KeyboardInterrupt
        return log

    train_staged(tmp_path / "full", recipe, log=lambda _: None, heldout=heldout)
    with pytest.raises(KeyboardInterrupt):
        train_staged(tmp_path / "resumed", recipe, log=stop_at("tune", 3), heldout=heldout)
    assert (tmp_path / "resumed" / "tune_state.pt").is_file() and (tmp_path / "resumed" / "align.done").is_file()
    with pytest.raises(KeyboardInterrupt):
        train_staged(tmp_path / "resumed", recipe, log=stop_at("polish", 3), heldout=heldout)
    assert (tmp_path / "resumed" / "polish_state.pt").is_file() and (tmp_path / "resumed" / "tune.done").is_file()
    train_staged(tmp_path / "resumed", recipe, log=lambda _: None, heldout=heldout)
    full, resumed = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("full", "resumed"))
    assert full == resumed
    left = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert {"recipe.json", "text_recipe.json", "text_metrics.jsonl", "metrics.jsonl", "model.safetensors"} <= set(left)
    assert not [n for n in left if n.endswith((".pt", ".done")) or n == "staged.json"], left
    stages = [json.loads(line)["stage"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("polish") == 4 and stages.index("polish") > stages.index("tune")


def test_staged_training_refuses_another_recipe_in_one_line(tmp_path, small_staged):
    from saturation.core.errors import ToolkitError
    from saturation.shapes.staged import train_staged

    recipe, heldout = small_staged

    def stop_in_align(msg: str) -> None:
        if '"stage": "align", "step": 1' in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_staged(tmp_path / "run", recipe, log=stop_in_align, heldout=heldout)
    with pytest.raises(ToolkitError, match=r"holds a run of another recipe: tune_steps 6 \(now 7\)"):
        train_staged(tmp_path / "run", replace(recipe, tune_steps=7), log=lambda _: None, heldout=heldout)
