"""The routed model: DPVR-LF and its baselines as one plan over the base model's own layers.

Read top to bottom: ``Route`` (where image and text sit, computed once per forward), ``RoutedModel.forward``
(prefill or cached continuation, then the head), ``_route_prompt`` (what needs the host: the route, masks,
pruning), ``routed_prefill`` (the plan's groups; each variant's difference is one short block), ``_route_next`` (a
decode step: one loop, one mask per cache layout), and ``build``.

The base model is held by reference and frozen; the only new weights are the side branch, ``d_v`` deep copies of
layers ``s .. s+d_v-1`` whose attention has its own ``layer_idx = L + i`` (it never touches the base's cache slots,
and it is not cached at all: during decoding its output already sits in the K/V of the layers that read it).
Everything goes through the backbone adapter (``adapter_for(model)``, one per family in
``saturation/core/adapters/``): its image merge, positions, masks, rotary tables and per-layer K/V. This file names no HF
module path and reads no private config field, so a new family needs no change here.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.loss.loss_utils import ForCausalLMLoss, fixed_cross_entropy
from transformers.modeling_outputs import CausalLMOutputWithPast

from saturation.core.adapters import IMAGE_KWARGS, Adapter, Embedded, adapter_for
from saturation.core.errors import ToolkitError
from saturation.core.hf_compat import CACHE_ARG, cache_kwargs

from .artifact import save_routing
from .generation import attach_state, check_cache, continuation, make_state, new_cache, state_of
from .plan import IN_LLM, PRE_LLM, RoutingPlan, check_family, check_fits, make_plan, stage_layout
from .prepruners import divprune_select, image_runs, visionzip_merge

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class RouteSizes:
    """What routing a batch must read on the host: the fewest and most image tokens in a row, and whether the
    attention mask masks anything. Read once per prompt, before any layer is queued (free on a GPU)."""

    n_image_min: int
    n_image_max: int
    unpadded: bool

    @classmethod
    def of(cls, image_mask: Tensor, attention_mask: Tensor) -> RouteSizes:
        counts = image_mask.sum(1).tolist()
        return cls(min(counts), max(counts), bool(attention_mask.all()))

    @property
    def dense(self) -> bool:
        """Images in every row, the same number, nothing padded: no fillers, no invalid slot in either subset."""
        return self.n_image_min == self.n_image_max > 0 and self.unpadded

    def all_valid(self, image_mask: Tensor) -> tuple[Tensor, Tensor]:
        """A dense batch's text and image validity, [batch, T] and [batch, I], all True."""
        batch, n = image_mask.shape
        valid = torch.ones(batch, n, dtype=torch.bool, device=image_mask.device)
        return valid[:, : n - self.n_image_max], valid[:, n - self.n_image_max:]


@dataclass(frozen=True)
class Route:
    """Where the image and text positions of one batch sit; computed once per forward, reused by every layer.

    Each subset keeps the original order. Rows with fewer image (or text) tokens than the batch maximum are filled
    up with other positions marked invalid, so image tokens may be anywhere and differ in number per row.
    Subsets are taken with one ``index_select`` over flattened rows (an order of magnitude faster on CPU than a
    ``gather`` with an expanded index).
    """

    image_mask: Tensor  # [batch, seq] bool
    text_index: Tensor  # [batch, T] original positions of the text subset (then fillers)
    text_valid: Tensor  # [batch, T] bool: real, unpadded text
    image_index: Tensor  # [batch, I]
    image_valid: Tensor  # [batch, I] bool
    inverse: Tensor | None  # [batch*seq] flat: [text | image] -> original order; None when rows have fillers
    text_flat: Tensor  # text_index over flattened rows, for index_select
    image_flat: Tensor
    text_dense: bool  # every text slot is real (no padding, no fillers): sdpa's own causal mask will do
    image_dense: bool
    unpadded: bool  # the attention mask masks nothing

    @classmethod
    def of(cls, image_mask: Tensor, attention_mask: Tensor, sizes: RouteSizes | None = None) -> Route | None:
        """The route of a batch, or None when no row has an image token. `sizes`: the batch's `RouteSizes`, when
        the caller has read them. A dense batch (`RouteSizes.dense`) skips the validity gathers: each op costs a
        few microseconds on CPU, where a compiled prefill's eager work is what LF pays over vanilla."""
        sizes = RouteSizes.of(image_mask, attention_mask) if sizes is None else sizes
        if sizes.n_image_max == 0:
            return None
        if sizes.dense:
            return cls.dense(image_mask, *sizes.all_valid(image_mask))
        n = image_mask.shape[1]
        order, flat = cls._order(image_mask)
        text_index, image_index = order[:, : n - sizes.n_image_min], order[:, n - sizes.n_image_max:]
        even = sizes.n_image_max == sizes.n_image_min
        inverse = flat(torch.argsort(order, dim=1)) if even else None  # [text | image] -> original order
        valid = attention_mask.bool()
        text_valid = (valid & ~image_mask).gather(1, text_index)
        image_valid = (valid & image_mask).gather(1, image_index)
        return cls(image_mask, text_index, text_valid, image_index, image_valid, inverse, flat(text_index),
                   flat(image_index), bool(text_valid.all()), bool(image_valid.all()), sizes.unpadded)

    @classmethod
    def dense(cls, image_mask: Tensor, text_valid: Tensor, image_valid: Tensor) -> Route:
        """The route of a dense batch (`RouteSizes.dense`) from tensors alone: the subsets' sizes are the widths of
        `text_valid` and `image_valid` (all True), so inside a compiled prompt this is part of its graph (sizes
        stay dynamic, no host read)."""
        n = image_mask.shape[1]
        order, flat = cls._order(image_mask)
        text_index, image_index = order[:, : text_valid.shape[1]], order[:, n - image_valid.shape[1]:]
        return cls(image_mask, text_index, text_valid, image_index, image_valid, flat(torch.argsort(order, dim=1)),
                   flat(text_index), flat(image_index), True, True, True)

    @staticmethod
    def _order(image_mask: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Every row's positions, text first then image (each in original order), and the function that turns
        [batch, m] indices into indices over the flattened [batch * seq] rows."""
        batch, n = image_mask.shape
        order = torch.argsort(image_mask.to(torch.uint8), dim=1, stable=True)
        rows = n * torch.arange(batch, device=order.device)[:, None] if batch > 1 else None
        return order, lambda index: (index if rows is None else index + rows).reshape(-1)

    @staticmethod
    def _take(x: Tensor, flat: Tensor, batch: int) -> Tensor:
        """Rows of `x` [batch, seq, ...] at flattened indices -> [batch, m, ...]."""
        rows = x.reshape(-1, *x.shape[2:]).index_select(0, flat.to(x.device))  # a device map: x may sit elsewhere
        return rows.view(batch, -1, *x.shape[2:])

    def text(self, x: Tensor) -> Tensor:
        return self._take(x, self.text_flat, x.shape[0])

    def image(self, x: Tensor) -> Tensor:
        return self._take(x, self.image_flat, x.shape[0])

    def scatter_image(self, image: Tensor) -> Tensor:
        """[batch, I, D] -> [batch, seq, D], correct at image positions (zeros elsewhere)."""
        full = image.new_zeros(self.image_mask.numel(), image.shape[-1])
        return full.index_copy(0, self.image_flat.to(image.device), image.reshape(-1, image.shape[-1])).view(
            *self.image_mask.shape, -1)

    def merge(self, text: Tensor, image: Tensor) -> Tensor:
        """The full sequence [batch, seq, D] from the text subset and the image subset, on the text's device (under
        a device map the side branch runs with its source layer, the deep text layers maybe on another GPU)."""
        image = image.to(text.device)
        if self.inverse is not None:  # the two subsets partition every row: one concatenation, one selection
            return self._take(torch.cat([text, image], dim=1), self.inverse, text.shape[0])
        full_text = text.new_zeros(self.image_mask.numel(), text.shape[-1])
        full_text = full_text.index_copy(0, self.text_flat.to(text.device), text.reshape(-1, text.shape[-1])).view(
            *self.image_mask.shape, -1)
        return torch.where(self.image_mask.to(text.device)[..., None], self.scatter_image(image), full_text)


@dataclass(frozen=True)
class Kept:
    """The positions that survive pruning, original order, each row right-aligned behind invalid fillers (the
    batch stays left-padded). `h_at_drop` [B, N, D]: the states when pruning happened; the pruned positions keep
    them in the output (nothing reads them again, as VTW's image positions)."""

    flat: Tensor  # [B*m] indices into the flattened [B*N] frame
    valid: Tensor  # [B, m] bool
    h_at_drop: Tensor
    # [B*N] flat: the original position each kept position stands for, where a pruning writes merged tokens into
    # an image's first slots (VisionZip: a dominant token its patch, a contextual token its target, [CLS] the
    # image's first position); None: each kept position stands for itself.
    stands_for: Tensor | None = None

    @classmethod
    def of(cls, kept: Tensor, h_at_drop: Tensor, stands_for: Tensor | None = None) -> Kept:
        n, m = kept.shape[1], int(kept.sum(1).max())
        order = torch.argsort(kept.to(torch.uint8), dim=1, stable=True)[:, n - m:]  # dropped first, then kept
        rows = n * torch.arange(len(kept), device=kept.device)[:, None]
        return cls((order + rows).reshape(-1), kept.gather(1, order), h_at_drop, stands_for)

    def sources(self) -> Tensor:
        """[B*m] flat original positions the kept positions stand for (`flat` unless a merge wrote elsewhere)."""
        return self.flat if self.stands_for is None else self.stands_for[self.flat]

    def mask(self, shape: torch.Size) -> Tensor:
        """The original positions the kept tokens stand for (`sources`), as a [B, N] bool over the original frame:
        what `kept_image_tokens` reports (VisionZip: its dominant patches and contextual targets, not the slots)."""
        keep = torch.zeros(shape.numel(), dtype=torch.bool, device=self.flat.device)
        return keep.index_fill(0, self.sources()[self.valid.reshape(-1).to(self.flat.device)], True).view(shape)

    def then(self, later: Kept) -> Kept:
        """This pruning followed by `later` (made in this one's kept frame), as one pruning of the original frame:
        a position `later` drops keeps its states from `later`'s drop, one this drops its own (PDrop's stages)."""
        flat = self.flat[later.flat.to(self.flat.device)]
        return Kept(flat, later.valid, self.restore(later.h_at_drop), None)

    def take(self, x: Tensor) -> Tensor:
        """[B, N, ...] -> [B, m, ...]."""
        return Route._take(x, self.flat, x.shape[0])

    def restore(self, h: Tensor) -> Tensor:
        """The pruned frame's output [B, m, D] back in the original one [B, N, D]."""
        d, keep = h.shape[-1], self.valid.reshape(-1).to(h.device)
        full = self.h_at_drop.to(h.device, h.dtype).reshape(-1, d).index_copy(
            0, self.flat.to(h.device)[keep], h.reshape(-1, d)[keep])
        return full.view(*self.h_at_drop.shape[:2], d)


class _PrefixKV:
    """A one-layer stand-in cache that puts fixed keys/values before the layer's own (KV deep layers, no cache)."""

    def __init__(self, keys: Tensor, values: Tensor):
        self.keys, self.values = keys, values

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)


def run_layers(layers, hidden: Tensor, masks: list, position_ids: Tensor, ropes: list, cache=None,
               norm: nn.Module | None = None) -> Tensor:
    """`hidden` [B, n, D] through `layers` in turn, layer i under ``masks[i]`` and ``ropes[i]`` (one per layer: a
    family with sliding windows has one per layer type), appending to `cache` (a KV cache or `_PrefixKV`) when given,
    then through `norm` if given (the stack's final norm, when the group ends the stack: a decode step).
    Every group of the plan runs through here; ``--compile`` makes it one graph per group (``routing.compiled``)."""
    kv = cache_kwargs(cache) if cache is not None else {}
    for layer, mask, rope in zip(layers, masks, ropes, strict=True):
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rope, **kv)
    return hidden if norm is None else norm(hidden)


def routed_prefill(a: Adapter, plan: RoutingPlan, side_layers: nn.ModuleList, r: Route, h: Tensor, masks: dict,
                   pos: Tensor, rope, text_pos: Tensor, image_pos: Tensor, cache=None, freeze: bool = False,
                   shallow: bool = True, norm: bool = True) -> Tensor:
    """A routed prompt after `Route.of`, from the embeddings `h` [B, N, D] to the stack's output [B, N, D]: shallow on
    every position, the side branch on the image subset (never cached), the deep layers as the variant says, the
    fusion layers on every position, then the final norm (as HF's text model ends; `norm` False: the caller puts a
    pruned frame back first). The deep layers are the one place the variants differ:

    - LF (``text_only``): the text subset alone (original positions, causal over text), then the merge;
    - PC (``reset``): every position, the image positions reset to the side output before every deep layer;
    - KV (``kv_only``): the text subset, with the side output's keys/values (through each deep layer's own norm and
      projections) before the text's own; no query, output projection or MLP for the image positions.

    Tensor operations only, given what needs the host before (`r`, each group's mask in `masks`: ``full``, ``side``
    and ``text`` (LF) or ``kv`` (KV); the subsets' positions): no value-dependent branch, so ``--compile`` makes the
    whole of it ONE graph (``routing.compiled``), as vanilla's stack is one; eager runs the same function.
    `freeze`: the layers no gradient reaches under ``no_grad`` (a training step with a frozen base: the shallow
    stack always, LF's deep text stack too)."""
    if shallow:  # False: the caller ran the shallow layers (FastV prunes inside them)
        with torch.no_grad() if freeze else nullcontext():
            h = run_group(a, plan.shallow, h, masks["full"], pos, rope, cache)
    image_rope = a.take_rope(rope, r.image)
    side = side_branch(a, side_layers, r, h, masks["side"], image_pos, image_rope)
    if plan.deep_mode == "text_only":
        with torch.no_grad() if freeze else nullcontext():
            text = run_group(a, plan.deep, r.text(h), masks["text"], text_pos, a.take_rope(rope, r.text), cache)
        h = r.merge(text=text, image=side)
    elif plan.deep_mode == "reset":
        at_image = r.image_mask[..., None]
        side_full = r.scatter_image(side)
        for i in plan.deep:  # `.to`: a no-op unless a device map put deep layers on another device
            h = run_group(a, [i], torch.where(at_image.to(h.device), side_full.to(h.device), h), masks["full"], pos,
                          rope, cache)
        h = torch.where(at_image.to(h.device), side_full.to(h.device), h)
    else:
        t, text_rope = r.text(h), a.take_rope(rope, r.text)
        for i in plan.deep:
            keys, values = a.key_values(i, side, image_rope)
            if cache is not None:
                cache.update(keys, values, i)  # this layer's cache: image keys first, then text
            t = run_group(a, [i], t, masks["kv"], text_pos, text_rope, cache if cache is not None
                          else _PrefixKV(keys, values))
        h = r.merge(text=t, image=side)
    h = run_group(a, plan.fusion, h, masks["full"], pos, rope, cache)  # none for lf-ideal and VTW
    return a.norm(h) if norm else h


