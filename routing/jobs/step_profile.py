"""Where one training step's time goes, per group of the routing plan (``routing bench --train``).

Forward hooks on the decoder layers and the side branch time each group; the step's remaining forward time is the
head and loss (after the last layer) and ``other`` (before and between layers: masks, rotary tables, the routing's
gathers and merges, PC's resets, KV's image K/V projections). The hooks live only inside `hooked`, in rounds of
their own: the timed steps and every normal forward carry no instrumentation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

GROUPS = ("shallow", "side", "deep", "fusion", "head+loss", "other", "backward")


def layer_groups(routed) -> dict[torch.nn.Module, str]:
    """Each decoder layer (and side-branch layer) of `routed` -> its group in the plan."""
    plan, layers = routed.plan, routed.adapter.layers
    groups = {layers[i]: name for name in ("shallow", "deep", "fusion") for i in getattr(plan, name)}
    return groups | {layer: "side" for layer in routed.side}


@contextmanager
def hooked(routed, now: Callable[[], float], totals: dict[str, float], marks: dict[str, float]) -> Iterator[None]:
    """While open, every layer call adds its time to ``totals[group]``; ``marks["last_exit"]`` is when the last
    layer call ended. `now` reads the clock (after synchronising the device)."""
    handles = []
    for layer, group in layer_groups(routed).items():
        def enter(_m, _args):
            marks["enter"] = now()

        def leave(_m, _args, _out, group=group):
            marks["last_exit"] = t = now()
            totals[group] += t - marks["enter"]

        handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def step_breakdown(routed, inputs: dict, now: Callable[[], float]) -> dict[str, float]:
    """Seconds per group (`GROUPS`) of one forward + backward of `routed` on `inputs` (with labels); the groups add
    up to the step."""
    totals = dict.fromkeys(GROUPS, 0.0)
    marks: dict[str, float] = {}
    with hooked(routed, now, totals, marks):
        start = now()
        loss = routed(**inputs).loss
        end = now()
    layers = sum(totals[g] for g in ("shallow", "side", "deep", "fusion"))
    totals["head+loss"] = end - marks["last_exit"]
    totals["other"] = end - start - layers - totals["head+loss"]
    loss.backward()
    totals["backward"] = now() - end
    routed.zero_grad(set_to_none=True)
    return totals
