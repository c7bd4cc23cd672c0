"""Tiny random models of all six supported families, built in code (GQA), with offline processors, as transformers'
own tests build theirs. One `Family` per name (`family(name)`, processors built once per session) gives each family's
config, model, padded batch, HF reference forward, naive routing reference and the tokens decoding must not emit.

- LLaVA-1.5 (Llama LM), LLaVA-NeXT (Mistral LM, anyres tiles + image_newline), LLaVA-OneVision (SigLIP tower, Qwen2 LM
  with q/k/v biases, anyres_max_9). Tiles are 16 px with patch 8 (4 tokens a tile) so anyres images stay a few dozen
  tokens: a 40x40 image is a 2x2 grid (4 + 4 x 5 = 24 tokens on NeXT), a 40x80 one a 1x2 grid (14): two sizes in one
  batch give ragged image-token counts.
- Qwen2.5-VL, Qwen3-VL: patches are 8 px and the merger joins 2x2 of them, so one image token covers 16x16 px: a
  32x32 image is 4 tokens, 32x64 is 8 and 48x32 is 6. Two or three sizes in one left-padded batch give ragged
  image-token counts and different M-RoPE grids (text after a 2x4 grid resumes at start + 4, not start + 8).
- Gemma 3: SigLIP sees 32x32 px in 4 px patches (8x8), the projector pools them 2x2 into 16 image tokens per image.
  The text model has 6 layers, sliding / sliding / full / sliding / sliding / full, with a sliding window of 8:
  shorter than an image block (16 tokens) and than every test sequence, so the window cuts into image blocks, into
  text after an image, and into long prompts. Batches: row 0 holds two images (text between and after), row 1 one
  image first and a long text after it, left padded: ragged image counts, so subsets have fillers.

Also: checkpoints on disk (the CLI's ``--model DIR``) and every command as a user runs them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)

from saturation.core.adapters import adapter_for, position_ids_from_mask
from saturation.core.tiny import tiny_llava_config, tiny_processor, word_tokenizer

LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
FAMILIES = (*LLAVA_FAMILIES, *QWEN_FAMILIES, "gemma3")

# The language model of LLaVA-NeXT (Mistral), OneVision (Qwen2) and the Qwen-VL families
LM = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
      "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
PATCH = 8  # the vision patch of the LLaVA and Qwen fixtures (Gemma's is GEMMA_PATCH)
COLOURS = ("red", "blue", "green")

# ---------------------------------------------------------------- LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision
LLAVA_WORDS = ("what", "colour", "is", "the", "circle", "square", "red", "blue", "green", "how", "many", "left", "a")
TILE = 16
PINPOINTS = [[16, 32], [32, 16], [32, 32]]
LLAVA_TEXTS = ("USER: <image>\nwhat colour is the circle? ASSISTANT:",
               "USER: how many <image>\nis the square red? ASSISTANT: a",  # text before the image
               "USER: <image>\nwhat ASSISTANT:")
LLAVA_IMAGE_SIZES = ((40, 40), (40, 80), (48, 32))  # (H, W): NeXT/OneVision grids 2x2, 1x2, 2x1 (LLaVA-1.5: one tile)

# ---------------------------------------------------------------- Qwen2.5-VL, Qwen3-VL
QWEN_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                 "<|vision_end|>", "<|im_start|>", "<|im_end|>")
QWEN_IMAGE, QWEN_VIDEO, VISION_START, VISION_END = 4, 5, 6, 7
QWEN_WORDS = ("user", "assistant", "what", "colour", "is", "the", "circle", "square", "red", "blue", "green", "how",
              "many", "left", "a", "?")
MERGE = 2
USER, ASSISTANT = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
QWEN_PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_TEXTS = (f"{USER}{QWEN_PICTURE}what colour is the circle ?{ASSISTANT}",
              f"{USER}how many {QWEN_PICTURE}is the square red ?{ASSISTANT}a",  # text before the image
              f"{USER}{QWEN_PICTURE}what{ASSISTANT}")
QWEN_IMAGE_SIZES = ((32, 64), (48, 32), (32, 32))  # (H, W): merged grids 2x4, 3x2, 2x2 -> 8, 6, 4 tokens
DEEPSTACK = 2  # Qwen3-VL: features injected after decoder layers 0 and 1
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}  # head_dim 16: 8 frequencies
QWEN_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": PATCH,
               "spatial_merge_size": MERGE, "temporal_patch_size": 2, "out_hidden_size": 64}
QWEN_TOKENS = {"image_token_id": QWEN_IMAGE, "video_token_id": QWEN_VIDEO, "vision_start_token_id": VISION_START,
               "vision_end_token_id": VISION_END}

# ---------------------------------------------------------------- Gemma 3
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
                  "<start_of_turn>", "<end_of_turn>")
GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_BOI, GEMMA_EOI, GEMMA_IMAGE = 0, 1, 2, 4, 5, 6
GEMMA_WORDS = ("user", "model", "what", "colour", "is", "the", "circle", "square", "red", "blue", "green", "how",
               "many", "left", "a", "and", "then", "next", "to", "it", "of", "?")
GEMMA_IMAGE_SIZE, GEMMA_PATCH, TOKENS_PER_IMAGE = 32, 4, 16
WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
GEMMA_PICTURE = "<start_of_image>"  # the processor expands it to <start_of_image> 16 x <image_soft_token> <end_of_image>
GEMMA_TEXTS = (f"user what {GEMMA_PICTURE} colour is the {GEMMA_PICTURE} circle ? model",
               f"user {GEMMA_PICTURE} how many red and blue circle left of the square and then next to it ? model")
IMAGES_PER_ROW = (2, 1)
LONG_TEXT = ("user what colour is the circle and how many red and blue square left of the circle and then next to it"
             " ? model")


# ---------------------------------------------------------------- processors
class _ImagesOnly:
    """Accept a missing video processor (it needs torchvision; images only here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class OfflineOnevisionProcessor(_ImagesOnly, LlavaOnevisionProcessor):
    pass


class OfflineQwen25Processor(_ImagesOnly, Qwen2_5_VLProcessor):
    pass


class OfflineQwen3Processor(_ImagesOnly, Qwen3VLProcessor):
    pass


def word_level_tokenizer(specials: tuple[str, ...], words: tuple[str, ...], **tokens) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: `specials` (ids in order), then `words`; `tokens`: its special-token kwargs."""
    vocab = {w: i for i, w in enumerate((*specials, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **tokens)


def qwen_tokenizer(words: tuple[str, ...] = QWEN_WORDS) -> PreTrainedTokenizerFast:
    """Qwen's special tokens (ids as in QWEN_SPECIALS), then `words`."""
    fast = word_level_tokenizer(QWEN_SPECIALS, words, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[4:])})
    return fast


