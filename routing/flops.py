"""Theoretical FLOPs of each routing variant for any decoder geometry (the paper's Table 1 and beyond).

One multiply-add is 2 FLOPs. Three parts, priced per layer group of the routing plan (``routing.plan``):

- ``linear``: q/k/v/o projections and the gated MLP, per token processed (the paper's "linear FLOPs");
- ``attention``: scores and the weighted sum, 4·heads·head_dim per visible (query, key) pair, causal;
  image tokens are taken to come before the text (LLaVA's prompt), which only matters for KV's deep layers;
  a sliding-window layer (Gemma 3) sees at most `window` keys per query, counted in original positions (LF's text
  after the image sees only the text inside the window; bidirectional image blocks are left out);
- ``head``: the LM head on `logit_positions` positions per sequence (1 in generation prefill, 0 to leave out).

Norms, RoPE and residual adds are left out (a fraction of a percent). Costs are per sequence.
``train_step_cost`` prices one training step per variant: the forward with the head at labelled positions only, plus
the backward that variant needs (none before the side branch; see its docstring).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .plan import RoutingPlan, make_plan


@dataclass(frozen=True)
class Geometry:
    """A Llama-style decoder: layers, widths, heads (grouped-query when `kv_heads` < `heads`)."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int = 0
    window: int | None = None  # sliding window of the layers marked in `sliding`
    sliding: tuple[bool, ...] = ()  # per layer: a sliding-window layer (empty: none)

    def window_of(self, layer: int) -> int | None:
        """Layer `layer`'s window, or None for a global layer."""
        return self.window if self.sliding and self.sliding[layer] else None

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return (self.kv_heads or self.heads) * (self.head_dim or self.hidden // self.heads)

    def kv_flops(self) -> float:
        """k and v projections of one token (all an image token costs in a KV deep layer)."""
        return 2.0 * 2 * self.hidden * self.kv_dim

    def linear_flops(self) -> float:
        """One token through one decoder layer's projections and MLP."""
        h = self.hidden
        return 2.0 * (h * self.q_dim + self.q_dim * h + 3 * h * self.intermediate) + self.kv_flops()

    def pair_flops(self) -> float:
        """One visible (query, key) pair: q·k and p·v over all heads."""
        return 4.0 * self.q_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer (projections, MLP, two norms): the side branch's size per layer."""
        h = self.hidden
        return 2 * h * self.q_dim + 2 * h * self.kv_dim + 3 * h * self.intermediate + 2 * h

    @classmethod
    def of(cls, text_config) -> Geometry:
        c = text_config
        types = getattr(c, "layer_types", None) or ()
        window = getattr(c, "sliding_window", None) if "sliding_attention" in types else None
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   c.num_key_value_heads, getattr(c, "head_dim", None), c.vocab_size, window,
                   tuple(t == "sliding_attention" for t in types) if window else ())


LLAVA_15_7B = Geometry(num_layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32064)
LLAVA_15_13B = Geometry(num_layers=40, hidden=5120, intermediate=13824, heads=40, vocab=32064)


@dataclass(frozen=True)
class Cost:
    """FLOPs of one sequence, split by kind."""

    linear: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.head

    def __truediv__(self, other: Cost) -> dict[str, float]:
        return {"linear": self.linear / other.linear, "attention": self.attention / other.attention,
                "total": self.total / other.total}


def _causal_pairs(n: int, window: int | None = None) -> int:
    """Visible (query, key) pairs of `n` consecutive tokens, causal, each query seeing at most `window` keys."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def prefill_cost(g: Geometry, plan: RoutingPlan | None, image_tokens: int, text_tokens: int,
                 logit_positions: int = 1) -> Cost:
    """Prefill FLOPs of one sequence; `plan=None` is the vanilla model. A pruning plan is priced per sample
    (`_pruned_prefill`): `image_tokens` is one image's count before pruning."""
    if plan is not None and plan.prune is not None:
        return _pruned_prefill(g, plan, image_tokens, text_tokens, logit_positions)
    n, i, t = image_tokens + text_tokens, image_tokens, text_tokens
    head = 2.0 * g.hidden * g.vocab * logit_positions
    def pairs(layers, m: int) -> int:  # m consecutive tokens through `layers`, each with its own window
        return sum(_causal_pairs(m, g.window_of(layer)) for layer in layers)

    if plan is None:
        return Cost(g.num_layers * n * g.linear_flops(), pairs(range(g.num_layers), n) * g.pair_flops(), head)
    full_layers = len(plan.shallow) + len(plan.fusion)
    tokens = full_layers * n + plan.side_depth * i  # token-layers at full cost
    total_pairs = pairs([*plan.shallow, *plan.fusion], n) + pairs(plan.side_sources, i)
    deep = len(plan.deep)
    kv_only = 0.0
    if plan.deep_mode == "text_only":  # the text sits after the image: consecutive original positions
        tokens += deep * t
        total_pairs += pairs(plan.deep, t)
    elif plan.deep_mode == "reset":
        tokens += deep * n
        total_pairs += pairs(plan.deep, n)
    else:  # kv_only: text in full, image tokens only project k and v; text queries see image and text keys
        tokens += deep * t
        kv_only = deep * i * g.kv_flops()
        total_pairs += pairs(plan.deep, n) - pairs(plan.deep, i)
    return Cost(tokens * g.linear_flops() + kv_only, total_pairs * g.pair_flops(), head)


