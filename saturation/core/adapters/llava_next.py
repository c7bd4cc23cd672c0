"""LLaVA-NeXT (``llava_next``, "LLaVA-1.6"): anyres tiles on a CLIP tower, a Mistral or Vicuna (Llama) LM.

What differs from LLaVA-1.5, and nothing else:
- ``pixel_values`` is [B, max tiles, 3, H, W] (zero-padded) and ``image_sizes`` [n_images, 2] drives how many tiles
  and tokens each image has: ragged batches are the normal case.
- An image's tokens are the base tile, then the unpadded grid row by row, each row closed by the learnt
  ``image_newline`` embedding. Those newline positions are image tokens (the processor writes ``<image>`` there),
  so they route with the image.
- The prompt: ``[INST] <image>\\n… [/INST]`` for the Mistral checkpoint; Vicuna keeps LLaVA-1.5's.
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from saturation.core.adapters.base import LLAVA_TEMPLATE, Adapter, ModuleMap, Preset, PromptTemplate

MISTRAL_TEMPLATE = PromptTemplate(user="[INST] ", assistant=" [/INST]")


def anyres_grid(config, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """``(base, rows, cols)``: tokens of the base tile and the unpadded feature grid of one image of `image_size`
    (H, W), by the model's own grid choice and unpadding (on an empty tensor: no compute)."""
    v = config.vision_config
    side = v.image_size // v.patch_size
    grid_h, grid_w = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, v.image_size)
    rows, cols = unpad_image(torch.empty(0, grid_h * side, grid_w * side), list(image_size)).shape[1:]
    return side * side, rows, cols


def llava_next_7b_config():
    """llava-hf/llava-v1.6-mistral-7b-hf: CLIP ViT-L/14 at 336 px, anyres tiles (5 grid pinpoints) with
    a newline token closing each row, Mistral-7B-Instruct-v0.2 LM (GQA 32/8 heads, no sliding window)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, pad_token_id=32001)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=32000,
                           image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                           vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=32001)


class LlavaNext(Adapter):
    spec = ModuleMap(name="llava-next", model_types=("llava_next",))
    tiled = True  # anyres crops
    image_kwargs = ("image_sizes",)
    aliases = {"llava-next-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
               "llava-next-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf"}
    presets = {"llava-next-7b": Preset(llava_next_7b_config, torch.float16)}

    @property
    def template(self) -> PromptTemplate:
        return MISTRAL_TEMPLATE if self.text_config.model_type == "mistral" else LLAVA_TEMPLATE

    @classmethod
    def image_tokens(cls, config, image_size: tuple[int, int] | None = None) -> int:
        """Base tile + rows x (cols + 1): the +1 is ``image_newline``. `image_size` (H, W) defaults to one tile."""
        base, rows, cols = anyres_grid(config, image_size or (config.vision_config.image_size,) * 2)
        return base + rows * (cols + 1)

    @classmethod
    def random_processor(cls, config, words):
        """LLaVA-NeXT's PIL processor at the tower's tile size and the config's grid pinpoints, word tokenizer."""
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        from saturation.core.tiny import word_tokenizer

        v = config.vision_config
        images = LlavaNextImageProcessorPil(size={"shortest_edge": v.image_size},
                                            crop_size={"height": v.image_size, "width": v.image_size},
                                            image_grid_pinpoints=config.image_grid_pinpoints)
        return LlavaNextProcessor(image_processor=images, tokenizer=word_tokenizer(words), patch_size=v.patch_size,
                                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                                  num_additional_image_tokens=1)