def gemma_tokenizer(words: tuple[str, ...] = GEMMA_WORDS) -> PreTrainedTokenizerFast:
    """Gemma's special tokens (ids as in GEMMA_SPECIALS), then `words`."""
    return word_level_tokenizer(
        GEMMA_SPECIALS, words, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})


def gemma_processor(words: tuple[str, ...] = GEMMA_WORDS, chat_template: str | None = None) -> Gemma3Processor:
    images = Gemma3ImageProcessorPil(size={"height": GEMMA_IMAGE_SIZE, "width": GEMMA_IMAGE_SIZE})
    return Gemma3Processor(image_processor=images, tokenizer=gemma_tokenizer(words),
                           image_seq_length=TOKENS_PER_IMAGE, chat_template=chat_template)


def _image_processor(name: str):
    if name == "llava_next":
        return LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                          image_grid_pinpoints=PINPOINTS)
    if name == "llava_onevision":
        return LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})


def _processor(name: str):
    if name == "llava":
        return tiny_processor(LLAVA_WORDS, image_size=TILE, patch_size=PATCH)
    if name == "gemma3":
        return gemma_processor()
    if name in QWEN_FAMILIES:
        cls = OfflineQwen25Processor if name == "qwen2_5_vl" else OfflineQwen3Processor
        return cls(image_processor=_image_processor(name), tokenizer=qwen_tokenizer(), video_processor=None)
    tokenizer = word_tokenizer(LLAVA_WORDS)
    if name == "llava_next":
        return LlavaNextProcessor(image_processor=_image_processor(name), tokenizer=tokenizer, patch_size=PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return OfflineOnevisionProcessor(image_processor=_image_processor(name), tokenizer=tokenizer,
                                     video_processor=None, num_image_tokens=(TILE // PATCH) ** 2,
                                     vision_feature_select_strategy="full")


# ---------------------------------------------------------------- configs and models
def _vision(kind: str):
    kw = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": TILE, "patch_size": PATCH}
    return SiglipVisionConfig(**kw) if kind == "siglip" else CLIPVisionConfig(projection_dim=32, **kw)


def _llava_config(name: str, vocab: int, layers: int):
    if name == "llava":
        return tiny_llava_config(vocab, image_size=TILE, patch_size=PATCH, layers=layers, hidden=64, heads=4,
                                 kv_heads=2, intermediate=128)
    if name == "llava_next":
        return LlavaNextConfig(vision_config=_vision("clip"), image_token_index=4, image_grid_pinpoints=PINPOINTS,
                               text_config=MistralConfig(vocab_size=vocab, num_hidden_layers=layers,
                                                         sliding_window=None, **LM),
                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaOnevisionConfig(vision_config=_vision("siglip"), image_token_index=4, video_token_index=3,
                                image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                vision_feature_select_strategy="full",
                                text_config=Qwen2Config(vocab_size=vocab, num_hidden_layers=layers, **LM))


def _qwen_config(name: str, vocab: int, layers: int, std: float | None):
    text = {"vocab_size": vocab, "num_hidden_layers": layers, "rope_parameters": dict(ROPE), **LM}
    if std is not None:
        text["initializer_range"] = std
    if name == "qwen2_5_vl":
        vision = QWEN_VISION | {"window_size": 32, "fullatt_block_indexes": [1]}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **QWEN_TOKENS)
    vision = QWEN_VISION | {"num_position_embeddings": 16, "deepstack_visual_indexes": list(range(DEEPSTACK))}
    return Qwen3VLConfig(text_config=text | {"head_dim": 16}, vision_config=vision, **QWEN_TOKENS)


def gemma_config(layers: int = 6, std: float | None = None, tie: bool = True, vocab: int | None = None
                 ) -> Gemma3Config:
    """`tie`: lm_head shares the embedding (as released). Untied, greedy decoding of a random model stops repeating
    the last token (its sqrt(hidden)-scaled embedding dominates the residual stream)."""
    text = {"vocab_size": vocab or len(GEMMA_SPECIALS) + len(GEMMA_WORDS), "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW,
            "layer_types": (LAYER_TYPES * 2)[:layers], "max_position_embeddings": 512, "tie_word_embeddings": tie,
            "pad_token_id": GEMMA_PAD, "eos_token_id": GEMMA_EOS, "bos_token_id": GEMMA_BOS,
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1000.0}}}
    if std is not None:
        text["initializer_range"] = std
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": GEMMA_IMAGE_SIZE, "patch_size": GEMMA_PATCH}
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
                        boi_token_index=GEMMA_BOI, eoi_token_index=GEMMA_EOI, image_token_index=GEMMA_IMAGE,
                        tie_word_embeddings=tie)


MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
                 "llava_onevision": LlavaOnevisionForConditionalGeneration,
                 "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration,
                 "gemma3": Gemma3ForConditionalGeneration}


def _randomise(name: str, model) -> None:
    """Parameters HF initialises plainly, drawn at random so that a dropped one shows: biases (Qwen2's q/k/v) are 0,
    Qwen3's q/k norms 1, Gemma's projector weight 0 (every image would embed as 0) and its RMSNorm weights 0."""
    with torch.no_grad():
        for key, p in model.named_parameters():
            if name == "gemma3":
                if key.endswith("mm_input_projection_weight"):
                    p.normal_(0.0, 0.5)
                elif "norm" in key and key.endswith("weight"):
                    p.normal_(0.0, 0.3)
            elif key.endswith("proj.bias") or (name in QWEN_FAMILIES and key.endswith(("q_norm.weight",
                                                                                        "k_norm.weight"))):
                p.normal_(1.0 if "norm" in key else 0.0, 0.5)


# ---------------------------------------------------------------- one family's fixtures
@dataclass
class Family:
    """One family's tiny model factory, its processor, its batches and its references."""

    name: str
    processor: object

    @property
    def layers(self) -> int:
        """The default depth: 4 decoder layers (Gemma: 6, its sliding/sliding/full pattern twice)."""
        return 6 if self.name == "gemma3" else 4

    @property
    def image_sizes(self) -> tuple:
        """(H, W) of the batch's images, one per row (Gemma's batch: random 32x32 noise, IMAGES_PER_ROW)."""
        return QWEN_IMAGE_SIZES if self.name in QWEN_FAMILIES else LLAVA_IMAGE_SIZES

    def config(self, layers: int | None = None, std: float | None = None, tie: bool = True):
        """`std`: the language model's init std; `tie` (Gemma): lm_head shares the embedding."""
        layers = self.layers if layers is None else layers
        vocab = len(self.processor.tokenizer)
        if self.name == "gemma3":
            return gemma_config(layers, std, tie, vocab)
        if self.name in QWEN_FAMILIES:
            return _qwen_config(self.name, vocab, layers, std)
        cfg = _llava_config(self.name, vocab, layers)
        if std is not None:
            cfg.text_config.initializer_range = std
        return cfg

    def model(self, attn: str = "sdpa", seed: int = 0, layers: int | None = None, std: float | None = None,
              tie: bool = True):
        """A random tiny model in eval mode, with the parameters HF initialises plainly drawn at random."""
        torch.manual_seed(seed)
        model = MODEL_CLASSES[self.name](self.config(layers, std, tie)).eval()
        _randomise(self.name, model)
        model.set_attn_implementation(attn)
        return model

    def batch(self, rows: int = 3, padding: str = "left", images: bool = True, sizes=None, seed: int = 0) -> dict:
        """A padded batch from the processor: input_ids, attention_mask and the family's image inputs (Qwen:
        mm_token_type_ids, pixel_values [patches, 3*2*8*8], image_grid_thw [images, 3]; Gemma: token_type_ids and
        pixel_values [3, 3, 32, 32] of random noise from `seed`, in its two fixed rows)."""
        if self.name == "gemma3":
            return _gemma_batch(self.processor, padding, images, seed)
        self.processor.tokenizer.padding_side = padding
        texts = list((QWEN_TEXTS if self.name in QWEN_FAMILIES else LLAVA_TEXTS)[:rows])
        if not images:
            picture = QWEN_PICTURE if self.name in QWEN_FAMILIES else "<image>\n"
            texts = [t.replace(picture, "") for t in texts]
            return dict(self.processor.tokenizer(texts, return_tensors="pt", padding=True))
        sizes = self.image_sizes if sizes is None else sizes
        pictures = [Image.new("RGB", (w, h), c) for (h, w), c in zip(sizes[:rows], COLOURS)]
        return dict(self.processor(images=pictures, text=texts, return_tensors="pt", padding=True))

    def hf_logits(self, model, batch: dict) -> torch.Tensor:
        """HF's own forward as generate runs it: positions ``cumsum(mask) - 1``, except Qwen's, which computes its
        M-RoPE positions itself from the batch (1D positions would be another model)."""
        if self.name in QWEN_FAMILIES:
            with torch.no_grad():
                return model(**batch).logits
        return hf_logits(model, batch)

    def naive_logits(self, routed, **batch) -> torch.Tensor:
        """Every variant as full-sequence layer loops with the family's masks and positions."""
        if self.name == "gemma3":
            return gemma_naive_logits(routed, **batch)
        if self.name in QWEN_FAMILIES:
            return qwen_naive_logits(routed, **batch)
        from routing_fixtures import naive_logits

        return naive_logits(routed, **batch)

    def suppressed(self, model) -> list[int]:
        """The tokens greedy decoding must not emit (after the prompt the routed model takes text only)."""
        extra = {"gemma3": [GEMMA_BOI, GEMMA_EOI]}.get(self.name, [QWEN_VIDEO] if self.name in QWEN_FAMILIES else [])
        return [adapter_for(model).image_token_id, *extra]


