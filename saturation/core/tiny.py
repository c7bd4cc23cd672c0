"""Tiny, offline LLaVA building blocks: a word-level tokenizer, a PIL-only processor and small configs.

Used by the embedded model in ``data_samples/`` and by the tests, which build random LLaVA models of the
exact ``LlavaForConditionalGeneration`` architecture in code (no hub access needed).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
TEMPLATE_WORDS = ("USER", "ASSISTANT", ":", "?", ".", ",")


def word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: specials first (pad=0, bos=1, eos=2, unk=3, image=4), then `words`.

    Splits on white space and punctuation, so the LLaVA template ``USER: <image>\\nQ ASSISTANT: A</s>``
    tokenizes without an unknown token as long as the words of Q and A are in the vocabulary.
    """
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *TEMPLATE_WORDS, *words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        add_bos_token=True,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def special_word_tokenizer(specials: Iterable[str], words: Iterable[str], named: dict[str, str] | None = None
                           ) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (the specials pad..unk and template words of `word_tokenizer`, the chat roles, `words`)
    that knows `specials` (a family's image and turn tokens) as whole special tokens; `named`: named special tokens.
    For the random geometries of families whose prompts do not use ``<image>``."""
    specials = list(specials)
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS[:4], *specials, *TEMPLATE_WORDS, "user", "assistant", "model", *words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=named or {})
    fast.add_tokens(specials, special_tokens=True)
    return fast


def tiny_processor(words: Iterable[str], image_size: int = 32, patch_size: int = 16) -> LlavaProcessor:
    """An offline `LlavaProcessor` (PIL image processor, word tokenizer) for `image_size` px square images."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=word_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token that the "default" strategy drops
    )


def tiny_llava_config(
    vocab_size: int,
    *,
    image_size: int = 32,
    patch_size: int = 16,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    hidden: int = 64,
    layers: int = 6,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int = 128,
    image_token_id: int = 4,
    tie_word_embeddings: bool = False,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config (CLIP tower, 2-layer GELU projector, Llama LM) at toy size."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    n_image = (image_size // patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=n_image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie_word_embeddings,
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg
