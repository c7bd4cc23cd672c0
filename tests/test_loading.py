"""load_model: aliases (every family's), local directories (LLaVA-NeXT's too), dtype/attention flow-through, and
one-line errors."""

import json

import pytest
import torch
from family_fixtures import family, hf_logits
from transformers import LlavaProcessor

from saturation import ToolkitError, load_model
from saturation.core.adapters import LlavaNext, adapter_for
from saturation.core.loading import TINY_DIR, resolve_dtype, resolve_name

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)


def test_aliases_resolve():
    assert resolve_name("llava-1.5-7b") == "llava-hf/llava-1.5-7b-hf"
    assert resolve_name("llava-1.5-13b") == "llava-hf/llava-1.5-13b-hf"
    assert resolve_name("tiny") == str(TINY_DIR)
    assert resolve_name("org/other") == "org/other"


def test_local_directory_loads_in_eval_fp32(tiny_model_dir, tiny_model):
    model, processor = load_model(tiny_model_dir, device="cpu")
    assert isinstance(processor, LlavaProcessor)
    assert not model.training and model.dtype == torch.float32
    assert model.config.text_config._attn_implementation == "sdpa"
    for (name, p), (_, q) in zip(model.state_dict().items(), tiny_model.state_dict().items()):
        assert torch.equal(p, q), name


def test_dtype_and_attention_flow_through(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype="bfloat16", device="cpu", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config.text_config._attn_implementation == "eager"


def test_offline_hub_id_names_the_resolved_id():
    with pytest.raises(ToolkitError, match=r"cannot load 'llava-hf/llava-1.5-7b-hf'.*--model PATH") as info:
        load_model("llava-1.5-7b")
    assert "\n" not in str(info.value)


def test_not_llava_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    with pytest.raises(ToolkitError, match="not a LLaVA model: model_type is 'llama'"):
        load_model(tmp_path)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ToolkitError, match="cannot read a model config"):
        load_model(tmp_path)


def test_unknown_dtype_is_refused():
    with pytest.raises(ToolkitError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))


FAMILY_ALIASES = {"llava-next-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
                  "llava-next-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
                  "llava-onevision-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
                  "llava-onevision-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
                  "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
                  "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct", "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
                  **{f"gemma-3-{n}b": f"google/gemma-3-{n}b-it" for n in (4, 12, 27)}}


@pytest.mark.parametrize("alias", FAMILY_ALIASES)
def test_aliases_resolve_and_fail_offline_in_one_line(alias):
    assert resolve_name(alias) == FAMILY_ALIASES[alias]
    with pytest.raises(ToolkitError, match=rf"cannot load '{FAMILY_ALIASES[alias]}'.*--model PATH") as err:
        load_model(alias)
    assert "\n" not in str(err.value)


def test_a_local_llava_next_checkpoint_loads(tmp_path):
    """load_model accepts the llava_next model type (it said "not a LLaVA model" before the adapters)."""
    fam = family("llava_next")
    model = fam.model()
    model.save_pretrained(tmp_path)
    fam.processor.save_pretrained(tmp_path)
    loaded, processor = load_model(tmp_path, device="cpu")
    batch = fam.batch()
    assert type(adapter_for(loaded)) is LlavaNext
    assert torch.equal(hf_logits(loaded, batch), hf_logits(model, batch))
    assert type(processor).__name__ == "LlavaNextProcessor"
