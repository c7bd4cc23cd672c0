"""Memory of each routing variant per device: the FLOP model's companion (``routing.flops``) for placed models.

Two parts, both exact for a Llama-style decoder (no projection biases) and priced from the geometry alone:

- ``weights``: the decoder layers each device holds (``Geometry.layer_params``), plus the side branch, which lives
  with its source layer (``routing.model._side_copy``). Embeddings, LM head and the image encoder are not in the
  decoder geometry; ``routing bench`` reports every parameter by where a device map put it beside this.
- ``cache``: the prompt's keys and values after prefill, per layer by the plan's cache layout (``full``: every
  position; ``text``: LF's deep layers hold the text only; ``kv``: image then text; ``kept``: what pruning left).
  The side branch is never cached. A vanilla sliding-window layer (Gemma 3) keeps its last ``window - 1`` entries
  (HF's ``DynamicCache(config=...)``); a routed one keeps every key (``routing.generation.new_cache``).

A device map decides where each layer's weights are stored (``placement``: ``cuda:0``, ``cpu``, ``disk``) and
where it computes (``execution``: an offloaded layer runs on the main device, and its cache is filled there).
"""

from __future__ import annotations

from collections.abc import Sequence

from .flops import Geometry
from .plan import RoutingPlan

MB = 2**20


def cache_keys(g: Geometry, plan: RoutingPlan | None, image_tokens: int, text_tokens: int) -> list[int]:
    """Cached keys per decoder layer of one prompt of `image_tokens` + `text_tokens` after prefill."""
    if plan is None:
        n = image_tokens + text_tokens
        return [n if g.window_of(i) is None else min(n, g.window_of(i) - 1) for i in range(g.num_layers)]
    image = plan.image_schedule(image_tokens)  # image tokens each layer still sees (PDrop: fewer at each stage)
    return [text_tokens + (0 if plan.layout(i) == "text" else image[i]) for i in range(plan.num_layers)]


def cache_bytes(g: Geometry, plan: RoutingPlan | None, image_tokens: int, text_tokens: int, batch: int = 1,
                dtype_bytes: int = 2) -> list[int]:
    """Bytes of keys and values per decoder layer for a batch of `batch` equal prompts."""
    return [2 * batch * keys * g.kv_dim * dtype_bytes for keys in cache_keys(g, plan, image_tokens, text_tokens)]


def weight_bytes(g: Geometry, plan: RoutingPlan | None, dtype_bytes: int = 2) -> tuple[list[int], list[int]]:
    """``(per decoder layer, per side-branch layer)`` weight bytes; the side list is empty for vanilla."""
    layer = g.layer_params() * dtype_bytes
    return [layer] * g.num_layers, [layer] * (plan.side_depth if plan is not None and plan.routes else 0)


def per_device(g: Geometry, plan: RoutingPlan | None, placement: Sequence[str], execution: Sequence[str],
               image_tokens: int, text_tokens: int, batch: int = 1, dtype_bytes: int = 2) -> dict[str, dict]:
    """``{device: {"weights_mb", "cache_mb"}}``: decoder-layer and side-branch weights where `placement[i]` stores
    layer i (a side layer with its source), the prompt's cache where `execution[i]` runs it."""
    if len(placement) != g.num_layers or len(execution) != g.num_layers:
        raise ValueError(f"need one device per decoder layer ({g.num_layers}), got {len(placement)}/{len(execution)}")
    layers, side = weight_bytes(g, plan, dtype_bytes)
    out: dict[str, dict] = {}

    def add(device: str, key: str, nbytes: int) -> None:
        slot = out.setdefault(device, {"weights_mb": 0.0, "cache_mb": 0.0})
        slot[key] += nbytes / MB

    for i, nbytes in enumerate(layers):
        add(placement[i], "weights_mb", nbytes)
    for i, nbytes in enumerate(side):  # the side branch computes (and is stored) where its source layer runs
        add(execution[plan.side_sources[i]], "weights_mb", nbytes)
    for i, nbytes in enumerate(cache_bytes(g, plan, image_tokens, text_tokens, batch, dtype_bytes)):
        add(execution[i], "cache_mb", nbytes)
    return dict(sorted(out.items()))
