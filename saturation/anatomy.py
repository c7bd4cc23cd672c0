"""One declarative map per backbone: where the decoder layers, norm, lm_head and image merge live.

Probes and routing see only an `Anatomy`, never ``model.model.language_model...`` directly, in the spirit of
TransformerLens' ``supported_architectures/llava.py``. Hook names follow TransformerLens
(``blocks.{l}.hook_resid_post``, ``blocks.{l}.attn.hook_pattern``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask

from .errors import ToolkitError
from .hf_compat import cache_kwargs


@dataclass(frozen=True)
class BackboneSpec:
    """Dotted submodule paths of one architecture, relative to the `...ForConditionalGeneration` model."""

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
    attn: str = "self_attn"  # inside each decoder layer


LLAVA_15 = BackboneSpec(name="llava-1.5", model_types=("llava",))
LLAVA_NEXT = BackboneSpec(name="llava-next", model_types=("llava_next",))
BACKBONES: tuple[BackboneSpec, ...] = (LLAVA_15, LLAVA_NEXT)


def spec_for_config(config) -> BackboneSpec:
    """The backbone map for a config, or a one-line error naming what the model is instead."""
    model_type = getattr(config, "model_type", None)
    for spec in BACKBONES:
        if model_type in spec.model_types:
            return spec
    known = ", ".join(t for s in BACKBONES for t in s.model_types)
    raise ToolkitError(f"not a LLaVA model: model_type is '{model_type}' (supported: {known})")


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions as `generate` makes them: ``cumsum(mask) - 1``, with pads set to 0. [batch, seq] -> [batch, seq]."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@dataclass
class Anatomy:
    """A LLaVA model seen as: ``embed() -> layers[0..L-1] -> norm -> lm_head``."""

    model: nn.Module
    spec: BackboneSpec

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

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.spec.attn)

    def hook_points(self) -> dict[str, nn.Module]:
        """TransformerLens-style names -> modules. `hook_resid_post` is the layer's output tensor;
        `attn.hook_pattern` is the attention module's second output (weights, eager attention only)."""
        points: dict[str, nn.Module] = {"hook_embed": self.embed_tokens}
        for i in range(self.num_layers):
            points[f"blocks.{i}.hook_resid_post"] = self.layers[i]
            points[f"blocks.{i}.attn.hook_pattern"] = self.attention(i)
        return points

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None, **image_kwargs) -> tuple[Tensor, Tensor]:
        """Token embeddings with image features scattered in, exactly as ``LlavaModel.forward`` does.

        Returns ``inputs_embeds`` [batch, seq, d_model] and ``image_mask`` [batch, seq] (bool).
        `image_kwargs` (e.g. ``image_sizes`` for LLaVA-NeXT) go to ``get_image_features``.
        """
        inputs_embeds = self.embed_tokens(input_ids)
        image_mask = input_ids == self.image_token_id
        if pixel_values is None:
            if image_mask.any():
                raise ToolkitError("the batch has image tokens but no pixel_values")
            return inputs_embeds, image_mask
        mm = self._get(self.spec.multimodal)
        out = mm.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs)
        features = torch.cat(list(out.pooler_output), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder = mm.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
        return inputs_embeds.masked_scatter(placeholder, features), image_mask

    def causal_mask(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                    cache=None, layer_idx: int = 0):
        """The decoder's mask. Always from a 2D `attention_mask`: with ``None`` and gapped positions,
        transformers infers packed sequences and builds a block-diagonal mask (DESIGN)."""
        return create_causal_mask(
            config=self.text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_kwargs(cache),
            layer_idx=layer_idx,
        )

    def unembed(self, hidden: Tensor) -> Tensor:
        """Logit lens: ``lm_head(norm(h))`` for a raw decoder-layer output. [..., d_model] -> [..., vocab]."""
        return self.lm_head(self.norm(hidden))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                position_ids: Tensor | None = None, **image_kwargs) -> Tensor:
        """Logits [batch, seq, vocab] by walking the map by hand; equals ``model(...)`` bit for bit."""
        h, _ = self.embed(input_ids, pixel_values, **image_kwargs)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        mask = self.causal_mask(h, attention_mask, position_ids)
        rope = self.rotary_emb(h, position_ids=position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=rope)
        return self.unembed(h)


def anatomy(model: nn.Module) -> Anatomy:
    """The anatomy map of a loaded model; a one-line error for anything that is not LLaVA."""
    config = getattr(model, "config", None)
    if config is None:
        raise ToolkitError(f"not a LLaVA model: {type(model).__name__} has no config")
    return Anatomy(model=model, spec=spec_for_config(config))
