"""routing.memory against what the models really hold: every layer's prompt cache, the decoder weights, and the
per-device sums a device map gives."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import family
from routing_fixtures import tiny_llava

from routing.flops import Geometry
from routing.jobs.timing import prefill, random_prompt
from routing.memory import cache_bytes, per_device, weight_bytes
from routing.model import build
from routing.plan import make_plan
from saturation.core.adapters import adapter_for

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)

PLANS = [("lf", {}), ("lf-ideal", {}), ("pc", {}), ("kv", {}), ("vtw", {}), ("fastv", {"keep": 0.5}),
         ("lf", {"prune": "fastv", "prune_layer": 2, "keep": 0.25}), ("kv", {"prune": "pool", "keep": 0.25})]


def _measured(model, p) -> list[int]:
    """Bytes of keys + values per decoder layer after `model`'s prefill of `p`."""
    cache = prefill(model, p).past_key_values
    return [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)) for layer in cache.layers]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(layers=6)


@pytest.mark.parametrize(("variant", "kw"), PLANS, ids=[f"{v}-{kw.get('prune', '')}" for v, kw in PLANS])
def test_predicted_cache_equals_each_layers_cache(llava, variant, kw):
    g = Geometry.of(adapter_for(llava).text_config)
    p = random_prompt(llava, text_tokens=9, batch=2, new_tokens=1)
    routed = build(llava, 3, variant, **kw).eval()
    predicted = cache_bytes(g, routed.plan, p.image_tokens, p.text_tokens, batch=2, dtype_bytes=4)
    with torch.no_grad():
        assert predicted == _measured(routed, p)
        assert cache_bytes(g, None, p.image_tokens, p.text_tokens, 2, 4) == _measured(llava, p)


def test_vanilla_sliding_layers_keep_a_window_and_routed_ones_every_key():
    model = family("gemma3").model(layers=4)
    a = adapter_for(model)
    g = Geometry.of(a.text_config)
    assert g.window is not None and any(g.sliding) and not all(g.sliding)
    p = random_prompt(model, text_tokens=g.window + 5, batch=1, new_tokens=1)
    routed = build(model, 2, "lf").eval()
    with torch.no_grad():
        assert cache_bytes(g, None, p.image_tokens, p.text_tokens, 1, 4) == _measured(model, p)
        assert cache_bytes(g, routed.plan, p.image_tokens, p.text_tokens, 1, 4) == _measured(routed, p)


def test_predicted_weights_equal_the_decoder_and_side_parameters(llava):
    a = adapter_for(llava)
    g = Geometry.of(a.text_config)
    routed = build(llava, 2, "lf", side_depth=2)
    layers, side = weight_bytes(g, routed.plan, dtype_bytes=4)
    assert layers == [sum(p.numel() * 4 for p in layer.parameters()) for layer in a.layers]
    assert side == [sum(p.numel() * 4 for p in layer.parameters()) for layer in routed.side]
    assert weight_bytes(g, None, 4)[1] == []


def test_per_device_splits_weights_by_placement_and_cache_by_execution():
    g = Geometry(num_layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=100)
    plan = make_plan(4, 2, "lf")
    placement, execution = ["cuda:0", "cuda:0", "disk", "cuda:1"], ["cuda:0", "cuda:0", "cuda:0", "cuda:1"]
    out = per_device(g, plan, placement, execution, image_tokens=16, text_tokens=8, batch=1, dtype_bytes=2)
    layer = g.layer_params() * 2 / 2**20
    per_key = 2 * g.kv_dim * 2 / 2**20
    # layers 0, 1 on cuda:0 plus the side copy of layer 2, which runs on cuda:0 although layer 2 is stored on disk
    assert out["cuda:0"]["weights_mb"] == pytest.approx(3 * layer)
    assert out["disk"] == {"weights_mb": pytest.approx(layer), "cache_mb": 0.0}
    # caches: layers 0, 1 full (24 keys) and layer 2 deep (8 text keys) on cuda:0, the fusion layer full on cuda:1
    assert out["cuda:0"]["cache_mb"] == pytest.approx((24 + 24 + 8) * per_key)
    assert out["cuda:1"] == {"weights_mb": pytest.approx(layer), "cache_mb": pytest.approx(24 * per_key)}
    with pytest.raises(ValueError, match="one device per decoder layer"):
        per_device(g, plan, placement[:3], execution, 16, 8)
