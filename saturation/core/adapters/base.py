"""The adapter contract, part 1: a declarative, nested map of module paths (`ModuleMap`, `LayerMap`), what a family
declares about itself (aliases, presets, image kwargs, template, tokens), the image merge and the walk. Part 2 is
``attention.py`` (`AttentionInputs`): positions, rotary tables, masks and one layer's q/k/v.

Everything outside ``saturation/core/adapters/`` reaches a model through a `Adapter` (``adapter_for(model)``): the probe,
the routed model, training, the benchmark and the shapes trainer. Only this package names HF module paths
(``language_model``, ``self_attn.k_proj``, ...), imports a ``modeling_*`` module or reads a private config field.
In the spirit of TransformerLens' ``supported_architectures/*.py``: one short subclass per family, mostly paths.

Hook names follow TransformerLens (``blocks.{l}.hook_resid_post``, ``blocks.{l}.attn.hook_pattern``).
Shapes: ``B`` batch, ``T`` sequence, ``D`` d_model, ``H``/``Hkv`` query/key-value heads, ``d`` head dim.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from saturation.core.adapters.attention import AttentionInputs
from saturation.core.errors import ToolkitError


@dataclass(frozen=True)
class LayerMap:
    """Submodule paths inside one decoder layer, relative to the layer (TransformerLens' block ``submodules``)."""

    attn: str = "self_attn"
    input_norm: str = "input_layernorm"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    q_norm: str | None = None  # per-head RMSNorm on queries/keys before the rotation (Qwen3, Gemma 3)
    k_norm: str | None = None


@dataclass(frozen=True)
class ModuleMap:
    """Where one architecture keeps its modules: dotted paths relative to the ``...ForConditionalGeneration``
    model, then `submodules`, paths relative to each decoder layer (``layers[i]``)."""

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
    submodules: LayerMap = LayerMap()


BackboneSpec = ModuleMap  # the flat map's name before the nested one; kept for a release


@dataclass(frozen=True)
class Preset:
    """A named architecture with random weights (``routing bench --geometry``): its config, built in code from the
    released checkpoint's numbers, and the dtype that checkpoint ships in."""

    config: Callable[[], PretrainedConfig]
    dtype: torch.dtype


@dataclass(frozen=True)
class PromptTemplate:
    """The text around one question: ``{user}<image>\\n{question}{assistant}``, then ``{question}`` turns later."""

    user: str = "USER: "
    assistant: str = " ASSISTANT:"
    image: str | None = None  # the image slot's literal text (Qwen's ``<|vision_start|>…``); None: placeholder + "\n"

    def question(self, question: str, first: bool, image_placeholder: str = "<image>", n_images: int = 1) -> str:
        """The turn's text; the first holds `n_images` image slots (0: a text-only record), one after another."""
        slot = f"{image_placeholder}\n" if self.image is None else self.image
        image = slot * n_images if first else ""
        return f"{self.user}{image}{question}{self.assistant}"


LLAVA_TEMPLATE = PromptTemplate()


@dataclass(frozen=True)
class Embedded:
    """The image merge's result: what the first decoder layer reads, where the images sit, and what is added at the
    image positions after the first decoder layers (Qwen3-VL's DeepStack; empty for every other family)."""

    inputs_embeds: Tensor  # [B, T, D]
    image_mask: Tensor  # [B, T] bool
    deepstack: tuple[Tensor, ...] = ()  # one [n_image_tokens, D] per decoder layer 0, 1, ..., in placeholder order


class Adapter(AttentionInputs):
    """A LLaVA-style model seen as ``embed() -> layers[0..L-1] -> norm -> lm_head``; one subclass per family.

    A subclass declares everything the toolkit knows about its family: `spec` (its module map), `image_kwargs` (the
    image keyword arguments its forward takes besides ``pixel_values``; `sequence_kwargs`: those with one entry per
    token), `template`, `aliases` (short names of its checkpoints), `presets` (named architectures with random
    weights), `special_tokens`/`turn_tokens` and `random_processor` (a word-level processor for those),
    `image_only_processor` (its processor without the video half); and it overrides the operations its family does
    differently: the merge here, positions, masks and rotary tables (`AttentionInputs`).
    """

    spec: ClassVar[ModuleMap]
    image_kwargs: ClassVar[tuple[str, ...]] = ()
    # Of those, the ones with one entry per TOKEN (1 = image), padded like input_ids when a batch is collated.
    sequence_kwargs: ClassVar[tuple[str, ...]] = ()
    template: ClassVar[PromptTemplate] = LLAVA_TEMPLATE
    # Image kwargs the positions read (M-RoPE's image_grid_thw): generate() must keep them after pre-encoding images.
    position_kwargs: ClassVar[tuple[str, ...]] = ()
    # Of those, the ones with a row per IMAGE (not per sample): expanding a batch for beams repeats them by row groups.
    per_image_kwargs: ClassVar[tuple[str, ...]] = ()
    # Prompts use the checkpoint's chat template when its processor has one (`template` otherwise); a family whose
    # published training format differs from its hub chat template pins `template` by setting this False.
    chat_template: ClassVar[bool] = True
    # Short names -> hub ids of the family's checkpoints (``--model llava-1.5-7b``).
    aliases: ClassVar[dict[str, str]] = {}
    # Named architectures with random weights (``--geometry``), by the released checkpoints' configs.
    presets: ClassVar[dict[str, Preset]] = {}
    # Config attribute -> token, for a family whose prompts do not use ``<image>``: a random geometry's processor
    # knows them as whole tokens and the config's ids are set to theirs. `turn_tokens`: the chat turn's markers.
    special_tokens: ClassVar[dict[str, str]] = {}
    turn_tokens: ClassVar[tuple[str, ...]] = ()
    # The family's processor without its video processor (which needs torchvision): loaded where AutoProcessor fails.
    image_only_processor: ClassVar[type | None] = None

    def __init__(self, model: nn.Module):
        self.model = model
        self._rope_tables = {}
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
        return layer.get_submodule(self.spec.submodules.attn)

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
        return self.layers[layer].get_submodule(self.spec.submodules.q_proj).weight

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

    # Whether an image reaches the LLM as several crops (anyres tiles): per-image tower-side compression then needs
    # the family's own tile layout (unpadding, newlines), which only a single-tile family does not.
    tiled: ClassVar[bool] = False

    @classmethod
    def tower_has_cls(cls, config) -> bool:
        """Whether the vision tower prepends a [CLS] token (CLIP does; SigLIP and Qwen's tower do not): what
        [CLS]-attention methods rank by. From the config alone (plans are checked before weights load)."""
        return getattr(config.vision_config, "model_type", None) == "clip_vision_model"

    def vision_attention_and_keys(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The tower layer whose output the projector reads (``vision_feature_layer``, CLIP's -2), seen from inside:
        its attention probabilities [N, heads, S, S], its output hidden states [N, S, D_vision] (``hidden_states[l]``,
        [CLS] first) and its keys averaged over heads [N, S, d_head] (the k projection's output, bias included,
        before any normalisation). S = patches + 1 with a [CLS] token. Eager attention for this one call.
        [N, 3, H, W] -> the three (one tile per image)."""
        c = self.model.config
        layer = c.vision_feature_layer
        if not isinstance(layer, int) or not self.tower_has_cls(c):
            raise ToolkitError(f"{self.spec.name}: needs a [CLS] vision tower and one vision feature layer")
        tower = self.vision_encoder
        blocks = tower.get_submodule("encoder.layers" if hasattr(tower, "encoder") else "vision_model.encoder.layers")
        index = layer if layer >= 0 else len(blocks) + 1 + layer  # hidden_states[l] is layer l-1's output
        keys: list[Tensor] = []
        hook = blocks[index - 1].get_submodule("self_attn.k_proj").register_forward_hook(
            lambda _m, _args, out: keys.append(out))
        previous = c.vision_config._attn_implementation
        self.model.set_attn_implementation({"vision_config": "eager"})
        try:
            out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
        finally:
            self.model.set_attn_implementation({"vision_config": previous})
            hook.remove()
        heads = c.vision_config.num_attention_heads
        k = keys[0]
        k = k.view(*k.shape[:2], heads, -1).mean(2)
        return out.attentions[index - 1], out.hidden_states[index], k

    def project(self, vision_tokens: Tensor) -> Tensor:
        """Vision-tower tokens [N, n, D_vision] through the projector alone -> [N, n, D] (what the LLM reads)."""
        return self.projector(vision_tokens)

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

    # ---------------------------------------------------------------- the walk
    def unembed(self, hidden: Tensor) -> Tensor:
        """Logit lens: ``lm_head(norm(h))`` for a raw decoder-layer output. [..., D] -> [..., vocab]."""
        return self.lm_head(self.norm(hidden))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                position_ids: Tensor | None = None, logits_to_keep: int = 0, **image_kwargs) -> Tensor:
        """Logits [B, T, vocab] by walking the map by hand; equals ``model(...)`` bit for bit (same positions).

        Positions default to `positions` (generate's convention; M-RoPE from the image kwargs); DeepStack features
        are added after their layers (`injecting`). `logits_to_keep` > 0: the last that many positions only, as HF's
        own argument (the LM head over the whole prompt is [B, T, vocab] at 7B: 32k columns a position)."""
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
        return self.unembed(h[:, -logits_to_keep:] if logits_to_keep else h)

    def question_text(self, question: str, first: bool) -> str:
        """The human half of a turn in this family's prompt template, ending with the assistant cue."""
        return self.template.question(question, first)

    # ---------------------------------------------------------------- random checkpoints
    @classmethod
    def random_processor(cls, config, words):
        """A word-level processor matched to `config`'s image pipeline (tile size, CLS or not), ``<image>`` at id 4;
        offline and PIL-only. For a random geometry of this family (`presets`)."""
        from saturation.core.tiny import tiny_processor

        v = config.vision_config
        return tiny_processor(words, image_size=v.image_size, patch_size=v.patch_size)

    @classmethod
    def family_tokenizer(cls, words, named: dict[str, str] | None = None):
        """A word-level tokenizer of `words` that knows `special_tokens` and `turn_tokens` as whole tokens; `named`:
        named special tokens (``image_token``, ...) as the family's processor asks for them."""
        from saturation.core.tiny import special_word_tokenizer

        return special_word_tokenizer([*cls.special_tokens.values(), *cls.turn_tokens], words, named)


