"""The routing plan: which layer groups a DPVR variant runs, on which positions, with which cache layout.

One plan describes all four variants; the routed model walks it (`routing.model`), the FLOP model prices it
(`routing.flops`) and the artifact records it (`routing.artifact`).

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
"""

from __future__ import annotations

from dataclasses import dataclass

from saturation.errors import ToolkitError
from saturation.recommend import split_range

VARIANTS = ("lf", "pc", "kv", "lf-ideal")
DEEP_MODE = {"lf": "text_only", "lf-ideal": "text_only", "pc": "reset", "kv": "kv_only"}
LAYOUT_OF_MODE = {"text_only": "text", "reset": "full", "kv_only": "kv"}


@dataclass(frozen=True)
class RoutingPlan:
    """A DPVR variant as layer groups over a decoder of `num_layers` layers."""

    variant: str
    num_layers: int  # L
    split: int  # s: the first layer that no longer sees image tokens the vanilla way
    fusion_layers: int  # K: the last K layers run on every position again
    side_depth: int  # d_v: side-branch layers, initialised from layers s .. s+d_v-1

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
        """The cache layout of base layer `layer`: ``full``, ``text`` or ``kv``."""
        return LAYOUT_OF_MODE[self.deep_mode] if layer in self.deep else "full"

    def first_layer(self, layout: str) -> int:
        """The first base layer with `layout` (its cache slot sizes that layout's decode mask)."""
        return next(i for i in range(self.num_layers) if self.layout(i) == layout)

    @property
    def layouts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.layout(i) for i in range(self.num_layers)))

    @property
    def trainable(self) -> bool:
        """Whether the loss has a path to the side branch: it needs a fusion layer, or deep layers that read it."""
        return self.fusion_layers > 0 or (self.deep_mode != "text_only" and len(self.deep) > 0)

    def describe(self) -> str:
        """One line per group, e.g. for `routing train` logs."""
        def span(r: range) -> str:
            return f"{r.start}..{r.stop - 1}" if len(r) else "-"

        return "\n".join([
            f"variant {self.variant}: L={self.num_layers} s={self.split} K={self.fusion_layers} d_v={self.side_depth}",
            f"  shallow {span(self.shallow)}: all positions",
            f"  side    copies of {span(self.side_sources)}: image positions (trainable)",
            f"  deep    {span(self.deep)}: {self.deep_mode}",
            f"  fusion  {span(self.fusion)}: all positions, image from side branch",
        ])


def make_plan(num_layers: int, split: int, variant: str = "lf", fusion_layers: int = 1,
              side_depth: int = 1, min_split: int = 1) -> RoutingPlan:
    """Validate a variant's geometry. `lf-ideal` always has K=0 (that is what makes it ideal and untrainable).
    `min_split`: the backbone's first allowed split (after Qwen3-VL's DeepStack layers)."""
    if variant not in VARIANTS:
        raise ToolkitError(f"unknown routing variant '{variant}': use one of {', '.join(VARIANTS)}")
    if variant == "lf-ideal":
        fusion_layers = 0
    elif variant == "lf" and fusion_layers == 0:
        raise ToolkitError("variant 'lf' needs fusion_layers >= 1; with no fusion layer it is 'lf-ideal'")
    if not isinstance(split, int) or isinstance(split, bool):
        raise ToolkitError(f"split must be an integer layer index, got {split!r}")
    valid = split_range(num_layers, fusion_layers, side_depth, min_split)  # one definition, shared with the probe
    if 1 <= split < min_split:
        raise ToolkitError(f"split {split} is inside the DeepStack layers (image features are still added after "
                           f"layers 0..{min_split - 1}): the first allowed split is {min_split}")
    if split not in valid:
        raise ToolkitError(f"split {split} is out of range for a {num_layers}-layer model with K={fusion_layers} "
                           f"fusion layer(s) and side depth {side_depth}: choose {valid.start}..{valid.stop - 1}")
    return RoutingPlan(variant, num_layers, split, fusion_layers, side_depth)