_FAMILIES: dict[str, Family] = {}


def family(name: str) -> Family:
    """The family's fixtures (processors are built once per session)."""
    if name not in _FAMILIES:
        _FAMILIES[name] = Family(name, _processor(name))
    return _FAMILIES[name]


def image_kwargs(batch: dict) -> dict:
    """Everything of a batch besides ids, mask and labels: pixel_values and the family's image kwargs."""
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}


@torch.no_grad()
def hf_logits(model, batch: dict) -> torch.Tensor:
    """HF's own forward with generate's position convention (``cumsum(mask) - 1``)."""
    return model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"])).logits


def image_counts(model, batch: dict) -> list[int]:
    return (batch["input_ids"] == adapter_for(model).image_token_id).sum(1).tolist()


def _gemma_batch(processor, padding: str, images: bool, seed: int) -> dict:
    tok = processor.tokenizer
    tok.padding_side = padding
    if not images:
        texts = [LONG_TEXT, GEMMA_TEXTS[1].replace(GEMMA_PICTURE, "")]
        return dict(tok(texts, return_tensors="pt", padding=True))
    g = torch.Generator().manual_seed(seed)
    pictures = [[_noise(g) for _ in range(n)] for n in IMAGES_PER_ROW]
    return dict(processor(images=pictures, text=list(GEMMA_TEXTS), return_tensors="pt", padding=True))