def decode_cost(g: Geometry, plan: RoutingPlan | None, image_tokens: int, text_tokens: int) -> Cost:
    """FLOPs of one generated token after a prompt of `image_tokens` + `text_tokens` (cached keys/values)."""
    if plan is not None and plan.prune is not None:  # layers from prune_layer on hold only the kept image tokens
        kept = plan.kept_tokens(image_tokens)
        inner = decode_cost(g, dataclasses.replace(plan, prune=None), kept, text_tokens)
        if plan.prune == "pdrop":  # each layer before the last stage holds its own stage's count
            extra = sum(_seen(g, j, c + text_tokens + 1) - _seen(g, j, kept + text_tokens + 1)
                        for j, c in enumerate(plan.image_schedule(image_tokens)) if plan.layout(j) != "text")
            return Cost(inner.linear, inner.attention + extra * g.pair_flops(), inner.head)
        extra = plan.prune_layer * (image_tokens - kept) * g.pair_flops()
        return Cost(inner.linear, inner.attention + extra, inner.head)
    n = image_tokens + text_tokens
    head = 2.0 * g.hidden * g.vocab
    def seen(layer: int, keys: int) -> int:  # keys a new token attends to: the window's last ones at most
        window = g.window_of(layer)
        return keys if window is None else min(keys, window)

    if plan is None:
        return Cost(g.num_layers * g.linear_flops(), sum(seen(j, n + 1) for j in range(g.num_layers)) * g.pair_flops(),
                    head)
    cached = {"full": n + 1, "kv": n + 1, "text": text_tokens + 1}  # per cache layout
    keys = sum(seen(layer, cached[plan.layout(layer)]) for layer in range(plan.num_layers))
    return Cost(g.num_layers * g.linear_flops(), keys * g.pair_flops(), head)


def ratio(g: Geometry, variant: str, split: int, image_tokens: int, text_tokens: int, fusion_layers: int = 1,
          side_depth: int = 1, logit_positions: int = 1) -> dict[str, float]:
    """Routed / vanilla prefill FLOPs: ``{"linear", "attention", "total"}``."""
    plan = make_plan(g.num_layers, split, variant, fusion_layers, side_depth)
    return (prefill_cost(g, plan, image_tokens, text_tokens, logit_positions)
            / prefill_cost(g, None, image_tokens, text_tokens, logit_positions))


def sample_ratio(g: Geometry, variant: str, split: int, samples: list[tuple[int, int]], fusion_layers: int = 1,
                 side_depth: int = 1, logit_positions: int = 1) -> dict[str, float]:
    """Routed / vanilla prefill FLOPs summed over `samples` of ``(image_tokens, text_tokens)`` each: the saving
    of a set whose image-token counts differ per sample (anyres: LLaVA-NeXT, OneVision). Attention is quadratic,
    so this is not `ratio` at the mean counts; with equal counts it is."""
    if not samples:
        raise ValueError("sample_ratio needs at least one (image_tokens, text_tokens) pair")
    plan = make_plan(g.num_layers, split, variant, fusion_layers, side_depth)
    routed = [prefill_cost(g, plan, i, t, logit_positions) for i, t in samples]
    vanilla = [prefill_cost(g, None, i, t, logit_positions) for i, t in samples]
    total = Cost(*(sum(getattr(c, k) for c in routed) for k in ("linear", "attention", "head")))
    return total / Cost(*(sum(getattr(c, k) for c in vanilla) for k in ("linear", "attention", "head")))


