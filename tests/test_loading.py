"""load_model: aliases, local directories, dtype/attention flow-through, and one-line errors."""

import json

import pytest
import torch
from transformers import LlavaProcessor

from saturation import ToolkitError, load_model
from saturation.core.loading import TINY_DIR, resolve_dtype, resolve_name


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
