"""A tiny random Gemma 3 built in code, with an offline processor (PIL image processor, a word-level tokenizer with
Gemma's begin/end-of-image and image-soft tokens).

SigLIP sees 32x32 px in 4 px patches (8x8), the projector pools them 2x2 into 16 image tokens per image. The text
model has 6 layers, sliding / sliding / full / sliding / sliding / full, with a sliding window of 8: shorter than
an image block (16 tokens) and than every test sequence, so the window cuts into image blocks, into text after an
image, and into long prompts. Batches: row 0 holds two images (text between and after), row 1 one image first and
a long text after it, left padded: ragged image counts, so subsets have fillers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    PreTrainedTokenizerFast,
)

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
            "<start_of_turn>", "<end_of_turn>")
PAD, EOS, BOS, BOI, EOI, IMAGE = 0, 1, 2, 4, 5, 6
WORDS = ("user", "model", "what", "colour", "is", "the", "circle", "square", "red", "blue", "green", "how", "many",
         "left", "a", "and", "then", "next", "to", "it", "of", "?")
IMAGE_SIZE, PATCH, TOKENS_PER_IMAGE = 32, 4, 16
WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
PICTURE = "<start_of_image>"  # the processor expands it to <start_of_image> 16 x <image_soft_token> <end_of_image>
TEXTS = (f"user what {PICTURE} colour is the {PICTURE} circle ? model",
         f"user {PICTURE} how many red and blue circle left of the square and then next to it ? model")
IMAGES_PER_ROW = (2, 1)
LONG_TEXT = ("user what colour is the circle and how many red and blue square left of the circle and then next to it"
             " ? model")


def gemma_tokenizer(words: tuple[str, ...] = WORDS) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with Gemma's special tokens (ids as in SPECIALS), then `words`."""
    vocab = {w: i for i, w in enumerate((*SPECIALS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})


def gemma_processor(words: tuple[str, ...] = WORDS, chat_template: str | None = None) -> Gemma3Processor:
    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Gemma3Processor(image_processor=images, tokenizer=gemma_tokenizer(words),
                           image_seq_length=TOKENS_PER_IMAGE, chat_template=chat_template)


def gemma_config(layers: int = 6, std: float | None = None, tie: bool = True, vocab: int | None = None
                 ) -> Gemma3Config:
    """`tie`: lm_head shares the embedding (as released). Untied, greedy decoding of a random model stops repeating
    the last token (its sqrt(hidden)-scaled embedding dominates the residual stream)."""
    text = {"vocab_size": vocab or len(SPECIALS) + len(WORDS), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "query_pre_attn_scalar": 16, "sliding_window": WINDOW, "layer_types": (LAYER_TYPES * 2)[:layers],
            "max_position_embeddings": 512, "tie_word_embeddings": tie, "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS,
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1000.0}}}
    if std is not None:
        text["initializer_range"] = std
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": PATCH}
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
                        boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE, tie_word_embeddings=tie)


def gemma_model(attn: str = "sdpa", seed: int = 0, layers: int = 6, std: float | None = None, tie: bool = True,
                vocab: int | None = None):
    """A random tiny Gemma 3 in eval mode. HF initialises the projector weight to zeros (every image would embed as
    0) and the RMSNorm weights to 0 (scale 1): both are randomised, so a dropped image or norm shows."""
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(gemma_config(layers, std, tie, vocab)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                p.normal_(0.0, 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(0.0, 0.3)
    model.set_attn_implementation(attn)
    return model


@dataclass
class Gemma:
    processor: Gemma3Processor

    def batch(self, padding: str = "left", images: bool = True, seed: int = 0) -> dict:
        """input_ids, attention_mask, token_type_ids (1 = image token) and, with images, pixel_values [3, 3, 32, 32]
        of random noise (a solid colour would give 16 equal image tokens and hide the mask among them)."""
        tok = self.processor.tokenizer
        tok.padding_side = padding
        if not images:
            texts = [LONG_TEXT, TEXTS[1].replace(PICTURE, "")]
            return dict(tok(texts, return_tensors="pt", padding=True))
        g = torch.Generator().manual_seed(seed)
        pictures = [[_noise(g) for _ in range(n)] for n in IMAGES_PER_ROW]
        return dict(self.processor(images=pictures, text=list(TEXTS), return_tensors="pt", padding=True))


def _noise(g: torch.Generator) -> Image.Image:
    pixels = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


_GEMMA: list[Gemma] = []


def gemma() -> Gemma:
    """The fixtures (the processor is built once per session)."""
    if not _GEMMA:
        _GEMMA.append(Gemma(gemma_processor()))
    return _GEMMA[0]


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
def naive_logits(routed, input_ids, attention_mask, pixel_values=None, **_) -> torch.Tensor:
    """Every variant as full-sequence layer loops with explicit per-layer-type masks (`allowed`): LF's deep stack is
    HF's mask with text queries kept off image keys, the side branch HF's mask among image tokens. Windows count in
    the full sequence, so a subset that counted its own indices would differ."""
    from routing_fixtures import layer_mask, run_plan_naively

    from saturation.core.adapters import adapter_for, position_ids_from_mask

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

CHAT_WORDS = ("yes", "no")
# Gemma 3's chat template, cut to what the data uses (BOS first, images as <start_of_image>, "model" turns)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' }}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<start_of_image>' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def save_checkpoint(folder, layers: int = 6, chat_template: str | None = None, seed: int = 0):
    """A tiny random Gemma 3 saved with save_pretrained (model + processor), as a user's ``--model DIR``; weights
    scaled up (std 0.2) and lm_head untied so that greedy answers depend on the input."""
    from pathlib import Path

    folder = Path(folder)
    proc = gemma_processor(WORDS + CHAT_WORDS, chat_template)
    proc.tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)  # whole, as released
    gemma_model(seed=seed, layers=layers, std=0.2, tie=False, vocab=len(proc.tokenizer)).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder
