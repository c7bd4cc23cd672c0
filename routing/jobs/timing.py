"""What every timing in the toolkit shares: the prompts models are timed on, the stopwatch, one prefill and one
decode step, the rotated round-robin that pairs samples across models, and the paired statistics.

``routing bench`` (`routing.jobs.bench`) and ``routing compare`` (`routing.jobs.compare`) time with these; the method
is in `routing.jobs.bench`'s docstring.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from routing.model import RoutedModel
from saturation.core.adapters import adapter_for, position_ids_from_mask
from saturation.core.errors import ToolkitError
from saturation.core.geometry import image_tokens_of
from saturation.core.hf_compat import cache_kwargs, cache_of, cache_tensors

CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def input_device(model) -> torch.device:
    """Where inputs go: the embedding's device, or under a device map that offloaded it (its weight a meta
    placeholder), the device its accelerate hook runs it on."""
    embed = adapter_for(model).embed_tokens
    if embed.weight.device.type != "meta":
        return embed.weight.device
    device = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device or "cpu")


# ---------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """One batch at one text length, as every model consumes it (all rows the same length, no padding)."""

    embeds: Tensor  # [batch, seq, d_model] merged embeddings: the FLOP model's scope starts here
    image_mask: Tensor  # [batch, seq] bool
    next_tokens: Tensor  # [new_tokens, batch, 1] text ids fed to the decode steps (never the image token)
    batch: dict | None = None  # input_ids, attention_mask, pixel_values: end-to-end prefill (real images only)
    own_positions: bool = False  # the batch's image kwargs drive positions (M-RoPE): vanilla HF derives them too
    attention_mask: Tensor = field(init=False)
    position_ids: Tensor = field(init=False)

    def __post_init__(self):
        self.attention_mask = torch.ones(self.image_mask.shape, dtype=torch.long, device=self.embeds.device)
        self.position_ids = position_ids_from_mask(self.attention_mask)

    @property
    def image_tokens(self) -> int:
        return int(self.image_mask[0].sum())

    @property
    def text_tokens(self) -> int:
        return self.image_mask.shape[1] - self.image_tokens


def _text_ids(vocab: int, image_token_id: int, shape, generator) -> Tensor:
    """Random ids from the upper part of the vocabulary (past the specials), never the image token."""
    ids = torch.randint(min(5, vocab - 1), vocab, shape, generator=generator)
    return torch.where(ids == image_token_id, (ids + 1) % vocab, ids)


@torch.no_grad()
def random_prompt(model, text_tokens: int, batch: int, new_tokens: int, seed: int = 0, before: int = 3,
                  image_size: tuple[int, int] | None = None) -> Prompt:
    """`before` text tokens, the image block (random features at the text embeddings' RMS), the rest of the text.
    The block has the adapter's token count for one image of `image_size` (H, W) px (anyres families; default
    one tile), row-end newline positions included."""
    a = adapter_for(model)
    g = torch.Generator().manual_seed(seed)
    vocab, image_id = a.text_config.vocab_size, a.image_token_id
    n_image = image_tokens_of(model.config, image_size)
    device = input_device(model)
    text = a.embed_tokens(_text_ids(vocab, image_id, (batch, text_tokens), g).to(device))
    rms = text.float().pow(2).mean().sqrt()
    image = (torch.randn(batch, n_image, text.shape[-1], generator=g) * rms.cpu()).to(device, text.dtype)
    b = min(before, text_tokens)
    embeds = torch.cat([text[:, :b], image, text[:, b:]], dim=1)
    image_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=device)
    image_mask[:, b: b + n_image] = True
    next_tokens = _text_ids(vocab, image_id, (new_tokens, batch, 1), g).to(device)
    return Prompt(embeds, image_mask, next_tokens)


@torch.no_grad()
def real_prompt(model, processor, records, text_tokens: int, batch: int, new_tokens: int, seed: int = 0) -> Prompt:
    """Real images and the family's prompt through the processor; each prompt's text is cycled (or cut) to
    `text_tokens` tokens around its image block, so every text length keeps the real image tokens."""
    from saturation.core.data import SEQUENCE_KEYS, PromptFormat, collate, encode_prompt, image_inputs

    a = adapter_for(model)
    fmt = PromptFormat.of(a)
    rows, encoded = [], []
    for k in range(batch):
        enc = encode_prompt(records[k % len(records)], processor, fmt=fmt)
        ids = enc["input_ids"]
        is_image = ids == a.image_token_id
        first = int(is_image.nonzero()[0]) if is_image.any() else len(ids)
        text = ids[~is_image].repeat(math.ceil(text_tokens / max(1, int((~is_image).sum()))))[:text_tokens]
        b = min(first, text_tokens)
        rows.append(torch.cat([text[:b], ids[is_image], text[b:]]))
        encoded.append(enc)
    device, dtype = input_device(model), a.embed_tokens.weight.dtype
    input_ids = torch.stack(rows).to(device)
    images = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
              for k, v in image_inputs(collate(encoded, 0)).items()}  # pixels and the family's image kwargs
    for key in SEQUENCE_KEYS:  # per-token kwargs (Gemma's token_type_ids, Qwen's mm_token_type_ids): 1 = image,
        if key in images:      # marking the rebuilt rows, not the processor's
            images[key] = input_ids.eq(a.image_token_id).to(images[key].dtype)
    embeds, image_mask = a.embed(input_ids, **images)
    if int(image_mask.sum(1).min()) != int(image_mask.sum(1).max()):
        raise ToolkitError("the benchmark needs the same number of image tokens in every row")
    g = torch.Generator().manual_seed(seed)
    pool = torch.stack(rows)[~torch.stack(rows).eq(a.image_token_id)]
    next_tokens = pool[torch.randint(len(pool), (new_tokens, batch, 1), generator=g)].to(device)
    batch_in = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **images}
    return Prompt(embeds, image_mask, next_tokens, batch_in, own_positions=bool(a.position_kwargs))


# ---------------------------------------------------------------- timing


class Stopwatch:
    """Seconds of one call on `clock`, with the device synchronised before and after on CUDA."""

    def __init__(self, clock: str, device: torch.device):
        self.clock, self.read, self.device = clock, CLOCKS[clock], device

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable):
        self._sync()
        start = self.read()
        out = fn()
        self._sync()
        return self.read() - start, out

    def now(self) -> float:
        """The clock, once the device has finished what was queued (for hooks that time parts of a call)."""
        self._sync()
        return self.read()


def rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def prefill(model, p: Prompt, e2e: bool = False):
    """Generation prefill: cache filled, last position's logits only (from merged embeddings unless `e2e`)."""
    routed = isinstance(model, RoutedModel)
    if e2e:
        positions = {} if routed or p.own_positions else {"position_ids": p.position_ids}
        return model(**p.batch, **positions, use_cache=True, logits_to_keep=1)
    if routed:
        return model(inputs_embeds=p.embeds, image_mask=p.image_mask, attention_mask=p.attention_mask,
                     use_cache=True, logits_to_keep=1)
    return model(inputs_embeds=p.embeds, attention_mask=p.attention_mask, position_ids=p.position_ids,
                 use_cache=True, logits_to_keep=1)


