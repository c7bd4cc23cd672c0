"""The backbone contract: a declarative map of module paths plus the few operations that differ per family.

Everything outside ``saturation/backbones/`` reaches a model through a `Adapter` (``adapter_for(model)``): the probe,
the routed model, training, the benchmark and the shapes trainer. Only this package names HF module paths
(``language_model``, ``self_attn.k_proj``, ...), imports a ``modeling_*`` module or reads a private config field.
In the spirit of TransformerLens' ``supported_architectures/*.py``: one short subclass per family, mostly paths.

Hook names follow TransformerLens (``blocks.{l}.hook_resid_post``, ``blocks.{l}.attn.hook_pattern``).
Shapes: ``B`` batch, ``T`` sequence, ``D`` d_model, ``H``/``Hkv`` query/key-value heads, ``d`` head dim.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask

from saturation.core.errors import ToolkitError
from saturation.core.hf_compat import cache_kwargs


@dataclass(frozen=True)
class BackboneSpec:
    """Dotted submodule paths of one architecture, relative to the ``...ForConditionalGeneration`` model."""

    name: str
    model_types: tuple[str, ...]
    multimodal: str = "model"  # owns get_image_features / get_placeholder_mask
    language_model: str = "model.language_model"
    embed_tokens: str = "model.language_model.embed_tokens"
    layers: str = "model.language_model.layers"
    norm: str = "model.language_model.norm"
    rotary_emb: str = "model.language_model.rotary_emb"
    lm_head: str = "lm_head"
    vision_tower: str = "model.vision_tower"
    projector: str = "model.multi_modal_projector"
    projector_in: str = "model.multi_modal_projector.linear_1"  # the projector's first linear layer
    # inside each decoder layer
    attn: str = "self_attn"
    input_norm: str = "input_layernorm"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    q_norm: str | None = None  # per-head RMSNorm on queries/keys before the rotation (Qwen3)
    k_norm: str | None = None


@dataclass(frozen=True)
class PromptTemplate:
    """The text around one question: ``{user}<image>\\n{question}{assistant}``, then ``{question}`` turns later."""

    user: str = "USER: "
    assistant: str = " ASSISTANT:"
    image: str | None = None  # the image slot's literal text (Qwen's ``<|vision_start|>…``); None: placeholder + "\n"

    def question(self, question: str, first: bool, image_placeholder: str = "<image>") -> str:
        slot = f"{image_placeholder}\n" if self.image is None else self.image
        image = slot if first else ""
        return f"{self.user}{image}{question}{self.assistant}"


LLAVA_TEMPLATE = PromptTemplate()


@dataclass(frozen=True)
class Embedded:
    """The image merge's result: what the first decoder layer reads, where the images sit, and what is added at the
    image positions after the first decoder layers (Qwen3-VL's DeepStack; empty for every other family)."""

    inputs_embeds: Tensor  # [B, T, D]
    image_mask: Tensor  # [B, T] bool
    deepstack: tuple[Tensor, ...] = ()  # one [n_image_tokens, D] per decoder layer 0, 1, ..., in placeholder order


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions as `generate` makes them: ``cumsum(mask) - 1``, with pads set to 0. [B, T] -> [B, T]."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


class Adapter:
    """A LLaVA-style model seen as ``embed() -> layers[0..L-1] -> norm -> lm_head``; one subclass per family.

    A subclass sets `spec` (its module paths), `image_kwargs` (the image keyword arguments its forward takes
    besides ``pixel_values``), `template`, and overrides the operations its family does differently.
    """

    spec: ClassVar[BackboneSpec]
    image_kwargs: ClassVar[tuple[str, ...]] = ()
    template: ClassVar[PromptTemplate] = LLAVA_TEMPLATE
    # Image kwargs the positions read (M-RoPE's image_grid_thw): generate() must keep them after pre-encoding images.
    position_kwargs: ClassVar[tuple[str, ...]] = ()
    # Of those, the ones with a row per IMAGE (not per sample): expanding a batch for beams repeats them by row groups.
    per_image_kwargs: ClassVar[tuple[str, ...]] = ()
    # Prompts use the checkpoint's chat template when its processor has one (`template` otherwise); a family whose
    # published training format differs from its hub chat template pins `template` by setting this False.
    chat_template: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        self.model = model
        self._rope_tables: dict = {}  # (layer type, dtype) -> (inv_freq it was made from, cos, sin): `_rotary`
        self.check()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name}, {self.num_layers} layers)"

    def check(self) -> None:
        """Refuse what the walk would get silently wrong: sliding-window attention needs another mask."""
        c = self.text_config
        sliding = getattr(c, "sliding_window", None) is not None and (
            getattr(c, "use_sliding_window", True) or "sliding_attention" in (getattr(c, "layer_types", None) or ()))
        if sliding:
            raise ToolkitError(f"{self.spec.name}: sliding-window attention (window {c.sliding_window}) is not "
                               "supported; load a checkpoint whose text config has sliding_window null")

    # ---------------------------------------------------------------- the map
    def _get(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    @cached_property
    def layers(self) -> nn.ModuleList:
        return self._get(self.spec.layers)

    @cached_property
    def norm(self) -> nn.Module:
        return self._get(self.spec.norm)

    @cached_property
    def lm_head(self) -> nn.Module:
        return self._get(self.spec.lm_head)

    @cached_property
    def rotary_emb(self) -> nn.Module:
        return self._get(self.spec.rotary_emb)

    @cached_property
    def embed_tokens(self) -> nn.Module:
        return self._get(self.spec.embed_tokens)

    @cached_property
    def text_model(self) -> nn.Module:
        """The decoder stack (embeddings, layers, norm), without the lm_head."""
        return self._get(self.spec.language_model)

    @cached_property
    def vision_encoder(self) -> nn.Module:
        """The vision tower (TransformerLens' name)."""
        return self._get(self.spec.vision_tower)

    @cached_property
    def projector(self) -> nn.Module:
        return self._get(self.spec.projector)

    @cached_property
    def projector_in(self) -> nn.Linear:
        """The projector's first linear layer (what a rescaling of the tower's features folds into)."""
        return self._get(self.spec.projector_in)

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def decoder_layer_class(self) -> str:
        """The decoder layer's class name, for ``_no_split_modules`` (accelerate never splits one across devices)."""
        return type(self.layers[0]).__name__

    @property
    def attn_implementation(self) -> str:
        """The language model's attention implementation (``sdpa``, ``eager``, ...)."""
        return self.text_config._attn_implementation

    @contextlib.contextmanager
    def use_attention(self, implementation: str) -> Iterator[None]:
        """Switch the language model to `implementation` (e.g. ``eager``, the only one that returns weights),
        then restore it. The vision tower keeps its own."""
        previous = self.attn_implementation
        if previous != implementation:
            self.model.set_attn_implementation({"text_config": implementation})
        try:
            yield
        finally:
            if previous != implementation:
                self.model.set_attn_implementation({"text_config": previous})

    def attention(self, layer: int) -> nn.Module:
        return self.attention_of(self.layers[layer])

    def attention_of(self, layer: nn.Module) -> nn.Module:
        """The attention module inside a decoder layer (a base layer or a copy of one)."""
        return layer.get_submodule(self.spec.attn)

    def hook_points(self) -> dict[str, nn.Module]:
        """TransformerLens-style names -> modules. `hook_resid_post` is the layer's output tensor;
        `attn.hook_pattern` is the attention module's second output (weights, eager attention only)."""
        points: dict[str, nn.Module] = {"hook_embed": self.embed_tokens}
        for i in range(self.num_layers):
            points[f"blocks.{i}.hook_resid_post"] = self.layers[i]
            points[f"blocks.{i}.attn.hook_pattern"] = self.attention(i)
        return points

    def copy_layer(self, source: int, layer_idx: int) -> nn.Module:
        """A deep copy of decoder layer `source` that caches into slot `layer_idx` (never the source's), sharing
        the base's config object so the attention implementation follows the base's."""
        config = self.attention(source).config
        new = copy.deepcopy(self.layers[source], memo={id(config): config})
        self.attention_of(new).layer_idx = layer_idx
        return new

    def fingerprint_weight(self, layer: int) -> Tensor:
        """A weight of layer `layer` that tells checkpoints apart (its query projection)."""
        return self.layers[layer].get_submodule(self.spec.q_proj).weight

    # ---------------------------------------------------------------- images
    def image_output(self, pixel_values: Tensor, **image_kwargs):
        """The model's own ``get_image_features`` output: ``.pooler_output`` (one [n_i, D] per image, in placeholder
        order) and, for DeepStack families, ``.deepstack_features``. As ``generate()`` pre-encodes images."""
        mm = self._get(self.spec.multimodal)
        return mm.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs)

    def image_features(self, pixel_values: Tensor, **image_kwargs) -> list[Tensor]:
        """One [n_i, D] tensor per image, in placeholder order: the model's own ``get_image_features``."""
        return list(self.image_output(pixel_values, **image_kwargs).pooler_output)

    def vision_hidden(self, pixel_values: Tensor) -> Tensor:
        """The tower's features the projector reads: ``vision_feature_layer``, CLS dropped under the "default"
        strategy. [N, 3, H, W] -> [N, patches, D_vision] (one tile per image)."""
        out = self.vision_encoder(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.model.config.vision_feature_layer]
        return feats[:, 1:] if self.model.config.vision_feature_select_strategy == "default" else feats

    def patch_scores(self, pixel_values: Tensor) -> Tensor:
        """How much each image token matters to the vision tower, for pre-LLM pruning: [N, tokens per image].

        The attention of the tower layer whose output the projector reads (``vision_feature_layer``), averaged
        over heads: the [CLS] query's row where the projector drops CLS (FasterVLM); where it keeps every token
        (SigLIP has no CLS) the attention each token receives, averaged over all queries. Eager for this one call.
        """
        c = self.model.config
        layer = c.vision_feature_layer
        if not isinstance(layer, int):
            raise ToolkitError(f"{self.spec.name}: pre-LLM pruning needs one vision feature layer, not {layer!r}")
        previous = c.vision_config._attn_implementation
        self.model.set_attn_implementation({"vision_config": "eager"})
        try:
            attn = self.vision_encoder(pixel_values, output_attentions=True).attentions
        finally:
            self.model.set_attn_implementation({"vision_config": previous})
        probs = attn[layer if layer < 0 else layer - 1].float().mean(1)  # hidden_states[l] is layer l-1's output
        return probs[:, 0, 1:] if c.vision_feature_select_strategy == "default" else probs.mean(1)

    def images_per_row(self, input_ids: Tensor) -> list[int]:
        """How many images each row of `input_ids` [B, T] holds: its runs of image tokens (as HF's M-RoPE index
        reads one grid per run of image tokens; pads are never image tokens)."""
        image = input_ids == self.image_token_id
        starts = image & ~torch.nn.functional.pad(image[:, :-1], (1, 0))
        return starts.sum(1).tolist()

    def placeholder_mask(self, input_ids: Tensor, inputs_embeds: Tensor, features: Tensor) -> Tensor:
        """[B, T, 1] bool: where the image features go (the model's own ``get_placeholder_mask``)."""
        mm = self._get(self.spec.multimodal)
        return mm.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None, *,
              image_features: list[Tensor] | None = None, **image_kwargs) -> tuple[Tensor, Tensor]:
        """Token embeddings with image features scattered in, exactly as the model's own forward does: the one
        image merge of the toolkit.

        Returns ``inputs_embeds`` [B, T, D] and ``image_mask`` [B, T] (bool). `image_kwargs` (e.g. ``image_sizes``)
        go to ``get_image_features``; `image_features` (one [n_i, D] per image, as ``generate()`` pre-encodes them
        into ``mm_encoder_outputs``) replaces `pixel_values`. A walk over the layers needs `encode` (DeepStack).
        """
        e = self.encode(input_ids, pixel_values, image_features=image_features, **image_kwargs)
        return e.inputs_embeds, e.image_mask

    def encode(self, input_ids: Tensor, pixel_values: Tensor | None = None, *, image_features: list[Tensor] | None = None,
               image_output=None, **image_kwargs) -> Embedded:
        """`embed`, plus the DeepStack features to add after the first decoder layers (see `injecting`).

        `image_output` (``get_image_features``' output, as ``generate()`` passes it in ``mm_encoder_outputs``) or
        `image_features` replaces `pixel_values`.
        """
        inputs_embeds = self.embed_tokens(input_ids)
        image_mask = input_ids == self.image_token_id
        if image_output is None and image_features is None and pixel_values is not None:
            image_output = self.image_output(pixel_values, **image_kwargs)
        deepstack: tuple[Tensor, ...] = ()
        if image_output is not None:
            image_features = image_output.pooler_output
            deepstack = tuple(torch.cat(list(f), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
                              for f in getattr(image_output, "deepstack_features", None) or ())
        if image_features is None:
            if image_mask.any():
                raise ToolkitError("the batch has image tokens but no pixel_values")
            return Embedded(inputs_embeds, image_mask)
        features = torch.cat(list(image_features), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        if features.shape[0] != int(image_mask.sum()):
            raise ToolkitError(f"{int(image_mask.sum())} image tokens but {features.shape[0]} image features "
                               f"(for {self.spec.name}, pass {', '.join(self.image_kwargs) or 'no other image kwargs'}"
                               " as the processor made them)")
        placeholder = self.placeholder_mask(input_ids, inputs_embeds, features)
        return Embedded(inputs_embeds.masked_scatter(placeholder, features), image_mask, deepstack)

    @classmethod
    def first_split(cls, config) -> int:
        """`min_split` from the config alone (the probe writes its recommendation with no model loaded on resume)."""
        return 1

    @property
    def min_split(self) -> int:
        """The first allowed split: 1, or after the last DeepStack injection (its layers must stay shallow)."""
        return self.first_split(self.model.config)

    def inject(self, hidden: Tensor, image_mask: Tensor, features: Tensor) -> Tensor:
        """`hidden` [B, T, D] with `features` [n_image_tokens, D] added at the image positions (DeepStack)."""
        raise ToolkitError(f"{self.spec.name} has no DeepStack features to inject")

    @contextlib.contextmanager
    def injecting(self, embedded: Embedded) -> Iterator[None]:
        """While inside, decoder layer i's output gains ``embedded.deepstack[i]`` at the image positions, as the
        model's own forward adds it after the layer. Forward hooks put first, so ``blocks.{i}.hook_resid_post``
        sees the injected states (what layer i+1 reads); nothing happens for families without DeepStack."""
        handles = [self.layers[i].register_forward_hook(
            lambda _m, _args, out, f=f: self.inject(out, embedded.image_mask, f), prepend=True)
            for i, f in enumerate(embedded.deepstack)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @classmethod
    def image_tokens(cls, config, image_size: tuple[int, int] | None = None) -> int:
        """Image tokens for one image of `image_size` (H, W) px: ``(size / patch)^2``, +1 if CLS is kept."""
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")

    # ---------------------------------------------------------------- positions, masks, rotary
    def positions(self, attention_mask: Tensor, last: int | None = None, *, image_mask: Tensor | None = None,
                  **image_kwargs) -> Tensor:
        """Position ids [B, T] (generate's convention), or of the `last` columns only (a decode step). M-RoPE
        families return [3, B, T] for a prompt with images, from `image_mask` [B, T] and their image kwargs
        (``image_grid_thw``); the 1D families ignore both.

        A subset (text only, image only) keeps its ORIGINAL positions (`take_positions`): never renumber them.
        """
        pos = position_ids_from_mask(attention_mask)
        return pos if last is None else pos[:, -last:]

    def layer_type(self, layer: int | nn.Module) -> str:
        """``full_attention`` or ``sliding_attention``: decoder layer `layer`'s type (``config.layer_types``), or that
        of a copy of one (its attention's ``layer_type``); every layer of a family without layer types is full."""
        if isinstance(layer, int):
            types = getattr(self.text_config, "layer_types", None)
            return types[layer] if types else "full_attention"
        return getattr(self.attention_of(layer), "layer_type", None) or "full_attention"

    def pick(self, value, layer: int | nn.Module):
        """Layer `layer`'s mask or rotary table: `value` itself, or its entry for the layer's type when it is one
        per layer type (a dict, as families with sliding-window layers make them)."""
        return value[self.layer_type(layer)] if isinstance(value, dict) else value

    @staticmethod
    def take_rope(rope, take):
        """A subset's rows of the rotary tables: `take` on each of ``(cos, sin)``, or on each layer type's pair."""
        if isinstance(rope, dict):
            return {kind: tuple(take(t) for t in pair) for kind, pair in rope.items()}
        return tuple(take(t) for t in rope)

    @staticmethod
    def take_positions(positions: Tensor, take) -> Tensor:
        """A subset's positions, ORIGINAL values: `take` ([B, T, ...] -> [B, n, ...]) on [B, T] positions, or on
        each row of M-RoPE's [3, B, T]."""
        return take(positions) if positions.dim() == 2 else torch.stack([take(p) for p in positions])

    def rope(self, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)``, each [B, T, d], computed once per stack; a subset takes its rows of them (`take_rope`).
        Families whose RoPE depends on the layer type return one pair per type (`pick` chooses a layer's)."""
        return self._rotary(hidden, position_ids)

    def _rotary(self, hidden: Tensor, position_ids: Tensor, layer_type: str | None = None) -> tuple[Tensor, Tensor]:
        """The rotary module's ``(cos, sin)`` at `position_ids` (for `layer_type` where it takes one), bit for bit.

        On CPU, 2D positions are answered from a table of the module's own output at positions 0, 1, ..., n - 1
        (its output at a position depends on that position alone): two row lookups instead of its ~10 small ops,
        which a compiled routed prompt and every compiled decode step pay eagerly (~40 us on CPU) where vanilla's
        compiled stack has them in its graph. Elsewhere (a GPU, where reading the largest position would be a sync;
        M-RoPE's [3, B, T]; RoPE types that rescale with the sequence length) the module runs as it is."""
        rotary, extra = self.rotary_emb, () if layer_type is None else (layer_type,)
        rope_type = rotary.rope_type if layer_type is None else rotary.rope_type[layer_type]
        if (position_ids.device.type != "cpu" or position_ids.dim() != 2 or "dynamic" in rope_type
                or rope_type == "longrope" or torch.compiler.is_compiling()):
            return rotary(hidden, position_ids, *extra)
        inv_freq = getattr(rotary, "inv_freq" if layer_type is None else f"{layer_type}_inv_freq")
        key, need = (layer_type, hidden.dtype), int(position_ids.max()) + 1 if position_ids.numel() else 1
        table = self._rope_tables.get(key)
        if table is None or table[0] is not inv_freq or table[1].shape[0] < need:  # a new buffer: model.to(...)
            length = max(need, 2 * table[1].shape[0] if table is not None else 256)
            cos, sin = rotary(hidden[:1, :1], torch.arange(length, device=position_ids.device)[None], *extra)
            self._rope_tables[key] = table = (inv_freq, cos[0], sin[0])
        flat = position_ids.reshape(-1)
        return tuple(t.index_select(0, flat).view(*position_ids.shape, -1) for t in table[1:])

    def causal_mask(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                    cache=None, layer_idx: int = 0, image_mask: Tensor | None = None):
        """The decoder's mask for the whole sequence (or a decode step against layer `layer_idx`'s cache).
        `image_mask` [B, T]: where the image tokens sit (families with bidirectional image blocks read it); a family
        with sliding-window layers returns one mask per layer type (`pick` chooses a layer's).
        Always from a 2D `attention_mask`: with ``None`` and gapped positions, transformers infers packed sequences
        and builds a block-diagonal mask. M-RoPE positions [3, B, T] are not token order: like HF's forward,
        the mask then gets none (a 2D `attention_mask` says everything). Where HF's answer is None (sdpa's own
        ``is_causal``: nothing padded, and a prompt on an empty cache or one new token) it is None straight away,
        without HF's mask machinery (~45 us a call on CPU, paid eagerly by a compiled routed prefill and decode step
        where vanilla's compiled stack traces it away). No mask and several queries go to HF (packed sequences)."""
        q = inputs_embeds.shape[1]
        if self._sdpa_is_causal(cache, layer_idx, q) and (q == 1 if attention_mask is None
                                                          else bool(attention_mask.all())):
            return None
        return create_causal_mask(
            config=self.text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids if position_ids.dim() == 2 else None,
            **cache_kwargs(cache),
            layer_idx=layer_idx,
        )

    def subset_causal_mask(self, x: Tensor, valid: Tensor, dense: bool, position_ids: Tensor, cache=None,
                           layer_idx: int = 0, image_mask: Tensor | None = None):
        """`causal_mask` for a subset in its original order (`valid` [B, n]: real entries), skipping HF's mask
        machinery where its answer is known in advance: under sdpa, with nothing masked (`dense`) and no cached keys
        before, it is ``None`` (sdpa's own ``is_causal``). `image_mask` [B, n]: which entries are image tokens; a
        window or an image block is computed in the ORIGINAL `position_ids`, never in subset indices."""
        if dense and self._sdpa_is_causal(cache, layer_idx):
            return None
        return self.causal_mask(x, valid, position_ids, cache, layer_idx=layer_idx)

    def maskless(self, cache=None) -> bool:
        """Whether an unpadded prompt on `cache` needs no mask in any layer: what `causal_mask` answers None for,
        and `subset_causal_mask` for a dense subset (sdpa's own ``is_causal``, no keys cached before). A family with
        sliding windows or image blocks overrides it (never)."""
        return self._sdpa_is_causal(cache, 0)

    def _sdpa_is_causal(self, cache, layer_idx: int, queries: int = 0) -> bool:
        """Whether an unpadded block of `queries` needs no mask (HF's ``_ignore_causal_mask_sdpa``): sdpa, and no
        keys cached before it (queries = keys) or a single query (it sees every key)."""
        return self.attn_implementation == "sdpa" and (queries == 1 or cache is None
                                                       or cache.get_seq_length(layer_idx) == 0)

    def decode_mask(self, inputs_embeds: Tensor, attention_mask: Tensor | None, position_ids: Tensor, cache,
                    layer_idx: int, key_positions: Tensor | None = None):
        """The mask of new text tokens against layer `layer_idx`'s cache: `causal_mask` (every cached key comes
        before them). `key_positions` [B, kv_len]: the original position of every cached key then the new ones, in
        the cache's order (a routed layout need not keep positions in order); a sliding window reads it."""
        return self.causal_mask(inputs_embeds, attention_mask, position_ids, cache, layer_idx=layer_idx)

    def order_mask(self, q_index: Tensor, k_index: Tensor, k_valid: Tensor, dtype: torch.dtype) -> Tensor:
        """A 4D mask [B, 1, q, k] for keys in any order: causal in the ORIGINAL positions, invalid keys out.

        Boolean for sdpa, additive (0 / dtype min) for eager, as ``create_causal_mask`` makes them.
        """
        allowed = (k_index[:, None, None, :] <= q_index[:, None, :, None]) & k_valid[:, None, None, :]
        return self._as_mask(allowed, dtype)

    def _as_mask(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """A boolean [B, 1, q, k] mask as this attention implementation takes it: itself (sdpa), or additive."""
        if self.attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    @staticmethod
    def allowed(mask: Tensor) -> Tensor:
        """`_as_mask` undone: the [B, 1, q, k] bool of what a layer's mask lets attend (an additive mask is 0 there)."""
        return mask if mask.dtype == torch.bool else mask == 0

    # ---------------------------------------------------------------- one layer's attention inputs
    def _rotary_fn(self, attn: nn.Module):
        """The family's own ``apply_rotary_pos_emb``, from the modeling module the attention class lives in (Llama,
        Mistral and Qwen2 LMs each have one; a LLaVA-NeXT may carry either of the first two)."""
        return sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def _heads(self, proj: nn.Module, x: Tensor, head_dim: int, norm: nn.Module | None = None) -> Tensor:
        """[B, n, D] through a projection (and a per-head norm, Qwen3's q_norm/k_norm) -> [B, heads, n, d]."""
        y = proj(x).view(*x.shape[:2], -1, head_dim)
        return (y if norm is None else norm(y)).transpose(1, 2)

    def _norm(self, module: nn.Module, path: str | None) -> nn.Module | None:
        return None if path is None else module.get_submodule(path)

    def key_values(self, layer: int | nn.Module, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The keys (rotated) and values decoder layer `layer` makes from `hidden` [B, n, D] at the positions of
        `rope`, through its own input norm, projections (with their biases) and rotary function; no query, output
        projection or MLP. Returns ``(keys, values)``, each [B, Hkv, n, d], as the layer's cache holds them."""
        module = self.layers[layer] if isinstance(layer, int) else layer
        attn = self.attention_of(module)
        hidden, rope = _to_weights(module, hidden, rope)
        x = module.get_submodule(self.spec.input_norm)(hidden)
        keys = self._heads(module.get_submodule(self.spec.k_proj), x, attn.head_dim, self._norm(module, self.spec.k_norm))
        values = self._heads(module.get_submodule(self.spec.v_proj), x, attn.head_dim)
        cos, sin = self.pick(rope, layer)
        _, keys = self._rotary_fn(attn)(keys[:, :0], keys, cos, sin)  # an empty query: rotate the keys only
        return keys, values

    def queries_keys(self, layer: int, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, float]:
        """Rotated queries [B, H, n, d] and keys [B, Hkv, n, d] of decoder layer `layer` for its input `hidden`,
        and the score scale: what attention scores of selected rows/columns need (supervision, FastV-style
        pruning) without running the attention itself."""
        module = self.layers[layer]
        attn = self.attention_of(module)
        hidden, rope = _to_weights(module, hidden, rope)
        x = module.get_submodule(self.spec.input_norm)(hidden)
        q = self._heads(module.get_submodule(self.spec.q_proj), x, attn.head_dim, self._norm(module, self.spec.q_norm))
        k = self._heads(module.get_submodule(self.spec.k_proj), x, attn.head_dim, self._norm(module, self.spec.k_norm))
        cos, sin = self.pick(rope, layer)
        q, k = self._rotary_fn(attn)(q, k, cos, sin)
        return q, k, float(attn.scaling)

    # ---------------------------------------------------------------- the walk
    def unembed(self, hidden: Tensor) -> Tensor:
        """Logit lens: ``lm_head(norm(h))`` for a raw decoder-layer output. [..., D] -> [..., vocab]."""
        return self.lm_head(self.norm(hidden))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                position_ids: Tensor | None = None, **image_kwargs) -> Tensor:
        """Logits [B, T, vocab] by walking the map by hand; equals ``model(...)`` bit for bit (same positions).

        Positions default to `positions` (generate's convention; M-RoPE from the image kwargs); DeepStack features
        are added after their layers (`injecting`)."""
        e = self.encode(input_ids, pixel_values, **image_kwargs)
        h = e.inputs_embeds
        if position_ids is None:
            position_ids = self.positions(attention_mask, image_mask=e.image_mask, **image_kwargs)
        mask = self.causal_mask(h, attention_mask, position_ids, image_mask=e.image_mask)
        rope = self.rope(h, position_ids)
        with self.injecting(e):
            for i, layer in enumerate(self.layers):
                h = layer(h, attention_mask=self.pick(mask, i), position_ids=position_ids,
                          position_embeddings=self.pick(rope, i))
        return self.unembed(h)

    def question_text(self, question: str, first: bool) -> str:
        """The human half of a turn in this family's prompt template, ending with the assistant cue."""
        return self.template.question(question, first)


def _to_weights(module: nn.Module, hidden: Tensor, rope):
    """`hidden` and the rotary table(s) on the device of `module`'s weights: its projections are called one by one
    here, past the accelerate hook a device map puts on the whole layer (which would move the inputs). Offloaded
    weights (meta placeholders) have per-submodule hooks of their own that do it."""
    device = next((p.device for p in module.parameters() if p.device.type != "meta"), None)
    if device is None or device == hidden.device:
        return hidden, rope
    return hidden.to(device), _moved(rope, device)


def _moved(x, device: torch.device):
    """Tensors inside tuples and dicts (a rotary table, or one per layer type) on `device`."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _moved(v, device) for k, v in x.items()}
    return type(x)(_moved(v, device) for v in x) if isinstance(x, (tuple, list)) else x
