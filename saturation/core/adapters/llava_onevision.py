"""LLaVA-OneVision (``llava_onevision``): SigLIP tower, Qwen2 LM, anyres tiles capped by ``anyres_max_9``.

What differs from LLaVA-NeXT:
- SigLIP has no CLS token: the "full" feature strategy keeps every patch (the base tile is (size/patch)^2).
- ``vision_aspect_ratio`` (``anyres_max_9``) shrinks a grid larger than 9 tiles' worth by bilinear interpolation.
- ``get_placeholder_mask`` returns an (image, video) pair; the image half is the merge's.
- ``batch_num_images`` [B] says how many images each sample has (several images per sample skip the tiles).
- The Qwen2 LM has biases on q/k/v (the contract's ``key_values`` goes through the projections, biases included).
- The prompt is Qwen's chat format.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import LlavaOnevisionProcessor

from saturation.core.adapters.base import Adapter, ModuleMap, Preset, PromptTemplate
from saturation.core.adapters.llava_next import anyres_grid

QWEN_TEMPLATE = PromptTemplate(user="<|im_start|>user\n", assistant="<|im_end|>\n<|im_start|>assistant\n")


def llava_onevision_7b_config():
    """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP so400m/14 at 384 px (729 tokens a tile, no CLS), anyres up to
    6x6 tiles capped by anyres_max_9, Qwen2-7B LM (GQA 28/4 heads, q/k/v biases)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14)
    text = Qwen2Config(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False)
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                video_token_index=151647, image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                tie_word_embeddings=False)


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without its video processor, for images only.

    The video processor needs torchvision (which the toolkit does not install: it replaces the CPU torch), so
    ``AutoProcessor`` cannot build a OneVision processor here. Everything the toolkit feeds OneVision is images;
    this class takes the same files (image processor, tokenizer, chat template, processor kwargs) and saves as a
    ``LlavaOnevisionProcessor`` would, minus the video processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        # no video_processor parameter: ProcessorMixin reads its sub-processors from this signature
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                         **kwargs)

    def to_dict(self) -> dict:
        return super().to_dict() | {"processor_class": LlavaOnevisionProcessor.__name__}


class LlavaOnevision(Adapter):
    spec = ModuleMap(name="llava-onevision", model_types=("llava_onevision",))
    tiled = True  # anyres crops
    image_kwargs = ("image_sizes", "batch_num_images")
    template = QWEN_TEMPLATE
    aliases = {"llava-onevision-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
               "llava-onevision-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"}
    presets = {"llava-onevision-7b": Preset(llava_onevision_7b_config, torch.bfloat16)}
    image_only_processor = ImageOnlyOnevisionProcessor

    def placeholder_mask(self, input_ids: Tensor, inputs_embeds: Tensor, features: Tensor) -> Tensor:
        image, _video = self._get(self.spec.multimodal).get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, image_features=features)
        return image

    @classmethod
    def image_tokens(cls, config, image_size: tuple[int, int] | None = None) -> int:
        """Base tile + rows x (cols + 1) after the ``anyres_max_N`` cap, as ``pack_image_features`` shrinks it."""
        base, rows, cols = anyres_grid(config, image_size or (config.vision_config.image_size,) * 2)
        side = config.vision_config.image_size // config.vision_config.patch_size
        max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return base + rows * (cols + 1)

    @classmethod
    def random_processor(cls, config, words):
        """The image-only processor: PIL tiles at the tower's size and the config's pinpoints, word tokenizer."""
        from transformers import LlavaOnevisionImageProcessorPil

        from saturation.core.tiny import word_tokenizer

        v = config.vision_config
        images = LlavaOnevisionImageProcessorPil(size={"height": v.image_size, "width": v.image_size},
                                                 image_grid_pinpoints=config.image_grid_pinpoints)
        return ImageOnlyOnevisionProcessor(image_processor=images, tokenizer=word_tokenizer(words),
                                           num_image_tokens=(v.image_size // v.patch_size) ** 2,
                                           vision_feature_select_strategy=config.vision_feature_select_strategy,
                                           vision_aspect_ratio=config.vision_aspect_ratio)
