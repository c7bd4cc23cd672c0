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


def _llava_next_7b():
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


def _llava_onevision_7b():
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


def _gemma_3(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int):
    """google/gemma-3-*-it: SigLIP so400m/14 at 896 px pooled 4x4 into 256 image tokens, a Gemma 3 LM (head_dim 256,
    five sliding-window layers of 1024 per global one, local RoPE base 1e4, global 1e6 with linear scaling 8)."""
    from transformers import Gemma3Config

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    text = {"vocab_size": 262208, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024, "rope_parameters": rope,
            "max_position_embeddings": 131072}
    vision = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
              "image_size": 896, "patch_size": 14, "vision_use_head": False}
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=255999,
                        eoi_token_index=256000, image_token_index=262144)


def _qwen2_5_vl_7b():
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


def _qwen3_vl_8b():
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


GEOMETRIES: dict[str, Callable] = {
    "llava-1.5-7b": functools.partial(_llava_15, 4096, 11008, 32, 32),
    "llava-1.5-13b": functools.partial(_llava_15, 5120, 13824, 40, 40),
    "llava-next-7b": _llava_next_7b,
    "llava-onevision-7b": _llava_onevision_7b,
    "gemma-3-4b": functools.partial(_gemma_3, 2560, 10240, 34, 8, 4),
    "gemma-3-12b": functools.partial(_gemma_3, 3840, 15360, 48, 16, 8),
    "qwen2.5-vl-7b": _qwen2_5_vl_7b,
    "qwen3-vl-8b": _qwen3_vl_8b,
    "tiny": _embedded_shape,
    "cpu-bench": _cpu_bench_shape,
}
CHECKPOINT_DTYPE = {"llava-1.5-7b": torch.float16, "llava-1.5-13b": torch.float16, "llava-next-7b": torch.float16,
                    "llava-onevision-7b": torch.bfloat16, "gemma-3-4b": torch.bfloat16, "gemma-3-12b": torch.bfloat16,
                    "qwen2.5-vl-7b": torch.bfloat16, "qwen3-vl-8b": torch.bfloat16,
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
    from saturation.core.adapters import adapter_class

    return adapter_class(config).image_tokens(config, image_size)


def random_llava(config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random weights of `config` (any supported family), initialised directly on `device` in `dtype` (sdpa, eval
    mode)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# The image and turn tokens of families whose prompts do not use LLaVA's ``<image>``: config attribute -> token.
FAMILY_TOKENS = {
    "qwen2_5_vl": {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                   "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"},
    "qwen3_vl": {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"},
    "gemma3": {"image_token_id": "<image_soft_token>", "boi_token_id": "<start_of_image>",
               "eoi_token_id": "<end_of_image>"},
}
TURN_TOKENS = {"qwen2_5_vl": ("<|im_start|>", "<|im_end|>"), "qwen3_vl": ("<|im_start|>", "<|im_end|>"),
               "gemma3": ("<start_of_turn>", "<end_of_turn>")}


def _family_tokenizer(model_type: str, words, extra: dict | None = None):
    """A word-level tokenizer (`saturation.core.tiny`'s specials and template words, the family's turn words, `words`)
    that knows the family's image and turn tokens as whole special tokens; `extra`: named special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from saturation.core.tiny import SPECIAL_TOKENS, TEMPLATE_WORDS

    specials = [*FAMILY_TOKENS[model_type].values(), *TURN_TOKENS[model_type]]
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS[:4], *specials, *TEMPLATE_WORDS, "user", "assistant", "model", *words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=extra or {})
    fast.add_tokens(specials, special_tokens=True)
    return fast


def _qwen_processor(config, words):
    """Qwen's PIL image processor at the released min/max pixels, images only (no torchvision)."""
    from transformers import Qwen2VLImageProcessorPil

    from saturation.core.adapters import adapter_class
    from saturation.core.loading import IMAGE_ONLY_PROCESSORS

    v = config.vision_config
    low, high = adapter_class(config).PIXELS
    images = Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                      temporal_patch_size=v.temporal_patch_size,
                                      size={"shortest_edge": low, "longest_edge": high})
    return IMAGE_ONLY_PROCESSORS[config.model_type](image_processor=images,
                                                    tokenizer=_family_tokenizer(config.model_type, words))


def _gemma_processor(config, words):
    """Gemma 3's PIL image processor at the tower's size, ``mm_tokens_per_image`` soft tokens an image."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    size = config.vision_config.image_size
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
                           tokenizer=_family_tokenizer("gemma3", words, named),
                           image_seq_length=config.mm_tokens_per_image)


def geometry_processor(config, words):
    """A word-level processor matched to `config`'s image pipeline (tile size, anyres pinpoints, CLS or not), with
    ``<image>`` at id 4 (Qwen and Gemma 3: their own image tokens, `FAMILY_TOKENS`); offline and PIL-only."""
    from saturation.core.tiny import tiny_processor, word_tokenizer

    v = config.vision_config
    if config.model_type in ("qwen2_5_vl", "qwen3_vl"):
        return _qwen_processor(config, words)
    if config.model_type == "gemma3":
        return _gemma_processor(config, words)
    if config.model_type == "llava":
        return tiny_processor(words, image_size=v.image_size, patch_size=v.patch_size)
    tokenizer = word_tokenizer(words)
    if config.model_type == "llava_next":
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        images = LlavaNextImageProcessorPil(size={"shortest_edge": v.image_size},
                                            crop_size={"height": v.image_size, "width": v.image_size},
                                            image_grid_pinpoints=config.image_grid_pinpoints)
        return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=v.patch_size,
                                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                                  num_additional_image_tokens=1)
    from transformers import LlavaOnevisionImageProcessorPil

    from saturation.core.loading import ImageOnlyOnevisionProcessor

    images = LlavaOnevisionImageProcessorPil(size={"height": v.image_size, "width": v.image_size},
                                             image_grid_pinpoints=config.image_grid_pinpoints)
    return ImageOnlyOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                       num_image_tokens=(v.image_size // v.patch_size) ** 2,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy,
                                       vision_aspect_ratio=config.vision_aspect_ratio)


def random_checkpoint(name: str, layers: int | None, dtype: torch.dtype | str | None, device, seed: int = 0):
    """``(model, processor)``: random weights of geometry `name` and a word-level processor matched to its image
    pipeline (`geometry_processor`: tile size, anyres pinpoints).

    The processor knows the shapes-world words (the embedded probe data) and puts ``<image>`` at id 4, so the
    config's image and pad ids are moved to match (a video token, where the family has one, goes to the last id,
    which no word reaches; Qwen and Gemma 3 get their own image, vision and video tokens' ids, `FAMILY_TOKENS`);
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
