"""The attention inputs of the contract: positions, rotary tables, masks and one layer's queries/keys/values.

`AttentionInputs` is a mixin of `Adapter` (``saturation.core.adapters.base``): the defaults every family shares
(1D positions, one rotary table, HF's causal mask, sdpa's ``is_causal`` shortcuts, the layer's own projections),
which a family module overrides where its attention differs (M-RoPE positions, one mask and table per layer type).
It reads only what the map gives: ``text_config``, ``rotary_emb``, ``attn_implementation``, ``layers``,
``attention_of`` and the layer-relative paths of ``spec.submodules``.

Shapes: ``B`` batch, ``T`` sequence, ``D`` d_model, ``H``/``Hkv`` query/key-value heads, ``d`` head dim.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask

from saturation.core.hf_compat import cache_kwargs


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions as `generate` makes them: ``cumsum(mask) - 1``, with pads set to 0. [B, T] -> [B, T]."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def take_rope(rope, take):
    """A subset's rows of the rotary tables: `take` on each of ``(cos, sin)``, or on each layer type's pair."""
    if isinstance(rope, dict):
        return {kind: tuple(take(t) for t in pair) for kind, pair in rope.items()}
    return tuple(take(t) for t in rope)


def take_positions(positions: Tensor, take) -> Tensor:
    """A subset's positions, ORIGINAL values: `take` ([B, T, ...] -> [B, n, ...]) on [B, T] positions, or on
    each row of M-RoPE's [3, B, T]."""
    return take(positions) if positions.dim() == 2 else torch.stack([take(p) for p in positions])


def sdpa_is_causal(implementation: str, cache, layer_idx: int, queries: int = 0) -> bool:
    """Whether an unpadded block of `queries` needs no mask (HF's ``_ignore_causal_mask_sdpa``): sdpa, and no keys
    cached before it (queries = keys) or a single query (it sees every key)."""
    return implementation == "sdpa" and (queries == 1 or cache is None or cache.get_seq_length(layer_idx) == 0)


def causal_in_order(q_index: Tensor, k_index: Tensor, k_valid: Tensor) -> Tensor:
    """[B, 1, q, k] bool for keys in any order: key position <= query position (ORIGINAL positions, `q_index`
    [B, q], `k_index` [B, k]), and the key valid (`k_valid` [B, k])."""
    return (k_index[:, None, None, :] <= q_index[:, None, :, None]) & k_valid[:, None, None, :]


def as_mask(allowed: Tensor, dtype: torch.dtype, implementation: str) -> Tensor:
    """A boolean [B, 1, q, k] mask as `implementation` takes it: itself (sdpa), or additive (0 / dtype min, eager),
    as ``create_causal_mask`` makes them."""
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def allowed(mask: Tensor) -> Tensor:
    """`as_mask` undone: the [B, 1, q, k] bool of what a layer's mask lets attend (an additive mask is 0 there)."""
    return mask if mask.dtype == torch.bool else mask == 0


class AttentionInputs:
    """Positions, rotary tables, masks and q/k/v of the decoder layers: the operations a family may override."""

    _rope_tables: dict  # (layer type, dtype) -> (inv_freq it was made from, cos, sin): `_rotary`

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

    take_rope = staticmethod(take_rope)
    take_positions = staticmethod(take_positions)

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
        return sdpa_is_causal(self.attn_implementation, cache, layer_idx, queries)

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
        return self._as_mask(causal_in_order(q_index, k_index, k_valid), dtype)

    def _as_mask(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """A boolean [B, 1, q, k] mask as this attention implementation takes it: itself (sdpa), or additive."""
        return as_mask(allowed, dtype, self.attn_implementation)

    allowed = staticmethod(allowed)

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
        hidden, rope = to_weights(module, hidden, rope)
        x = module.get_submodule(self.spec.submodules.input_norm)(hidden)
        keys = self._heads(module.get_submodule(self.spec.submodules.k_proj), x, attn.head_dim, self._norm(module, self.spec.submodules.k_norm))
        values = self._heads(module.get_submodule(self.spec.submodules.v_proj), x, attn.head_dim)
        cos, sin = self.pick(rope, layer)
        _, keys = self._rotary_fn(attn)(keys[:, :0], keys, cos, sin)  # an empty query: rotate the keys only
        return keys, values

    def queries_keys(self, layer: int, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, float]:
        """Rotated queries [B, H, n, d] and keys [B, Hkv, n, d] of decoder layer `layer` for its input `hidden`,
        and the score scale: what attention scores of selected rows/columns need (supervision, FastV-style
        pruning) without running the attention itself."""
        module = self.layers[layer]
        attn = self.attention_of(module)
        hidden, rope = to_weights(module, hidden, rope)
        x = module.get_submodule(self.spec.submodules.input_norm)(hidden)
        q = self._heads(module.get_submodule(self.spec.submodules.q_proj), x, attn.head_dim, self._norm(module, self.spec.submodules.q_norm))
        k = self._heads(module.get_submodule(self.spec.submodules.k_proj), x, attn.head_dim, self._norm(module, self.spec.submodules.k_norm))
        cos, sin = self.pick(rope, layer)
        q, k = self._rotary_fn(attn)(q, k, cos, sin)
        return q, k, float(attn.scaling)


def to_weights(module: nn.Module, hidden: Tensor, rope):
    """`hidden` and the rotary table(s) on the device of `module`'s weights: its projections are called one by one
    here, past the accelerate hook a device map puts on the whole layer (which would move the inputs). Offloaded
    weights (meta placeholders) have per-submodule hooks of their own that do it."""
    device = next((p.device for p in module.parameters() if p.device.type != "meta"), None)
    if device is None or device == hidden.device:
        return hidden, rope
    return hidden.to(device), moved(rope, device)


def moved(x, device: torch.device):
    """Tensors inside tuples and dicts (a rotary table, or one per layer type) on `device`."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: moved(v, device) for k, v in x.items()}
    return type(x)(moved(v, device) for v in x) if isinstance(x, (tuple, list)) else x