def dense_prefill(a: Adapter, plan: RoutingPlan, side_layers: nn.ModuleList, h: Tensor, image_mask: Tensor,
                  attention_mask: Tensor, text_valid: Tensor, image_valid: Tensor, cache=None,
                  freeze: bool = False) -> tuple[Tensor, Route, Tensor, Tensor, Tensor]:
    """`routed_prefill` for the common prompt, computing inside what it otherwise gets: the route (`Route.dense`:
    a dense batch, the subsets' sizes in `text_valid`/`image_valid`), positions from the mask, rotary tables and
    the subsets' positions. Only for a family whose positions read the mask alone and whose prompt needs no mask
    in any layer (`Adapter.maskless`), so every mask is None, or KV's order mask (tensor operations). Under
    ``--compile`` all of it is then in the prompt's one graph: as eager work before the graph it cost ~0.03 of LF's
    compiled prefill at 64 text tokens on CPU (measured with it answered from a cache), more than its op count says
    (it runs after the graph has evicted the caches). Returns the stack's output, the route, and the positions of
    every token, of the text subset and of the image subset (for the cache's state)."""
    r = Route.dense(image_mask, text_valid, image_valid)
    pos = a.positions(attention_mask)
    rope = a.rope(h, pos)
    text_pos, image_pos = a.take_positions(pos, r.text), a.take_positions(pos, r.image)
    masks = {"full": None, "side": None, "text": None}
    if plan.deep_mode == "kv_only":
        masks["kv"] = kv_mask(a, r, h.dtype)
    h = routed_prefill(a, plan, side_layers, r, h, masks, pos, rope, text_pos, image_pos, cache, freeze)
    return h, r, pos, text_pos, image_pos


def kv_mask(a: Adapter, r: Route, dtype: torch.dtype):
    """KV's deep-layer mask: text queries; keys of the image subset, then of the text subset (the cache's order)."""
    return a.order_mask(r.text_index, torch.cat([r.image_index, r.text_index], 1),
                        torch.cat([r.image_valid, r.text_valid], 1), dtype)


def run_group(a: Adapter, indices, hidden: Tensor, mask, position_ids: Tensor, rope, cache=None,
              runner=run_layers) -> Tensor:
    """Base layers `indices` through `runner` (`run_layers`, or a compiled copy), each under its layer type's mask
    and rotary table (`a.pick`: one per type where the family has sliding windows)."""
    layers = list(indices)
    return runner([a.layers[i] for i in layers], hidden, [a.pick(mask, i) for i in layers], position_ids,
                  [a.pick(rope, i) for i in layers], cache)


def side_branch(a: Adapter, side_layers, r: Route, h: Tensor, mask, image_pos: Tensor, image_rope) -> Tensor:
    """The side branch on the image subset of `h` (original positions, never cached); fillers zeroed so they stay
    finite keys/values for whoever reads them."""
    side = run_layers(side_layers, r.image(h), [a.pick(mask, layer) for layer in side_layers], image_pos,
                      [a.pick(image_rope, layer) for layer in side_layers])
    if not r.image_dense:
        side = side.masked_fill(~r.image_valid.to(side.device)[..., None], 0.0)
    return side


@dataclass(frozen=True)
class TrainableReport:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total

    def __str__(self) -> str:
        return f"{_human(self.trainable)} trainable of {_human(self.total)} ({100 * self.share:.2f}%)"


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _naming_image_kwargs(forward: Callable) -> Callable:
    """`forward` whose signature names every family's image kwargs (`IMAGE_KWARGS`, keyword-only, default None)
    before its ``**image_kwargs``: HF generate() validates model kwargs against the signature (behind ``**kwargs``
    they are refused), and the adapters declare them, so a new family's kwargs need no change here."""
    sig = inspect.signature(forward)
    *params, rest = sig.parameters.values()
    named = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Tensor | None")
             for k in IMAGE_KWARGS]
    forward.__signature__ = sig.replace(parameters=[*params, *named, rest])
    return forward


