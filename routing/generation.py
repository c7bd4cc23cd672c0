"""KV-cached decoding for the routed model: what the cache must remember about the prompt, and nothing more.

HF's own ``generate()`` drives the routed model (``RoutedModel`` is a ``GenerationMixin``), so ``max_new_tokens``,
``eos_token_id``, sampling, streamers and stopping criteria all work. The routing-specific part is small:

- The one ``DynamicCache`` holds a different length per layer group: ``full`` layers cache image+text,
  ``text`` layers (LF's deep stack) the text positions only, ``kv`` layers (KV's deep stack) image keys then text.
- So each layout needs its own 2D padding mask for every decode step. The prompt part of each is fixed at prefill
  and kept on the cache object itself (``RoutingState``, an attribute of whatever ``DynamicCache`` generate made);
  the generated part is the tail of the running 2D mask. Beam search reorders the cache but not this state, which
  is right: the beams of one sample are adjacent copies with identical prompt masks.
- When the prompt has no pads and every row has the same number of image tokens, no layout needs a padding mask
  during decoding (generate drops the all-ones mask too), which keeps a decode step as lean as vanilla's.
- A decode mask is sized against the cache slot of its own group (``layer_idx``), never ``get_seq_length()``
  without a layer index.
- Positions are the original ones (``cumsum(mask) - 1``), so a generated token sits where vanilla would put it,
  whatever the padding side; M-RoPE families add the prompt's delta (``RoutingState.position_delta``, HF's
  ``rope_deltas``), kept here rather than in HF's state on the model.
- The side branch does not run during decoding: its output already sits in the fusion (and KV/PC deep) layers' K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache

from saturation.core.adapters import position_ids_from_mask
from saturation.core.errors import ToolkitError

_STATE_ATTR = "_dpvr_routing"


@dataclass(frozen=True)
class RoutingState:
    """What a routed prefill leaves on its cache for the steps after it."""

    prompt_length: int  # N0: positions in the prompt (the length of the `full` layout's prompt part)
    prompt_masks: dict[str, Tensor]  # layout -> [batch, its prompt part] (bool), in that layout's cache order
    next_position: Tensor  # [batch]: the position id of the first token after the prompt
    unmasked: bool = False  # no pads and no fillers in any layout: decode steps need no padding mask
    # [batch]: next_position - real prompt tokens; 0 for 1D positions, M-RoPE's rope_deltas (text after an image
    # resumes at max(h, w) / merge, not at its index): decode positions are cumsum(mask) - 1 + delta.
    position_delta: Tensor | None = None
    # layout -> [batch, its prompt part]: each cached key's ORIGINAL position, in that layout's cache order (a
    # sliding window reads them: the text-only and image-first layouts are not in sequence order)
    prompt_positions: dict[str, Tensor] | None = None
    # prompt entries in layer 0's cache when pruning before the LLM shortened the prompt (None: prompt_length)
    cached_prompt_length: int | None = None
    # layout -> [batch]: PDrop renumbers positions contiguously after each drop (its authors' code), so a layer
    # after a stage places a new token this much below its original position (the tokens dropped so far)
    position_shift: dict[str, Tensor] | None = None


def attach_state(cache: Cache, state: RoutingState) -> None:
    setattr(cache, _STATE_ATTR, state)


def state_of(cache: Cache | None) -> RoutingState | None:
    return getattr(cache, _STATE_ATTR, None)


def new_cache() -> DynamicCache:
    """The cache a routed prefill fills. With sliding-window layers a plain one: ``DynamicCache(config=...)`` keeps
    the last window - 1 entries of a sliding layer BY COUNT, right only for a layout in sequence order; the
    text-only layout (image positions removed) and the image-first one (KV) hold other entries, so every layer keeps
    all of its keys and the decode masks cut the window in original positions (`RoutingState.prompt_positions`).
    Every family gets that one: its layers are made as they are first written, and ``DynamicCache(config=...)``
    read the config for ~0.2 ms per prefill on CPU (a fifth of a compiled LF prefill's eager work)."""
    return DynamicCache()


def check_cache(cache: Cache) -> None:
    """Only growing caches fit per-group lengths; static ones would need a 4D mask per group."""
    if not isinstance(cache, DynamicCache) or cache.is_compileable:
        raise ToolkitError(f"routed decoding needs a DynamicCache, got {type(cache).__name__} "
                           "(static/compiled caches are not supported)")
    if any(cache.is_sliding):
        raise ToolkitError("routed decoding needs cache layers that keep every key: a DynamicCache(config=...) of a "
                           "sliding-window model keeps only the last window - 1 by count; pass DynamicCache() or none")
    if state_of(cache) is None and cache.get_seq_length(0) > 0:
        raise ToolkitError("this cache was not filled by a routed prefill: start from an empty cache")


def make_state(prompt_masks: dict[str, Tensor], attention_mask: Tensor, positions: Tensor | None = None,
               prompt_positions: dict[str, Tensor] | None = None, unmasked: bool | None = None) -> RoutingState:
    """The state a prefill leaves on its cache; `attention_mask` is the prompt's 2D mask, `positions` the prompt's
    position ids ([batch, seq], or M-RoPE's [3, batch, seq]): the next token goes one past the largest (None:
    generate's ``cumsum(mask) - 1``, the next is the count of real tokens). `prompt_positions`: layout -> its cached
    keys' original positions (see `RoutingState`). `unmasked`: whether no prompt mask masks anything, when the
    caller knows (read from the masks otherwise: a host read each)."""
    if unmasked is None:
        unmasked = all(bool(m.all()) for m in prompt_masks.values())
    real = attention_mask.sum(1)
    if positions is None:
        return RoutingState(attention_mask.shape[1], prompt_masks, real, unmasked, torch.zeros_like(real),
                            prompt_positions)
    following = positions.reshape(-1, *attention_mask.shape).amax(dim=(0, 2)) + 1
    return RoutingState(attention_mask.shape[1], prompt_masks, following, unmasked, following - real,
                        prompt_positions)


@dataclass(frozen=True)
class Continuation:
    """Masks and positions of new text tokens after a cached prompt. `masks`: layout -> 2D mask [batch, kv_len],
    or None where nothing is masked (as ``generate`` does, once a cache exists no packed-sequence guess is made)."""

    masks: dict[str, Tensor | None]
    position_ids: Tensor  # [batch, q]
    prompt_positions: dict[str, Tensor] | None = None  # the state's
    generated_positions: Tensor | None = None  # [batch, generated]: positions after the prompt, these q included
    position_shift: dict[str, Tensor] | None = None  # the state's (PDrop's renumbering)

    def shift(self, layout: str) -> Tensor | None:
        """[batch, 1]: how far below the original positions layout `layout` places the new tokens (None: not)."""
        shift = None if self.position_shift is None else self.position_shift.get(layout)
        return None if shift is None else shift[:, None]

    def positions(self, layout: str) -> Tensor:
        """[batch, q]: the new tokens' positions in layout `layout`'s layers (the original ones but after a PDrop
        stage, which renumbers)."""
        shift = self.shift(layout)
        return self.position_ids if shift is None else self.position_ids - shift

    def key_positions(self, layout: str) -> Tensor | None:
        """[batch, kv_len]: the position of every key layout `layout` caches (the original one, or PDrop's
        renumbered one), then the new tokens' (None for M-RoPE prompts and states without them: no family with
        sliding windows needs them there)."""
        prompt = None if self.prompt_positions is None else self.prompt_positions.get(layout)
        if prompt is None or prompt.dim() != 2:
            return None
        shift = self.shift(layout)
        return torch.cat([prompt, self.generated_positions if shift is None else self.generated_positions - shift],
                         dim=1)


def continuation(state: RoutingState, cache: Cache, attention_mask: Tensor | None, q: int) -> Continuation:
    """2D masks per cache layout and original positions for `q` new tokens.

    `attention_mask` is the running 2D mask over prompt + everything generated (as ``generate`` keeps it), or
    ``None`` when it is all ones. Layer 0 is always a ``full`` layer (split >= 1), so its cache length counts the
    prompt plus every token decoded so far.
    """
    cached = state.prompt_length if state.cached_prompt_length is None else state.cached_prompt_length
    generated = cache.get_seq_length(0) - cached + q  # tokens after the prompt, these q included
    device = state.next_position.device
    if attention_mask is None:
        tail = None
        after = state.next_position[:, None] + torch.arange(generated, device=device)
        position_ids = after[:, -q:]
    else:
        if attention_mask.shape[1] != state.prompt_length + generated:
            raise ToolkitError(f"attention_mask has {attention_mask.shape[1]} columns, but the cache holds "
                               f"{state.prompt_length + generated - q} positions and {q} are new")
        tail = attention_mask[:, state.prompt_length:].bool()
        after = position_ids_from_mask(attention_mask)[:, state.prompt_length:]
        if state.position_delta is not None:
            after = after + state.position_delta[:, None]
        position_ids = after[:, -q:]
    if tail is None and state.unmasked:
        return Continuation(dict.fromkeys(state.prompt_masks), position_ids, state.prompt_positions, after,
                            state.position_shift)
    if tail is None:
        tail = torch.ones(len(position_ids), generated, dtype=torch.bool, device=device)
    masks = {layout: torch.cat([prompt, tail], dim=1) for layout, prompt in state.prompt_masks.items()}
    return Continuation(masks, position_ids, state.prompt_positions, after, state.position_shift)


@torch.no_grad()
def greedy_recompute(routed, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                     pixel_values: Tensor | None = None, **image_kwargs) -> Tensor:
    """Greedy decoding with no cache: the whole sequence through the routed forward at every step.

    Slow but obviously right; the reference that cached ``generate`` must equal token for token. Returns the prompt
    followed by `max_new_tokens` new ids, like ``generate``.
    """
    ids, mask = input_ids, attention_mask
    for _ in range(max_new_tokens):
        logits = routed(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **image_kwargs).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids
