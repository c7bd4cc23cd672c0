"""Every command on Qwen2.5-VL, Qwen3-VL and Gemma 3: tiny random checkpoints saved with save_pretrained (model +
processor), loaded offline by ``load_model`` and by the CLI from disk like a user's ``--model DIR``; images of
different sizes, so Qwen batches are ragged (different M-RoPE grids)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from family_fixtures import (
    GEMMA_CHAT_TEMPLATE,
    QWEN_VL_CHAT_TEMPLATE,
    check_plugin_requests,
    family,
    gemma_config,
    run_every_command,
    save_checkpoint,
    write_images_dataset,
)
from PIL import Image

from saturation.core.adapters import adapter_for, position_ids_from_mask

NEW = ("qwen2_5_vl", "qwen3_vl", "gemma3")


def save(name: str, folder, chat: bool = False, video_config: bool = False):
    """A checkpoint of family `name` in `folder`; `chat`: with the family's chat template."""
    template = GEMMA_CHAT_TEMPLATE if name == "gemma3" else QWEN_VL_CHAT_TEMPLATE
    return save_checkpoint(name, folder, chat_template=template if chat else None, video_config=video_config)


@pytest.mark.parametrize("name", NEW)
def test_checkpoint_loads_offline_and_walks_as_hf(name, tmp_path):
    """A saved checkpoint + processor (Qwen3-VL with the video processor config a release ships) loads through
    load_model without torchvision; the processor batches two image sizes; the anatomy walk equals HF's forward."""
    from saturation.core.loading import load_model

    assert importlib.util.find_spec("torchvision") is None  # the toolkit's environment
    folder = save(name, tmp_path / name, chat=True, video_config=name == "qwen3_vl")
    model, proc = load_model(folder)
    assert proc.chat_template and type(proc).__name__.lower().replace("_", "").startswith(
        ("imageonly", "gemma3"))
    a = adapter_for(model)
    texts = [a.template.question(q, True) for q in ("what colour is the circle ?", "how many")]
    proc.tokenizer.padding_side = "left"
    pictures = [Image.new("RGB", (40, 40), "red"), Image.new("RGB", (80, 40), "blue")]
    nested = [[p] for p in pictures] if name == "gemma3" else pictures  # Gemma's processor takes images per row
    batch = dict(proc(images=nested, text=texts, return_tensors="pt", padding=True))
    counts = (batch["input_ids"] == a.image_token_id).sum(1).tolist()
    assert all(counts) and (name == "gemma3" or counts[0] != counts[1])
    with torch.no_grad():
        hf = model(**batch, position_ids=None if name != "gemma3" else position_ids_from_mask(
            batch["attention_mask"])).logits
        walk = a.forward(batch["input_ids"], batch["attention_mask"], **{
            k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")})
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(walk[valid], hf[valid], rtol=0, atol=0)


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module", params=NEW)
def checkpoint(request, tmp_path_factory):
    name = request.param  # Qwen2.5-VL through its chat template, the others through their adapter's
    return name, save(name, tmp_path_factory.mktemp(name) / "model", chat=name == "qwen2_5_vl")


def test_every_command_runs_on_the_family(checkpoint, data, tmp_path, monkeypatch):
    """probe -> train at --split auto -> eval -> generate -> bench -> analyze (`family_fixtures.run_every_command`);
    Qwen3-VL's recommendation starts after its 2 DeepStack layers."""
    name, model = checkpoint
    monkeypatch.chdir(tmp_path)  # bench's default folder, anything relative
    run_every_command(model, data, tmp_path, layers=6 if name == "gemma3" else 4, first=2 if name == "qwen3_vl" else 1)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_bench_real_prompt_marks_its_own_image_tokens(name, tmp_path):
    """routing bench rebuilds each prompt's text around its image block: the per-token image kwargs (Qwen's
    mm_token_type_ids, Gemma's token_type_ids) must mark the rebuilt rows' image tokens, not the processor's rows
    (before: a shape error on Qwen, 'marks other tokens' on Gemma), and vanilla HF takes the batch end to end."""
    from routing.jobs.bench import _bench_records
    from routing.jobs.timing import prefill, real_prompt
    from saturation.core.loading import load_model

    model, proc = load_model(save(name, tmp_path / name))
    a = adapter_for(model)
    for text_tokens in (5, 40):  # cut and cycled
        p = real_prompt(model, proc, _bench_records(), text_tokens, batch=2, new_tokens=1)
        key = "token_type_ids" if name == "gemma3" else "mm_token_type_ids"
        assert torch.equal(p.batch[key] == 1, p.batch["input_ids"] == a.image_token_id)
        assert p.text_tokens == text_tokens and p.own_positions == (name != "gemma3")
        with torch.no_grad():
            assert prefill(model, p, e2e=True).logits.shape[:2] == (2, 1)


@pytest.mark.parametrize("name, layers, heads, kv, tokens, first", [("qwen2.5-vl-7b", 28, 28, 4, 391, 1),
                                                                     ("qwen3-vl-8b", 36, 32, 8, 300, 3)])
def test_qwen_geometries_are_the_released_configs(name, layers, heads, kv, tokens, first):
    """The geometries' numbers as the released config.json files have them (no weights are built), the tokens of
    a 480x640 photo, and the first allowed split (after Qwen3-VL's DeepStack layers)."""
    from saturation.core.adapters import adapter_class
    from saturation.core.geometry import CHECKPOINT_DTYPE, REPRESENTATIVE_IMAGE, geometry_config, image_tokens_of

    config = geometry_config(name)
    t = config.text_config
    assert (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (layers, heads, kv)
    assert image_tokens_of(config, REPRESENTATIVE_IMAGE) == tokens and CHECKPOINT_DTYPE[name] == torch.bfloat16
    assert adapter_class(config).first_split(config) == first and not config.tie_word_embeddings
    assert config.vision_config.out_hidden_size == t.hidden_size
    assert geometry_config(name, layers=5).text_config.num_hidden_layers == 5


def test_bench_default_split_is_after_the_deepstack_layers():
    """With no --split, bench splits at layers // 2, but never inside Qwen3-VL's DeepStack layers (before: the
    routed build refused the default split)."""
    from routing.jobs.bench import BenchConfig, run_bench

    fam = family("qwen3_vl")
    config = fam.config(layers=5)
    config.vision_config.deepstack_visual_indexes = [0, 1, 2]  # min_split 3 > 5 // 2
    model = type(fam.model())(config).eval()
    out = run_bench(BenchConfig(variants="lf", text_tokens="4", repeats=1, warmup=0, new_tokens=1), model=model)
    assert out["split"] == 3 and out["layers"] == 5


@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "qwen3-vl-8b", "gemma-3-4b"])
def test_geometry_processor_counts_what_the_adapter_counts(name):
    """The geometries' processors turn a 480x640 photo in the family's own prompt into as many image tokens as the
    adapter prices (no weights are built)."""
    from saturation.core.adapters import adapter_class
    from saturation.core.geometry import (
        FAMILY_TOKENS,
        REPRESENTATIVE_IMAGE,
        geometry_config,
        geometry_processor,
        image_tokens_of,
    )

    config = geometry_config(name, layers=3)
    proc = geometry_processor(config, ["what"])
    text = adapter_class(config).template.question("what", True)
    h, w = REPRESENTATIVE_IMAGE
    picture = Image.new("RGB", (w, h))
    out = proc(images=[[picture]] if config.model_type == "gemma3" else [picture], text=[text], return_tensors="pt")
    image = proc.tokenizer.convert_tokens_to_ids(FAMILY_TOKENS[config.model_type]["image_token_id"])
    assert int((out["input_ids"] == image).sum()) == image_tokens_of(config, REPRESENTATIVE_IMAGE)
    assert proc.tokenizer.unk_token_id not in out["input_ids"][0].tolist()  # the template's words are known


@pytest.mark.parametrize("name", NEW)
def test_random_checkpoint_wires_the_familys_tokens(name, monkeypatch):
    """random_checkpoint (probe benchmark --geometry) moves the config's image/vision/pad ids onto its processor's
    tokens: the model's forward takes the processor's batch and finds every image token (checked on a small
    geometry of each family)."""
    from saturation.core import geometry

    if name == "gemma3":
        monkeypatch.setitem(geometry.GEOMETRIES, "small", lambda: gemma_config(layers=3))
    else:
        monkeypatch.setitem(geometry.GEOMETRIES, "small", lambda: family(name).config(layers=3))
    monkeypatch.setitem(geometry.CHECKPOINT_DTYPE, "small", torch.float32)
    model, proc = geometry.random_checkpoint("small", None, None, "cpu")
    a = adapter_for(model)
    text = a.template.question("what", True)
    picture = Image.new("RGB", (32, 64))
    batch = proc(images=[[picture]] if name == "gemma3" else [picture], text=[text], return_tensors="pt")
    assert int((batch["input_ids"] == a.image_token_id).sum()) == a.image_tokens(model.config, (64, 32)) > 0
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


def test_lmms_plugin_on_the_family(checkpoint):
    """The lmms-eval plugin's request handling (no lmms-eval needed) on a saved checkpoint of the family, routed:
    two image sizes in one batch answer as each alone, and loglikelihood is a finite loss."""

    import routing
    from saturation.core.loading import load_model

    name, folder = checkpoint
    model, proc = load_model(folder)
    routed = routing.build(model, adapter_for(model).min_split).eval()  # Qwen3-VL: the first split after DeepStack
    pictures = [[Image.new("RGB", (56, 56), "red")], [Image.new("RGB", (112, 56), "blue")]]
    check_plugin_requests(routed, proc, pictures)
