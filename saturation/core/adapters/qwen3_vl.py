"""Qwen3-VL (``qwen3_vl``): Qwen2.5-VL's layout with DeepStack, interleaved M-RoPE and a Qwen3 LM.

What differs from Qwen2.5-VL:
- DeepStack: ``get_image_features`` also returns features of intermediate vision layers, added at the image
  positions after decoder layers 0..n-1 (n = 3 in the released models). The walk injects them after those layers
  (the contract's `injecting`, through the model's own ``_deepstack_process``), and a split must come after them:
  `min_split` = n.
- The three M-RoPE sections are interleaved (``mrope_section``); the model's rotary module does it, nothing here.
- q_norm/k_norm (per-head RMSNorm) before the rotation: the contract's ``key_values`` applies them via the spec.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Qwen3VLProcessor

from saturation.core.adapters.base import LayerMap, ModuleMap, Preset
from saturation.core.adapters.qwen2_5_vl import QwenVL


def qwen3_vl_8b_config():
    """Qwen/Qwen3-VL-8B-Instruct: a 27-layer SigLIP-2-style ViT (hidden 1152, patch 16, 2304 learned positions
    interpolated), DeepStack features from ViT layers 8/16/24 added after LM layers 0..2, a Qwen3-8B LM (GQA 32/8
    heads, head_dim 128, q/k norms) with interleaved M-RoPE sections [24, 20, 20] at base 5e6."""
    from transformers import Qwen3VLConfig

    text = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}}
    vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
              "hidden_act": "gelu_pytorch_tanh", "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without its video processor (torchvision), as ``ImageOnlyOnevisionProcessor``."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        return super().to_dict() | {"processor_class": Qwen3VLProcessor.__name__}


class Qwen3VL(QwenVL):
    spec = ModuleMap(name="qwen3-vl", model_types=("qwen3_vl",), vision_tower="model.visual",
                     projector="model.visual.merger", projector_in="model.visual.merger.linear_fc1",
                     submodules=LayerMap(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"))
    PIXELS = (256 * 256, 4096 * 4096)
    aliases = {"qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct", "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct"}
    presets = {"qwen3-vl-8b": Preset(qwen3_vl_8b_config, torch.bfloat16)}
    image_only_processor = ImageOnlyQwen3VLProcessor

    @classmethod
    def first_split(cls, config) -> int:
        """After the last DeepStack injection: layers 0..n-1 must stay shallow (they still receive image features)."""
        return max(1, len(config.vision_config.deepstack_visual_indexes))

    def inject(self, hidden: Tensor, image_mask: Tensor, features: Tensor) -> Tensor:
        return self.text_model._deepstack_process(hidden, image_mask, features)
