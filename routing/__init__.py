"""DPVR routing: the routed model (one plan, four variants and the training-free peers), cached generation, the FLOP
model, save/load.

A plan is one object, made once and checked once: ``plan = routing.parse_plan("lf@6+prune-pre:50%", model)``
(any spec the command line takes; None for ``vanilla``), then ``routing.build(model, plan)`` routes the loaded model
along it. ``plan.to_manifest()`` / ``RoutingPlan.from_manifest(d)`` write and read it as a saved artifact's
``routing.json`` does; ``routing.load(model, dir)`` rebuilds a saved routing on its base; ``routing.flops`` prices any
geometry; ``routing.kept_image_tokens(routed, **inputs)`` lists, per row, the original prompt positions of the image
tokens a plan keeps (FastV's survivors, a pre-LLM pruning's). (``routing.build(model, split, variant="lf",
fusion_layers=1, side_depth=1)``, the older form, is kept for one release.)
"""

from . import flops
from .artifact import save_routing
from .model import RoutedLlava, RoutedModel, TrainableReport, build, kept_image_tokens, kept_image_tokens_per_stage
from .plan import VARIANTS, RoutingPlan, make_plan, parse_plan
from .saved import load

__all__ = ["VARIANTS", "RoutedLlava", "RoutedModel", "RoutingPlan", "TrainableReport", "build", "flops",
           "kept_image_tokens", "kept_image_tokens_per_stage", "load", "make_plan", "parse_plan", "save_routing"]
