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

from torch import Tensor

from saturation.core.adapters.base import Adapter, BackboneSpec, PromptTemplate
from saturation.core.adapters.llava_next import anyres_grid

QWEN_TEMPLATE = PromptTemplate(user="<|im_start|>user\n", assistant="<|im_end|>\n<|im_start|>assistant\n")


class LlavaOnevision(Adapter):
    spec = BackboneSpec(name="llava-onevision", model_types=("llava_onevision",))
    image_kwargs = ("image_sizes", "batch_num_images")
    template = QWEN_TEMPLATE

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
