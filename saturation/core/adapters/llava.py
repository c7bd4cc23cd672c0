"""LLaVA-1.5 (``llava``): CLIP tower, 2-layer GELU projector, Llama (Vicuna) LM; 576 contiguous image tokens.

Everything is the contract's default: the paths, the merge, 1D RoPE, full causal masks, the
``USER: <image>\\n… ASSISTANT:`` template.
"""

from __future__ import annotations

from saturation.core.adapters.base import Adapter, BackboneSpec


class Llava(Adapter):
    spec = BackboneSpec(name="llava-1.5", model_types=("llava",))
    # LLaVA-1.5 trained on ``USER: <image>\\n… ASSISTANT: …</s>``; llava-hf's chat template ends answers with a space
    # and no ``</s>``, so the toolkit keeps the published template even where a chat template exists.
    chat_template = False