def table(g: Geometry, split: int, image_tokens: int, text_tokens: int, fusion_layers: int = 1,
          side_depth: int = 1) -> list[dict]:
    """One row per variant (and vanilla): prefill GFLOPs per sequence and ratios to vanilla, Table 1 style."""
    vanilla = prefill_cost(g, None, image_tokens, text_tokens)
    rows = [{"variant": "vanilla", "linear_gflops": vanilla.linear / 1e9, "total_gflops": vanilla.total / 1e9,
             "linear_ratio": 1.0, "total_ratio": 1.0}]
    for variant in ("lf", "lf-ideal", "kv", "pc"):
        plan = make_plan(g.num_layers, split, variant, fusion_layers, side_depth)
        cost = prefill_cost(g, plan, image_tokens, text_tokens)
        r = cost / vanilla
        rows.append({"variant": variant, "linear_gflops": cost.linear / 1e9, "total_gflops": cost.total / 1e9,
                     "linear_ratio": r["linear"], "total_ratio": r["total"]})
    return rows


def _seen(g: Geometry, layer: int, keys: int) -> int:
    """Keys a new token attends to at `layer`: the window's last ones at most."""
    window = g.window_of(layer)
    return keys if window is None else min(keys, window)


def _pdrop_prefill(g: Geometry, plan: RoutingPlan, image_tokens: int, text_tokens: int,
                   logit_positions: int) -> Cost:
    """PDrop's pyramid (`RoutingPlan.image_schedule`: layer j sees its stage's image tokens, then the text), the
    plan's routing priced on the last stage's kept tokens, and the stages' score reads: each stage layer's q/k over
    the tokens entering it (its own forward computes them again) and the last prompt token's one score row. Under
    a DPVR variant every stage is in the shallow stack, so the layers before the last stage run every position."""
    t, schedule = text_tokens, plan.image_schedule(image_tokens)
    kept = plan.kept_tokens(image_tokens)
    inner = prefill_cost(g, dataclasses.replace(plan, prune=None), kept, t, logit_positions)
    before = [(j, c) for j, c in enumerate(schedule) if c != kept]  # layers before the last stage
    linear = inner.linear + sum(c - kept for _, c in before) * g.linear_flops()
    attention = inner.attention + sum(_causal_pairs(c + t, g.window_of(j)) - _causal_pairs(kept + t, g.window_of(j))
                                      for j, c in before) * g.pair_flops()
    entering = [schedule[k - 1] + t for k in plan.stages]  # tokens entering each stage layer, before its drop
    linear += sum(2.0 * g.hidden * (g.q_dim + g.kv_dim) * n for n in entering)
    attention += sum(2.0 * g.q_dim * n for n in entering)  # one query row, scores only
    return Cost(linear, attention, inner.head)


def _pruned_prefill(g: Geometry, plan: RoutingPlan, image_tokens: int, text_tokens: int,
                    logit_positions: int) -> Cost:
    """Layers before `plan.prune_layer` at the full count, every later group on the kept image tokens; FastV adds
    its one score read (q/k of layer K-1 again, the rank rule's rows x all keys: the last prompt token's one row,
    every token's, or the text rows). Pre-LLM scoring (the tower's CLS attention)
    is vision-tower compute, outside this decoder-only model."""
    if plan.prune == "pdrop":
        return _pdrop_prefill(g, plan, image_tokens, text_tokens, logit_positions)
    n, t = image_tokens + text_tokens, text_tokens
    kept = plan.kept_tokens(image_tokens)
    inner = prefill_cost(g, dataclasses.replace(plan, prune=None), kept, t, logit_positions)
    before = plan.prune_layer
    linear = inner.linear + before * (n - kept - t) * g.linear_flops()
    attention = inner.attention + before * (_causal_pairs(n) - _causal_pairs(kept + t)) * g.pair_flops()
    if plan.prune == "fastv":
        linear += 2.0 * g.hidden * (g.q_dim + g.kv_dim) * n
        rows = {"last": 1, "all": n}.get(plan.rank, t)
        attention += 2.0 * g.q_dim * rows * n  # scores only, no weighted sum
    return Cost(linear, attention, inner.head)


def plan_ratios(g: Geometry, plan: RoutingPlan | None, samples: list[tuple[int, int]]) -> dict[str, float]:
    """Prefill and decode FLOPs of `plan` / vanilla summed over `samples` of ``(image_tokens, text_tokens)``:
    ``{"prefill", "decode"}`` (total FLOPs; decode: one token after each prompt)."""
    def total(cost_fn, p) -> float:
        return sum(cost_fn(g, p, i, t).total for i, t in samples)

    if not samples:
        raise ValueError("plan_ratios needs at least one (image_tokens, text_tokens) pair")
    return {"prefill": total(prefill_cost, plan) / total(prefill_cost, None),
            "decode": total(decode_cost, plan) / total(decode_cost, None)}


