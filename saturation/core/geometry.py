"""Named architectures with random weights, built in code: measure at real size without downloading.

Each family's adapter declares its presets (``llava-1.5-7b``, ``gemma-3-4b``, ...: the released checkpoint's config
and dtype, `Adapter.presets`); ``tiny`` is the embedded model's shape, ``cpu-bench`` the routing issue's CPU
benchmark shape. Used by ``routing bench --geometry`` and ``python -m saturation.benchmark --geometry``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saturation.core.adapters import ADAPTERS, PRESETS, adapter_class


def _embedded_shape():
    """The embedded model's shape: 48 px / patch 16 -> 9 image tokens, 12 layers, hidden 128."""
    from saturation.core.tiny import tiny_llava_config, word_tokenizer
    from saturation.shapes import IMAGE_SIZE, vocabulary

    return tiny_llava_config(len(word_tokenizer(vocabulary())), image_size=IMAGE_SIZE, patch_size=16,
                             vision_hidden=64, hidden=128, layers=12, heads=4, intermediate=344,
                             tie_word_embeddings=True)


def _cpu_bench_shape():
    """The routing issue's CPU benchmark: hidden 256, 12 layers, 4 heads, 64 image tokens (128 px / patch 16)."""
    from saturation.core.tiny import tiny_llava_config

    return tiny_llava_config(512, image_size=128, patch_size=16, vision_hidden=64, hidden=256, layers=12, heads=4,
                             intermediate=688)


# Name -> config builder and name -> the checkpoint's dtype: every family's presets, then the toolkit's own shapes.
GEOMETRIES: dict[str, Callable] = {**{name: p.config for name, p in PRESETS.items()},
                                   "tiny": _embedded_shape, "cpu-bench": _cpu_bench_shape}
CHECKPOINT_DTYPE: dict[str, torch.dtype] = {**{name: p.dtype for name, p in PRESETS.items()},
                                            "tiny": torch.float32, "cpu-bench": torch.float32}
# The image an anyres geometry is measured with, (H, W) px: COCO's typical 480x640 photo. Its tokens, by the
# adapters' count: llava-next-7b 2,340 (base tile + 2x2 grid, each row closed by a newline token), llava-onevision-7b 2,929;
# qwen2.5-vl-7b 391 (resized to 476x644, 28 px per token), qwen3-vl-8b 300 (480x640, 32 px per token);
# LLaVA-1.5 takes any image as 576, Gemma 3 as 256.
REPRESENTATIVE_IMAGE = (480, 640)


def geometry_config(name: str, layers: int | None = None):
    """The config of a named geometry, optionally `layers` decoder layers deep."""
    config = GEOMETRIES[name]()
    if layers is not None:
        text = config.text_config
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):  # Mistral/Qwen2 configs list one type per layer
            text.layer_types = text.layer_types[:layers]
    config.architectures = [type(config).__name__.replace("Config", "ForConditionalGeneration")]
    return config


def image_tokens_of(config, image_size: tuple[int, int] | None = None) -> int:
    """Image tokens for one image of `image_size` (H, W) px, as the backbone adapter counts them: fixed for
    LLaVA-1.5 ((size / patch)^2, +1 if CLS is kept); for anyres families (NeXT, OneVision) it depends on the size,
    which defaults to one square tile."""
    return adapter_class(config).image_tokens(config, image_size)


def random_llava(config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random weights of `config` (any supported family), initialised directly on `device` in `dtype` (sdpa, eval
    mode)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# The image and turn tokens of families whose prompts do not use LLaVA's ``<image>``, by model type: config
# attribute -> token, and the turn's markers (each adapter's `special_tokens`, `turn_tokens`).
FAMILY_TOKENS = {model_type: dict(cls.special_tokens) for model_type, cls in ADAPTERS.items() if cls.special_tokens}
TURN_TOKENS = {model_type: cls.turn_tokens for model_type, cls in ADAPTERS.items() if cls.turn_tokens}


def geometry_processor(config, words):
    """A word-level processor matched to `config`'s image pipeline (tile size, anyres pinpoints, CLS or not), with
    ``<image>`` at id 4 (families with their own image tokens: those, `FAMILY_TOKENS`); offline and PIL-only. Each
    family's adapter builds it (`Adapter.random_processor`)."""
    return adapter_class(config).random_processor(config, words)


def random_checkpoint(name: str, layers: int | None, dtype: torch.dtype | str | None, device, seed: int = 0):
    """``(model, processor)``: random weights of geometry `name` and a word-level processor matched to its image
    pipeline (`geometry_processor`: tile size, anyres pinpoints).

    The processor knows the shapes-world words (the embedded probe data) and puts ``<image>`` at id 4, so the
    config's image and pad ids are moved to match (a video token, where the family has one, goes to the last id,
    which no word reaches; families with their own image tokens get those tokens' ids, `FAMILY_TOKENS`);
    vocabulary size, widths and depth stay the architecture's.
    """
    from saturation.core.loading import resolve_device, resolve_dtype
    from saturation.shapes import vocabulary

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = geometry_config(name, layers)
    processor = geometry_processor(config, vocabulary())
    tokenizer = processor.tokenizer
    if config.model_type in FAMILY_TOKENS:
        for attr, token in FAMILY_TOKENS[config.model_type].items():
            setattr(config, attr, tokenizer.convert_tokens_to_ids(token))
    else:
        config.image_token_index = config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if hasattr(config, "video_token_id") and config.model_type not in FAMILY_TOKENS:
        config.video_token_index = config.video_token_id = config.text_config.vocab_size - 1
    config.pad_token_id = config.text_config.pad_token_id = tokenizer.pad_token_id
    model = random_llava(config, CHECKPOINT_DTYPE[name] if dtype == "auto" else dtype, device, seed)
    return model, processor
