"""Gemma 3 (``gemma3``): SigLIP, a pooling projector (``mm_tokens_per_image`` tokens per image, 256 released), and a
Gemma 3 LM whose layers are sliding-window or global (``config.layer_types``).

What differs from LLaVA, and nothing else:
- Masks are one per layer type, for the whole sequence built by the model's own functions: every contiguous run of
  image tokens is one block that attends to itself both ways on top of the causal mask (``token_type_ids``, derived
  here from the image tokens: without them HF silently builds a plain causal mask); global layers = causal OR same
  block, sliding layers = window AND (causal OR same block). A subset (image only, text only) or a routed cache
  layout gets its window and its blocks in ORIGINAL positions, never in subset indices: text far after an image
  does not see text the window excludes just because the image tokens between them were removed. Those subset and
  decode masks are built here by the same rules (HF would expand the custom mask functions they need under vmap,
  tens of ms a mask); tests hold them equal to HF's own construction.
- RoPE depends on the layer type (``rotary_emb(x, pos, layer_type)``: local and global bases), so `rope` returns one
  pair per type; q/k norms sit in attention (the spec's ``q_norm``/``k_norm``); queries scale by
  ``query_pre_attn_scalar`` (the attention module's own ``scaling``).
- ``embed_tokens`` scales by sqrt(hidden) itself; image features go in unscaled (the contract's merge does both).
- Routed decoding needs full-length cache layers (``routing.generation.new_cache``): ``DynamicCache(config=...)``
  keeps the last window - 1 entries of a sliding layer BY COUNT, wrong for the text-only and image-first layouts.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers.masking_utils import create_causal_mask, create_masks_for_generate
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from saturation.core.adapters.attention import causal_in_order
from saturation.core.adapters.base import Adapter, LayerMap, ModuleMap, Preset, PromptTemplate
from saturation.core.errors import ToolkitError
from saturation.core.hf_compat import cache_kwargs

GEMMA_TEMPLATE = PromptTemplate(user="<start_of_turn>user\n", assistant="<end_of_turn>\n<start_of_turn>model\n",
                                image="<start_of_image>")
FULL, SLIDING = "full_attention", "sliding_attention"
GEMMA_TOKENS = {"image_token_id": "<image_soft_token>", "boi_token_id": "<start_of_image>",
                "eoi_token_id": "<end_of_image>"}


def gemma_3_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int):
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


def block_ids(image: Tensor, positions: Tensor) -> Tensor:
    """Image block ids [B, n] of a sequence or a subset in original order: each run of image tokens at consecutive
    ORIGINAL positions is one image (what HF's ``get_block_sequence_ids_for_mask`` finds over ``token_type_ids``
    in the full sequence), -1 elsewhere. `image` [B, n] bool, `positions` [B, n]."""
    before_image = F.pad(image, (1, 0))[:, :-1]
    before = F.pad(positions, (1, 0), value=-2)[:, :-1]
    start = image & ~(before_image & (positions == before + 1))
    return torch.where(image, start.long().cumsum(1) - 1, -1)


class Gemma3(Adapter):
    spec = ModuleMap(name="gemma-3", model_types=("gemma3",), projector_in="model.multi_modal_projector",
                     submodules=LayerMap(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"))
    image_kwargs = ("token_type_ids",)
    sequence_kwargs = ("token_type_ids",)
    template = GEMMA_TEMPLATE
    aliases = {f"gemma-3-{n}b": f"google/gemma-3-{n}b-it" for n in (4, 12, 27)}
    presets = {"gemma-3-4b": Preset(functools.partial(gemma_3_config, 2560, 10240, 34, 8, 4), torch.bfloat16),
               "gemma-3-12b": Preset(functools.partial(gemma_3_config, 3840, 15360, 48, 16, 8), torch.bfloat16)}
    special_tokens = GEMMA_TOKENS
    turn_tokens = ("<start_of_turn>", "<end_of_turn>")

    @classmethod
    def random_processor(cls, config, words):
        """Gemma 3's PIL image processor at the tower's size, ``mm_tokens_per_image`` soft tokens an image."""
        from transformers import Gemma3ImageProcessorPil, Gemma3Processor

        size = config.vision_config.image_size
        named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
                               tokenizer=cls.family_tokenizer(words, named),
                               image_seq_length=config.mm_tokens_per_image)

    def check(self) -> None:
        """Sliding-window layers are supported; a bidirectional text model (EmbeddingGemma-style) is not."""
        if getattr(self.text_config, "use_bidirectional_attention", False):
            raise ToolkitError(f"{self.spec.name}: use_bidirectional_attention is not supported (a causal LM only)")

    @property
    def window(self) -> int:
        return int(self.text_config.sliding_window)

    # ---------------------------------------------------------------- images
    def image_output(self, pixel_values: Tensor, **_):
        """``get_image_features`` takes pixel values only (its kwargs go to the tower; token_type_ids are masks')."""
        return self._get(self.spec.multimodal).get_image_features(pixel_values=pixel_values, return_dict=True)

    def encode(self, input_ids: Tensor, pixel_values: Tensor | None = None, *, token_type_ids: Tensor | None = None,
               **kwargs):
        """The contract's merge; `token_type_ids` (the processor's) must mark exactly the image tokens, from which the
        masks take their blocks."""
        if token_type_ids is not None and input_ids is not None and not torch.equal(
                token_type_ids == 1, input_ids == self.image_token_id):
            raise ToolkitError(f"{self.spec.name}: token_type_ids marks other tokens than the image tokens")
        return super().encode(input_ids, pixel_values, **kwargs)

    def vision_hidden(self, pixel_values: Tensor) -> Tensor:
        """The tower's last hidden state, which the projector pools. [N, 3, H, W] -> [N, patches, D_vision]."""
        return self.vision_encoder(pixel_values).last_hidden_state

    @classmethod
    def image_tokens(cls, config, image_size: tuple[int, int] | None = None) -> int:
        """``mm_tokens_per_image`` whatever the size (pooled); pan-and-scan crops (off by default) add as many each."""
        return int(config.mm_tokens_per_image)

    # ---------------------------------------------------------------- rotary, masks
    def rope(self, hidden: Tensor, position_ids: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """One ``(cos, sin)`` pair per layer type, as the model's forward computes them."""
        return {kind: self._rotary(hidden, position_ids, kind) for kind in sorted(set(self.text_config.layer_types))}

    def near(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """[B, 1, q, k] bool: keys inside a sliding layer's window, counted in ORIGINAL positions (HF's
        ``sliding_window_overlay``, ``kv > q - window``, read at `q_pos` [B, q] and `k_pos` [B, k])."""
        return k_pos[:, None, None, :] > q_pos[:, None, :, None] - self.window

    def causal_mask(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache=None,
                    layer_idx: int = 0, image_mask: Tensor | None = None) -> dict:
        """HF's masks for the whole sequence: with image tokens exactly what its forward builds from
        ``token_type_ids`` (blocks), without them what it builds with none."""
        kw = dict(config=self.text_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                  position_ids=position_ids, **cache_kwargs(cache))
        if image_mask is None or not bool(image_mask.any()):
            return create_masks_for_generate(**kw)
        blocks = get_block_sequence_ids_for_mask(image_mask.long(), device=inputs_embeds.device)
        return create_masks_for_vision_model(block_sequence_ids=blocks, **kw)

    def maskless(self, cache=None) -> bool:
        """Never: sliding layers always need their window, image blocks their bidirectional attention."""
        return False

    def subset_causal_mask(self, x: Tensor, valid: Tensor, dense: bool, position_ids: Tensor, cache=None,
                           layer_idx: int = 0, image_mask: Tensor | None = None) -> dict:
        """Causal in the subset's (original) order, OR same image block, and for sliding layers AND the window, both
        in ORIGINAL positions; invalid keys out. For a prompt's subset, so on an empty cache: its keys are itself.

        What HF's ``create_causal_mask`` gives with ``or_mask_function=blockwise_overlay(...)`` and the window as
        ``and_mask_function``, built directly: HF expands any custom mask function under vmap (~40 ms for a
        subset's two masks on CPU in a gemma-3-4b bench, host time on a GPU). tests/test_adapter_gemma3.py holds the two
        equal, bit for bit."""
        if cache is not None and cache.get_seq_length(layer_idx):
            raise ToolkitError(f"{self.spec.name}: a routed prompt starts on an empty cache (layer {layer_idx} holds "
                               f"{cache.get_seq_length(layer_idx)} keys)")
        index = torch.arange(valid.shape[1], device=valid.device)
        allowed = index[None, None, :] <= index[None, :, None]  # [1, q, k]: causal in the subset's order
        blocks = image_mask is not None and bool(image_mask.any())
        if blocks:
            ids = block_ids(image_mask & valid.bool(), position_ids)
            allowed = allowed | ((ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0))
        allowed = (allowed & valid.bool()[:, None, :])[:, None]  # [B, 1, q, k]
        near = self.near(position_ids, position_ids)
        if blocks:
            full = self._as_mask(allowed, x.dtype)
        elif dense and self._sdpa_is_causal(cache, layer_idx):
            full = None  # sdpa's own is_causal
        else:  # HF's plain causal mask: no custom function, no vmap
            full = create_causal_mask(config=self.text_config, inputs_embeds=x, attention_mask=valid,
                                      position_ids=position_ids, **cache_kwargs(cache), layer_idx=layer_idx)
        return {FULL: full, SLIDING: self._as_mask(allowed & near, x.dtype)}

    def order_mask(self, q_index: Tensor, k_index: Tensor, k_valid: Tensor, dtype: torch.dtype) -> dict:
        """Keys in any order (KV's image-first deep layers): causal in original indices, and for sliding layers the
        window in original indices too (HF's window is over indices; for real tokens that is their positions)."""
        near = self.near(q_index, k_index)
        causal = causal_in_order(q_index, k_index, k_valid)
        return {FULL: self._as_mask(causal, dtype), SLIDING: self._as_mask(causal & near, dtype)}

    def decode_mask(self, inputs_embeds: Tensor, attention_mask: Tensor | None, position_ids: Tensor, cache,
                    layer_idx: int, key_positions: Tensor | None = None) -> dict:
        """New text tokens against a routed cache layout: every cached key is earlier; sliding layers keep the keys
        whose ORIGINAL position (`key_positions`, in the cache's order) is inside the window."""
        if key_positions is None:
            raise ToolkitError(f"{self.spec.name}: a decode mask needs the cached keys' positions")
        kw = dict(config=self.text_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                  position_ids=position_ids, **cache_kwargs(cache), layer_idx=layer_idx)
        # Sliding layers by hand: HF builds any custom mask function under vmap (~15 ms a mask on CPU, at every
        # step, per layout: 7% of a 6-layer gemma-3-4b decode step). Every cached key precedes the new tokens, so
        # HF's causal rule is `key position <= query position` here, and `order_mask` is that with the window.
        valid = torch.ones_like(key_positions, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        sliding = self.order_mask(position_ids, key_positions, valid, inputs_embeds.dtype)[SLIDING]
        return {FULL: create_causal_mask(**kw), SLIDING: sliding}