# ---------------------------------------------------------------- one training step


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one training step of one sequence: `groups` maps shallow / side / deep / fusion / head to
    (forward, backward)."""

    groups: dict[str, tuple[float, float]]

    @property
    def forward(self) -> float:
        return sum(f for f, _ in self.groups.values())

    @property
    def backward(self) -> float:
        return sum(b for _, b in self.groups.values())

    @property
    def total(self) -> float:
        return self.forward + self.backward


def train_step_cost(g: Geometry, plan: RoutingPlan, image_tokens: int, text_tokens: int, labelled: int) -> StepCost:
    """Forward + the backward a variant needs, per sequence, the LM head at `labelled` positions only.

    Backward rules: nothing before the side branch has one (the shallow stack runs under no_grad), nor LF's
    text-only deep stack (it never sees the side branch). The side branch (trainable weights) costs 2x its forward.
    A frozen layer the gradient passes through (fusion; PC's and KV's deep layers; the head) costs 1x its linear
    FLOPs (the input's gradient only, no weight gradient) and 2x its attention FLOPs (dQ, dK, dV and dP: four
    products against the forward's two). Gradient checkpointing would add one more forward of every layer with a
    backward; it is not counted (`routing bench --train` runs without it).
    """
    if plan.prune is not None:
        raise ValueError("train_step_cost prices lf/pc/kv without pruning")
    if not plan.trainable:
        raise ValueError(f"variant '{plan.variant}' has no gradient path to the side branch: no training step")
    n, i, t = image_tokens + text_tokens, image_tokens, text_tokens
    f, pair = g.linear_flops(), g.pair_flops()

    def pairs(layers, m: int) -> int:
        return sum(_causal_pairs(m, g.window_of(layer)) for layer in layers)

    def frozen_pass(linear: float, attention: float) -> tuple[float, float]:
        """(forward, backward) of frozen layers the gradient passes through."""
        return linear + attention, linear + 2 * attention

    side_forward = len(plan.side_sources) * i * f + pairs(plan.side_sources, i) * pair
    groups = {"shallow": (len(plan.shallow) * n * f + pairs(plan.shallow, n) * pair, 0.0),
              "side": (side_forward, 2 * side_forward)}
    deep = len(plan.deep)
    if plan.deep_mode == "text_only":
        groups["deep"] = (deep * t * f + pairs(plan.deep, t) * pair, 0.0)
    elif plan.deep_mode == "reset":
        groups["deep"] = frozen_pass(deep * n * f, pairs(plan.deep, n) * pair)
    else:  # kv_only: text in full, image tokens project k and v only; text queries see image and text keys
        groups["deep"] = frozen_pass(deep * (t * f + i * g.kv_flops()),
                                     (pairs(plan.deep, n) - pairs(plan.deep, i)) * pair)
    groups["fusion"] = frozen_pass(len(plan.fusion) * n * f, pairs(plan.fusion, n) * pair)
    head = 2.0 * g.hidden * g.vocab * labelled
    groups["head"] = (head, head)
    return StepCost(groups)


def train_step_ratio(g: Geometry, variant: str, split: int, image_tokens: int, text_tokens: int, labelled: int,
                     fusion_layers: int = 1, side_depth: int = 1) -> float:
    """A training step of `variant` / one of PC on the same batch (total FLOPs, the model of `train_step_cost`)."""
    def total(v: str) -> float:
        plan = make_plan(g.num_layers, split, v, fusion_layers, side_depth)
        return train_step_cost(g, plan, image_tokens, text_tokens, labelled).total

    return total(variant) / total("pc")


# ---------------------------------------------------------------- the peers' own counting conventions
# Published FLOP figures use other conventions than the model above; these small functions evaluate them as the
# papers state them, so a published figure can be reproduced and set beside ours (docs/RESULTS.md, "FLOPs beside
# published figures"). The model above stays the toolkit's own.

FASTV_SYSTEM_TOKENS = 36  # LLaVA-1.5's system prompt before the image: FastV's n = 36 + 576 (no question tokens)
LLAVA_IMAGE_TOKENS = 576


def fastv_layer(g: Geometry, n: float) -> float:
    """FastV's per-layer count (the bracket of its Eq. 5), 4nd² + 2n²d + 2ndm, in multiply-adds: q/k/v/o as four d×d
    matrices, all n² (query, key) pairs (no causal halving), a two-matrix FFN of width m (Llama's gate is left out)."""
    d, m = g.hidden, g.intermediate
    return 4.0 * n * d * d + 2.0 * n * n * d + 2.0 * n * d * m


def fastv_eq5(g: Geometry, n_tokens: float, layers: int | None = None) -> float:
    """FastV's Eq. 5, T(4nd² + 2n²d + 2ndm) multiply-adds: `layers` (T, default all) layers at `n_tokens` each."""
    return (g.num_layers if layers is None else layers) * fastv_layer(g, n_tokens)


def fastv_eq5_pruned(g: Geometry, n_tokens: float, k: int, r: float,
                     image_tokens: int = LLAVA_IMAGE_TOKENS) -> float:
    """FastV pruned under Eq. 5: K layers at n tokens, the other T-K at n - R·image_tokens (only image tokens go)."""
    return fastv_eq5(g, n_tokens, k) + fastv_eq5(g, n_tokens - r * image_tokens, g.num_layers - k)


def fastv_eq5_ratio(g: Geometry, k: int, r: float, n_tokens: float = FASTV_SYSTEM_TOKENS + LLAVA_IMAGE_TOKENS,
                    image_tokens: int = LLAVA_IMAGE_TOKENS) -> float:
    """FastV pruned / vanilla under Eq. 5 (FastV's "FLOPs ratio"; 1 minus it is its "FLOPs reduction")."""
    return fastv_eq5_pruned(g, n_tokens, k, r, image_tokens) / fastv_eq5(g, n_tokens)


def fastv_reported(g: Geometry, n_tokens: float = FASTV_SYSTEM_TOKENS + LLAVA_IMAGE_TOKENS) -> float:
    """The vanilla figure FastV prints as "TFLOPs" (99.3 at 7B, 154.6 at 13B): ONE layer's Eq. 5 bracket at
    n = 36 + 576 in units of 1e9 multiply-adds, i.e. Eq. 5 without its factor T. Eq. 5 itself over all T layers is
    T times this (3.18e12 multiply-adds at 7B)."""
    return fastv_layer(g, n_tokens) / 1e9


def pdrop_layer(g: Geometry, n: float) -> float:
    """PyramidDrop's per-layer count (its Section 3.1), 4nd² + 2n²d + 3ndm multiply-adds: FastV's with Llama's
    three-matrix (gated) FFN."""
    d, m = g.hidden, g.intermediate
    return 4.0 * n * d * d + 2.0 * n * n * d + 3.0 * n * d * m


def pdrop_schedule(num_layers: int, image_tokens: int, layer_list: tuple[int, ...] = (8, 16, 24),
                   ratios: tuple[float, ...] = (0.5, 0.25, 0.125)) -> list[int]:
    """Image tokens each layer sees under PyramidDrop's stages: N before the first entry of `layer_list`, then
    int(N · ratio) from each entry on (ratios relative to the original N; the published 1.78 TFLOPs at 7B needs
    stages of 8 layers each, i.e. an entry is the first layer that sees the smaller count)."""
    counts, n = [], image_tokens
    for layer in range(num_layers):
        for start, ratio in zip(layer_list, ratios, strict=True):
            if layer == start:
                n = int(image_tokens * ratio)
        counts.append(n)
    return counts


def pdrop_macs(g: Geometry, image_counts: list[int], other_tokens: int = 0) -> float:
    """PyramidDrop's FLOPs of a schedule (multiply-adds): Σ over layers of `pdrop_layer` at that layer's image tokens
    plus `other_tokens` (its published LLaVA-1.5 figures count the 576 image tokens only: `other_tokens` = 0)."""
    return sum(pdrop_layer(g, n + other_tokens) for n in image_counts)


def average_tokens(image_counts: list[int]) -> float:
    """PyramidDrop's "average tokens" of a schedule: the sum of per-layer image-token counts / layers."""
    return sum(image_counts) / len(image_counts)


def schedule_prefill_cost(g: Geometry, image_counts: list[int], text_tokens: int, logit_positions: int = 1) -> Cost:
    """The toolkit's own count (gated MLP, causal pairs, windows, 2 FLOPs per multiply-add) for a per-layer schedule
    of image tokens (layer j sees `image_counts[j]` image tokens, then the text): PyramidDrop's pyramid, or any
    pre-LLM pruning (a constant schedule), priced the way `prefill_cost` prices the vanilla model."""
    if len(image_counts) != g.num_layers:
        raise ValueError(f"a schedule needs one image-token count per layer ({g.num_layers}), got {len(image_counts)}")
    tokens = sum(image_counts) + g.num_layers * text_tokens
    pairs = sum(_causal_pairs(i + text_tokens, g.window_of(j)) for j, i in enumerate(image_counts))
    return Cost(tokens * g.linear_flops(), pairs * g.pair_flops(), 2.0 * g.hidden * g.vocab * logit_positions)
