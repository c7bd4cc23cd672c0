"""The routing plan: which layer groups a DPVR variant runs, on which positions, with which cache layout.

One plan describes all four variants; the routed model walks it (`routing.model`), the FLOP model prices it
(`routing.flops`) and the artifact records it (`routing.artifact`). A plan is made once and checked once:
`parse_plan` reads a spec (``lf@6+prune-pre:50%``) against a model's depth and first allowed split, `plan_for` takes
the pieces, `RoutingPlan.from_manifest` reads a saved ``routing.json`` (`to_manifest` writes it); `parse_spec`
(syntax only) and `make_plan` (numbers only) are the pure steps underneath.

Layer groups for ``L`` layers, split ``s``, ``K`` fusion layers and a side branch of depth ``d_v``::

    shallow  0 .. s-1          every position (untouched: bit-identical to the base model)
    side     d_v copies of s .. s+d_v-1, image positions only (the only trainable weights)
    deep     s .. L-K-1        lf/lf-ideal: text positions only;  pc: image positions reset to the side output;
                               kv: image positions supply only keys/values (computed from the side output)
    fusion   L-K .. L-1        every position, image positions taken from the side branch

``fusion_layers`` applies to every variant: under PC, K=1 is exactly "every deep layer s..L-1 resets the image
positions"; under KV the fusion layers are where image positions get updated again (their text outputs equal
K=0). ``lf-ideal`` is LF with K=0: its image positions end as the side output, which no text position reads, so the
loss has no path to the side branch (the paper's Appendix A). A split must leave at least one deep layer.

Cache layouts during decoding (a new token is always text): ``full`` layers cache image+text in the original
order; ``text`` layers (LF deep) cache the text positions only; ``kv`` layers (KV deep) cache the image keys first,
then the text. Each layout needs its own 2D padding mask, see ``routing.generation``.

Training-free peers are plans too (issue 17), and pruning composes with the DPVR variants:

    vtw        all image tokens leave after layer s (VTW): LF-ideal with no side branch at all
    fastv      after layer K, drop the share R of the image tokens (FastV's notation, ``fastv@K:R=50%``) that
               rank lowest by layer K-1's attention (``rank=last``: the last prompt token's row, as FastV's code;
               ``rank=all``: the paper's sentence; ``rank=text``: the mean over text rows); the rest are gone for
               every later layer (``kept`` cache layout from K on), ranked once at prefill
    pdrop      PyramidDrop: at each stage layer K_i (``pdrop:layers=8/16/24,lambda=0.5``; bare ``pdrop``: the authors'
               8/16/24 of 32 scaled to the depth, round(L/4), round(L/2), round(3L/4), half up) the image tokens are
               ranked by the attention of the last prompt token, recomputed with layer K_i's own input norm, q/k and
               RoPE (PDrop's code: ``rank_layer = layer_idx + 1``), and int(N lambda^(i+1)) of the ORIGINAL N are kept
               (at least 1); layer K_i on caches only them (``kept``, ``kept1``, ``kept2``, ... one layout per stage).
               The layer list is written with ``/`` so that it cannot clash with the comma between parameters.
               Positions: as its authors' code, what is left is renumbered contiguously after each drop (a new
               token then sits, in a layer after stage i, below its original position by the tokens dropped so
               far: `RoutingState.position_shift`); 1D RoPE only (M-RoPE families are refused).
    divprune   keep a max-min diverse subset of each image's projected tokens (DivPrune): ``divprune:keep=9.8%``
               (a share, rounded as its authors round) or ``divprune:keep=56`` (a count), before the LLM
    visionzip  per image, the dominant tokens by the tower's [CLS] attention plus contextual tokens merged by key
               similarity (VisionZip), projected: ``visionzip:dominant=54,contextual=10``, before the LLM
    prune-pre  keep the top R of each image's tokens before the LLM, by the vision tower's [CLS] attention
               (FasterVLM); the LLM sees a shorter prompt (positions renumbered, as the method feeds it)
    pool       average-pool each image's token grid to about R of its tokens before the LLM

``lf`` (or pc, kv, lf-ideal) with ``prune`` set runs the pruning first: the side branch and the fusion layer see
only the kept image tokens. FastV keeps the original positions of what it keeps (as its reference code does); PDrop
renumbers them contiguously (as its code does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

from transformers import PretrainedConfig

from saturation.core.adapters import adapter_class, adapter_for
from saturation.core.errors import ToolkitError
from saturation.recommend import split_range

VARIANTS = ("lf", "pc", "kv", "lf-ideal")  # the DPVR variants (a side branch)
# image-token pruning, alone or under a DPVR variant
PRUNERS = ("fastv", "pdrop", "prune-pre", "pool", "divprune", "visionzip")
PRE_LLM = ("prune-pre", "pool", "divprune", "visionzip")  # pruning before the first decoder layer
# Prunings written with explicit ``key=value`` options (``divprune:keep=9.8%``), never a bare ratio: a bare number
# could be read as the kept or the dropped share. Their defaults are the authors' (DivPrune 0.098, VisionZip 54+10).
KEYED = {"divprune": {"keep": "9.8%"}, "visionzip": {"dominant": "54", "contextual": "10"}}
PEERS = ("vtw",) + PRUNERS  # training-free baselines (issue 17)
ALL_VARIANTS = VARIANTS + PEERS
DEEP_MODE = {"lf": "text_only", "lf-ideal": "text_only", "pc": "reset", "kv": "kv_only", "vtw": "text_only",
             "fastv": "dense", "pdrop": "dense", "prune-pre": "dense", "pool": "dense", "divprune": "dense",
             "visionzip": "dense"}
LAYOUT_OF_MODE = {"text_only": "text", "reset": "full", "kv_only": "kv", "dense": "full"}
# the plan's keys of a saved manifest (`routing.json`) with their JSON types (pruning's are optional: older artifacts)
MANIFEST_TYPES = {"variant": str, "split": int, "fusion_layers": int, "side_depth": int, "num_layers": int}
# FastV's ranking of image tokens by layer K-1's attention (head mean, image columns), over which query rows:
#   last  the last valid prompt token's row (FastV's code: `last_layer_attention_avg[-1]`)
#   all   the paper's "attention a token receives from all other tokens": the sum over every other valid prompt
#         row (a row before the token gives 0, as causal attention does; the token's own row is left out), which
#         ranks as the mean over all other tokens does
#   text  the mean over the valid text rows (this toolkit's rule before the FastV spelling; kept as a variant)
FASTV_RANKS = ("last", "all", "text")
IN_LLM = ("fastv", "pdrop")  # prunings inside the LLM: a kept cache layout per drop stage
PDROP_LAMBDA = 0.5  # PyramidDrop's default ratio between stages (its image_token_ratio_list 1, 0.5, 0.25, 0.125)


def stage_layout(stage: int) -> str:
    """The cache layout of the layers after in-LLM drop stage `stage` (0-based): ``kept``, ``kept1``, ``kept2``, ..."""
    return "kept" if stage <= 0 else f"kept{stage}"


def pdrop_default_layers(num_layers: int) -> tuple[int, ...]:
    """PyramidDrop's default stages, layers 8/16/24 of 32, scaled to `num_layers`: round(L/4), round(L/2),
    round(3L/4), halves up (12 layers: 3/6/9)."""
    return tuple(int(num_layers * q / 4 + 0.5) for q in (1, 2, 3))


def pdrop_kept(n: int, lam: float, stage: int) -> int:
    """Image tokens one image of `n` keeps from PDrop's stage `stage` (0-based) on: int(n lambda^(stage+1)), the
    ratio relative to the ORIGINAL n as its code computes it, at least 1 (its int() could keep none). The routed
    model budgets a row's image tokens together (PDrop's code handles one image per prompt)."""
    return max(1, math.floor(n * lam ** (stage + 1) + 1e-9))


def kept_tokens(prune: str | None, n: int, keep: float, args: tuple = ()) -> int:
    """Image tokens one image of `n` keeps under `prune` at ratio `keep`: floor(R n), at least 1 (9 tokens at 25%
    keep 2); `pool` keeps a square grid of side round(sqrt(R) side) (24x24 at 25% -> 12x12, 3x3 at 50% -> 2x2);
    `fastv` keeps round(n (1 - R_dropped)) = round(n keep), halves up, at least 1 (FastV's scripts: (1-R) 576).
    Keyed prunings read `args` (`RoutingPlan.prune_args`): DivPrune keeps round(share n) as its code rounds
    (``int(round(ratio * N))``: 56 of 576 at 9.8%), at least 1, or min(count, n); VisionZip hands the LLM
    dominant + contextual tokens per image (64 by default), whatever n."""
    if prune is None or n == 0:
        return n
    options = dict(args)
    if prune == "divprune":
        return min(n, int(options["count"])) if "count" in options else max(1, int(round(options["share"] * n)))
    if prune == "visionzip":
        return int(options["dominant"]) + int(options["contextual"])
    if prune == "fastv":
        return max(1, math.floor(keep * n + 0.5 + 1e-9))
    if prune == "pdrop":  # what enters the last stage
        return pdrop_kept(n, options["lambda"], len(options["layers"]) - 1)
    if prune == "pool":
        side = math.isqrt(n)
        return max(1, round(side * math.sqrt(keep))) ** 2 if side * side == n else n
    return max(1, math.floor(keep * n + 1e-9))


@dataclass(frozen=True)
class RoutingPlan:
    """A DPVR variant as layer groups over a decoder of `num_layers` layers."""

    variant: str
    num_layers: int  # L
    split: int  # s: the first layer that no longer sees image tokens the vanilla way
    fusion_layers: int  # K: the last K layers run on every position again
    side_depth: int  # d_v: side-branch layers, initialised from layers s .. s+d_v-1
    prune: str | None = None  # fastv | prune-pre | pool: image tokens dropped before layer `prune_layer`
    prune_layer: int = 0  # FastV's K (scores from layer K-1); 0 = before the LLM
    keep: float = 1.0  # the share of each image's tokens kept (FastV: of each row's; its R is 1 - keep, dropped)
    rank: str | None = None  # FastV only: which query rows rank the image tokens (FASTV_RANKS)
    # A keyed pruning's options (`KEYED`), sorted (key, number) pairs: DivPrune ("share", R) or ("count", k);
    # VisionZip ("contextual", c), ("dominant", d). Empty for the others.
    # PDrop: (("lambda", 0.5), ("layers", (8, 16, 24))).
    prune_args: tuple[tuple[str, float | int | tuple[int, ...]], ...] = ()

    def to_manifest(self) -> dict:
        """The plan's part of an artifact's ``routing.json`` (`RoutingPlan.from_manifest` reads it back)."""
        fastv = {"drop": self.drop, "rank": self.rank} if self.prune == "fastv" else {}  # FastV's R and rank rule
        return {"variant": self.variant, "split": self.split, "fusion_layers": self.fusion_layers,
                "side_depth": self.side_depth, "num_layers": self.num_layers,
                "prune": self.prune,  # pruning (issue 17): fastv | prune-pre | pool, its layer K and keep ratio
                "prune_layer": self.prune_layer, "keep": self.keep, **fastv, "spec": self.spec} | (
                    {"prune_args": self.args_json} if self.prune_args else {})

    @property
    def args_json(self) -> dict:
        """`prune_args` as JSON reads them back (PDrop's layer tuple as a list), so a saved copy compares equal."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.prune_args}

    @classmethod
    def from_manifest(cls, manifest: dict) -> RoutingPlan:
        """The plan of a ``routing.json`` (every key but the plan's is ignored), checked as `make_plan` checks a new
        one: a hand-edited manifest is one line. Manifests from before pruning (no ``prune`` keys) prune nothing."""
        if not isinstance(manifest, dict):
            raise ToolkitError(f"a routing manifest is a JSON object, not {type(manifest).__name__}")
        missing = [k for k in MANIFEST_TYPES if k not in manifest]
        if missing:
            raise ToolkitError(f"the routing manifest lacks {', '.join(missing)}")
        for key, kind in MANIFEST_TYPES.items():
            value = manifest[key]
            if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is not a layer index
                raise ToolkitError(f"'{key}' must be a JSON {kind.__name__}, got {value!r}")
        return make_plan(manifest["num_layers"], manifest["split"], manifest["variant"], manifest["fusion_layers"],
                         manifest["side_depth"], **manifest_pruning(manifest))

    @property
    def name(self) -> str:
        """``lf``, ``fastv``, ``lf+prune-pre``, ...: the variant and the pruning under it."""
        return self.variant if self.prune in (None, self.variant) else f"{self.variant}+{self.prune}"

    @property
    def drop(self) -> float:
        """FastV's R: the share of the image tokens dropped (1 - keep)."""
        return round(1.0 - self.keep, 12)  # 1 - 0.3 is 0.7000000000000001: R as it was written

    @property
    def spec(self) -> str:
        """The plan as `parse_spec` reads it back, e.g. ``lf@6+fastv@2:R=50%`` or ``fastv@3:R=75%,rank=all``."""
        head = self.variant if self.variant in PRUNERS else f"{self.variant}@{self.split}"
        if self.prune is None:
            return head
        if self.prune == "fastv":
            rank = "" if self.rank == "last" else f",rank={self.rank}"
            tail = f"fastv@{self.prune_layer}:R={100 * self.drop:g}%{rank}"
        elif self.prune in KEYED or self.prune == "pdrop":
            tail = f"{self.prune}:{args_text(self.prune_args)}"
        else:
            tail = f"{self.prune}:{100 * self.keep:g}%"
        return tail if self.variant in PRUNERS else f"{head}+{tail}"

    @property
    def pruning_terms(self) -> str:
        """The pruning in its authors' terms: ``K=2, R=75% dropped, rank=last`` (FastV), ``keep 25%`` (the rest)."""
        if self.prune == "fastv":
            return f"K={self.prune_layer}, R={100 * self.drop:g}% dropped, rank={self.rank}"
        if self.prune in KEYED or self.prune == "pdrop":
            return args_text(self.prune_args)
        return "" if self.prune is None else f"keep {100 * self.keep:g}%"

    @property
    def routes(self) -> bool:
        """Whether image and text go separate ways at the split (every plan but the pruning-only ones)."""
        return self.split < self.num_layers

    def kept_tokens(self, n: int) -> int:
        """Image tokens one image of `n` keeps after this plan's pruning (PDrop: what enters its last stage)."""
        return kept_tokens(self.prune, n, self.keep, self.prune_args)

    @property
    def stages(self) -> tuple[int, ...]:
        """The layers where an in-LLM pruning drops image tokens (each is the first layer that sees fewer): FastV's
        (K,), PDrop's layer list; () for the others."""
        if self.prune == "pdrop":
            return tuple(dict(self.prune_args)["layers"])
        return (self.prune_layer,) if self.prune == "fastv" else ()

    def stage_kept(self, n: int, stage: int) -> int:
        """Image tokens one image of `n` keeps from drop stage `stage` (0-based) on."""
        if self.prune == "pdrop":
            return pdrop_kept(n, dict(self.prune_args)["lambda"], stage)
        return self.kept_tokens(n)

    def image_schedule(self, n: int) -> list[int]:
        """Image tokens (one image of `n`) each layer sees, before the plan's routing: the stages' counts, or the
        pre-LLM pruning's count throughout."""
        if self.prune in PRE_LLM:
            return [self.kept_tokens(n)] * self.num_layers
        counts, stages = [], self.stages
        for layer in range(self.num_layers):
            done = sum(1 for k in stages if k <= layer)
            counts.append(n if done == 0 else self.stage_kept(n, done - 1))
        return counts

    @property
    def deep_mode(self) -> str:
        """``text_only`` (lf, lf-ideal), ``reset`` (pc) or ``kv_only`` (kv)."""
        return DEEP_MODE[self.variant]

    @property
    def shallow(self) -> range:
        return range(0, self.split)

    @property
    def side_sources(self) -> range:
        """The base layers the side branch is copied from."""
        return range(self.split, self.split + self.side_depth)

    @property
    def deep(self) -> range:
        return range(self.split, self.num_layers - self.fusion_layers)

    @property
    def fusion(self) -> range:
        return range(self.num_layers - self.fusion_layers, self.num_layers)

    def layout(self, layer: int) -> str:
        """The cache layout of base layer `layer`: ``full``, ``text``, ``kv``, or ``kept`` (text and the image
        tokens that survived pruning, original order) for the non-deep layers from `prune_layer` on; PDrop's later
        stages ``kept1``, ``kept2``, ... (each layer caches only what it saw)."""
        return self.layer_layouts[layer]

    @cached_property
    def layer_layouts(self) -> tuple[str, ...]:
        """`layout` of every base layer, worked out once (every prefill and decode step reads them)."""
        def of(layer: int) -> str:
            layout = LAYOUT_OF_MODE[self.deep_mode] if layer in self.deep else "full"
            if layout != "full" or self.prune is None or layer < self.prune_layer:
                return layout
            return stage_layout(sum(1 for k in self.stages if k <= layer) - 1)  # pre-LLM: no stages, one kept

        return tuple(map(of, range(self.num_layers)))

    def first_layer(self, layout: str) -> int:
        """The first base layer with `layout` (its cache slot sizes that layout's decode mask)."""
        return next(i for i in range(self.num_layers) if self.layout(i) == layout)

    @cached_property
    def layouts(self) -> tuple[str, ...]:
        """The distinct cache layouts, in layer order."""
        return tuple(dict.fromkeys(self.layer_layouts))

    @property
    def trainable(self) -> bool:
        """Whether the loss has a path to the side branch: it needs a fusion layer, or deep layers that read it."""
        if self.side_depth == 0:
            return False
        return self.fusion_layers > 0 or (self.deep_mode != "text_only" and len(self.deep) > 0)

    @property
    def _pruning_what(self) -> str:
        return args_text(self.prune_args) if self.prune in KEYED else f"keep {100 * self.keep:g}% of the image tokens"

    def describe(self) -> str:
        """One line per group, e.g. for `routing train` logs."""
        def span(r: range) -> str:
            return f"{r.start}..{r.stop - 1}" if len(r) else "-"

        pruning = [] if self.prune is None else [
            f"  prune   fastv {self.pruning_terms}: image tokens ranked by layer {self.prune_layer - 1}'s attention "
            f"({RANK_ROWS[self.rank]}), the rest dropped before layer {self.prune_layer}" if self.prune == "fastv" else
            f"  prune   pdrop {self.pruning_terms}: before each stage layer the image tokens ranked by the last prompt "
            f"token's attention at that layer, int(N lambda^i) of N kept" if self.prune == "pdrop" else
            f"  prune   {self.prune}: {self._pruning_what} before layer {self.prune_layer}"]
        if not self.routes:
            return "\n".join([f"variant {self.variant}: L={self.num_layers}", *pruning])
        return "\n".join([
            f"variant {self.name}: L={self.num_layers} s={self.split} K={self.fusion_layers} d_v={self.side_depth}",
            *pruning,
            f"  shallow {span(self.shallow)}: all positions",
            *([f"  side    copies of {span(self.side_sources)}: image positions (trainable)"] if self.side_depth else
              ["  side    none: image tokens leave here (VTW)"]),
            f"  deep    {span(self.deep)}: {self.deep_mode}",
            *([f"  fusion  {span(self.fusion)}: all positions, image from side branch"] if self.fusion_layers else []),
        ])


RANK_ROWS = {"last": "the last prompt token's row", "all": "summed over every other prompt token",
             "text": "mean over the text rows"}


def make_plan(num_layers: int, split: int, variant: str = "lf", fusion_layers: int = 1,
              side_depth: int = 1, min_split: int = 1, *, prune: str | None = None, prune_layer: int | None = None,
              keep: float = 1.0, rank: str | None = None, prune_args: dict | None = None) -> RoutingPlan:
    """Validate a variant's geometry. `lf-ideal` always has K=0 (that is what makes it ideal and untrainable).
    `min_split`: the backbone's first allowed split (after Qwen3-VL's DeepStack layers).

    Peers: ``vtw`` drops every image token after layer `split` (no side branch, no fusion). ``fastv``,
    ``prune-pre`` and ``pool`` prune alone (`split` is FastV's K when `prune_layer` is not given); a DPVR variant
    with `prune` runs on the kept image tokens only (FastV's K must then be <= `split`). `keep` in (0, 1] is the
    share kept (FastV's R is 1 - keep); `rank` is FastV's ranking rule (FASTV_RANKS, default ``last``).
    `prune_args`: a keyed pruning's options (`KEYED`; DivPrune ``{"share": R}`` or ``{"count": k}``, VisionZip
    ``{"dominant": d, "contextual": c}``), the authors' defaults where missing.
    """
    if variant not in ALL_VARIANTS:
        raise ToolkitError(f"unknown routing variant '{variant}': use one of {', '.join(ALL_VARIANTS)}")
    if not isinstance(split, int) or isinstance(split, bool):
        raise ToolkitError(f"split must be an integer layer index, got {split!r}")
    if variant in PRUNERS:
        if prune not in (None, variant):
            raise ToolkitError(f"variant '{variant}' is itself a pruning; compose pruning with lf, pc or kv")
        if variant == "fastv" and prune_layer is None:
            prune_layer = split
        prune = variant
        split, fusion_layers, side_depth = num_layers, 0, 0
    if variant == "vtw" and prune is not None:  # VTW's image tokens leave at the split: nothing is left to prune
        raise ToolkitError(f"vtw takes no pruning ({prune}): pruning composes only after lf, pc, kv or lf-ideal")
    args: tuple = ()
    if prune == "pdrop":  # its stages and lambda (the authors' defaults scaled to the depth where missing)
        if keep != 1.0:
            raise ToolkitError("pdrop takes layers= and lambda=, not a keep ratio")
        args = pdrop_options(prune_args, num_layers, min_split)
        if prune_layer not in (None, dict(args)["layers"][0]):
            raise ToolkitError(f"pdrop's first stage is {dict(args)['layers'][0]}, not prune_layer={prune_layer}")
        prune_layer = dict(args)["layers"][0]
    elif prune is not None:
        keep, args = keyed_options(prune, prune_args, keep)
        prune_layer = _check_pruning(num_layers, prune, prune_layer, keep, min_split)
    elif prune_args:
        raise ToolkitError("prune_args without a pruning: name the pruning (divprune or visionzip)")
    rank = _check_rank(prune, rank)
    if variant in PRUNERS:
        return RoutingPlan(variant, num_layers, split, 0, 0, prune, prune_layer, float(keep), rank, args)
    if variant in ("lf-ideal", "vtw"):
        fusion_layers = 0
    elif variant == "lf" and fusion_layers == 0:
        raise ToolkitError("variant 'lf' needs fusion_layers >= 1; with no fusion layer it is 'lf-ideal'")
    # VTW has no side branch; its splits are LF-ideal's (it is LF-ideal without one)
    valid = split_range(num_layers, fusion_layers, 1 if variant == "vtw" else side_depth, min_split)
    if variant == "vtw":
        side_depth = 0
    _check_deepstack(split, min_split)
    if split not in valid:
        raise ToolkitError(out_of_range(split, num_layers, fusion_layers, side_depth, valid))
    last = dict(args)["layers"][-1] if prune == "pdrop" else prune_layer  # PDrop: every stage in the shallow stack
    if prune is not None and last > split:
        raise ToolkitError(f"{prune} at layer {last} comes after the split {split}: pruning must happen in "
                           "the shallow stack, so that the side branch and the fusion see only the kept tokens")
    return RoutingPlan(variant, num_layers, split, fusion_layers, side_depth, prune,
                       0 if prune is None else prune_layer, float(keep) if prune is not None else 1.0, rank, args)


def _check_rank(prune: str | None, rank: str | None) -> str | None:
    """FastV's ranking rule (default ``last``, its code's); the other prunings take none."""
    if prune != "fastv":
        if rank is not None:
            raise ToolkitError(f"rank={rank} is FastV's ranking rule; {prune or 'this plan'} takes none")
        return None
    if rank is None:
        return "last"
    if rank not in FASTV_RANKS:
        raise ToolkitError(f"unknown FastV rank rule {rank!r}: use one of {', '.join(FASTV_RANKS)}")
    return rank


def keyed_options(prune: str, options: dict | None, keep: float) -> tuple[float, tuple]:
    """A pruning's keep ratio and its `RoutingPlan.prune_args`, checked. Non-keyed prunings take no options.
    DivPrune: ``{"share": R}`` (R in (0, 1]) or ``{"count": k}`` (k >= 1), default share 0.098; a `keep` other
    than 1 (the older keyword form) is its share; its `keep` is the share (1 for a count). VisionZip:
    ``{"dominant": d, "contextual": c}``, integers >= 1 (d counts the [CLS] token, as its code does), defaults
    54 and 10; it takes no `keep`."""
    if prune not in KEYED:
        if options:
            raise ToolkitError(f"{prune} takes no key=value options (got {', '.join(options)})")
        return keep, ()
    options = dict(options or {})
    if prune == "divprune":
        if not options:
            options = {"share": keep if keep != 1.0 else 0.098}
        unknown = set(options) - {"share", "count"}
        if unknown or len(options) != 1:
            raise ToolkitError(f"divprune takes one keep option, a share (keep=9.8%) or a count (keep=56); got "
                               f"{', '.join(sorted(options))}")
        if "count" in options:
            count = options["count"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ToolkitError(f"divprune's keep count must be an integer >= 1, got {count!r}")
            return 1.0, (("count", count),)
        share = options["share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ToolkitError(f"divprune's kept share must be in (0%, 100%], got {share!r}")
        return float(share), (("share", float(share)),)
    if keep != 1.0:
        raise ToolkitError("visionzip takes dominant= and contextual= token counts, not a keep ratio")
    unknown = set(options) - {"dominant", "contextual"}
    if unknown:
        raise ToolkitError(f"visionzip takes dominant= and contextual=, not {', '.join(sorted(unknown))}")
    options = {"dominant": 54, "contextual": 10} | options
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ToolkitError(f"visionzip's {key} must be an integer >= 1, got {value!r}")
    return 1.0, tuple(sorted(options.items()))


def pdrop_options(options: dict | None, num_layers: int, min_split: int = 1) -> tuple:
    """PDrop's `RoutingPlan.prune_args`, checked: ``{"layers": [K_1, ...], "lambda": x}`` (either may be missing:
    `pdrop_default_layers`, 0.5). Stages strictly increasing in max(1, min_split)..L-1 (layer K_i ranks with its own
    q/k and is the first to see fewer tokens), lambda in (0, 1)."""
    options = dict(options or {})
    unknown = sorted(set(options) - {"layers", "lambda"})
    if unknown:
        raise ToolkitError(f"pdrop takes layers= and lambda=, not {', '.join(unknown)}")
    layers = options.get("layers", pdrop_default_layers(num_layers))
    if not isinstance(layers, (list, tuple)) or not layers or any(
            isinstance(k, bool) or not isinstance(k, int) for k in layers):
        raise ToolkitError(f"pdrop's layers must be a list of layer indices (e.g. layers=8/16/24), got {layers!r}")
    layers, first = tuple(layers), max(1, min_split)
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ToolkitError(f"pdrop's layers must increase strictly (e.g. layers=8/16/24), got "
                           f"{'/'.join(map(str, layers))}")
    if layers[0] < first or layers[-1] > num_layers - 1:
        raise ToolkitError(f"pdrop's layers must be in {first}..{num_layers - 1} for a {num_layers}-layer model, got "
                           f"{'/'.join(map(str, layers))}")
    lam = options.get("lambda", PDROP_LAMBDA)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < 1:
        raise ToolkitError(f"pdrop's lambda (the share kept from one stage to the next) must be in (0, 1), "
                           f"got {lam!r}")
    return (("lambda", float(lam)), ("layers", layers))


def read_pdrop(spec: str, part: str, layer: int | None, text: str | None) -> dict:
    """``pdrop[:layers=8/16/24,lambda=0.5]`` -> `pdrop_options`' dict (layers as written; checked there)."""
    if layer is not None:
        raise ToolkitError(f"cannot read plan '{spec}' at '{part}': pdrop takes its stages as layers=, "
                           "e.g. pdrop:layers=8/16/24,lambda=0.5")
    if text is not None and "layers=" in text and any("=" not in item for item in text.split(",")):  # 8,16,24
        raise ToolkitError(f"cannot read plan '{spec}' at '{part}': pdrop's layers are separated by '/' and its "
                           "parameters by ',', e.g. pdrop:layers=8/16/24,lambda=0.5")
    params, options = parse_params(text, spec), {}
    for key, value in params.items():
        if key == "layers":
            if not re.fullmatch(r"\d+(/\d+)*", value):
                raise ToolkitError(f"cannot read plan '{spec}': pdrop's layers are layer indices separated by '/', "
                                   f"e.g. layers=8/16/24, got '{value}'")
            options["layers"] = tuple(int(k) for k in value.split("/"))
        elif key == "lambda":
            options["lambda"] = _ratio(value, spec)
        else:
            raise ToolkitError(f"cannot read plan '{spec}' at '{part}': pdrop takes layers= and lambda=, e.g. "
                               "pdrop:layers=8/16/24,lambda=0.5")
    return options


def args_text(args: tuple) -> str:
    """A keyed pruning's options as the spec writes them: ``keep=9.8%``, ``keep=56``, ``dominant=54,contextual=10``,
    PDrop's ``layers=8/16/24,lambda=0.5``."""
    options = dict(args)
    if "lambda" in options:
        return f"layers={'/'.join(map(str, options['layers']))},lambda={options['lambda']:g}"
    if "share" in options:
        return f"keep={100 * options['share']:g}%"
    if "count" in options:
        return f"keep={options['count']}"
    return f"dominant={options['dominant']},contextual={options['contextual']}"


def read_keyed(name: str, spec: str, text: str | None) -> dict:
    """The options of a keyed pruning as written (``keep=9.8%``, ``keep=56``, ``dominant=54,contextual=10``) ->
    `keyed_options`' dict. A share needs its ``%`` and a count is an integer: nothing is guessed."""
    if text is None:
        return {}
    options: dict = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq:  # a bare ratio: kept or dropped? nothing is guessed
            raise ToolkitError(f"cannot read plan '{spec}' at '{item}': {name} takes explicit options, e.g. "
                               f"{name}:{','.join(f'{k}={v}' for k, v in KEYED[name].items())}")
        if key not in KEYED[name] or key in options or not re.fullmatch(r"[0-9]+(\.[0-9]+)?%?", value):
            raise ToolkitError(f"cannot read plan '{spec}' at '{item}': {name} takes "
                               f"{', '.join(f'{k}={v}' for k, v in KEYED[name].items())}")
        options[key] = value
    if name == "divprune":
        value = options.get("keep")
        if value is None:
            return {}
        if value.endswith("%"):
            return {"share": float(value[:-1]) / 100}
        if "." in value:
            raise ToolkitError(f"cannot read plan '{spec}': divprune's keep is a share with % (keep=9.8%) or a "
                               f"whole count (keep=56), not {value}")
        return {"count": int(value)}
    if any(not v.isdigit() for v in options.values()):
        raise ToolkitError(f"cannot read plan '{spec}': visionzip's dominant and contextual are token counts")
    return {k: int(v) for k, v in options.items()}


def _check_pruning(num_layers: int, prune: str, prune_layer: int | None, keep: float, min_split: int) -> int:
    """FastV's layer K in 1..L-1 (it reads attention at K-1), after any DeepStack layers; R in (0, 1]."""
    if prune not in PRUNERS:
        raise ToolkitError(f"unknown pruning '{prune}': use one of {', '.join(PRUNERS)}")
    if prune == "fastv" and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1):
        got = f"R={100 * (1 - keep):g}%" if isinstance(keep, (int, float)) and not isinstance(keep, bool) else \
            repr(keep)
        raise ToolkitError(f"FastV's R (the share dropped) must be in [0, 1) (e.g. R=50%), got {got}")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ToolkitError(f"keep ratio R must be in (0, 1] (e.g. 0.5 or 50%), got {keep!r}")
    if prune in PRE_LLM:
        if prune_layer not in (None, 0):
            raise ToolkitError(f"{prune} prunes before the LLM: it takes no layer (got {prune_layer})")
        return 0
    if not isinstance(prune_layer, int) or isinstance(prune_layer, bool) or not 1 <= prune_layer <= num_layers - 1:
        raise ToolkitError(f"FastV's layer K must be in 1..{num_layers - 1} for a {num_layers}-layer model "
                           f"(it reads the attention at layer K-1), got {prune_layer!r}")
    _check_deepstack_fastv(prune_layer, min_split)
    return prune_layer


def check_family(plan: RoutingPlan | None, model) -> None:
    """Refuse, from the config alone (before weights load), a keyed pre-LLM pruning this family cannot take: any of
    them where the positions read the image grid (M-RoPE: a pruned prompt would need a new grid; prune-pre refuses
    the same); VisionZip without a [CLS] tower (SigLIP, Qwen's merger: nothing to rank by) or with anyres crops
    (per-crop compression, no unpadding, no newline: not implemented)."""
    if plan is None or plan.prune not in (*KEYED, "pdrop"):
        return
    config = model if isinstance(model, PretrainedConfig) else model.config
    family = adapter_class(config)
    name = family.spec.name
    if plan.prune == "pdrop":
        if family.position_kwargs:  # its authors' contiguous renumbering is of 1D positions
            raise ToolkitError(f"pdrop renumbers the kept tokens' positions contiguously (its authors' code, 1D "
                               f"RoPE), but {name}'s positions read the image grid "
                               f"({', '.join(family.position_kwargs)}): not supported")
        return
    if plan.prune == "visionzip" and not family.tower_has_cls(config):
        raise ToolkitError(f"visionzip ranks by the vision tower's [CLS] attention; {name}'s tower "
                           f"({getattr(config.vision_config, 'model_type', '?')}) has no [CLS] token")
    if family.position_kwargs:
        raise ToolkitError(f"{plan.prune} prunes before the LLM, but {name}'s positions read the image grid "
                           f"({', '.join(family.position_kwargs)}): not supported (as for prune-pre)")
    if plan.prune == "visionzip" and (family.tiled or not isinstance(config.vision_feature_layer, int)):
        raise ToolkitError(f"visionzip on {name}: anyres crops (per-crop budgets, no unpadding, no newline) are not "
                           "implemented; it runs on single-tile LLaVA-1.5")


# Pre-LLM prunings that select within each image's run of image tokens: images with no token between them (a
# tokenizer that drops the newline after ``<image>``) would be one run, so several images per record are refused.
PER_RUN = ("divprune", "visionzip")


def check_records(plan: RoutingPlan | None, records) -> None:
    """One line naming the first record `plan` cannot route. Text-only records run as vanilla (nothing to route);
    several images are routed together by the in-LLM variants and budgets (a row's image tokens are one set) and
    by prune-pre / pool (fixed blocks of one image's tokens, in placeholder order), but not by `PER_RUN`."""
    if plan is None or plan.prune not in PER_RUN:
        return
    for r in records:
        if len(r.images) > 1:
            raise ToolkitError(f"record {r.id}: {len(r.images)} images; {plan.prune} compresses one image at a "
                               f"time and takes one image per record (in-LLM plans, prune-pre and pool take several)")


def out_of_range(split: int, num_layers: int, fusion_layers: int, side_depth: int, valid: range) -> str:
    """The one line for a split outside `valid`; K and d_v are named when they are not the defaults (1, 1)."""
    given = "" if (fusion_layers, side_depth) == (1, 1) else \
        f" with K={fusion_layers} fusion layer(s) and side depth {side_depth}"
    return (f"split {split} is out of range for a {num_layers}-layer model{given}: "
            f"choose {valid.start}..{valid.stop - 1}")


def _check_deepstack(split: int, min_split: int) -> None:
    if 1 <= split < min_split:
        raise ToolkitError(f"split {split} is inside the DeepStack layers (image features are still added after "
                           f"layers 0..{min_split - 1}): the first allowed split is {min_split}")


def _check_deepstack_fastv(prune_layer: int, min_split: int) -> None:
    if prune_layer < min_split:
        raise ToolkitError(f"FastV's layer K={prune_layer} is inside the DeepStack layers: use K >= {min_split}")


def check_fits(plan: RoutingPlan, num_layers: int, min_split: int) -> None:
    """Refuse a plan made for another model (`build` does not check a plan twice, only that it is this model's)."""
    if plan.num_layers != num_layers:
        raise ToolkitError(f"plan {plan.spec} is for a {plan.num_layers}-layer model; this one has {num_layers} "
                           "layers: make the plan for this model (routing.parse_plan)")
    if plan.routes:
        _check_deepstack(plan.split, min_split)
    if plan.prune in IN_LLM:
        _check_deepstack_fastv(plan.prune_layer, min_split)


# `vtw@auto[:eta=..,n=..,seed=..]`: VTW's layer chosen by its KL search on data (routing.vtw), VTW's own defaults
# (eta 0.003 as its code uses for LLaVA-1.5-7B, n 20 as its README's `--limit 20`; the seed draws the sample)
_VTW_AUTO = re.compile(r"^vtw@auto(?::(?P<params>.*))?$")
VTW_AUTO_DEFAULTS = {"eta": 0.003, "n": 20, "seed": 0}


def parse_vtw_auto(spec: str) -> dict | None:
    """``{"eta", "n", "seed"}`` of a ``vtw@auto[:eta=0.003,n=20,seed=0]`` spec (None for any other spec): eta a
    finite number >= 0, n an integer >= 1, seed an integer >= 0; anything else is one line naming the part."""
    m = _VTW_AUTO.match(spec.strip())
    if m is None:
        return None
    ascii_digits_only(spec)
    params, raw = dict(VTW_AUTO_DEFAULTS), m["params"]
    for item in [] if raw is None else raw.split(","):
        key, eq, value = item.strip().partition("=")
        if key not in VTW_AUTO_DEFAULTS or not eq:
            raise ToolkitError(f"cannot read plan '{spec}' at '{item}': vtw@auto takes eta=, n= and seed= "
                               "(e.g. vtw@auto:eta=0.003,n=20)")
        params[key] = _auto_value(spec, key, value.strip())
    return params


def shown(text: str, limit: int = 24) -> str:
    """`text` as an error message quotes it: cut after `limit` characters (a 5000-digit layer is not echoed)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def non_ascii_digits(text: str) -> bool:
    """Whether `text` holds a digit other than ASCII 0-9 (full-width ６, Arabic-Indic ٦, ...)."""
    return any(c.isdigit() and not c.isascii() for c in text)


def ascii_digits_only(spec: str) -> None:
    """Refuse a spec with a digit other than ASCII 0-9, naming it (``vtw@６`` is not vtw@6)."""
    if non_ascii_digits(spec):
        digit = next(c for c in spec if c.isdigit() and not c.isascii())
        raise ToolkitError(f"cannot read plan '{shown(spec, 60)}': '{digit}' is not an ASCII digit (write numbers "
                           "with 0-9)")


def _auto_value(spec: str, key: str, value: str) -> float | int:
    pattern = _REAL if key == "eta" else _COUNT
    number = (float(value) if key == "eta" else int(value)) if pattern.fullmatch(value) else None
    if key == "eta" and (number is None or not math.isfinite(number) or number < 0):
        raise ToolkitError(f"plan '{spec}': eta must be a number >= 0 (VTW's KL budget, e.g. 0.003), got '{value}'")
    if key != "eta" and (number is None or number < (1 if key == "n" else 0)):
        least = "1 (calibration samples)" if key == "n" else "0"
        raise ToolkitError(f"plan '{spec}': {key} must be an integer >= {least}, got '{value}'")
    return number


_PART = re.compile(r"^(?P<name>[a-z-]+)(?:@(?P<layer>[^:]*))?(?::(?P<params>.+))?$")
_RATIO = re.compile(r"^[0-9.]+%?$")
# Numbers in a plan are ASCII: Python's int() and float() also read full-width (６) and Arabic-Indic (٦) digits and
# underscores (1_0), which a spec must not silently turn into vtw@6. A layer index has at most 6 digits (int() of
# thousands of digits raises past sys.int_info's limit).
_LAYER = re.compile(r"[0-9]{1,6}", re.ASCII)
_COUNT = re.compile(r"[0-9]{1,9}", re.ASCII)
_REAL = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?", re.ASCII)
_PARAM = re.compile(r"^(?P<key>[A-Za-z_-]+)=(?P<value>[^=,]+)$")
EXAMPLES = ("lf@6, fastv@2:R=50%, fastv@2:R=75%,rank=all, pdrop:layers=8/16/24,lambda=0.5, prune-pre:25% or "
            "lf@6+prune-pre:50%")


def _ratio(text: str, spec: str) -> float:
    """``50%`` or ``0.5`` -> 0.5; anything else is one line naming `spec`."""
    if not _RATIO.match(text):
        raise ToolkitError(f"cannot read plan '{shown(spec, 60)}': '{shown(text)}' is not a ratio (write e.g. 50% "
                           "or 0.5)")
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ToolkitError(f"cannot read plan '{shown(spec, 60)}': '{shown(text)}' is not a ratio (write e.g. 50% "
                           "or 0.5)") from None


def _layer(text: str | None, part: str, spec: str) -> int | None:
    """The layer after ``@``: ASCII digits, at most 6 of them (no model has a million layers)."""
    if text is None:
        return None
    if not _LAYER.fullmatch(text):
        too_long = text.isascii() and text.isdigit()
        raise ToolkitError(f"cannot read plan '{shown(spec, 60)}' at '{shown(part)}': "
                           + (f"layer {shown(text, 12)} is far past any model's depth" if too_long else
                              f"'@{shown(text)}' is not a layer number (write e.g. {EXAMPLES})"))
    return int(text)


def parse_params(text: str | None, spec: str) -> dict[str, str]:
    """A pruner's parameters after ``:``: a bare ratio (``50%``: key ``""``) or ``key=value`` pairs separated by
    commas (``R=75%,rank=all``); keys are read case-insensitively, each once."""
    if text is None:
        return {}
    if _RATIO.match(text):
        return {"": text}
    params: dict[str, str] = {}
    for item in text.split(","):
        m = _PARAM.match(item.strip())
        if not m:
            raise ToolkitError(f"cannot read plan '{spec}' at '{item}': parameters are key=value pairs separated "
                               f"by commas, e.g. fastv@2:R=75%,rank=all")
        key = m["key"].lower()
        if key in params:
            raise ToolkitError(f"plan '{spec}' gives '{m['key']}' twice")
        params[key] = m["value"].strip()
    return params


def _fastv_params(params: dict[str, str], part: str, spec: str) -> dict:
    """FastV's ``R`` (the share DROPPED, as its scripts and paper write it) and its ``rank`` rule."""
    if "" in params:  # the old spelling kept R: its meaning flipped, so it is refused rather than reread
        old = _ratio(params[""], spec)
        if not 0 < old <= 1:  # no R to suggest: the old ratio was out of range too
            raise ToolkitError(f"plan '{spec}': '{part}' is the old spelling (a kept share, here out of range); "
                               f"FastV's R is the share dropped: write e.g. {part.split(':')[0]}:R=50%")
        suggestion = spec.replace(part, f"{part.split(':')[0]}:R={100 * (1 - old):g}%")
        raise ToolkitError(f"plan '{spec}': '{part}' is the old spelling (it KEPT {100 * old:g}%); FastV's R is the "
                           f"share dropped: write {suggestion}")
    unknown = sorted(set(params) - {"r", "rank"})
    if unknown:
        raise ToolkitError(f"plan '{spec}': fastv takes R (the share dropped) and rank, not {', '.join(unknown)}")
    if "r" not in params:
        raise ToolkitError(f"plan '{spec}': fastv needs R, the share of image tokens dropped, e.g. fastv@2:R=50%")
    drop = _ratio(params["r"], spec)
    if not 0 <= drop < 1:
        raise ToolkitError(f"FastV's R (the share dropped) must be in [0, 1) (e.g. R=50%), got {params['r']}")
    return {"keep": 1.0 - drop, "rank": params.get("rank", "last")}


def _keep_params(name: str, params: dict[str, str], spec: str) -> dict:
    """A pre-LLM pruner's kept share: a bare ratio (``prune-pre:25%``) or ``keep=25%``."""
    unknown = sorted(set(params) - {"", "keep"})
    if unknown:
        raise ToolkitError(f"plan '{spec}': {name} takes a keep ratio (e.g. {name}:50%), not {', '.join(unknown)}")
    if "" in params and "keep" in params:
        raise ToolkitError(f"plan '{spec}' gives {name}'s keep ratio twice")
    text = params.get("", params.get("keep"))
    if text is None:
        raise ToolkitError(f"plan '{spec}': {name} needs a keep ratio, e.g. {name}:50%")
    return {"keep": _ratio(text, spec)}


def split_specs(text: str) -> list[str]:
    """A comma-separated list of plan specs, where a spec's own ``key=value`` parameters also follow commas:
    ``vanilla,fastv@2:R=75%,rank=all,lf`` -> ``["vanilla", "fastv@2:R=75%,rank=all", "lf"]`` (a piece with ``=``
    and no ``:`` or ``@`` continues the spec before it: no plan name holds ``=``)."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if specs and "=" in piece and not any(c in piece for c in ":@+"):
            specs[-1] = f"{specs[-1]},{piece}"
        else:
            specs.append(piece)
    return specs


def parse_spec(spec: str) -> dict:
    """A plan written as one word: ``vanilla``, ``lf@6``, ``vtw@6``, ``fastv@2:R=50%``, ``fastv@3:R=75%,rank=all``,
    ``prune-pre:25%``, ``pool:0.25``, ``lf@6+prune-pre:50%``, ``lf@6+fastv@2:R=50%`` (``lf`` with no ``@`` = the
    recommended split). A pruner's parameters follow ``:`` as comma-separated ``key=value`` pairs (`parse_params`);
    the pre-LLM pruners also take a bare kept share. FastV's R is the share DROPPED (its own notation); the old
    ``fastv@2:25%`` (which kept 25%) is refused with the new spelling.

    Keyed prunings take explicit options only: ``divprune:keep=9.8%``, ``divprune:keep=56``,
    ``visionzip:dominant=54,contextual=10`` (``divprune`` alone: the authors' defaults). PDrop: ``pdrop`` (its
    authors' stages scaled to the depth, lambda 0.5) or ``pdrop:layers=8/16/24,lambda=0.5`` (``/`` in the list).

    Returns ``{"variant", "split" (None = recommended), "prune", "prune_layer", "keep", "rank"}`` and, for a keyed
    pruning, ``"prune_args"`` (`keyed_options`' dict); `variant` None is vanilla. ``vtw@auto[:eta=..,n=..,seed=..]``
    (VTW's layer from its KL search, `routing.vtw`) adds ``"auto"``: its params. Raises ToolkitError naming the part
    it cannot read.
    """
    ascii_digits_only(spec)
    auto = parse_vtw_auto(spec)
    if auto is not None:  # a layer found on data: `plan_from_spec` cannot make it, `routing.vtw.resolve_auto` can
        return {"variant": "vtw", "split": None, "prune": None, "prune_layer": None, "keep": 1.0, "rank": None,
                "auto": auto}
    parts = [p.strip() for p in spec.strip().split("+")]
    parsed = []
    for part in parts:
        m = _PART.match(part)
        if not m:
            raise ToolkitError(f"cannot read plan '{shown(spec, 60)}' at '{shown(part)}': write e.g. {EXAMPLES}")
        parsed.append((m["name"], _layer(m["layer"], part, spec), m["params"], part))
    (name, layer, params, part), rest = parsed[0], parsed[1:]
    if name == "vanilla" and not rest and layer is None and params is None:
        return {"variant": None, "split": None, "prune": None, "prune_layer": None, "keep": 1.0, "rank": None}
    if name not in ALL_VARIANTS or len(rest) > 1 or (rest and (name not in VARIANTS or rest[0][0] not in PRUNERS)):
        raise ToolkitError(f"cannot read plan '{spec}': one of vanilla, {', '.join(ALL_VARIANTS)}, optionally "
                           f"+ one of {', '.join(PRUNERS)} after lf/pc/kv/lf-ideal")
    if name in PRUNERS:
        rest, layer = [(name, layer, params, part)], None
    elif params is not None:
        head = part.split(":")[0]  # a pruning composes after the variant with +
        raise ToolkitError(f"cannot read plan '{spec}': '{name}' takes no keep ratio or parameters (a pruning "
                           f"composes after it with +, e.g. {head}+prune-pre:50%)")
    if not rest:
        return {"variant": name, "split": layer, "prune": None, "prune_layer": None, "keep": 1.0, "rank": None}
    prune, prune_layer, text, part = rest[0]
    if prune in KEYED:  # divprune:keep=9.8%, visionzip:dominant=54,contextual=10: explicit options, no layer
        if prune_layer is not None:
            raise ToolkitError(f"cannot read plan '{spec}' at '{part}': {prune} takes no layer and explicit options, "
                               f"e.g. {prune}:{','.join(f'{k}={v}' for k, v in KEYED[prune].items())}")
        return {"variant": name, "split": layer, "prune": prune, "prune_layer": None, "keep": 1.0, "rank": None,
                "prune_args": read_keyed(prune, spec, text)}
    if prune == "pdrop":
        return {"variant": name, "split": layer, "prune": prune, "prune_layer": None, "keep": 1.0, "rank": None,
                "prune_args": read_pdrop(spec, part, prune_layer, text)}
    values = parse_params(text, spec)
    if prune == "fastv":
        if prune_layer is None:
            raise ToolkitError(f"plan '{spec}': fastv needs its layer, e.g. fastv@2:R=50%")
        read = _fastv_params(values, part, spec)
    else:
        read = {**_keep_params(prune, values, spec), "rank": None}
    return {"variant": name, "split": layer, "prune": prune, "prune_layer": prune_layer, **read}


def plan_from_spec(parsed: dict, num_layers: int, default_split: int | None, fusion_layers: int = 1,
                   side_depth: int = 1, min_split: int = 1, spec: str | None = None) -> RoutingPlan | None:
    """`parse_spec`'s answer as a plan for an L-layer model (None for vanilla); `default_split` fills a missing @S
    (None: a plan that needs one is one line naming `spec`)."""
    variant = parsed["variant"]
    if variant is None:
        return None
    if parsed.get("auto") is not None:
        raise ToolkitError(f"plan '{spec or 'vtw@auto'}' chooses VTW's layer by a KL search on data: write a "
                           f"layer (e.g. vtw@{num_layers // 2}), "
                           "or resolve it with routing.vtw.resolve_auto(spec, model, processor, records) (the CLI's "
                           "`routing compare --plans` and `routing save-plan --plan` do, on --data)")
    if variant in PRUNERS:  # the pruning carries its own layer; the split is the model's depth
        split = 0
    elif parsed["split"] is not None:
        split = parsed["split"]
    elif default_split is None:
        raise ToolkitError(f"plan '{spec or variant}' needs its split: write e.g. {variant}@{num_layers // 2} (or "
                           "pass --split S)")
    else:
        split = default_split
    return make_plan(num_layers, split, variant, fusion_layers, side_depth, min_split,
                     prune=parsed["prune"], prune_layer=parsed["prune_layer"], keep=parsed["keep"],
                     rank=parsed.get("rank"), prune_args=parsed.get("prune_args"))


def geometry(model) -> tuple[int, int]:
    """``(num_layers, min_split)`` of a loaded model, or of its config alone (plans checked before weights load)."""
    if isinstance(model, PretrainedConfig):
        return model.text_config.num_hidden_layers, adapter_class(model).first_split(model)
    a = adapter_for(model)
    return a.num_layers, a.min_split


def parse_plan(spec: str, model, *, split: int | None = None, fusion_layers: int = 1,
               side_depth: int = 1) -> RoutingPlan | None:
    """The plan `spec` (`parse_spec`: ``vanilla``, ``lf@6``, ``vtw@6``, ``fastv@2:R=50%``, ``prune-pre:25%``,
    ``pool:0.25``, ``lf@6+prune-pre:50%``, ...) for `model` (a loaded model or its config), checked once against its
    depth and first allowed split. None for vanilla. `split` fills a spec written without ``@S`` (the caller's
    --split or the probe's recommendation); `fusion_layers` and `side_depth` are K and d_v of a side branch."""
    parsed = parse_spec(spec)
    if parsed["variant"] is None:
        return None
    num_layers, min_split = geometry(model)
    plan = plan_from_spec(parsed, num_layers, split, fusion_layers, side_depth, min_split, spec=spec)
    check_family(plan, model)
    return plan


def plan_for(model, split: int, variant: str = "lf", fusion_layers: int = 1, side_depth: int = 1, *,
             prune: str | None = None, prune_layer: int | None = None, keep: float = 1.0,
             rank: str | None = None, prune_args: dict | None = None) -> RoutingPlan:
    """`make_plan` for `model` (a loaded model or its config): its depth and first allowed split filled in."""
    num_layers, min_split = geometry(model)
    plan = make_plan(num_layers, split, variant, fusion_layers, side_depth, min_split, prune=prune,
                     prune_layer=prune_layer, keep=keep, rank=rank, prune_args=prune_args)
    check_family(plan, model)
    return plan


def manifest_pruning(manifest: dict) -> dict:
    """The plan's pruning keywords from a manifest (absent in artifacts from before issue 17: none). A FastV
    manifest holds its R (``drop``) and ``rank``; one without them was saved under the old spelling, whose ratio
    meant the share KEPT and whose ranking was the text rows' mean: it is refused, not silently reread."""
    prune, layer, keep = manifest.get("prune"), manifest.get("prune_layer"), manifest.get("keep", 1.0)
    if prune is None:
        return {}
    if not isinstance(prune, str) or (layer is not None and (not isinstance(layer, int) or isinstance(layer, bool))) \
            or isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ToolkitError(f"malformed pruning in routing manifest: prune={prune!r} prune_layer={layer!r} keep={keep!r}")
    if prune != "fastv":  # a rank here is refused by make_plan (it is FastV's alone)
        args = manifest.get("prune_args")
        if args is not None and not isinstance(args, dict):
            raise ToolkitError(f"malformed pruning in routing manifest: prune_args={args!r} (a JSON object)")
        return {"prune": prune, "prune_layer": layer, "keep": keep, "rank": manifest.get("rank")} | (
            {"prune_args": args} if args else {})
    drop, rank = manifest.get("drop"), manifest.get("rank")
    if drop is None and rank is None:
        raise ToolkitError(f"this FastV plan ({manifest.get('spec', 'fastv')}) was saved under the old spelling, "
                           f"whose ratio was the share KEPT, ranked by the text rows: save it again as "
                           f"fastv@{layer}:R={100 * (1 - keep):g}%,rank=text (the same rule) or "
                           f"fastv@{layer}:R={100 * (1 - keep):g}% (FastV's own ranking)")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or abs(drop - (1 - keep)) > 1e-9 \
            or not isinstance(rank, str):
        raise ToolkitError(f"malformed FastV pruning in routing manifest: drop={drop!r} keep={keep!r} rank={rank!r}")
    return {"prune": prune, "prune_layer": layer, "keep": keep, "rank": rank}
