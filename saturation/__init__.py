"""Saturation probe: model loading, anatomy, LLaVA-format data, probes and the split recommendation.

Public names are imported lazily so that `saturation --help` does not pay for importing torch.
The anatomy map itself is `saturation.anatomy.anatomy(model)` (the module shares its name).
"""

from importlib import import_module

from .errors import ToolkitError

__version__ = "0.1.0"

_LAZY = {
    "Anatomy": "anatomy",
    "BackboneSpec": "anatomy",
    "position_ids_from_mask": "anatomy",
    "load_llava": "loading",
    "ProbeConfig": "probe",
    "run_probe": "probe",
}
__all__ = ["ToolkitError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'saturation' has no attribute {name!r}")
