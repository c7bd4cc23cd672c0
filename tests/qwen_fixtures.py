"""Tiny random Qwen2.5-VL and Qwen3-VL models built in code, with offline processors (PIL image processor, a word-level
tokenizer with Qwen's special tokens, no video processor: that one needs torchvision).

Patches are 8 px and the merger joins 2x2 of them, so one image token covers 16x16 px: a 32x32 image is 4 tokens,
32x64 is 8 and 48x32 is 6. Two or three sizes in one left-padded batch give ragged image-token counts and different
M-RoPE grids (text after a 2x4 grid resumes at start + 4, not start + 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
            "<|im_start|>", "<|im_end|>")
IMAGE, VIDEO, VISION_START, VISION_END = 4, 5, 6, 7
WORDS = ("user", "assistant", "what", "colour", "is", "the", "circle", "square", "red", "blue", "green", "how", "many",
         "left", "a", "?")
PATCH, MERGE = 8, 2
USER, ASSISTANT = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
TEXTS = (f"{USER}{PICTURE}what colour is the circle ?{ASSISTANT}",
         f"{USER}how many {PICTURE}is the square red ?{ASSISTANT}a",  # text before the image
         f"{USER}{PICTURE}what{ASSISTANT}")
IMAGE_SIZES = ((32, 64), (48, 32), (32, 32))  # (H, W): merged grids 2x4, 3x2, 2x2 -> 8, 6, 4 tokens
DEEPSTACK = 2  # Qwen3-VL: features injected after decoder layers 0 and 1


def qwen_tokenizer(words: tuple[str, ...] = WORDS) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with Qwen's special tokens (ids as in SPECIALS), then `words`."""
    vocab = {w: i for i, w in enumerate((*SPECIALS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": list(SPECIALS[4:])})
    return fast


class _ImagesOnly:
    """Accept a missing video processor (it needs torchvision; images only here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class OfflineQwen25Processor(_ImagesOnly, Qwen2_5_VLProcessor):
    pass


class OfflineQwen3Processor(_ImagesOnly, Qwen3VLProcessor):
    pass


def _processor(name: str):
    images = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                      size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    cls = OfflineQwen25Processor if name == "qwen2_5_vl" else OfflineQwen3Processor
    return cls(image_processor=images, tokenizer=qwen_tokenizer(), video_processor=None)


LM = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
      "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}  # head_dim 16: 8 frequencies
VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": PATCH,
          "spatial_merge_size": MERGE, "temporal_patch_size": 2, "out_hidden_size": 64}
TOKENS = {"image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": VISION_START,
          "vision_end_token_id": VISION_END}


@dataclass
class Family:
    """One Qwen family's tiny model factory, processor and batches."""

    name: str
    processor: object

    def config(self, layers: int = 4, std: float | None = None):
        vocab = len(self.processor.tokenizer)
        text = {"vocab_size": vocab, "num_hidden_layers": layers, "rope_parameters": dict(ROPE), **LM}
        if std is not None:
            text["initializer_range"] = std
        if self.name == "qwen2_5_vl":
            vision = VISION | {"window_size": 32, "fullatt_block_indexes": [1]}
            return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **TOKENS)
        vision = VISION | {"num_position_embeddings": 16, "deepstack_visual_indexes": list(range(DEEPSTACK))}
        return Qwen3VLConfig(text_config=text | {"head_dim": 16}, vision_config=vision, **TOKENS)

    def model(self, attn: str = "sdpa", seed: int = 0, layers: int = 4, std: float | None = None):
        cls = Qwen2_5_VLForConditionalGeneration if self.name == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
        torch.manual_seed(seed)
        model = cls(self.config(layers, std)).eval()
        with torch.no_grad():  # HF initialises biases (Qwen2's q/k/v) and norm weights plainly: a dropped one would hide
            for name, p in model.named_parameters():
                if name.endswith("proj.bias") or name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.normal_(1.0 if "norm" in name else 0.0, 0.5)
        model.set_attn_implementation(attn)
        return model

    def batch(self, rows: int = 3, padding: str = "left", images: bool = True, sizes=IMAGE_SIZES) -> dict:
        """A padded batch from the processor: input_ids, attention_mask, mm_token_type_ids, and with images
        pixel_values [patches, 3*2*8*8] and image_grid_thw [images, 3]."""
        self.processor.tokenizer.padding_side = padding
        texts = list(TEXTS[:rows])
        if not images:
            texts = [t.replace(PICTURE, "") for t in texts]
            return dict(self.processor.tokenizer(texts, return_tensors="pt", padding=True))
        pictures = [Image.new("RGB", (w, h), c) for (h, w), c in zip(sizes[:rows], ("red", "blue", "green"))]
        return dict(self.processor(images=pictures, text=texts, return_tensors="pt", padding=True))


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
def naive_logits(routed, input_ids, attention_mask, pixel_values=None, **kwargs) -> torch.Tensor:
    """Every variant as full-sequence layer loops (routing is a mask plus a reset of the image positions), with the
    model's M-RoPE positions and DeepStack injection: `routing_fixtures.naive_logits` for the Qwen families."""
    from routing_fixtures import layer_mask, run_plan_naively

    from saturation.core.adapters import adapter_for

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


# ---------------------------------------------------------------- checkpoints on disk (the CLI's --model DIR)

CHAT_WORDS = ("yes", "no")
# Qwen-VL's chat template, cut to what the data uses (images as content entries, the vision tokens around the pad)
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# What a released Qwen3-VL checkpoint ships beside its processor: AutoProcessor then wants torchvision
VIDEO_PREPROCESSOR = {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": PATCH, "merge_size": MERGE,
                      "temporal_patch_size": 2}


def checkpoint_processor(name: str, chat_template: str | None = None):
    """A processor of family `name` that can be saved (images only, as `load_model` builds it without torchvision),
    knowing the chat words too."""
    from saturation.core.loading import ImageOnlyQwen2_5_VLProcessor, ImageOnlyQwen3VLProcessor

    images = _processor(name).image_processor
    cls = ImageOnlyQwen2_5_VLProcessor if name == "qwen2_5_vl" else ImageOnlyQwen3VLProcessor
    return cls(image_processor=images, tokenizer=qwen_tokenizer(WORDS + CHAT_WORDS), chat_template=chat_template)


def save_checkpoint(name: str, folder, layers: int = 4, chat_template: str | None = None, seed: int = 0,
                    video_config: bool = False):
    """A tiny random checkpoint of family `name` saved with save_pretrained (model + processor), as a user's
    ``--model DIR``; weights scaled up (std 0.2) so that greedy answers depend on the input. `video_config`: also
    write the video processor's config a released checkpoint has (which AutoProcessor cannot build here)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    proc = checkpoint_processor(name, chat_template)
    Family(name, proc).model(seed=seed, layers=layers, std=0.2).save_pretrained(folder)
    proc.save_pretrained(folder)
    if video_config:
        (folder / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR))
    return folder
