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

from torch import Tensor

from saturation.core.adapters.base import BackboneSpec
from saturation.core.adapters.qwen2_5_vl import QwenVL


class Qwen3VL(QwenVL):
    spec = BackboneSpec(name="qwen3-vl", model_types=("qwen3_vl",), vision_tower="model.visual",
                        projector="model.visual.merger", projector_in="model.visual.merger.linear_fc1",
                        q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    PIXELS = (256 * 256, 4096 * 4096)

    @classmethod
    def first_split(cls, config) -> int:
        """After the last DeepStack injection: layers 0..n-1 must stay shallow (they still receive image features)."""
        return max(1, len(config.vision_config.deepstack_visual_indexes))

    def inject(self, hidden: Tensor, image_mask: Tensor, features: Tensor) -> Tensor:
        return self.text_model._deepstack_process(hidden, image_mask, features)
