"""The shapes world, the offline processor, the shipped tiny LLaVA and a short training smoke test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from saturation import shapes
from saturation.core.answers import answers, by_type
from saturation.core.data import Record, encode_record, read_records
from saturation.shapes.evaluate import blind_answers, position_errors
from saturation.shapes.train import (
    Recipe,
    attach_rescale,
    attention_loss,
    build_model,
    build_pool,
    build_processor,
    cell_targets,
    cosine_schedule,
    fold_rescale,
    lookup_targets,
    make_batch,
    patch_features,
    pixels,
    render_batch,
    stage1_heads,
    stage1_loss,
    stage2_loss,
    stage2_optimizer,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data_samples" / "tiny-llava"
CLEAN = ROOT / "data_samples" / "tiny-clean"
# tiny-clean on the 100 fresh questions of the `shipped` fixture: 0.72 with the image, 0.25 with a blank one
CLEAN_MIN_ACC, CLEAN_MIN_MARGIN = 0.60, 0.35
SAMPLES = ROOT / "data_samples" / "shapes"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_make_dataset_is_deterministic_per_seed(tmp_path):
    a = shapes.make_dataset(tmp_path / "a", 12, seed=3)
    b = shapes.make_dataset(tmp_path / "b", 12, seed=3)
    c = shapes.make_dataset(tmp_path / "c", 12, seed=4)
    assert _files(a.parent) == _files(b.parent)
    assert a.read_bytes() != c.read_bytes()


def test_make_dataset_writes_llava_records(tmp_path):
    path = shapes.make_dataset(tmp_path, 40, seed=0, name="probe")
    raw = json.loads(path.read_text())
    records = read_records(path)  # the toolkit's own validator accepts it
    assert len(records) == 40 and all(r.image.is_file() for r in records)
    assert raw[0]["conversations"][0]["value"].startswith("<image>\n")
    assert {r["question_type"] for r in raw} == set(shapes.QUESTION_TYPES)
    exist = [r.turns[0][1] for r in records if r.question_type == "exist"]
    assert exist.count("no") == len(exist) // 2  # POPE-style: half "no"
    assert all(1 <= len(r.turns[0][1].split()) <= 2 for r in records)


def test_every_question_and_answer_is_in_the_vocabulary():
    tok = build_processor().tokenizer
    for s in shapes.sample_scenes(60, seed=1, turns=5):
        for q, a, _ in s["qas"]:
            assert tok.unk_token_id not in tok(f"USER: {q} ASSISTANT: {a}</s>")["input_ids"], (q, a)


def test_near_miss_existence_questions():
    rng = random.Random(0)
    near = 0
    for _ in range(200):
        scene = shapes.random_scene(rng)
        q, a = shapes.ask_exist(scene, rng, "no")
        _, colour, shape = q.removeprefix("is there ").removesuffix("?").split()
        assert (shape, colour) not in {(o.shape, o.colour) for o in scene}
        near += any(o.shape == shape or o.colour == colour for o in scene)
    assert near > 140  # most "no"s share the colour or the shape with an object in the scene


def test_processor_round_trip_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = build_processor()
    proc.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    image = shapes.render(shapes.random_scene(random.Random(0)), random.Random(1))
    text = "USER: <image>\nwhat colour is the circle? ASSISTANT: red</s>"
    a, b = proc(text=[text], images=[image], return_tensors="pt"), again(text=[text], images=[image], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert (a["input_ids"] == 4).sum() == 9  # one image token per grid cell
    assert again.tokenizer.decode(b["input_ids"][0, -2:]) .split()[0] == "red"


def test_rescale_folds_into_the_projector():
    recipe = Recipe(layers=2, hidden=32, intermediate=64, vision_hidden=32)
    proc = build_processor()
    model = build_model(recipe, len(proc.tokenizer)).eval()
    px = pixels(proc, [shapes.blank_image(), shapes.render(shapes.random_scene(random.Random(2)), random.Random(3))])
    rms = torch.rand(recipe.vision_hidden) + 0.5
    hook = attach_rescale(model, rms)
    with torch.no_grad():
        hooked = model.model.get_image_features(pixel_values=px).pooler_output
        hook.remove()
        fold_rescale(model, rms)
        folded = model.model.get_image_features(pixel_values=px).pooler_output
    torch.testing.assert_close(torch.stack(hooked), torch.stack(folded), rtol=1e-5, atol=1e-5)


def test_attention_loss_matches_eager_attention():
    """The supervised rows recomputed by `attention_loss` are the layer's real attention probabilities."""
    recipe = Recipe(layers=2, hidden=32, intermediate=64, vision_hidden=32)
    proc = build_processor()
    model = build_model(recipe, len(proc.tokenizer)).eval()
    model.set_attn_implementation("eager")
    batch = make_batch(build_pool(proc, 6, 0, recipe, frozenset(), log=lambda _: None), 0, recipe, 4)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], output_hidden_states=True, output_attentions=True)
        for key in ("attn_cells", "lookup_cells"):
            targets = batch[key]
            rows, pos, heads = targets.any(-1).nonzero(as_tuple=True)
            probs = out.attentions[1][rows, heads, pos][batch["image_mask"][rows]].view(len(rows), -1)
            expected = -(probs * targets[rows, pos, heads]).sum(-1).log().mean()
            got = attention_loss(model, out.hidden_states[1], batch, targets, 1)
            torch.testing.assert_close(got, expected)


