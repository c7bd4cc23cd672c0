"""Save/load of a routing: only the side branch and the plan are written; a mismatched base is refused."""

from __future__ import annotations

import json

import pytest
import torch
from routing_fixtures import make_batch, tiny_llava, without_labels
from safetensors.torch import load_file

import routing
from saturation import __version__
from saturation.errors import ToolkitError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An LF routing whose side branch moved away from its initial copy, saved once."""
    model = tiny_llava(seed=0)
    model.config._name_or_path = "org/tiny-llava"
    routed = routing.build(model, 2, "lf", fusion_layers=1, side_depth=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in routed.side.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    directory = tmp_path_factory.mktemp("routing")
    routed.save_routing(directory)
    return model, routed, directory


def test_round_trip_gives_identical_logits(trained):
    model, routed, directory = trained
    loaded = routing.load(model, directory)
    batch = without_labels(make_batch("mixed", "left"))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, routed(**batch).logits)
    assert loaded.plan == routed.plan


def test_only_what_is_new_is_written(trained):
    model, routed, directory = trained
    assert sorted(p.name for p in directory.iterdir()) == ["routing.json", "side_branch.safetensors"]
    weights = load_file(str(directory / "side_branch.safetensors"))
    assert sum(w.numel() for w in weights.values()) == routed.trainable_parameters().trainable
    manifest = json.loads((directory / "routing.json").read_text())
    assert {k: manifest[k] for k in ("split", "variant", "fusion_layers", "side_depth", "base_model",
                                     "toolkit_version")} == {
        "split": 2, "variant": "lf", "fusion_layers": 1, "side_depth": 2, "base_model": "org/tiny-llava",
        "toolkit_version": __version__}


@pytest.mark.parametrize("other", ["geometry", "weights", "name"])
def test_a_mismatched_base_is_refused(trained, other):
    _, _, directory = trained
    base = {"geometry": lambda: tiny_llava(layers=5), "weights": lambda: tiny_llava(seed=1),
            "name": lambda: tiny_llava(seed=0)}[other]()
    base.config._name_or_path = "org/other-llava" if other == "name" else "org/tiny-llava"
    with pytest.raises(ToolkitError, match="routing .* (built on|does not fit)"):
        routing.load(base, directory)


def test_the_same_base_elsewhere_and_in_another_dtype_is_accepted(trained, tmp_path):
    _, routed, directory = trained
    base = tiny_llava(seed=0).to(torch.bfloat16)
    base.config._name_or_path = "/models/tiny-llava"  # a local copy of org/tiny-llava
    loaded = routing.load(base, directory)
    assert next(loaded.side.parameters()).dtype == torch.bfloat16


def test_not_a_routing_directory(tmp_path):
    with pytest.raises(ToolkitError, match="not a routing directory"):
        routing.load(tiny_llava(), tmp_path)
