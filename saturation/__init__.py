"""Saturation probe, on top of the model layer (`saturation.core`: loading, adapters, data) it shares with routing.

Public names are imported lazily so that `saturation --help` does not pay for importing torch.
"""

from importlib import import_module

from saturation.core.errors import ToolkitError

__version__ = "0.1.0"

_LAZY = {
    "Adapter": "core.adapters",
    "BackboneSpec": "core.adapters",
    "ModuleMap": "core.adapters",
    "LayerMap": "core.adapters",
    "adapter_for": "core.adapters",
    "position_ids_from_mask": "core.adapters",
    "load_model": "core.loading",
    "load_llava": "core.loading",
    "DataSpec": "core.sources",
    "open_source": "core.sources",
    "load_records": "core.sources",
    "ProbeConfig": "probe",
    "run_probe": "probe",
}
__all__ = ["ToolkitError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'saturation' has no attribute {name!r}")
