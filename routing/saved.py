"""A saved routing back on its base (`load`), and a training-free plan saved as one (`save_plan`).

`routing.artifact` is the file format (it knows no routed model, so that `routing.model` can save through it);
this module sits above both: it reads an artifact's plan, builds the routed model and fills its side branch.
"""

from __future__ import annotations

from pathlib import Path

from saturation.core.errors import ToolkitError

from .artifact import artifact_dir, check_base, load_side, read_artifact, save_routing
from .model import RoutedModel, build
from .plan import RoutingPlan, parse_plan


def load(model, directory) -> RoutedModel:
    """Rebuild a saved routing on `model` (`directory`: the artifact or a `routing train` run folder).

    Refuses a mismatched base or a damaged artifact with a `ToolkitError`.
    """
    directory = artifact_dir(directory)
    manifest, plan = read_artifact(directory)
    check_base(model, manifest, f"'{directory}'")
    routed = build(model, plan)
    load_side(routed, directory)
    return routed


def training_free_plan(spec: str, model, split: int | None = None) -> RoutingPlan:
    """The plan `spec` (``vtw@6``, ``fastv@2:R=50%``, ``prune-pre:25%``, ``pool:25%``, ``lf-ideal@6``) for `model` (a
    loaded model or its config: checked before any weights load); `split` fills a missing ``@S``. Vanilla and plans
    with a side branch to train (``routing train --plan``) are one line."""
    plan = parse_plan(spec, model, split=split)
    if plan is None:
        raise ToolkitError("the vanilla plan needs no artifact: leave --routing out")
    if plan.trainable:
        raise ToolkitError(f"plan '{plan.spec}' has a side branch to train: use `routing train --plan {plan.spec}` "
                           "(save-plan saves training-free plans)")
    return plan


def save_plan(model, plan: RoutingPlan, directory, calibration: dict | None = None) -> Path:
    """Save a training-free plan (`training_free_plan`) on `model` as an artifact, so every command's ``--routing``
    and the lmms-eval plugin's ``routing=`` take it. `calibration` (``VtwSearch.to_dict()`` of a ``vtw@auto``):
    how its layer was found, kept in ``routing.json`` under ``calibration`` (loading ignores it)."""
    return save_routing(build(model, plan), directory, None if calibration is None else {"calibration": calibration})
