"""One adapter per backbone family, and the registry from ``config.model_type`` to it.

``adapter_for(model)`` (re-exported as ``saturation.anatomy.anatomy``) is how the rest of the toolkit sees a model.
A new family is one module here with a `Backbone` subclass, added to `ADAPTERS`; nothing outside this package
changes.
"""

from __future__ import annotations

from torch import nn

from ..errors import ToolkitError
from .base import Backbone, BackboneSpec, Embedded, PromptTemplate, position_ids_from_mask
from .gemma3 import Gemma3
from .llava import Llava
from .llava_next import LlavaNext
from .llava_onevision import LlavaOnevision
from .qwen2_5_vl import Qwen25VL
from .qwen3_vl import Qwen3VL

ADAPTERS: dict[str, type[Backbone]] = {
    model_type: cls for cls in (Llava, LlavaNext, LlavaOnevision, Qwen25VL, Qwen3VL, Gemma3) for model_type in cls.spec.model_types
}


def adapter_class(config) -> type[Backbone]:
    """The adapter class for a config, or a one-line error naming what the model is instead."""
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    raise ToolkitError(f"not a LLaVA model: model_type is '{model_type}' (supported: {', '.join(ADAPTERS)})")


def adapter_for(model: nn.Module) -> Backbone:
    """The backbone adapter of a loaded model; a one-line error for anything that is not a supported family."""
    config = getattr(model, "config", None)
    if config is None:
        raise ToolkitError(f"not a LLaVA model: {type(model).__name__} has no config")
    return adapter_class(config)(model)


__all__ = ["ADAPTERS", "Backbone", "BackboneSpec", "Embedded", "Gemma3", "Llava", "LlavaNext", "LlavaOnevision", "PromptTemplate",
           "Qwen25VL", "Qwen3VL",
           "adapter_class", "adapter_for", "position_ids_from_mask"]
