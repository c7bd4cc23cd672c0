"""One adapter per backbone family, and the registry from ``config.model_type`` to it.

``adapter_for(model)`` is how the rest of the toolkit sees a model. A new family is one module here with an
`Adapter` subclass that declares everything about the family (module map, image kwargs, template, aliases, presets,
processors, tokens), added to `ADAPTERS`; the tables below gather those declarations for the rest of the toolkit,
so nothing outside this package changes (tests/test_layering.py holds it).
"""

from __future__ import annotations

from torch import nn

from saturation.core.adapters.attention import AttentionInputs, position_ids_from_mask
from saturation.core.adapters.base import Adapter, BackboneSpec, Embedded, LayerMap, ModuleMap, Preset, PromptTemplate
from saturation.core.adapters.gemma3 import Gemma3
from saturation.core.adapters.llava import Llava
from saturation.core.adapters.llava_next import LlavaNext
from saturation.core.adapters.llava_onevision import LlavaOnevision
from saturation.core.adapters.qwen2_5_vl import Qwen25VL
from saturation.core.adapters.qwen3_vl import Qwen3VL
from saturation.core.errors import ToolkitError

FAMILIES: tuple[type[Adapter], ...] = (Llava, LlavaNext, LlavaOnevision, Qwen25VL, Qwen3VL, Gemma3)
ADAPTERS: dict[str, type[Adapter]] = {model_type: cls for cls in FAMILIES for model_type in cls.spec.model_types}

# What the families declare, gathered in registry order (first declaration wins).
ALIASES: dict[str, str] = {alias: hub for cls in FAMILIES for alias, hub in cls.aliases.items()}
PRESETS: dict[str, Preset] = {name: preset for cls in FAMILIES for name, preset in cls.presets.items()}
IMAGE_KWARGS: tuple[str, ...] = tuple(dict.fromkeys(k for cls in FAMILIES for k in cls.image_kwargs))
SEQUENCE_KWARGS: tuple[str, ...] = tuple(dict.fromkeys(k for cls in FAMILIES for k in cls.sequence_kwargs))
IMAGE_ONLY_PROCESSORS: dict[str, type] = {model_type: cls.image_only_processor for model_type, cls in ADAPTERS.items()
                                          if cls.image_only_processor is not None}


def adapter_class(config) -> type[Adapter]:
    """The adapter class for a config, or a one-line error naming what the model is instead."""
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    raise ToolkitError(f"not a LLaVA model: model_type is '{model_type}' (supported: {', '.join(ADAPTERS)})")


def spec_for_config(config) -> ModuleMap:
    """The module map for a config, or a one-line error naming what the model is instead."""
    return adapter_class(config).spec


def adapter_for(model: nn.Module) -> Adapter:
    """The backbone adapter of a loaded model; a one-line error for anything that is not a supported family."""
    config = getattr(model, "config", None)
    if config is None:
        raise ToolkitError(f"not a LLaVA model: {type(model).__name__} has no config")
    return adapter_class(config)(model)


LLAVA_15, LLAVA_NEXT, LLAVA_ONEVISION = Llava.spec, LlavaNext.spec, LlavaOnevision.spec
BACKBONES: tuple[ModuleMap, ...] = tuple(dict.fromkeys(cls.spec for cls in ADAPTERS.values()))

__all__ = ["ADAPTERS", "ALIASES", "BACKBONES", "FAMILIES", "IMAGE_KWARGS", "IMAGE_ONLY_PROCESSORS", "LLAVA_15",
           "LLAVA_NEXT", "LLAVA_ONEVISION", "PRESETS", "SEQUENCE_KWARGS", "Adapter", "AttentionInputs", "BackboneSpec",
           "Embedded", "Gemma3", "LayerMap", "Llava", "LlavaNext", "LlavaOnevision", "ModuleMap", "Preset",
           "PromptTemplate", "Qwen25VL", "Qwen3VL", "adapter_class", "adapter_for", "position_ids_from_mask",
           "spec_for_config"]
