"""DPVR routing: the routed model (one plan, four variants), cached generation, the FLOP model, save/load.

``routing.build(model, split, variant="lf", fusion_layers=1, side_depth=1)`` routes a loaded LLaVA;
``routing.load(model, dir)`` rebuilds a saved routing on its base; ``routing.flops`` prices any geometry.
"""

from . import flops
from .artifact import load, save_routing
from .model import RoutedLlava, RoutedModel, TrainableReport, build
from .plan import VARIANTS, RoutingPlan, make_plan

__all__ = ["VARIANTS", "RoutedLlava", "RoutedModel", "RoutingPlan", "TrainableReport", "build", "flops", "load", "make_plan",
           "save_routing"]
