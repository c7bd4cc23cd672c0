"""Named LLaVA architectures with random weights, built in code: measure at real size without downloading.

``llava-1.5-7b`` and ``llava-1.5-13b`` are llava-hf's configs (CLIP ViT-L/14 at 336 px → 576 image tokens, Llama-2
decoders); ``tiny`` is the embedded model's shape, ``cpu-bench`` the routing issue's CPU benchmark shape. Used by
``routing bench --geometry`` and ``python -m saturation.benchmark --geometry``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def _llava_15(hidden: int, intermediate: int, layers: int, heads: int):
    """llava-hf/llava-1.5-*-hf's config: CLIP ViT-L/14 at 336 px, 2-layer GELU projector, Llama-2 (Vicuna) LM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=32001)


def _embedded_shape():
    """The embedded model's shape (DESIGN): 48 px / patch 16 -> 9 image tokens, 12 layers, hidden 128."""
    from saturation.shapes import IMAGE_SIZE, vocabulary
    from saturation.tiny import tiny_llava_config, word_tokenizer

    return tiny_llava_config(len(word_tokenizer(vocabulary())), image_size=IMAGE_SIZE, patch_size=16,
                             vision_hidden=64, hidden=128, layers=12, heads=4, intermediate=344,
                             tie_word_embeddings=True)


def _cpu_bench_shape():
    """The routing issue's CPU benchmark: hidden 256, 12 layers, 4 heads, 64 image tokens (128 px / patch 16)."""
    from saturation.tiny import tiny_llava_config

    return tiny_llava_config(512, image_size=128, patch_size=16, vision_hidden=64, hidden=256, layers=12, heads=4,
                             intermediate=688)


GEOMETRIES: dict[str, Callable] = {
    "llava-1.5-7b": functools.partial(_llava_15, 4096, 11008, 32, 32),
    "llava-1.5-13b": functools.partial(_llava_15, 5120, 13824, 40, 40),
    "tiny": _embedded_shape,
    "cpu-bench": _cpu_bench_shape,
}
CHECKPOINT_DTYPE = {"llava-1.5-7b": torch.float16, "llava-1.5-13b": torch.float16, "tiny": torch.float32,
                    "cpu-bench": torch.float32}


def geometry_config(name: str, layers: int | None = None):
    """The LlavaConfig of a named geometry, optionally `layers` decoder layers deep."""
    config = GEOMETRIES[name]()
    if layers is not None:
        config.text_config.num_hidden_layers = layers
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def image_tokens_of(config, image_size: tuple[int, int] | None = None) -> int:
    """Image tokens for one image of `image_size` (H, W) px, as the backbone adapter counts them: fixed for
    LLaVA-1.5 ((size / patch)^2, +1 if CLS is kept); for anyres families (NeXT, OneVision) it depends on the size,
    which defaults to one square tile."""
    from .backbones import adapter_class

    return adapter_class(config).image_tokens(config, image_size)


def random_llava(config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random weights of `config`, initialised directly on `device` in `dtype` (sdpa, eval mode)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_checkpoint(name: str, layers: int | None, dtype: torch.dtype | str | None, device, seed: int = 0):
    """``(model, processor)``: random weights of geometry `name` and a word-level processor of the same image size.

    The processor knows the shapes-world words (the embedded probe data) and puts ``<image>`` at id 4, so the
    config's image and pad ids are moved to match; vocabulary size, widths and depth stay the architecture's.
    """
    from .loading import resolve_device, resolve_dtype
    from .shapes import vocabulary
    from .tiny import tiny_processor

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = geometry_config(name, layers)
    vision = config.vision_config
    processor = tiny_processor(vocabulary(), image_size=vision.image_size, patch_size=vision.patch_size)
    tokenizer = processor.tokenizer
    config.image_token_index = config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.pad_token_id = config.text_config.pad_token_id = tokenizer.pad_token_id
    model = random_llava(config, CHECKPOINT_DTYPE[name] if dtype == "auto" else dtype, device, seed)
    return model, processor