def _noise(g: torch.Generator) -> Image.Image:
    """Random pixels: a solid colour would give 16 equal image tokens and hide the mask among them."""
    pixels = torch.randint(0, 256, (GEMMA_IMAGE_SIZE, GEMMA_IMAGE_SIZE, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# ---------------------------------------------------------------- naive references of the Qwen and Gemma families
@torch.no_grad()
def qwen_naive_logits(routed, input_ids, attention_mask, pixel_values=None, **kwargs) -> torch.Tensor:
    """Every variant as full-sequence layer loops (routing is a mask plus a reset of the image positions), with the
    model's M-RoPE positions and DeepStack injection: `routing_fixtures.naive_logits` for the Qwen families."""
    from routing_fixtures import layer_mask, run_plan_naively

    model = routed.base
    a = adapter_for(model)
    e = a.encode(input_ids, pixel_values, **kwargs)
    h, img = e.inputs_embeds, e.image_mask
    pos = a.positions(attention_mask, image_mask=img, **kwargs)
    rope = a.rope(h, pos)
    n = h.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None]
    eye = torch.eye(n, dtype=torch.bool)[None]  # keeps rows that see nothing finite; never changes a real row
    full = causal & attention_mask.bool()[:, None, :]
    image_only = full & img[:, :, None] & img[:, None, :]
    text_only = full & ~img[:, :, None] & ~img[:, None, :]

    def layer(module, x, allowed):
        return module(x, attention_mask=layer_mask(allowed | eye, model), position_embeddings=rope)

    return run_plan_naively(routed, h, img, layer, full, image_only, text_only, shallow=a.injecting(e))


def allowed(img: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a query may see in HF's Gemma 3 masks, per layer type, as plain [B, q, k] booleans over the full sequence:
    causal OR same image block (each contiguous run of image tokens), AND the window for sliding layers; pads out."""
    n = img.shape[1]
    idx = torch.arange(n)
    start = img & ~torch.nn.functional.pad(img, (1, 0))[:, :-1]
    block = torch.where(img, start.long().cumsum(1), -1)
    same = (block[:, :, None] == block[:, None, :]) & img[:, :, None]
    full = ((idx[None, :, None] >= idx[None, None, :]) | same) & valid[:, None, :]
    near = idx[None, None, :] > idx[None, :, None] - WINDOW
    return {"full_attention": full, "sliding_attention": full & near}


@torch.no_grad()
def gemma_naive_logits(routed, input_ids, attention_mask, pixel_values=None, **_) -> torch.Tensor:
    """Every variant as full-sequence layer loops with explicit per-layer-type masks (`allowed`): LF's deep stack is
    HF's mask with text queries kept off image keys, the side branch HF's mask among image tokens. Windows count in
    the full sequence, so a subset that counted its own indices would differ."""
    from routing_fixtures import layer_mask, run_plan_naively

    model = routed.base
    a = adapter_for(model)
    h, img = a.embed(input_ids, pixel_values)
    pos = position_ids_from_mask(attention_mask)
    rope = a.rope(h, pos)
    eye = torch.eye(h.shape[1], dtype=torch.bool)[None]  # keeps rows that see nothing finite; never changes a real row
    full = allowed(img, attention_mask.bool())
    image_only = {k: m & img[:, :, None] & img[:, None, :] for k, m in full.items()}
    text_only = {k: m & ~img[:, :, None] & ~img[:, None, :] for k, m in full.items()}

    def layer(module, x, masks):
        kind = a.layer_type(module)
        return module(x, attention_mask=layer_mask(masks[kind] | eye, model), position_embeddings=rope[kind])

    return run_plan_naively(routed, h, img, layer, full, image_only, text_only)


# ---------------------------------------------------------------- checkpoints on disk (the CLI's --model DIR)
LLAVA_CHAT_WORDS = ("user", "assistant", "yes", "no")
CHAT_WORDS = ("yes", "no")  # Qwen-VL and Gemma (their word lists hold user/assistant/model already)
# A Qwen-style chat template (llava-onevision's form: images as content entries, <|im_start|>/<|im_end|> turns)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen-VL's chat template, cut to what the data uses (images as content entries, the vision tokens around the pad)
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma 3's chat template, cut to what the data uses (BOS first, images as <start_of_image>, "model" turns)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' }}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<start_of_image>' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# What a released Qwen3-VL checkpoint ships beside its processor: AutoProcessor then wants torchvision
VIDEO_PREPROCESSOR = {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": PATCH, "merge_size": MERGE,
                      "temporal_patch_size": 2}


def checkpoint_processor(name: str, chat_template: str | None = None):
    """A fresh processor of family `name` that can be saved (images only, as `load_model` builds it without
    torchvision), knowing the chat words too. LLaVA families: with `chat_template`, Qwen's turn tokens become
    specials (OneVision's own template has them too); Gemma's turn tokens are whole specials, as released."""
    from saturation.core.loading import (
        ImageOnlyOnevisionProcessor,
        ImageOnlyQwen2_5_VLProcessor,
        ImageOnlyQwen3VLProcessor,
    )

    if name == "gemma3":
        proc = gemma_processor(GEMMA_WORDS + CHAT_WORDS, chat_template)
        proc.tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
        return proc
    if name in QWEN_FAMILIES:
        cls = ImageOnlyQwen2_5_VLProcessor if name == "qwen2_5_vl" else ImageOnlyQwen3VLProcessor
        return cls(image_processor=_image_processor(name), tokenizer=qwen_tokenizer(QWEN_WORDS + CHAT_WORDS),
                   chat_template=chat_template)
    if name == "llava":
        proc = tiny_processor(LLAVA_WORDS + LLAVA_CHAT_WORDS, image_size=TILE, patch_size=PATCH)
        tokenizer, images = proc.tokenizer, proc.image_processor
    else:
        tokenizer, images = word_tokenizer(LLAVA_WORDS + LLAVA_CHAT_WORDS), _image_processor(name)
    if chat_template is not None or name == "llava_onevision":  # Qwen's turn tokens (OneVision's own template too)
        tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    if name == "llava_next":
        return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=chat_template)
    if name == "llava_onevision":
        return ImageOnlyOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                           num_image_tokens=(TILE // PATCH) ** 2,
                                           vision_feature_select_strategy="full", chat_template=chat_template)
    proc.chat_template = chat_template
    return proc


def save_checkpoint(name: str, folder, layers: int | None = None, chat_template: str | None = None, seed: int = 0,
                    video_config: bool = False) -> Path:
    """A tiny random checkpoint of family `name` saved with save_pretrained (model + processor), as a user's
    ``--model DIR``; weights scaled up (std 0.2, Gemma's lm_head untied) so that greedy answers depend on the input.
    `video_config`: also write the video processor's config a released Qwen3-VL has (AutoProcessor cannot build it
    here)."""
    folder = Path(folder)
    proc = checkpoint_processor(name, chat_template)
    Family(name, proc).model(seed=seed, layers=layers, std=0.2, tie=False).save_pretrained(folder)
    proc.save_pretrained(folder)
    if video_config:
        (folder / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR))
    return folder


def write_images_dataset(folder, sizes=LLAVA_IMAGE_SIZES, n: int = 6, turns: int = 2):
    """``data.json`` with `n` LLaVA records about solid-colour images of the given (H, W) sizes, cycled (so anyres
    batches are ragged), `turns` question/answer turns each, in the fixtures' word vocabulary."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        (h, w), colour = sizes[i % len(sizes)], COLOURS[i % len(COLOURS)]
        Image.new("RGB", (w, h), colour).save(folder / "images" / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": colour}]
        conv += [{"from": "human", "value": "is the square red?"}, {"from": "gpt", "value": "yes" if i % 2 else "no"}] \
            * (turns - 1)
        records.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": conv, "question_type": "colour"})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------- every command, as a user runs them
def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def run_every_command(model, data, tmp_path, layers: int, first: int = 1) -> None:
    """Every command on the checkpoint `model` (a `--model DIR`) as a user runs them, run from `tmp_path`: probe
    (three views, medians in range, Figure 2, a recommendation at the model's own depth, no split before `first`)
    -> train at --split auto -> eval -> generate (two image sizes in one batch = each alone) -> bench -> analyze."""
    import pandas as pd
    from typer.testing import CliRunner

    from cli import routing_app, saturation_app

    runner = CliRunner()
    probe = tmp_path / "probe"
    _ok(runner.invoke(saturation_app, ["probe", "--model", str(model), "--data", str(data), "--n", "6",
                                       "--batch-size", "3", "--out", str(probe)]))
    rec = json.loads((probe / "recommendation.json").read_text())
    assert rec["num_layers"] == layers and first <= rec["split"] <= layers - 2
    assert rec["evidence"]["clip"] == [first, layers - 2] and min(rec["alternatives"].values()) >= first
    assert (probe / "figure2.png").stat().st_size > 0 and (probe / "figure2.pdf").is_file()
    summary = pd.read_csv(probe / "summary.csv")
    med = {m: summary[summary.metric == m]["median"] for m in ("cosine", "attention_mass", "logit_lens_kl")}
    assert set(summary.layer) == set(range(layers)) and not any(v.isna().any() for v in med.values())
    assert med["cosine"].between(-1, 1).all() and med["attention_mass"].between(0, 1).all()
    assert (med["logit_lens_kl"] >= 0).all()

    run = tmp_path / "run"
    _ok(runner.invoke(routing_app, ["train", "--model", str(model), "--split", "auto", "--probe", str(probe),
                                    "--data", str(data), "--out", str(run), "--max-steps", "2", "--batch-size", "3",
                                    "--save-steps", "2"]))
    assert json.loads((run / "train_summary.json").read_text())["split"] == rec["split"]

    _ok(runner.invoke(routing_app, ["eval", "--model", str(model), "--routing", str(run), "--data", str(data),
                                    "--json", str(tmp_path / "eval.json"), "--max-new-tokens", "2"]))
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 6

    images = [tmp_path / "square.png", tmp_path / "wide.png"]
    Image.new("RGB", (40, 40), "red").save(images[0])
    Image.new("RGB", (80, 40), "blue").save(images[1])  # (W, H): a 1x2 grid on anyres families, 2x2 and 2x5 on Qwen
    ask = ["generate", "--model", str(model), "--routing", str(run), "--prompt", "what colour is the circle?",
           "--max-new-tokens", "3"]
    both = runner.invoke(routing_app, [*ask, "--image", str(images[0]), "--image", str(images[1])])
    alone = [runner.invoke(routing_app, [*ask, "--image", str(p)]) for p in images]
    _ok(both), [_ok(a) for a in alone]
    answers = [line.strip() for line in both.stdout.strip().splitlines()]
    assert len(answers) == 2 and answers[0].startswith(f"{images[0]}:")
    assert answers == [a.stdout.strip() for a in alone]  # a left-padded ragged batch answers as each alone
    assert any(len(line) > len(f"{images[0]}:") for line in answers)  # something was generated

    _ok(runner.invoke(routing_app, ["bench", "--model", str(model), "--routing", str(run), "--text-tokens", "8",
                                    "--repeats", "1", "--warmup", "0", "--new-tokens", "1",
                                    "--json", str(tmp_path / "bench.json")]))
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["images"] == "real" and bench["layers"] == layers and bench["split"] == rec["split"]

    _ok(runner.invoke(routing_app, ["analyze", "--routing", str(run), "--model", str(model), "--data", str(data),
                                    "--n", "4", "--out", str(tmp_path / "analysis")]))
    mech = json.loads((tmp_path / "analysis" / "mechanism.json").read_text())
    assert mech["shallow_drift_min_cosine"] > 0.9999  # the shallow stack is shared, ragged padding or not


def check_plugin_requests(routed, proc, pictures: list[list]) -> None:
    """The lmms-eval plugin's requests on `routed` (no lmms-eval needed): two prompts with the two images of
    `pictures` answer in one batch as each alone, and loglikelihood is a finite loss."""
    import math

    from routing.lmms.plugin import generate_requests, loglikelihood

    contexts, settings = ["what colour is the circle?"] * 2, [{"max_new_tokens": 3}] * 2
    both = generate_requests(routed, proc, contexts, settings, lambda i: pictures[i], batch_size=2)
    alone = [generate_requests(routed, proc, contexts[:1], settings[:1], lambda _, i=i: pictures[i], batch_size=1)[0]
             for i in range(2)]
    assert both == alone
    nll, _ = loglikelihood(routed, proc, "what colour is the circle?", " red", pictures[1])
    assert math.isfinite(nll) and nll > 0
