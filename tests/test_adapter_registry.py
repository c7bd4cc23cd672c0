"""What the families declare (aliases, presets, kwargs, processors, tokens) is consistent, and the rest of the toolkit
reads it through the registry: a new family is one module in saturation/core/adapters/."""

import inspect

import pytest

from saturation.core import adapters, data, geometry, loading
from saturation.core.adapters import FAMILIES, LayerMap, ModuleMap

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)


def test_each_name_is_declared_once():
    for table in ("aliases", "presets"):
        names = [name for cls in FAMILIES for name in getattr(cls, table)]
        assert len(names) == len(set(names)), table
    assert loading.ALIASES == adapters.ALIASES and loading.resolve_name("llava-1.5-7b") == "llava-hf/llava-1.5-7b-hf"


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_a_family_declares_consistent_kwargs_and_a_nested_map(cls):
    assert isinstance(cls.spec, ModuleMap) and isinstance(cls.spec.submodules, LayerMap)
    assert set(cls.sequence_kwargs) <= set(cls.image_kwargs) and set(cls.per_image_kwargs) <= set(cls.image_kwargs)
    assert set(cls.special_tokens) == set() or cls.turn_tokens  # a family with its own tokens has its turn markers


@pytest.mark.parametrize("name", list(adapters.PRESETS))
def test_a_preset_builds_its_own_family_with_its_dtype(name):
    cls = next(c for c in FAMILIES if name in c.presets)
    config = geometry.geometry_config(name, layers=2)
    assert config.model_type in cls.spec.model_types and config.text_config.num_hidden_layers == 2
    assert geometry.CHECKPOINT_DTYPE[name] is cls.presets[name].dtype


def test_the_toolkit_reads_the_declarations():
    assert data.SEQUENCE_KEYS == adapters.SEQUENCE_KWARGS
    assert data.image_input_keys() == ("pixel_values", *adapters.IMAGE_KWARGS)
    for model_type, processor in adapters.IMAGE_ONLY_PROCESSORS.items():
        assert getattr(loading, processor.__name__) is processor, model_type
    with pytest.raises(AttributeError):
        _ = loading.NoSuchProcessor
    from routing.model import RoutedModel

    params = inspect.signature(RoutedModel.forward).parameters  # what HF generate() validates model kwargs against
    assert all(params[k].default is None for k in adapters.IMAGE_KWARGS) and "image_kwargs" in params