class RoutedModel(PreTrainedModel, GenerationMixin):
    """A DPVR-routed LLaVA. ``routed(input_ids=, pixel_values=, attention_mask=, labels=)`` gives ``.loss`` and
    ``.logits``; ``routed.generate(...)`` is HF's own generate with a per-group KV cache."""

    base_model_prefix = "base"  # so generate() pre-encodes images with the base's own image encoder
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # base and side layers are HF GradientCheckpointingLayers
    # Image keyword arguments some family's forward takes besides pixel_values, as the adapters declare them; named
    # in `forward`'s signature (`_naming_image_kwargs`) because HF generate() validates model kwargs against it.
    IMAGE_KWARGS = IMAGE_KWARGS
    run_layers = staticmethod(run_layers)  # each layer group's loop; routing.compiled swaps in a compiled one
    routed_prefill = staticmethod(routed_prefill)  # the prompt after Route.of; routing.compiled: one graph
    dense_prefill = staticmethod(dense_prefill)  # the common prompt, route and positions included; one graph too

    def __init__(self, base: nn.Module, plan: RoutingPlan):
        super().__init__(base.config)
        self._no_split_modules = [adapter_for(base).decoder_layer_class]  # accelerate never splits a decoder layer
        self.base = base.requires_grad_(False)  # held by reference: no copy of the base weights
        self.plan = plan
        self.generation_config = copy.deepcopy(base.generation_config)
        self._adapter = a = adapter_for(base)
        # The side branch: trainable copies of layers s.., each caching into its own slot L + i (never layer s's).
        self.side = nn.ModuleList(_side_copy(a, src, a.num_layers + i).requires_grad_(True)
                                  for i, src in enumerate(plan.side_sources))
        self._gradient_probe = False
        self._kept_log: dict | None = None  # `kept_image_tokens` listening: the prompt's image mask and kept set
        if getattr(base, "hf_device_map", None):
            # A base placed by accelerate (device_map): say so as HF does, so the Trainer and accelerate leave the
            # placement alone (without it the Trainer calls .to(device): meta tensors of offloaded layers raise,
            # and a model spread over GPUs would be gathered onto one) and generate() knows the model is split.
            self.hf_device_map = {f"base.{k}" if k else "base": v for k, v in base.hf_device_map.items()} | {
                f"side.{i}": _map_entry(next(layer.parameters()).device) for i, layer in enumerate(self.side)}

    @property
    def adapter(self) -> Adapter:
        """The base model's map: the only way this class reaches the base's modules."""
        return self._adapter

    # ---------------------------------------------------------------- forward
    @_naming_image_kwargs
    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: Cache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: Tensor | None = None,
        image_mask: Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        return_dict: bool = True,
        past_key_values: Cache | None = None,
        num_items_in_batch: Tensor | int | None = None,
        **image_kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [batch, seq, vocab] (or the last `logits_to_keep`) and, with `labels`, the causal-LM loss over
        positions whose label is not -100, shifted as HF does.

        Positions are always the generate convention, ``cumsum(attention_mask) - 1`` (M-RoPE families: the
        model's own [3, batch, seq] positions, from the adapter). The first call on a cache is
        the prefill (images allowed anywhere); later calls continue it with text tokens. `inputs_embeds` with
        `image_mask` [batch, seq] replaces `input_ids`/`pixel_values` (benchmarks); `mm_encoder_outputs`
        ({"image": the base's image-feature output}) replaces `pixel_values`, as ``generate()`` passes it.
        `image_sizes`, `batch_num_images`, ...: the family's own image kwargs (see ``IMAGE_KWARGS``), to its merge.
        `num_items_in_batch` (the Trainer's count of labelled tokens over every process): the loss is their sum over
        it, so data-parallel ranks add up to the one-process mean instead of averaging per-rank means.
        A training step (training mode, gradients enabled, `labels`) runs the head only at labelled positions
        (`labelled_loss`, the same loss) and returns ``logits=None``; otherwise (eval mode as the Trainer's
        evaluation, generate and lmms-eval use it, or under no_grad) the logits are computed as above.
        """
        if image_kwargs.pop("position_ids", None) is not None:
            raise ToolkitError("the routed model derives positions from attention_mask (cumsum - 1, the generate "
                               "convention); pass attention_mask instead of position_ids")
        for unsupported in ("output_attentions", "output_hidden_states"):  # use hook_points() instead
            image_kwargs.pop(unsupported, None)
        named = {k: image_kwargs.pop(k, None) for k in self.IMAGE_KWARGS}
        image_kwargs |= self._family_kwargs(named)
        self._refuse_untrainable(labels)
        cache = past_key_values if cache is None else cache  # the name before transformers 5.24 (hf_compat)
        use_cache = cache is not None if use_cache is None else use_cache
        cache = cache if use_cache else None
        if use_cache and cache is None:
            cache = new_cache()
        elif use_cache:  # a caller's cache (ours is fine by construction)
            check_cache(cache)
        state = state_of(cache)
        if state is None:
            h = self._route_prompt(input_ids, pixel_values, attention_mask, cache, inputs_embeds, image_mask,
                                   image_output=(mm_encoder_outputs or {}).get("image"), **image_kwargs)
        else:
            h = self._route_next(input_ids, attention_mask, cache, state)
        if labels is not None and self.training and torch.is_grad_enabled() and not logits_to_keep:
            # A training step: the head only where a label is; `logits` None (nothing in a step reads them)
            loss = labelled_loss(self.adapter.lm_head, h, labels, num_items_in_batch)
            return CausalLMOutputWithPast(loss=loss, logits=None, **{CACHE_ARG: cache})
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.adapter.lm_head(h)  # `h` is normed: the stack's output, as HF's text model returns it
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_ARG: cache})

    def _family_kwargs(self, named: dict) -> dict:
        """The given image kwargs; one this family does not take is refused in one line (not silently dropped)."""
        given = {k: v for k, v in named.items() if v is not None}
        foreign = sorted(set(given) - set(self.adapter.image_kwargs))
        if foreign:
            raise ToolkitError(f"{self.adapter.spec.name} takes no {', '.join(foreign)} (its image kwargs: "
                               f"{', '.join(self.adapter.image_kwargs) or 'none besides pixel_values'})")
        return given

    def _route_prompt(self, input_ids, pixel_values, attention_mask, cache, inputs_embeds, image_mask,
                      image_output=None, **image_kwargs):
        a, plan = self.adapter, self.plan
        if inputs_embeds is None:  # image_output: the image encoder's output, as generate() pre-encodes it
            e = a.encode(input_ids, pixel_values, image_output=image_output, **image_kwargs)
        else:
            e = Embedded(inputs_embeds, torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool,
                                                    device=inputs_embeds.device) if image_mask is None
                         else image_mask.bool())
        h, image_mask = e.inputs_embeds, e.image_mask
        if attention_mask is None:
            attention_mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        self._log_kept(image_mask=image_mask)
        prompt_mask, kept = attention_mask, None  # kept: what survived pruning (put back under the output)
        if plan.prune in PRE_LLM and bool(image_mask.any()):  # the LLM sees a shorter prompt (FasterVLM, pooling)
            kept, h = self._prune_pre(h, image_mask, attention_mask, pixel_values, image_kwargs)
            self._log_kept(kept=kept.mask(image_mask.shape))
            h, image_mask, attention_mask = kept.take(h), kept.take(image_mask), kept.valid.long()
        # Every host-device sync of the routing happens here, before any layer is queued (free on a GPU).
        sizes = RouteSizes.of(image_mask, attention_mask)
        if (sizes.dense and plan.routes and plan.prune is None and not a.position_kwargs
                and a.maskless(cache)):  # the common prompt: everything after these reads is one call
            with a.injecting(e):
                h, r, pos, text_pos, image_pos = self.dense_prefill(
                    a, plan, self.side, h, image_mask, attention_mask, *sizes.all_valid(image_mask), cache,
                    freeze=self._freezes())
            frame = {"full": (attention_mask.bool(), pos)}
            return self._finish_prompt(h, r, cache, frame, text_pos, image_pos, prompt_mask, pos, attention_mask,
                                       None)
        pos = a.positions(attention_mask, image_mask=image_mask, **image_kwargs)  # M-RoPE: [3, batch, seq]
        rope = a.rope(h, pos)
        full_mask = a.causal_mask(h, attention_mask, pos, cache, layer_idx=0, image_mask=image_mask)  # per layer type
        r = Route.of(image_mask, attention_mask, sizes)  # None: no image token in the batch

        def run(layers, x, mask, x_pos, x_rope, kv=cache):  # one group = one call (one graph under --compile)
            return run_group(a, layers, x, mask, x_pos, x_rope, kv, runner=self.run_layers)

        state_pos = pos  # the next token follows the prompt the LLM saw (FastV and PDrop keep original positions)
        fused = r is not None and plan.routes  # the shallow layers run inside routed_prefill (one graph)
        stage_frames: dict = {}  # in-LLM pruning: each stage's kept layout -> (its prompt mask, its key positions)
        shift: dict = {}  # PDrop: each later layout -> how far its decode positions sit below the original ones
        with self._frozen(), a.injecting(e):  # nothing trainable upstream: no graph; DeepStack stays shallow
            if plan.prune in IN_LLM and r is not None:  # FastV (one drop), PDrop (one per stage)
                start, counts, logged = 0, r.image_valid.sum(1).tolist(), []  # PDrop's ratios: of the ORIGINAL N
                for stage, layer in enumerate(plan.stages):
                    # FastV ranks by layer K-1's attention (its input), PDrop with layer K's own norm, q/k and RoPE
                    scorer = layer - 1 if plan.prune == "fastv" else layer
                    h = run(range(start, scorer), h, full_mask, pos, rope)
                    budget = [plan.stage_kept(int(n), stage) for n in counts]
                    keep = self._rank_keep(h, r, rope, attention_mask, a.pick(full_mask, scorer), scorer,
                                           plan.rank or "last", budget)
                    h = run(range(scorer, layer), h, full_mask, pos, rope)
                    dropped = Kept.of(keep, h)  # this stage's, in the previous stage's frame
                    kept = dropped if kept is None else kept.then(dropped)  # in the prompt's frame
                    logged.append(kept.mask(prompt_mask.shape))
                    h, image_mask, attention_mask = dropped.take(h), dropped.take(image_mask), dropped.valid.long()
                    if plan.prune == "pdrop":  # its authors renumber what is left contiguously (FastV keeps them)
                        pos = a.positions(attention_mask, image_mask=image_mask)
                        rope = a.rope(h, pos)
                        shift[stage_layout(stage)] = prompt_mask.sum(1) - attention_mask.sum(1)  # dropped so far
                    else:
                        pos, rope = a.take_positions(pos, dropped.take), a.take_rope(rope, dropped.take)
                    full_mask = a.subset_causal_mask(h, dropped.valid, bool(dropped.valid.all()), pos, cache,
                                                     layer_idx=layer, image_mask=image_mask)
                    r = Route.of(image_mask, attention_mask)
                    stage_frames[stage_layout(stage)] = (dropped.valid, pos)
                    start = layer
                self._log_kept(kept=logged[-1], stages=logged)
                if shift:  # the deep layers (text, kv) come after the last stage
                    shift |= {layout: shift[stage_layout(len(plan.stages) - 1)] for layout in ("text", "kv")}
                h = run(range(start, plan.split), h, full_mask, pos, rope)
            elif not fused:
                h = run(plan.shallow, h, full_mask, pos, rope)
        valid = attention_mask.bool()  # after pruning: the kept frame's
        frame = {"full": (valid if kept is None else prompt_mask.bool(), state_pos), "kept": (valid, pos),
                 **stage_frames}
        if r is None or not plan.routes:  # nothing to route: every later layer sees the (kept) sequence as vanilla
            h = run(range(plan.split, plan.num_layers), h, full_mask, pos, rope)
            self._leave_state(cache, {k: frame.get(k, frame["kept"]) for k in plan.layouts}, prompt_mask, state_pos,
                              attention_mask, shift=shift)
            return a.norm(h if kept is None else kept.restore(h))

        text_pos, image_pos = a.take_positions(pos, r.text), a.take_positions(pos, r.image)  # original (PDrop: its)

        def like(index):  # all a mask reads of a subset: its shape, dtype and device (a view, no copy)
            return h[:, :1].expand(-1, index.shape[1], -1)

        side_mask = a.subset_causal_mask(like(r.image_index), r.image_valid, r.image_dense, image_pos,
                                         image_mask=r.image_valid)
        masks = {"full": full_mask, "side": side_mask}  # every mask first (they need the host), then one call
        if plan.deep_mode == "text_only":
            masks["text"] = a.subset_causal_mask(like(r.text_index), r.text_valid, r.text_dense, text_pos, cache,
                                                 layer_idx=plan.deep.start)
        elif plan.deep_mode == "kv_only":
            masks["kv"] = kv_mask(a, r, h.dtype)
        with a.injecting(e):
            h = self.routed_prefill(a, plan, self.side, r, h, masks, pos, rope, text_pos, image_pos, cache,
                                    freeze=self._freezes(), shallow=plan.prune not in IN_LLM, norm=kept is None)
        return self._finish_prompt(h, r, cache, frame, text_pos, image_pos, prompt_mask, state_pos, attention_mask,
                                   kept, shift)

    def _finish_prompt(self, h: Tensor, r: Route, cache, frame: dict, text_pos: Tensor, image_pos: Tensor,
                       prompt_mask: Tensor, state_pos: Tensor, attention_mask: Tensor, kept: Kept | None,
                       shift: dict | None = None) -> Tensor:
        """A routed prompt's output (after the final norm) in the original frame, and the cache's state (each
        layout's prompt mask and its keys' original positions) for the decode steps."""
        if cache is not None:
            frame["text"] = (r.text_valid, text_pos)
            if "kv" in self.plan.layouts:  # image keys first, then text
                frame["kv"] = (torch.cat([r.image_valid, r.text_valid], 1), torch.cat([image_pos, text_pos], -1))
            dense = {"full": r.unpadded, "text": r.text_dense, "kv": r.text_dense and r.image_dense}
            unmasked = all(dense[k] for k in self.plan.layouts) if kept is None else None  # known: no host reads
            self._leave_state(cache, {k: frame[k] for k in self.plan.layouts}, prompt_mask, state_pos, attention_mask,
                              unmasked, shift=shift)
        return h if kept is None else self.adapter.norm(kept.restore(h))

    def _log_kept(self, **found: Tensor) -> None:
        """What `kept_image_tokens` asked to see (nothing when it is not listening)."""
        if self._kept_log is not None:
            self._kept_log.update(found)

    def _leave_state(self, cache, layouts: dict, prompt_mask: Tensor, pos: Tensor, frame_mask: Tensor,
                     unmasked: bool | None = None, shift: dict | None = None) -> None:
        """What the decode steps need (`layouts`: layout -> (prompt mask, key positions)); layer 0's prompt part
        is shorter than the prompt when pruning happened before the LLM. `unmasked`: see `make_state`. `shift`:
        PDrop's renumbering, layout -> [B] (`RoutingState.position_shift`)."""
        if cache is None:
            return
        masks, keys = {k: m for k, (m, _) in layouts.items()}, {k: p for k, (_, p) in layouts.items()}
        pos = pos if pos.dim() == 3 else None  # 1D: generate's cumsum(mask) - 1 (`positions`), the next is the count
        if self.plan.layout(0) != "kept":
            state = make_state(masks, prompt_mask, pos, keys, unmasked)
            if shift:
                state = dataclasses.replace(state, position_shift={k: v for k, v in shift.items() if k in masks})
            return attach_state(cache, state)
        # Pruned before the LLM: the shorter prompt is what the cache holds and what positions count on from; the
        # running 2D mask of generate() still has the original prompt's columns.
        state = make_state(masks, frame_mask, pos, keys, unmasked)
        attach_state(cache, dataclasses.replace(
            state, prompt_length=prompt_mask.shape[1], cached_prompt_length=frame_mask.shape[1],
            position_delta=state.next_position - prompt_mask.sum(1)))

    # ---------------------------------------------------------------- pruning (training-free peers)
    def _rank_keep(self, h: Tensor, r: Route, rope, attention_mask: Tensor, mask: Tensor | None, layer: int,
                   rank: str, budget: list[int]) -> Tensor:
        """One drop's choice [B, N] bool (text and the kept image tokens): the top `budget[b]` of row b's image
        tokens by the attention they receive at `layer` (its input `h`: its own norm, q/k and RoPE), averaged over
        heads, from the query rows of `rank` (`fastv_rows`: the last prompt token's, every other token's, or the text
        rows'). FastV reads layer K-1 with its rank rule and keeps round(n (1 - R)); PDrop reads the stage layer
        itself with the last prompt token and keeps int(N lambda^(i+1)) of the original N.

        One read of that layer's q/k (the adapter's `queries_keys`), those rows only; every layer keeps its sdpa.
        The softmax (fp32) needs every visible key, so the scores are rows x all columns, then the image columns.
        What a query sees is that layer's own `mask` (a sliding-window layer's window, in original positions), or
        causal over the real tokens where the layer needs none.
        """
        a = self.adapter
        q, k, scale = a.queries_keys(layer, h, a.pick(rope, layer))
        device = r.image_mask.device  # the routing's (a device map may run layer K-1 elsewhere)
        q, k, attention_mask = q.to(device), k.to(device), attention_mask.to(device)
        n = h.shape[1]
        rows, weight = fastv_rows(rank, r, attention_mask)  # [B, Q], [B, Q]
        q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])).float()  # [B, H, Q, d]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).float()  # grouped-query heads
        if mask is None:  # causal over the real tokens
            visible = torch.arange(n, device=device)[None, None, :] <= rows[:, :, None]
        else:  # the layer's own rows (a window; Gemma's image blocks, whose image rows also see later image keys)
            allowed = a.allowed(mask.to(device))[:, 0].expand(len(rows), -1, -1)
            visible = allowed.gather(1, rows[:, :, None].expand(-1, -1, n))
        visible = visible & attention_mask.bool()[:, None, :]  # [B, Q, N], no pads
        probs = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible[:, None], float("-inf")).softmax(-1)
        probs = probs.nan_to_num(0.0).mean(1)  # over heads; a row with nothing visible has none to give
        if rank == "all":  # "from all OTHER tokens": a token's attention to itself is left out
            probs = probs.scatter(2, rows[:, :, None], 0.0)
        received = (probs * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1)  # [B, N]
        score = received.gather(1, r.image_index).masked_fill(~r.image_valid, float("-inf"))  # [B, I]
        order = torch.argsort(torch.argsort(score, dim=1, descending=True, stable=True), dim=1)
        chosen = (order < torch.tensor(budget, device=device)[:, None]) & r.image_valid
        keep = attention_mask.bool() & ~r.image_mask
        return keep.scatter(1, r.image_index, chosen | keep.gather(1, r.image_index))

    def _prune_pre(self, h: Tensor, image_mask: Tensor, attention_mask: Tensor, pixel_values, image_kwargs
                   ) -> tuple[Kept, Tensor]:
        """Pre-LLM pruning of each image's tokens: ``prune-pre`` keeps the top R by the tower's patch scores
        (`Adapter.patch_scores`: [CLS] attention), ``pool`` average-pools the token grid into its first tokens.
        Returns the kept positions and `h` (pooled features written in)."""
        a, plan = self.adapter, self.plan
        if plan.prune == "divprune":
            return self._divprune(h, image_mask, attention_mask)
        if plan.prune == "visionzip":
            return self._visionzip(h, image_mask, attention_mask, pixel_values)
        per_image = a.image_tokens(a.model.config)
        where = image_mask.reshape(-1).nonzero().squeeze(1)  # flat image positions, placeholder order
        if a.position_kwargs or where.numel() % per_image or (image_mask.sum(1) % per_image).any():
            raise ToolkitError(f"{plan.prune} needs a fixed grid of {per_image} tokens per image and 1D positions "
                               f"(LLaVA-1.5 style); {a.spec.name} with this input has another layout")
        blocks = where.view(-1, per_image)  # [images, tokens per image]
        m = plan.kept_tokens(per_image)
        if plan.prune == "pool":
            side, out = math.isqrt(per_image), math.isqrt(m)
            if side * side != per_image:
                raise ToolkitError(f"pool needs a square token grid per image, not {per_image} tokens")
            flat = h.reshape(-1, h.shape[-1])
            grid = flat[blocks.reshape(-1)].view(len(blocks), side, side, -1).permute(0, 3, 1, 2)
            pooled = torch.nn.functional.adaptive_avg_pool2d(grid.float(), out).to(h.dtype)
            chosen = blocks[:, :m]
            h = flat.index_copy(0, chosen.reshape(-1), pooled.flatten(2).transpose(1, 2).reshape(-1, h.shape[-1])
                                ).view(h.shape)
        else:
            if pixel_values is None:
                raise ToolkitError("prune-pre scores the vision tower's attention: it needs pixel_values")
            scores = a.patch_scores(pixel_values).to(h.device)
            if scores.shape != blocks.shape:
                raise ToolkitError(f"prune-pre: the tower scores {tuple(scores.shape)} tokens but the prompt holds "
                                   f"{tuple(blocks.shape)} image tokens")
            top = scores.topk(m, dim=1).indices.sort(dim=1).values
            chosen = blocks.gather(1, top)
        keep = (attention_mask.bool() & ~image_mask).reshape(-1)
        keep = keep.index_fill(0, chosen.reshape(-1), True).view(image_mask.shape)
        return Kept.of(keep, h), h

    def _divprune(self, h: Tensor, image_mask: Tensor, attention_mask: Tensor) -> tuple[Kept, Tensor]:
        """DivPrune: per image (a run of image tokens: LLaVA-NeXT's crops and newlines together, one Gemma 3 block),
        the max-min diverse subset of its projected tokens as they enter the LLM (`divprune_select`), original
        order; text stays. The kept tokens of one image stay one contiguous run in the shorter prompt."""
        flat = h.reshape(-1, h.shape[-1])
        sizes: dict[int, list[Tensor]] = {}
        for run in image_runs(image_mask):  # images of one size are selected together (one loop of k steps)
            sizes.setdefault(len(run), []).append(run)
        chosen = []
        for n, runs in sizes.items():
            index = torch.stack(runs)  # [images, n] flat positions
            picked = divprune_select(flat[index.to(h.device)], self.plan.kept_tokens(n))
            chosen.append(index.gather(1, picked.to(index.device)).reshape(-1))
        keep = (attention_mask.bool() & ~image_mask).reshape(-1)
        keep = keep.index_fill(0, torch.cat(chosen), True).view(image_mask.shape)
        return Kept.of(keep, h), h

    def _visionzip(self, h: Tensor, image_mask: Tensor, attention_mask: Tensor, pixel_values) -> tuple[Kept, Tensor]:
        """VisionZip: each image's dominant + contextual tokens (`visionzip_merge` over the tower layer the projector
        reads, `Adapter.vision_attention_and_keys`), through the projector, written into the image's first slots in
        the authors' order ([CLS], dominant patches, contextual); the rest of its slots dropped. `Kept.stands_for`
        reports a dominant token at its patch's position, a contextual one at its target's, [CLS] at the image's
        first position."""
        a = self.adapter
        if pixel_values is None:
            raise ToolkitError("visionzip compresses inside the vision tower: it needs pixel_values")
        options = dict(self.plan.prune_args)
        attn, hidden, keys = a.vision_attention_and_keys(pixel_values)
        tokens, sources = visionzip_merge(attn, hidden, keys, options["dominant"], options["contextual"])
        runs = image_runs(image_mask)
        patches = attn.shape[-1] - 1
        if len(runs) != len(tokens) or any(len(run) != patches for run in runs):
            raise ToolkitError(f"visionzip: the tower sees {len(tokens)} image(s) of {patches} patches but the prompt "
                               f"holds {[len(run) for run in runs]} image tokens per image")
        blocks = torch.stack(runs)  # [images, patches], flat positions
        features = a.project(tokens).to(h.device, h.dtype)  # [images, m, D]
        slots = blocks[:, : features.shape[1]]
        d = h.shape[-1]
        h = h.reshape(-1, d).index_copy(0, slots.reshape(-1).to(h.device), features.reshape(-1, d)).view(h.shape)
        keep = (attention_mask.bool() & ~image_mask).reshape(-1)
        keep = keep.index_fill(0, slots.reshape(-1), True).view(image_mask.shape)
        sources = sources.to(blocks.device)
        origin = torch.where(sources >= 0, blocks.gather(1, sources.clamp(min=0)), blocks[:, :1])
        stands_for = torch.arange(image_mask.numel(), device=blocks.device).index_copy(
            0, slots.reshape(-1), origin.reshape(-1))
        return Kept.of(keep, h, stands_for), h

    def _route_next(self, input_ids, attention_mask, cache, state) -> Tensor:
        """New text tokens after a cached prompt: one loop over the layers and the final norm, one mask per cache
        layout."""
        a, plan = self.adapter, self.plan
        if input_ids is None or (input_ids == a.image_token_id).any():
            raise ToolkitError("after the prompt, the routed model takes text token ids only (images go in the "
                               "first call on a cache)")
        h = a.embed_tokens(input_ids)
        c = continuation(state, cache, attention_mask, input_ids.shape[1])
        rope = a.rope(h, c.position_ids)
        # PDrop's layers after a stage place the new tokens at its renumbered positions: their own rope
        ropes = {layout: rope if c.shift(layout) is None else a.rope(h, c.positions(layout)) for layout in plan.layouts}
        masks = {layout: a.decode_mask(h, c.masks[layout], c.positions(layout), cache, plan.first_layer(layout),
                                       c.key_positions(layout)) for layout in plan.layouts}
        n = range(a.num_layers)  # the whole step is one group (one graph under --compile)
        return self.run_layers(a.layers, h, [a.pick(masks[plan.layout(i)], i) for i in n], c.position_ids,
                               [a.pick(ropes[plan.layout(i)], i) for i in n], cache, norm=a.norm)

    def _prepare_multimodal_encoder_kwargs_for_generation(self, model_kwargs: dict) -> dict:
        """HF pre-encodes the images and drops what the encoder took (``image_grid_thw``); keep what this family's
        positions still read (the adapter's ``position_kwargs``)."""
        names = self.adapter.position_kwargs + (("pixel_values",) if self.plan.prune in ("prune-pre", "visionzip")
                                                else ())
        keep = {k: model_kwargs[k] for k in names if model_kwargs.get(k) is not None}  # prune-pre scores the pixels
        return super()._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs) | keep

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: Tensor | None = None, **model_kwargs) -> tuple[Tensor | None, dict]:
        """Beams and ``num_return_sequences``: HF repeats every tensor kwarg row by row, right for per-sample ones but
        not for a kept per-image one (Qwen's ``image_grid_thw`` [images, 3]): a row with images A, B needs [A, B, A, B],
        not [A, A, B, B], as HF repeats the encoded images themselves (``_expand_multimodal_outputs``)."""
        names = self.adapter.per_image_kwargs if expand_size > 1 and input_ids is not None else ()
        per_image = {k: model_kwargs.pop(k) for k in names if model_kwargs.get(k) is not None}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder,
                                                                           input_ids, **model_kwargs)
        if per_image:
            counts = self.adapter.images_per_row(input_ids)
            for k, v in per_image.items():
                if sum(counts) != len(v):
                    raise ToolkitError(f"{k} has {len(v)} rows but the prompts hold {sum(counts)} images")
                model_kwargs[k] = torch.cat([g.repeat(expand_size, *(1,) * (v.ndim - 1)) for g in v.split(counts)])
        return expanded_ids, model_kwargs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """HF makes ``DynamicCache(config=...)``, whose sliding-window layers drop keys by count; a routed prefill
        needs `new_cache`'s (a user's own cache is left to `check_cache`)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        made = model_kwargs.get(CACHE_ARG)
        if isinstance(made, DynamicCache) and any(made.is_sliding) and not getattr(made, "_is_user_defined", False):
            model_kwargs[CACHE_ARG] = new_cache()

    def generate(self, *args, **kwargs):
        """HF ``generate()`` (greedy, sampling, beams, streamers, stopping criteria) with the routed KV cache.

        ``pixel_values=None`` is dropped first: HF would otherwise try to encode it (vanilla LLaVA crashes there).
        """
        if "pixel_values" in kwargs and kwargs["pixel_values"] is None:
            del kwargs["pixel_values"]
        return super().generate(*args, **kwargs)

    # ---------------------------------------------------------------- training helpers
    def _frozen(self):
        """``no_grad`` for base-only stacks when training with a frozen base (LF's backward skips most layers)."""
        return torch.no_grad() if self._freezes() else nullcontext()

    def _freezes(self) -> bool:
        """Whether `_frozen` turns gradients off: they are on, and the base is frozen."""
        return torch.is_grad_enabled() and not any(p.requires_grad for p in self.base.parameters())

    def _refuse_untrainable(self, labels) -> None:
        if (labels is not None and self.training and torch.is_grad_enabled() and not self.plan.trainable
                and not self._gradient_probe):
            raise ToolkitError(
                f"variant '{self.plan.variant}' cannot be trained: with no fusion layer the loss has no path to the "
                "side branch, so its gradient is exactly 0 (the paper's Appendix A; see "
                "RoutedModel.side_gradient_norm). Train 'lf' with fusion_layers >= 1 instead.")

    @contextmanager
    def _probing(self):
        self._gradient_probe = True
        try:
            yield
        finally:
            self._gradient_probe = False

    def side_gradient_norm(self, **batch) -> float:
        """The L2 norm of d(loss)/d(side-branch weights) on one batch (with `labels`); no weights change.

        Non-zero for lf/pc/kv; exactly 0.0 for lf-ideal, whose loss never reads the side branch (Appendix A).
        """
        params = [p for p in self.side.parameters() if p.requires_grad]
        with self._probing(), torch.enable_grad():
            loss = self(**batch).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))

    def trainable_parameters(self) -> TrainableReport:
        """Trainable (side branch) against all parameters of the routed model (base + side branch)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return TrainableReport(trainable, sum(p.numel() for p in self.parameters()))

    def save_routing(self, directory) -> None:
        """Write only what is new: side-branch weights (safetensors) and the plan (JSON). See `routing.load`."""
        save_routing(self, directory)

    def hook_points(self) -> dict[str, nn.Module]:
        """TransformerLens-style names -> modules: the base's (``blocks.{l}...``) plus ``side.{i}.hook_resid_post``.

        Under LF and KV the deep blocks' outputs cover the text subset only ([batch, T, d_model], original order,
        then fillers); the side branch's cover the image subset ([batch, I, d_model]).
        """
        points = self.adapter.hook_points()
        for i, layer in enumerate(self.side):
            points[f"side.{i}.hook_resid_post"] = layer
            points[f"side.{i}.attn.hook_pattern"] = self.adapter.attention_of(layer)
        return points

    def extra_repr(self) -> str:
        return self.plan.describe()


def labelled_loss(unembed, h: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None,
                  ignore_index: int = -100) -> Tensor:
    """HF's causal-LM loss (``ForCausalLMLoss``: position t predicts ``labels[t + 1]``, its reduction, its
    `num_items_in_batch`) with the head run only on the rows that have a label: `h` [B, T, D] -> [n, D] -> `unembed`
    -> [n, vocab]. Labels sit on the answer tokens alone, so this skips the LM head and its backward almost
    everywhere; equal to the full-head loss up to float rounding."""
    shifted = nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:].to(h.device)
    at = shifted != ignore_index
    logits = unembed(h[at]).float()  # upcast as HF does
    return fixed_cross_entropy(logits, shifted[at], num_items_in_batch, ignore_index)


def _map_entry(device: torch.device) -> int | str:
    """A device as accelerate's device maps write it: a GPU by its index, else ``cpu``/``mps``."""
    return device.index if device.type == "cuda" else device.type


