"""LLaVA-1.5 (``llava``): CLIP tower, 2-layer GELU projector, Llama (Vicuna) LM; 576 contiguous image tokens.

Everything is the contract's default: the paths, the merge, 1D RoPE, full causal masks, the
``USER: <image>\\n… ASSISTANT:`` template, the tiny word-level processor for random geometries.
"""

from __future__ import annotations

import functools

import torch

from saturation.core.adapters.base import Adapter, ModuleMap, Preset


def llava_15_config(hidden: int, intermediate: int, layers: int, heads: int):
    """llava-hf/llava-1.5-*-hf's config: CLIP ViT-L/14 at 336 px, 2-layer GELU projector, Llama-2 (Vicuna) LM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=32001)


class Llava(Adapter):
    spec = ModuleMap(name="llava-1.5", model_types=("llava",))
    # LLaVA-1.5 trained on ``USER: <image>\\n… ASSISTANT: …</s>``; llava-hf's chat template ends answers with a space
    # and no ``</s>``, so the toolkit keeps the published template even where a chat template exists.
    chat_template = False
    aliases = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf"}
    presets = {"llava-1.5-7b": Preset(functools.partial(llava_15_config, 4096, 11008, 32, 32), torch.float16),
               "llava-1.5-13b": Preset(functools.partial(llava_15_config, 5120, 13824, 40, 40), torch.float16)}
