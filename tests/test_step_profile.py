"""routing.jobs.step_profile: where a training step goes, by layer group (routing bench --train's breakdown)."""

from __future__ import annotations

from routing_fixtures import make_batch, tiny_llava

import routing


def test_step_breakdown_leaves_no_hooks_and_adds_up():
    """The hooks exist only during the breakdown; its groups add up to the step's clock readings.

    A clock that ticks once per reading makes this exact (a wall clock made it flaky on a shared machine): each layer
    call is one tick (enter, leave), so a group's total is its number of layer calls, and the groups sum to the
    ticks between the first reading and the last."""
    import itertools

    from routing.jobs.step_profile import step_breakdown

    model, split, batch = tiny_llava(), 2, make_batch("mixed", "left")  # ragged: a row without an image, one with two
    routed = routing.build(model, split, "lf").train()
    ticks = itertools.count()
    try:
        parts = step_breakdown(routed, batch, lambda: float(next(ticks)))
    finally:
        routed.eval()
    readings = next(ticks)
    assert sum(parts.values()) == readings - 1
    plan = routed.plan
    assert parts["shallow"] == len(plan.shallow) and parts["deep"] == len(plan.deep)
    assert parts["fusion"] == len(plan.fusion) and parts["side"] == len(routed.side)
    assert parts["backward"] == 1 and parts["head+loss"] == 1
    layers = [*routed.adapter.layers, *routed.side]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in layers)
    assert all(p.grad is None for p in routed.side.parameters())