def _side_copy(a: Adapter, source: int, layer_idx: int) -> nn.Module:
    """`a.copy_layer`, also for a base dispatched by accelerate (``device_map``): the copy gets real weights (an
    offloaded source's come in from CPU or disk for the copy), no hooks of the source's, and lives on the source
    layer's execution device, where an accelerate hook of its own brings its inputs and returns its output."""
    layer = a.layers[source]
    hooks = [m._hf_hook for m in layer.modules() if hasattr(m, "_hf_hook")]
    if not hooks:
        return a.copy_layer(source, layer_idx)
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    from saturation.core.loading import weights_in_place

    device = next((h.execution_device for h in hooks if getattr(h, "execution_device", None) is not None), "cpu")
    with weights_in_place(layer):  # every offloaded submodule's weights in place while copying
        maps = [getattr(h, "weights_map", None) for h in hooks]
        try:  # the hooks are copied too (and dropped below): not the offloaded weights of the whole model with them
            for h in hooks:
                h.weights_map = None
            new = a.copy_layer(source, layer_idx)
        finally:
            for h, m in zip(hooks, maps):
                h.weights_map = m
    remove_hook_from_module(new, recurse=True)
    new.to(device)
    add_hook_to_module(new, AlignDevicesHook(execution_device=device, io_same_device=True))
    return new


