"""Qwen2.5-VL (``qwen2_5_vl``): a ViT whose patch merger (2x2 patches -> one token) is the projector, a Qwen2 LM.

What differs from LLaVA, and nothing else:
- The vision tower ``model.visual`` includes the merger; ``image_grid_thw`` [images, 3] (patches, before the merge)
  drives each image's token count, so batches are ragged. ``<|vision_start|>``/``<|vision_end|>`` are text tokens.
- M-RoPE: positions are [3, B, T] (temporal, height, width) from the model's own ``get_rope_index``; text after an
  image resumes at start + max(h, w) / merge, so a token's position is not its index. ``mm_token_type_ids`` (1 =
  image) drives it; where it is absent it comes from the image tokens (HF would silently fall back to 1D positions).
  Decoding continues at ``cumsum(mask) - 1 + rope_deltas``, all three rows equal: the routed cache carries the
  prompt's delta (``routing.generation``), never the ``rope_deltas`` HF keeps on ``model.model``.
- ``get_placeholder_mask`` returns an (image, video) pair; q/k/v have biases (the contract's projections keep them).
- The prompt is Qwen's chat format; videos are refused in one line.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from transformers import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from saturation.core.adapters.base import Adapter, ModuleMap, Preset, PromptTemplate
from saturation.core.errors import ToolkitError

QWEN_VL_TEMPLATE = PromptTemplate(user="<|im_start|>user\n", assistant="<|im_end|>\n<|im_start|>assistant\n",
                                  image="<|vision_start|><|image_pad|><|vision_end|>")
VIDEO_KWARGS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
DEFAULT_IMAGE = (448, 448)  # (H, W) px when a count needs a size and none is given (geometry, FLOP model)
QWEN_VL_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                  "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


class QwenVL(Adapter):
    """What Qwen2.5-VL and Qwen3-VL share: the merge, M-RoPE positions, the token count and the prompt."""

    image_kwargs = ("image_grid_thw", "mm_token_type_ids")
    sequence_kwargs = ("mm_token_type_ids",)
    position_kwargs = ("image_grid_thw", "mm_token_type_ids")
    per_image_kwargs = ("image_grid_thw",)
    template = QWEN_VL_TEMPLATE
    special_tokens = QWEN_VL_TOKENS
    turn_tokens = ("<|im_start|>", "<|im_end|>")
    # The released checkpoints' preprocessor_config.json: (min_pixels, max_pixels) an image is resized into.
    PIXELS: ClassVar[tuple[int, int]] = (56 * 56, 28 * 28 * 1280)

    def _refuse_video(self, input_ids: Tensor | None, image_kwargs: dict) -> None:
        given = [k for k in VIDEO_KWARGS if image_kwargs.get(k) is not None]
        types = image_kwargs.get("mm_token_type_ids")
        if given or (input_ids is not None and (input_ids == self.model.config.video_token_id).any()) or (
                types is not None and (types == 2).any()):
            raise ToolkitError(f"{self.spec.name}: video inputs are not supported (images only)"
                               + (f"; got {', '.join(given)}" if given else ""))

    def image_output(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **_):
        if image_grid_thw is None:
            raise ToolkitError(f"{self.spec.name}: pixel_values need image_grid_thw (pass the processor's output)")
        mm = self._get(self.spec.multimodal)
        return mm.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw, return_dict=True)

    def encode(self, input_ids: Tensor, pixel_values: Tensor | None = None, **kwargs):
        self._refuse_video(input_ids, kwargs)
        return super().encode(input_ids, pixel_values, **kwargs)

    def placeholder_mask(self, input_ids: Tensor, inputs_embeds: Tensor, features: Tensor) -> Tensor:
        image, _video = self._get(self.spec.multimodal).get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, image_features=features)
        return image

    def positions(self, attention_mask: Tensor, last: int | None = None, *, image_mask: Tensor | None = None,
                  image_grid_thw: Tensor | None = None, mm_token_type_ids: Tensor | None = None, **_) -> Tensor:
        """[3, B, T] M-RoPE positions for a prompt with images (the model's own ``get_rope_index``, pads 0, real
        tokens numbered from 0 as ``generate`` does); without images the 1D positions [B, T], which the rotary
        module spreads to its three rows itself."""
        if last is not None or image_grid_thw is None or image_mask is None or not bool(image_mask.any()):
            return super().positions(attention_mask, last)
        types = image_mask.long() if mm_token_type_ids is None else mm_token_type_ids.long()
        if types.shape != image_mask.shape:
            raise ToolkitError(f"{self.spec.name}: mm_token_type_ids has shape {tuple(types.shape)}, the input ids "
                               f"{tuple(image_mask.shape)}")
        self._refuse_video(None, {"mm_token_type_ids": types})
        if not bool(((types == 1) == image_mask).all()):
            raise ToolkitError(f"{self.spec.name}: mm_token_type_ids marks other tokens than the image tokens")
        # get_rope_index reads input_ids only for their shape and count; the token types stand in for them, so the
        # inputs_embeds path (no ids) gets the same positions.
        pos, _deltas = self._get(self.spec.multimodal).get_rope_index(
            types, mm_token_type_ids=types, image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        return pos

    @classmethod
    def image_tokens(cls, config, image_size: tuple[int, int] | None = None,
                     pixels: tuple[int, int] | None = None) -> int:
        """Tokens for one image of `image_size` (H, W) px (default 448x448): the processor's resize to multiples of
        patch x merge within `pixels` (min, max; default the released processor's), then one token per merge^2
        patches."""
        v = config.vision_config
        factor = v.patch_size * v.spatial_merge_size
        low, high = pixels or cls.PIXELS
        h, w = smart_resize(*(image_size or DEFAULT_IMAGE), factor=factor, min_pixels=low, max_pixels=high)
        return (h // factor) * (w // factor)


    @classmethod
    def random_processor(cls, config, words):
        """Qwen's PIL image processor at the released min/max pixels, images only (no torchvision)."""
        from transformers import Qwen2VLImageProcessorPil

        v = config.vision_config
        low, high = cls.PIXELS
        images = Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                          temporal_patch_size=v.temporal_patch_size,
                                          size={"shortest_edge": low, "longest_edge": high})
        return cls.image_only_processor(image_processor=images, tokenizer=cls.family_tokenizer(words))


def qwen2_5_vl_7b_config():
    """Qwen/Qwen2.5-VL-7B-Instruct: a 32-block ViT (hidden 1280, patch 14, window attention of 112 px with full
    attention in blocks 7/15/23/31) whose merger joins 2x2 patches into one token of the LM's width, a Qwen2-7B LM
    (GQA 28/4 heads, q/k/v biases) with M-RoPE sections [16, 24, 24] at base 1e6."""
    from transformers import Qwen2_5_VLConfig

    text = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
              "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor (torchvision), as ``ImageOnlyOnevisionProcessor``."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # no video_processor parameter: ProcessorMixin reads its sub-processors from this signature
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        return super().to_dict() | {"processor_class": Qwen2_5_VLProcessor.__name__}


class Qwen25VL(QwenVL):
    spec = ModuleMap(name="qwen2.5-vl", model_types=("qwen2_5_vl",), vision_tower="model.visual",
                     projector="model.visual.merger", projector_in="model.visual.merger.mlp.0")
    PIXELS = (56 * 56, 28 * 28 * 16384)
    aliases = {"qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct"}
    presets = {"qwen2.5-vl-7b": Preset(qwen2_5_vl_7b_config, torch.bfloat16)}
    image_only_processor = ImageOnlyQwen2_5_VLProcessor
