"""The one transformers 5.x rename the toolkit spans: the KV cache argument and output field.

Up to 5.23 layers, masks, models and their outputs call the cache ``past_key_values``; from 5.24 it is ``cache``
(the old keyword still works, with a deprecation warning and an extra wrapper call per layer, until 5.40/6.0; the
old output field is gone). Everything that hands a cache to transformers or reads one back goes through here, so
the rest of the code is the same on both sides of the rename.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

from torch import Tensor
from transformers.masking_utils import create_causal_mask

CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever this transformers takes."""
    return {CACHE_ARG: cache}


def cache_of(output):
    """The KV cache a model output carries (``output.cache`` or ``output.past_key_values``)."""
    return getattr(output, CACHE_ARG)


def cache_tensors(cache) -> Iterator[Tensor]:
    """Every key and value tensor a ``DynamicCache`` holds, layer by layer (layers may differ in length)."""
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, Tensor):
                yield t
