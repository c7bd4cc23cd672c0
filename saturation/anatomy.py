"""The public entry to a model's anatomy: ``anatomy(model)`` is its backbone adapter (``saturation.backbones``).

Kept as its own module because the contract names it (``saturation.anatomy.anatomy(model).forward(...)`` equals
HF's logits). The maps and operations themselves live in ``saturation/backbones/``, one module per family.
"""

from __future__ import annotations

from .backbones import ADAPTERS, Backbone, BackboneSpec, adapter_class, adapter_for, position_ids_from_mask
from .backbones.llava import Llava
from .backbones.llava_next import LlavaNext
from .backbones.llava_onevision import LlavaOnevision

Anatomy = Backbone  # the name the toolkit used before the adapters (type hints, saturation.Anatomy)
anatomy = adapter_for
LLAVA_15, LLAVA_NEXT, LLAVA_ONEVISION = Llava.spec, LlavaNext.spec, LlavaOnevision.spec
BACKBONES: tuple[BackboneSpec, ...] = tuple(dict.fromkeys(cls.spec for cls in ADAPTERS.values()))


def spec_for_config(config) -> BackboneSpec:
    """The module map for a config, or a one-line error naming what the model is instead."""
    return adapter_class(config).spec


__all__ = ["Anatomy", "BACKBONES", "BackboneSpec", "LLAVA_15", "LLAVA_NEXT", "LLAVA_ONEVISION", "anatomy",
           "position_ids_from_mask", "spec_for_config"]