def fastv_rows(rank: str, r: Route, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The query rows FastV's `rank` rule reads ([B, Q] positions) and their weights ([B, Q], 0 = a filler):
    ``last`` the last valid prompt token (FastV's code), ``all`` every valid prompt token (the paper's sentence),
    ``text`` the valid text tokens."""
    valid = attention_mask.bool()
    n = valid.shape[1]
    if rank == "text":
        return r.text_index, r.text_valid.float()
    if rank == "all":
        return torch.arange(n, device=valid.device).expand(len(valid), n), valid.float()
    last = (torch.arange(1, n + 1, device=valid.device) * valid).argmax(1, keepdim=True)  # left or right padding
    return last, torch.ones(last.shape, device=valid.device)


def _listen(routed: RoutedModel, inputs: dict) -> dict:
    """Run the routed prompt once (no cache) and return what its pruning logged: the prompt's image mask, the kept
    set (``kept``) and, for in-LLM pruning, the kept set of every drop stage (``stages``)."""
    routed._kept_log = log = {}
    try:
        with torch.no_grad():
            routed(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
    finally:
        routed._kept_log = None
    return log


def _positions(image: Tensor, kept: Tensor | None) -> list[Tensor]:
    chosen = image if kept is None else image & kept.to(image.device)
    return [row.nonzero().squeeze(1).cpu() for row in chosen]


def kept_image_tokens(routed: RoutedModel, **inputs) -> list[Tensor]:
    """Per row, the original prompt positions (sorted) of the image tokens `routed`'s plan keeps: FastV's survivors
    (the image tokens that enter layer K), PDrop's that enter its LAST stage's layer (`kept_image_tokens_per_stage`
    gives every stage), the image tokens a pre-LLM pruning lets into the LLM, or every image position when the plan
    prunes nothing. It runs the routed prompt once (no cache) and reads the set it chose: the routing's own choice,
    not a second implementation of the rule."""
    log = _listen(routed, inputs)
    return _positions(log["image_mask"].bool(), log.get("kept"))


def kept_image_tokens_per_stage(routed: RoutedModel, **inputs) -> list[list[Tensor]]:
    """Per drop stage of an in-LLM pruning (PDrop's layers, FastV's one K), per row, the original positions of the
    image tokens that enter that stage's layer; one stage with `kept_image_tokens`' answer for the other plans."""
    log = _listen(routed, inputs)
    image = log["image_mask"].bool()
    return [_positions(image, kept) for kept in log.get("stages", [log.get("kept")])]


def build(model: nn.Module, plan: RoutingPlan | int | None = None, variant: str = "lf", fusion_layers: int = 1,
          side_depth: int = 1, *, split: int | None = None, prune: str | None = None, prune_layer: int | None = None,
          keep: float = 1.0, rank: str | None = None) -> RoutedModel:
    """Route `model` (any family with an adapter, any dtype/device) along `plan` (``routing.parse_plan``,
    ``RoutingPlan.from_manifest`` or ``routing.plan.plan_for``). Freezes the base; the side branch (copies of layers
    split .. split+side_depth-1) is trainable. The plan was checked when it was made; here only that it is this
    model's (its depth, the first allowed split). The routed model is in the base's mode (eval for a model from
    ``from_pretrained``); the Trainer switches it.

    The older form ``build(model, split, variant="lf", fusion_layers=1, side_depth=1, *, prune, prune_layer, keep,
    rank)``
    (or ``split=`` by keyword) makes the plan here; it is kept for one release.
    """
    a = adapter_for(model)
    if isinstance(plan, RoutingPlan):
        if split is not None or (variant, fusion_layers, side_depth, prune, prune_layer, keep, rank) != (
                "lf", 1, 1, None, None, 1.0, None):
            raise ToolkitError("build(model, plan) takes no split, variant, K, d_v or pruning: the plan holds them")
        check_fits(plan, a.num_layers, a.min_split)
        check_family(plan, model)
    else:
        if (plan is None) == (split is None):
            raise ToolkitError("build needs a RoutingPlan (routing.parse_plan), or a split (the older form)")
        plan = make_plan(a.num_layers, plan if split is None else split, variant, fusion_layers, side_depth,
                         min_split=a.min_split, prune=prune, prune_layer=prune_layer, keep=keep, rank=rank)
        check_family(plan, model)
    impl = a.attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise ToolkitError(f"routing supports attn_implementation sdpa or eager, not '{impl}'")
    return RoutedModel(model, plan).train(model.training)


RoutedLlava = RoutedModel  # the name before the other families; kept for one release