def test_lookup_targets_point_at_the_named_object():
    proc = build_processor()
    scene = (shapes.Obj("circle", "red", 0, 2), shapes.Obj("square", "red", 0, 0))
    record = Record("r", Path("x.png"), (("where is the red circle?", "top right"), ("how many shapes are there?", "two")))
    enc = encode_record(record, proc, image=shapes.blank_image())
    cells = lookup_targets(enc["input_ids"], enc["labels"], scene, proc.tokenizer)
    words = proc.tokenizer.convert_ids_to_tokens(enc["input_ids"].tolist())
    supervised = {(words[t], words[t + 1]): c.nonzero().flatten().tolist() for t, c in enumerate(cells) if c.any()}
    # the answer cue and the row word (which predicts the column) look at cell 2; the count question at nothing
    assert supervised == {(":", "top"): [2], ("top", "right"): [2]}


def test_training_smoke_losses_decrease():
    recipe = Recipe(layers=2, hidden=64, intermediate=128, vision_hidden=32, batch=8, lm_lr=3e-3, lookup_layer=1)
    proc = build_processor()
    model = build_model(recipe, len(proc.tokenizer))
    # stage 1: the per-patch heads learn on a fixed batch
    heads = stage1_heads(recipe)
    scenes = [shapes.random_scene(random.Random(i)) for i in range(16)]
    px, (colours, kinds) = pixels(proc, render_batch(scenes, random.Random(0))), cell_targets(scenes)
    opt = torch.optim.AdamW([*model.model.vision_tower.parameters(), *heads.parameters()], lr=3e-3)
    first = None
    for _ in range(15):
        loss, _ = stage1_loss(patch_features(model, px), heads, colours, kinds)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    # stage 2: projector + LM with the auxiliary lens loss on a small pool
    pool = build_pool(proc, 16, 0, recipe, frozenset(), log=lambda _: None)
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    opt = stage2_optimizer(model, recipe)
    sched = cosine_schedule(opt, 15, warmup=2)
    losses = []
    for step in range(15):
        loss = stage2_loss(model, make_batch(pool, step % 2, recipe, 4), recipe)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        sched.step()
        losses.append(loss["total"].item())
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3])
    for k, v in model.model.vision_tower.state_dict().items():  # stage 2 keeps the tower frozen
        assert torch.equal(v, tower[k]), k


