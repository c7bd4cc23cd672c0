"""Models placed by accelerate's big-model machinery (device maps, offload to disk) route as the plain model does.

No GPU here: the map keeps some decoder layers on ``cpu`` and offloads others to ``disk``, so accelerate's own
hooks move their weights in per call; the routed logits must equal the undispatched model's.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model, infer_auto_device_map
from conftest import make_model

import routing
from saturation.core.adapters import adapter_for
from saturation.core.loading import load_model


def _inputs(processor, batch: int = 2) -> dict:
    from PIL import Image

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")][:batch]
    texts = ["USER: <image>\nwhat colour is the circle? ASSISTANT: red", "USER: <image>\nwhat shape? ASSISTANT:"]
    enc = processor(images=images, text=texts[:batch], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": enc["pixel_values"]}


@pytest.mark.parametrize("variant", ["lf", "pc", "kv"])
def test_dispatched_with_disk_offload_routes_like_the_plain_model(processor, tmp_path, variant):
    split = 2
    inputs = _inputs(processor)
    with torch.no_grad():
        want = routing.build(make_model(processor), split, variant)(**inputs).logits

    model = make_model(processor)
    layers = adapter_for(model).layers
    names = {id(m): n for n, m in model.named_modules()}
    device_map = infer_auto_device_map(model, max_memory={"cpu": "1GiB"},
                                       no_split_module_classes=[type(layers[0]).__name__])
    offloaded = [names[id(layers[i])] for i in (split, 4)]  # the side branch's source and a deep layer
    device_map = {k: v for k, v in device_map.items() if not any(k.startswith(f"{o}.") or k == o for o in offloaded)}
    device_map |= {o: "disk" for o in offloaded}
    if "" in device_map:  # the whole model fitted in one entry: spell out its children instead
        del device_map[""]
        device_map |= {n: "cpu" for n, _ in model.named_children()}
    model = dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))
    assert layers[split].self_attn.q_proj.weight.device.type == "meta"  # really offloaded: weights come per call
    routed = routing.build(model, split, variant)
    side = routed.side[0].self_attn.q_proj.weight
    assert side.device.type == "cpu" and side.requires_grad  # a real, trainable copy, not the meta placeholder
    with torch.no_grad():
        got = routed(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_load_llava_device_map_offloads_past_max_memory(tmp_path):
    model, _ = load_model("tiny", device_map="auto", max_memory="cpu=1MiB", offload_folder=tmp_path)
    assert "disk" in set(model.hf_device_map.values())  # accelerate really put layers on disk
    del model
    __import__("gc").collect()
    assert tmp_path.exists()  # a folder the caller gave is the caller's: kept


def test_load_llavas_own_offload_folder_goes_with_the_model(tmp_path, monkeypatch):
    import gc
    import tempfile

    made = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(str(tmp_path / "scratch")) or
                        (tmp_path / "scratch").mkdir() or made[-1])
    model, _ = load_model("tiny", device_map="auto", max_memory="cpu=1MiB")
    # safetensors weights are read in place, so it may stay empty; a .bin checkpoint's layers are written there
    assert made and (tmp_path / "scratch").is_dir()
    del model
    gc.collect()
    assert not (tmp_path / "scratch").exists()


def test_probe_cli_with_device_map_equals_plain_probe_and_bad_options_are_one_line(tmp_path):
    import numpy as np
    import pandas as pd
    from typer.testing import CliRunner

    from cli import saturation_app

    runner = CliRunner()
    plain = runner.invoke(saturation_app, ["probe", "-n", "4", "--out", str(tmp_path / "plain")])
    mapped = runner.invoke(saturation_app, ["probe", "-n", "4", "--out", str(tmp_path / "mapped"),
                                            "--device-map", "auto", "--max-memory", "cpu=1MiB"])
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    a, b = (pd.read_parquet(tmp_path / d / "per_sample.parquet") for d in ("plain", "mapped"))
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-5, atol=1e-6, equal_nan=True)
    for args, text in ((["--device-map", "nope"], "unknown --device-map"),
                       (["--device-map", "auto", "--max-memory", "cpu"], "DEVICE=SIZE"),
                       (["--device-map", "auto", "--device", "cpu"], "exclude each other")):
        bad = runner.invoke(saturation_app, ["probe", "-n", "4", "--out", str(tmp_path / "bad"), *args])
        assert not (tmp_path / "bad").exists()  # refused before anything is written
        lines = bad.output.strip().splitlines()
        assert bad.exit_code == 1 and len(lines) == 1 and text in lines[0], bad.output


def test_eval_with_device_map_answers_like_the_plain_model_and_bad_options_are_one_line(tmp_path):
    """`routing eval --device-map auto` (layers offloaded to disk past a 1 MiB cap), routed, gives the plain answers."""
    import pandas as pd
    from typer.testing import CliRunner

    from cli import routing_app

    runner = CliRunner()
    routing.build(load_model("tiny")[0], 4).save_routing(tmp_path / "run" / "routing")
    common = ["eval", "--routing", str(tmp_path / "run"), "-n", "12", "--batch-size", "4"]
    plain = runner.invoke(routing_app, [*common, "--json", str(tmp_path / "plain.json")])
    mapped = runner.invoke(routing_app, [*common, "--json", str(tmp_path / "mapped.json"),
                                         "--device-map", "auto", "--max-memory", "cpu=1MiB"])
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    a, b = (pd.read_csv(tmp_path / f"{d}.csv") for d in ("plain", "mapped"))
    assert list(a["prediction"]) == list(b["prediction"])
    for command, args, text in (("eval", ["--device-map", "auto", "--device", "cpu"], "exclude each other"),
                                ("eval", ["--max-memory", "cpu=1GiB"], "goes with --device-map"),
                                ("generate", ["--device-map", "nope"], "unknown --device-map"),
                                ("analyze", ["--device-map", "auto", "--max-memory", "cpu"], "DEVICE=SIZE")):
        extra = ["--image", "x.png", "--prompt", "q"] if command == "generate" else ["--routing", str(tmp_path / "run")]
        bad = runner.invoke(routing_app, [command, *extra, *args])
        lines = bad.output.strip().splitlines()
        assert bad.exit_code == 1 and len(lines) == 1 and text in lines[0], bad.output


def test_train_with_layers_offloaded_to_disk_learns_the_same_side_branch(tmp_path, monkeypatch):
    """`routing train --device-map auto --max-memory cpu=1MiB`: every layer past the cap goes to disk and comes in
    per call; the Trainer must leave that placement alone (it called .to(cpu) on the meta tensors before: the
    routed model now carries `hf_device_map`) and the side branch learns exactly what it learns undispatched."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from cli import routing_app
    from routing.jobs.train import RUN_MANIFEST

    monkeypatch.chdir(tmp_path)  # a default --out must not land in the repository
    runner = CliRunner()
    common = ["train", "--split", "4", "--n-train", "6", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-2"]
    plain = runner.invoke(routing_app, [*common, "--out", "plain"])
    mapped = runner.invoke(routing_app, [*common, "--out", "mapped", "--device-map", "auto", "--max-memory", "cpu=1MiB"])
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    start = routing.build(load_model("tiny")[0], 4).side.state_dict()
    a, b = (load_file(tmp_path / d / "routing" / "side_branch.safetensors") for d in ("plain", "mapped"))
    assert a.keys() == b.keys()
    assert max((a[k] - start[k.removeprefix("side.")]).abs().max() for k in a) > 1e-4  # training moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    # placement is not a defining option: the run records the same identity either way
    assert (tmp_path / "plain" / RUN_MANIFEST).read_text() == (tmp_path / "mapped" / RUN_MANIFEST).read_text()


def test_train_bad_placements_are_one_line_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli import routing_app

    runner = CliRunner()
    cases = [(["--device-map", "nope"], {}, "unknown --device-map"),
             (["--device-map", "auto", "--device", "cpu"], {}, "exclude each other"),
             (["--max-memory", "cpu=1GiB"], {}, "goes with --device-map"),
             (["--device-map", "auto", "--max-memory", "cpu"], {}, "DEVICE=SIZE"),
             (["--device-map", "auto"], {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "under torchrun")]
    for args, env, text in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            bad = runner.invoke(routing_app, ["train", "--split", "4", "--out", str(tmp_path / "bad"), *args])
        assert not (tmp_path / "bad").exists()  # refused before anything is written
        lines = bad.output.strip().splitlines()
        assert bad.exit_code == 1 and len(lines) == 1 and text in lines[0], bad.output


def test_bench_with_device_map_reports_memory_per_device_and_bad_options_are_one_line(tmp_path):
    """`routing bench --device-map auto`: the same KV caches as the plain model, the weights counted where the map
    put them (disk included, same total), the process peak RSS on CPU; bad placements one line before loading."""
    import json

    from typer.testing import CliRunner

    from cli import routing_app

    runner = CliRunner()
    common = ["bench", "--variants", "lf", "--text-tokens", "8", "--repeats", "1", "--warmup", "0", "--new-tokens", "1"]
    plain = runner.invoke(routing_app, [*common, "--json", str(tmp_path / "plain.json")])
    mapped = runner.invoke(routing_app, [*common, "--json", str(tmp_path / "mapped.json"),
                                         "--device-map", "auto", "--max-memory", "cpu=1MiB"])
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    a, b = (json.loads((tmp_path / f"{d}.json").read_text())["memory"] for d in ("plain", "mapped"))
    assert b["cache_mb"] == a["cache_mb"]
    assert list(a["parameters_mb"]["vanilla"]) == ["cpu"] and b["parameters_mb"]["vanilla"]["disk"] > 0
    assert sum(b["parameters_mb"]["vanilla"].values()) == pytest.approx(a["parameters_mb"]["vanilla"]["cpu"])
    assert b["parameters_mb"]["lf"] == a["parameters_mb"]["lf"]  # the side branch: a real copy on the CPU
    assert b["peak_rss_mb"] > 0 and "weights: cpu" in mapped.output and "disk" in mapped.output
    # routing.memory's prediction: decoder weights where the map stored them (disk here, the side copy on the CPU
    # it runs on), the cache where each layer computes; the cache total is what the model really held
    model_a, model_b = a["model_mb"]["lf"]["8"], b["model_mb"]["lf"]["8"]
    assert list(model_a) == ["cpu"] and model_b["disk"]["weights_mb"] > 0 and model_b["disk"]["cache_mb"] == 0
    assert sum(d["cache_mb"] for d in model_b.values()) == pytest.approx(a["cache_mb"]["lf"]["8"])
    assert sum(d["weights_mb"] for d in model_b.values()) == pytest.approx(model_a["cpu"]["weights_mb"])
    for args, text in ((["--geometry", "tiny", "--device-map", "auto"], "--geometry is built on one --device"),
                       (["--device-map", "auto", "--device", "cpu"], "exclude each other"),
                       (["--max-memory", "cpu=1GiB"], "goes with --device-map")):
        bad = runner.invoke(routing_app, ["bench", "--json", str(tmp_path / "bad.json"), *args])
        lines = bad.output.strip().splitlines()
        assert bad.exit_code == 1 and len(lines) == 1 and text in lines[0], bad.output
        assert not (tmp_path / "bad.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_train_and_bench_with_layers_offloaded_to_cpu(tmp_path, monkeypatch):
    """On a GPU: a map that keeps a few MiB on cuda:0 and offloads the rest to CPU trains the side branch as the
    plain GPU run does (same bf16 autocast, so a looser tolerance), and bench reports the GPU's peak."""
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from cli import routing_app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    common = ["train", "--split", "4", "--n-train", "6", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-2",
              "--dtype", "float32"]
    plain = runner.invoke(routing_app, [*common, "--out", "plain", "--device", "cuda"])
    mapped = runner.invoke(routing_app, [*common, "--out", "mapped", "--device-map", "auto",
                                         "--max-memory", "0=2MiB,cpu=1GiB"])
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    a, b = (load_file(tmp_path / d / "routing" / "side_branch.safetensors") for d in ("plain", "mapped"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3)
    bench = runner.invoke(routing_app, ["bench", "--variants", "lf", "--text-tokens", "8", "--repeats", "1",
                                        "--warmup", "0", "--new-tokens", "1", "--json", "b.json",
                                        "--device-map", "auto", "--max-memory", "0=2MiB,cpu=1GiB"])
    assert bench.exit_code == 0, bench.output
    memory = json.loads((tmp_path / "b.json").read_text())["memory"]
    assert "cuda:0" in memory["cuda_peak_mb_per_device"] and "cpu" in memory["parameters_mb"]["vanilla"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("variant", ["lf", "pc", "kv", "fastv"])
def test_layers_split_over_two_gpus_route_and_decode_like_one_gpu(processor, variant):
    """A device map with the shallow layers (and the side branch's source) on cuda:0 and the deep and fusion layers
    on cuda:1: every place where the routing joins tensors of two groups (merge, PC's reset, KV's image keys,
    FastV's scores) must move them, and the cached decode must still equal one GPU's."""
    split, inputs = 2, {k: v.to("cuda:0") for k, v in _inputs(processor).items()}
    one = routing.build(make_model(processor).to("cuda:0"), split, variant)
    model = make_model(processor)
    device_map = _two_device_map(model, split, 0, 1)
    two = routing.build(dispatch_model(model, device_map=device_map, main_device="cuda:0"), split, variant)
    assert {p.device.index for p in two.base.parameters()} == {0, 1} and two.side[0].self_attn.q_proj.weight.is_cuda
    with torch.no_grad():
        torch.testing.assert_close(two(**inputs).logits.to("cuda:0"), one(**inputs).logits, rtol=1e-5, atol=1e-5)
    gen, row = {"max_new_tokens": 4, "do_sample": False}, {k: v[:1] for k, v in inputs.items()}  # no right padding
    assert torch.equal(two.generate(**row, **gen).cpu(), one.generate(**row, **gen).cpu())


def _two_device_map(model, split: int, first, second) -> dict:
    """Every module of `model` on `first`, except decoder layers past `split` (the side branch's source stays on
    `first`), the final norm and the LM head, which go to `second`."""
    names = {id(m): n for n, m in model.named_modules()}
    a = adapter_for(model)
    path = names[id(a.layers)]  # the family's own path to the decoder layers
    device_map = {}

    def place(prefix: str, module) -> None:  # every child off the path to the layers goes to `first` whole
        for n, child in module.named_children():
            full = f"{prefix}{n}"
            if path.startswith(f"{full}."):
                place(f"{full}.", child)
            elif full != path:
                device_map[full] = first

    place("", model)
    device_map |= {names[id(layer)]: (first if i <= split else second) for i, layer in enumerate(a.layers)}
    return device_map | {names[id(a.lm_head)]: second, names[id(a.norm)]: second}