def decode_step(model, cache, token: Tensor, position: int):
    """One cached step of one new text token per row (the routed model derives its positions itself)."""
    positions = {} if isinstance(model, RoutedModel) else {"position_ids": torch.full_like(token, position)}
    return model(input_ids=token, use_cache=True, logits_to_keep=1, **positions, **cache_kwargs(cache))


@torch.no_grad()
def warm(models: dict, p: Prompt, steps: int = 3) -> float:
    """Wall seconds of one untimed prefill (and end-to-end prefill) plus `steps` decode steps per model: under
    ``--compile`` this is where the graphs compile, so no timed round pays for it."""
    start = time.perf_counter()
    n = p.embeds.shape[1]
    for model in models.values():
        if p.batch is not None:
            prefill(model, p, True)
        cache = cache_of(prefill(model, p))
        for i, token in enumerate(p.next_tokens[:steps]):
            cache = cache_of(decode_step(model, cache, token, n + i))
    return time.perf_counter() - start


def cache_bytes(cache) -> int:
    """Bytes of keys and values held by a DynamicCache (layers hold different lengths under routing)."""
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


@torch.no_grad()
def measure(models: dict, p: Prompt, watch: Stopwatch, repeats: int, warmup: int) -> tuple[dict, dict]:
    """``(samples, cache_mb)``: samples[kind][model] in seconds, kind in prefill / decode (/ prefill_e2e), sample k
    of every model taken in the same round; cache_mb[model] is the prompt's KV cache size."""
    names = list(models)
    kinds = ["prefill", "decode"] + (["prefill_e2e"] if p.batch is not None else [])
    samples = {kind: {name: [] for name in names} for kind in kinds}
    cache_mb = {}
    n = p.embeds.shape[1]
    for rep in range(warmup + repeats):
        keep = rep >= warmup
        if p.batch is not None:
            for name in rotated(names, rep):
                t, _ = watch.time(functools.partial(prefill, models[name], p, True))
                if keep:
                    samples["prefill_e2e"][name].append(t)
        caches = {}
        for name in rotated(names, rep):
            t, out = watch.time(functools.partial(prefill, models[name], p))
            caches[name] = cache_of(out)
            cache_mb[name] = cache_bytes(caches[name]) / 2**20
            if keep:
                samples["prefill"][name].append(t)
        for i, token in enumerate(p.next_tokens):
            for name in rotated(names, rep + i):
                t, out = watch.time(functools.partial(decode_step, models[name], caches[name], token, n + i))
                caches[name] = cache_of(out)
                if keep:
                    samples["decode"][name].append(t)
    return samples, cache_mb



# ---------------------------------------------------------------- statistics


def spread(xs: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q1, q3


def paired_ratios(baseline: list[float], other: list[float]) -> list[float]:
    return [o / b for b, o in zip(baseline, other, strict=True)]
