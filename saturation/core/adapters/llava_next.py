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

from saturation.core.adapters.base import LLAVA_TEMPLATE, Adapter, BackboneSpec, PromptTemplate

MISTRAL_TEMPLATE = PromptTemplate(user="[INST] ", assistant=" [/INST]")


def anyres_grid(config, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """``(base, rows, cols)``: tokens of the base tile and the unpadded feature grid of one image of `image_size`
    (H, W), by the model's own grid choice and unpadding (on an empty tensor: no compute)."""
    v = config.vision_config
    side = v.image_size // v.patch_size
    grid_h, grid_w = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, v.image_size)
    rows, cols = unpad_image(torch.empty(0, grid_h * side, grid_w * side), list(image_size)).shape[1:]
    return side * side, rows, cols


class LlavaNext(Adapter):
    spec = BackboneSpec(name="llava-next", model_types=("llava_next",))
    image_kwargs = ("image_sizes",)

    @property
    def template(self) -> PromptTemplate:
        return MISTRAL_TEMPLATE if self.text_config.model_type == "mistral" else LLAVA_TEMPLATE

    @classmethod
    def image_tokens(cls, config, image_size: tuple[int, int] | None = None) -> int:
        """Base tile + rows x (cols + 1): the +1 is ``image_newline``. `image_size` (H, W) defaults to one tile."""
        base, rows, cols = anyres_grid(config, image_size or (config.vision_config.image_size,) * 2)
        return base + rows * (cols + 1)