def test_training_resumes_where_it_stopped(tmp_path):
    """An interrupted run, restarted, ends with the same weights as an uninterrupted one."""
    recipe = Recipe(layers=2, hidden=32, intermediate=64, vision_hidden=32, stage1_steps=3, train_scenes=16, steps=6,
                    batch=4, lookup_layer=1, log_every=1, checkpoint_every=2, rms_scenes=8)

    def stop_at_step_5(msg: str) -> None:
        if msg.startswith("stage2 step 5 "):
            raise KeyboardInterrupt

    train(tmp_path / "full", recipe, log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", recipe, log=stop_at_step_5)
    assert (tmp_path / "resumed" / "train_state.pt").is_file()
    train(tmp_path / "resumed", recipe, log=lambda _: None)
    assert not (tmp_path / "resumed" / "train_state.pt").exists()
    full, resumed = _files(tmp_path / "full"), _files(tmp_path / "resumed")
    assert full["model.safetensors"] == resumed["model.safetensors"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    model = LlavaForConditionalGeneration.from_pretrained(TINY, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(TINY)
    # Fresh scenes (a seed used nowhere else), single-turn, types balanced.
    path = shapes.make_dataset(tmp_path_factory.mktemp("fresh"), 100, seed=4242, name="fresh")
    return model, processor, read_records(path)


def test_shipped_model_loads_offline_and_is_small(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (TINY / "model.safetensors").stat().st_size <= 12 * 2**20
    model = LlavaForConditionalGeneration.from_pretrained(TINY)
    assert model.config.text_config.num_hidden_layers >= 12
    assert AutoProcessor.from_pretrained(TINY).tokenizer.pad_token_id == 0


def test_shipped_model_answers_depend_on_the_image(shipped):
    model, processor, records = shipped
    gold = [r.turns[0][1] for r in records]
    real = answers(model, processor, records)
    blank = answers(model, processor, records, [shapes.blank_image()] * len(records))
    acc = by_type(records, [a == g for a, g in zip(real, gold)])["overall"]
    acc_blank = by_type(records, [a == g for a, g in zip(blank, gold)])["overall"]
    acc_blind = by_type(records, [a == g for a, g in zip(blind_answers(records), gold)])["overall"]
    assert acc >= 0.85, acc
    assert acc - acc_blank >= 0.35, (acc, acc_blank)
    assert acc - acc_blind >= 0.35, (acc, acc_blind)


def test_stored_fp16_weights_answer_like_fp32(shipped):
    model, processor, records = shipped
    fp16 = LlavaForConditionalGeneration.from_pretrained(TINY).eval()  # the stored dtype
    assert fp16.dtype == torch.float16
    assert answers(fp16, processor, records) == answers(model, processor, records)


def test_batched_left_padded_generation_matches_one_by_one(shipped):
    model, processor, records = shipped
    picked = records[:10]  # different question lengths, so the batch really is left-padded
    batched = answers(model, processor, picked)
    single = [answers(model, processor, [r])[0] for r in picked]
    assert batched == single


def test_shipped_sample_sets():
    probe, heldout = read_records(SAMPLES / "probe.json"), read_records(SAMPLES / "heldout.json")
    assert len(probe) == len(heldout) == 500

    def keys(path: Path) -> set:
        return {shapes.scene_key(tuple(shapes.Obj(**o) for o in r["objects"])) for r in json.loads(path.read_text())}

    # held-out scenes are never trained on: the training generator excludes exactly these keys
    assert keys(SAMPLES / "probe.json") | keys(SAMPLES / "heldout.json") <= shapes.held_out_keys()


def test_the_package_depends_one_way():
    """world <- data <- train/evaluate <- text_stage <- staged <- cli: no module imports one above it, and the world needs no torch."""
    import ast
    import subprocess
    import sys

    order = ["world", "data", "train", "evaluate", "text_stage", "staged", "cli", "__main__"]
    rank = {"world": 0, "data": 1, "train": 2, "evaluate": 2, "text_stage": 3, "staged": 4, "cli": 5, "__main__": 6}
    package = ROOT / "saturation" / "shapes"
    for name in order:
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import / from . import x
                targets = [node.module] if node.module else [a.name for a in node.names]
                assert all(rank[t] < rank[name] for t in targets), (name, targets)
    code = "import sys; from saturation import shapes; shapes.make_dataset; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_clean_model_is_trained_on_the_answer_loss_alone_and_loads_offline(monkeypatch):
    """`tiny-clean` (data_samples/tiny-clean): no loss on the LM's image tokens or attention; plain loading."""
    from saturation.core.loading import resolve_name

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_name("tiny-clean")) == CLEAN
    assert (CLEAN / "model.safetensors").stat().st_size <= 12 * 2**20
    recipe = json.loads((CLEAN / "recipe.json").read_text())
    assert recipe["answer_weight"] == 1 and recipe["aux_weight"] == recipe["attn_weight"] == recipe["lookup_weight"] == 0
    model = LlavaForConditionalGeneration.from_pretrained(CLEAN)
    assert model.dtype == torch.float16 and model.config.text_config.num_hidden_layers == 12
    assert AutoProcessor.from_pretrained(CLEAN).tokenizer.pad_token_id == 0


def test_clean_model_answers_depend_on_the_image(shipped):
    """Its answers come from the image: on the same fresh questions it beats a blank image by a wide margin."""
    _, _, records = shipped
    model = LlavaForConditionalGeneration.from_pretrained(CLEAN, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(CLEAN)
    gold = [r.turns[0][1] for r in records]
    acc = by_type(records, [a == g for a, g in zip(answers(model, processor, records), gold)])["overall"]
    blank = answers(model, processor, records, [shapes.blank_image()] * len(records))
    acc_blank = by_type(records, [a == g for a, g in zip(blank, gold)])["overall"]
    assert acc >= CLEAN_MIN_ACC and acc - acc_blank >= CLEAN_MIN_MARGIN, (acc, acc_blank)


def test_curriculum_pools_hold_at_most_max_objects():
    from saturation.shapes.train import build_pool

    for m in (1, 2):
        assert all(len(s["scene"]) <= m for s in shapes.sample_scenes(50, seed=5, turns=5, max_objects=m))
    assert max(len(s["scene"]) for s in shapes.sample_scenes(50, seed=5, turns=5)) == shapes.MAX_OBJECTS
    recipe = Recipe(layers=2, hidden=32, intermediate=64, vision_hidden=32, curriculum=((3, 1),), batch=4)
    pool = build_pool(build_processor(), 8, 0, recipe, frozenset(), log=lambda _: None, max_objects=1)
    assert all((e["aux"][:, 0] != -100).sum() == 1 for e in pool)  # one non-empty cell per scene


def test_text_world_puts_each_cells_words_at_its_image_token():
    from saturation.shapes.train import text_world_embeds

    recipe = Recipe(layers=2, hidden=32, intermediate=64, vision_hidden=32, batch=4, text_world=0.5, text_world_steps=1,
                    lookup_layer=1)
    proc = build_processor()
    model = build_model(recipe, len(proc.tokenizer))
    pool = build_pool(proc, 4, 0, recipe, frozenset(), log=lambda _: None)
    batch = make_batch(pool, 0, recipe, 4)
    assert batch["text_world"] == 2 and "text_world" not in make_batch(pool, 1, recipe, 4)
    embeds = text_world_embeds(model, batch["input_ids"], batch["image_mask"], batch["cell_words"])
    table, tok = model.get_input_embeddings().weight, proc.tokenizer
    cells = batch["image_mask"][0].nonzero().flatten()
    for k, scene_obj in enumerate(batch["aux"][:9]):  # example 0's aux rows: colour, shape, row, column or -100
        words = [f"{('top', 'middle', 'bottom')[k // 3]}", f"{('left', 'center', 'right')[k % 3]}"]
        ids = tok.convert_tokens_to_ids(words) + [i for i in scene_obj[:2].tolist() if i >= 0]
        torch.testing.assert_close(embeds[0, cells[k]], table[ids].sum(0))
    torch.testing.assert_close(embeds[0, : cells[0]], table[batch["input_ids"][0, : cells[0]]])
    losses = stage2_loss(model, batch, recipe)  # half text, half image; both reach the total
    assert losses["total"].requires_grad and losses["text"].item() > 0


def test_train_rejects_an_unknown_recipe(tmp_path, capsys):
    from saturation.shapes.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--recipe", "nope", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == "error: unknown recipe 'nope'; choose one of tiny, tiny-clean"
    assert not (tmp_path / "out").exists()


def test_position_errors_name_whose_cell_a_wrong_answer_is():
    """Each wrong position answer is classified by the object whose cell it names; questions whose object shares
    its shape with another are counted apart."""
    objs = [{"shape": "circle", "colour": "red", "row": 0, "col": 0},
            {"shape": "circle", "colour": "blue", "row": 1, "col": 1},
            {"shape": "square", "colour": "red", "row": 2, "col": 2},
            {"shape": "triangle", "colour": "green", "row": 0, "col": 2}]

    def ask(name: str, gold: str) -> Record:
        return Record("r", None, ((f"where is the {name}?", gold),), "position", {"objects": objs})

    records = [ask("red circle", "top left")] * 5 + [ask("green triangle", "top right")] * 2
    answers = ["top left", "middle center", "bottom right", "top right", "middle left", "top right", "Top Left"]
    assert position_errors(records, answers) == {
        "wrong": 5, "same_shape": 1, "same_colour": 1, "other_object": 2, "no_object": 1,
        "shape_shared": 5, "shape_shared_right": 1}
    colour = Record("c", None, (("what colour is the square?", "red"),), "colour", {"objects": objs})
    assert position_errors([colour], ["blue"])["wrong"] == 0
    unnamed = Record("u", None, (("where is the cat?", "top left"),), "position", {"objects": objs})
    assert position_errors([unnamed], ["bottom right"])["wrong"] == 0
