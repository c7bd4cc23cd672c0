"""The benchmark's structure and its theory column, on toy shapes with one round (speed itself is not tested)."""

from __future__ import annotations

import functools
from dataclasses import replace

import pandas as pd
import pytest

import routing
from figures.io import save_figure
from figures.latency import latency_figure
from routing import flops
from routing.jobs.bench import (
    BenchConfig,
    parse_text_tokens,
    parse_variants,
    run_bench,
    summary_table,
    theory,
)
from saturation.core.errors import ToolkitError
from saturation.core.geometry import geometry_config, image_tokens_of, random_checkpoint

FAST = {"repeats": 1, "warmup": 0, "new_tokens": 2}


@pytest.fixture(scope="module")
def geometry_result():
    return run_bench(BenchConfig(geometry="tiny", layers=4, split=1, variants="lf,pc,kv", text_tokens="4,8",
                                 batch=2, **FAST))


def test_result_structure(geometry_result):
    r = geometry_result
    for key in ("prefill_ratio", "decode_ratio"):
        assert set(r[key]) == {"lf", "pc", "kv"}
        assert all(set(by_t) == {"4", "8"} for by_t in r[key].values())
    assert set(r["theory"]) == {"prefill", "decode"}
    assert r["image_tokens"] == 9 and r["layers"] == 4 and r["split"] == 1 and r["clock"] == "cpu"
    assert len(r["rows"]) == 2 * 4 and [row["model"] for row in r["rows"][:4]] == ["vanilla", "lf", "pc", "kv"]
    for row in r["rows"]:
        assert row["prefill_ms_q1"] <= row["prefill_ms"] <= row["prefill_ms_q3"]
        assert row["decode_ms"] > 0
    assert r["memory"]["peak_rss_mb"] > 0
    cache = r["memory"]["cache_mb"]
    assert cache["lf"]["8"] < cache["vanilla"]["8"] == cache["pc"]["8"] == cache["kv"]["8"]
    for row in r["rows"]:  # routing.memory's cache: what each model really held after its prefill (batch 2)
        assert row["cache_mb_model"] == pytest.approx(row["cache_mb"], rel=1e-9)
    assert list(r["memory"]["model_mb"]["lf"]["8"]) == ["cpu"]
    assert "prefill_e2e_ratio" not in r and r["images"] == "random embeddings"


def test_theory_is_the_flop_model(geometry_result):
    r = geometry_result
    g = flops.Geometry.of(geometry_config("tiny", 4).text_config)
    for variant in ("lf", "pc", "kv"):
        for t in (4, 8):
            plan = routing.make_plan(4, 1, variant)
            assert r["theory"]["prefill"][variant][str(t)] == pytest.approx(
                flops.ratio(g, variant, 1, 9, t)["total"], rel=1e-12)
            decode = flops.decode_cost(g, plan, 9, t).total / flops.decode_cost(g, None, 9, t).total
            assert r["theory"]["decode"][variant][str(t)] == pytest.approx(decode, rel=1e-12)
    assert theory(g, "lf", 1, 9, 8) == {"prefill": r["theory"]["prefill"]["lf"]["8"],
                                        "decode": r["theory"]["decode"]["lf"]["8"]}


def test_table_and_figure(geometry_result, tmp_path):
    assert summary_table(geometry_result).row_count == 8
    paths = save_figure(latency_figure(pd.DataFrame(geometry_result["rows"]), title="toy"), tmp_path / "latency")
    assert all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="decode_ms"):
        latency_figure(pd.DataFrame(geometry_result["rows"]).drop(columns=["decode_ms"]))


def test_real_model_with_a_routing_artifact(tiny_model_dir, tmp_path):
    """Real images through the processor (4 image tokens for 32 px / patch 16); the artifact fixes the split."""
    base, _ = routing.jobs.bench.load_models(BenchConfig(model=str(tiny_model_dir)))[:2]
    routing.build(base, 2, "kv").save_routing(tmp_path / "routing")
    r = run_bench(BenchConfig(model=str(tiny_model_dir), routing=tmp_path / "routing", variants="lf,kv",
                              text_tokens=[6], **FAST))
    assert r["images"] == "real" and r["image_tokens"] == 4 and r["split"] == 2 and r["split_source"] == "routing"
    assert set(r["prefill_e2e_ratio"]) == {"lf", "kv"} and r["rows"][0]["text_tokens"] == 6


def test_named_geometries_come_from_their_configs():
    seven, thirteen = geometry_config("llava-1.5-7b"), geometry_config("llava-1.5-13b", layers=8)
    assert image_tokens_of(seven) == image_tokens_of(thirteen) == 576
    cost = functools.partial(flops.prefill_cost, plan=None, image_tokens=576, text_tokens=64)
    assert cost(flops.Geometry.of(seven.text_config)) == cost(flops.LLAVA_15_7B)
    assert cost(flops.Geometry.of(thirteen.text_config)) == cost(replace(flops.LLAVA_15_13B, num_layers=8))
    assert image_tokens_of(geometry_config("tiny")) == 9


def test_random_checkpoint_has_a_processor_of_its_own_image_size():
    """`python -m saturation.benchmark --geometry` probes random weights through a word-level processor: its image
    token and image size must agree with the config, however many image tokens the architecture makes."""
    import torch

    from saturation.core.adapters import adapter_for
    from saturation.core.data import encode_prompt, read_records
    from saturation.probe import DEFAULT_DATA

    model, processor = random_checkpoint("cpu-bench", layers=3, dtype=None, device="cpu")
    enc = encode_prompt(read_records(DEFAULT_DATA)[0], processor)
    image_id = adapter_for(model).image_token_id
    assert int((enc["input_ids"] == image_id).sum()) == image_tokens_of(model.config) == 64
    assert model.dtype == torch.float32 and adapter_for(model).num_layers == 3
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"][None], pixel_values=enc["pixel_values"]).logits  # [1, 3, H, W]
    assert logits.shape[-1] == model.config.text_config.vocab_size


@pytest.mark.parametrize("kwargs, message", [
    ({"variants": "lf,xx"}, "unknown variant 'xx'"),
    ({"variants": "vanilla"}, "no variant"),
    ({"text_tokens": "64,0"}, "must be positive"),
    ({"text_tokens": "64,x"}, "positive integers"),
    ({"geometry": "llava-2"}, "unknown geometry"),
    ({"geometry": "tiny", "model": "tiny"}, "no --model"),
    ({"layers": 4}, "shrinks a --geometry"),
    ({"geometry": "tiny", "layers": 2}, "at least 3"),
    ({"routing": "r", "split": 3}, "not both"),
    ({"repeats": 0}, "repeats"),
])
def test_bad_options_are_refused_before_any_model_loads(kwargs, message):
    with pytest.raises(ToolkitError, match=message):
        BenchConfig(**kwargs)


def test_parsers_keep_order_and_drop_duplicates():
    assert parse_variants("kv, LF,kv,vanilla") == ("kv", "lf")
    assert parse_text_tokens("256,64,256") == (256, 64)
    assert parse_text_tokens([16, 64]) == (16, 64)
