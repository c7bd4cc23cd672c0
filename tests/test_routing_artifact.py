"""Save/load of a routing: only the side branch and the plan are written; a mismatched base is refused."""

from __future__ import annotations

import json

import pytest
import torch
from routing_fixtures import make_batch, tiny_llava, without_labels
from safetensors.torch import load_file

import routing
from saturation import __version__
from saturation.core.errors import ToolkitError

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)


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


def test_a_crash_mid_save_keeps_the_old_artifact(trained, tmp_path, monkeypatch):
    import routing.artifact as artifact

    model, routed, _ = trained
    directory = tmp_path / "routing"
    routed.save_routing(directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def dies_half_way(state, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        routed.save_routing(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing"]  # no temporary folder left behind
    routing.load(model, directory)


def test_a_crash_between_the_renames_is_recovered(trained, tmp_path):
    """The swap renames the old artifact aside first: if the process dies right there, the old one comes back."""
    model, routed, _ = trained
    directory = tmp_path / "routing"
    routed.save_routing(directory)
    directory.rename(tmp_path / ".routing.old-12345")
    assert routing.artifact.read_manifest(directory)["split"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing"]
    routing.load(model, directory)


def test_save_refuses_to_replace_a_folder_that_is_not_an_artifact(trained, tmp_path):
    _, routed, _ = trained
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ToolkitError, match="not a routing artifact"):
        routed.save_routing(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_run_folder_of_routing_train_is_accepted(trained, tmp_path):
    """`routing train --out D` writes the artifact to D/routing; `--routing D` must find it."""
    model, routed, directory = trained
    run = tmp_path / "run"
    routed.save_routing(run / "routing")
    assert routing.artifact.read_manifest(run)["split"] == 2
    batch = without_labels(make_batch("mixed", "left"))
    with torch.no_grad():
        assert torch.equal(routing.load(model, run)(**batch).logits, routed(**batch).logits)


def _corrupt(directory, defect: str) -> None:
    """Damage a saved routing artifact in one way a user might meet."""
    manifest_path, weights_path = directory / "routing.json", directory / "side_branch.safetensors"
    manifest = json.loads(manifest_path.read_text())
    if defect == "bad json":
        manifest_path.write_text('{"format": "dpvr-routing/1", "split": ')
    elif defect == "not an object":
        manifest_path.write_text("[1, 2]")
    elif defect == "missing keys":
        manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("split", "variant")}))
    elif defect == "split not an integer":
        manifest_path.write_text(json.dumps(manifest | {"split": "2"}))
    elif defect == "split out of range":
        manifest_path.write_text(json.dumps(manifest | {"split": manifest["num_layers"] + 3}))
    elif defect == "unknown variant":
        manifest_path.write_text(json.dumps(manifest | {"variant": "fast"}))
    elif defect == "not safetensors":
        weights_path.write_bytes(b"PK\x03\x04 a zip file, as torch.save writes")
    elif defect == "wrong shapes":
        from safetensors.torch import save_file

        save_file({k: torch.zeros(3) for k in load_file(str(weights_path))}, str(weights_path))


DEFECTS = ["bad json", "not an object", "missing keys", "split not an integer", "split out of range",
           "unknown variant", "not safetensors", "wrong shapes"]


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_damaged_artifact_is_a_toolkit_error(trained, tmp_path, defect):
    model, routed, _ = trained
    directory = tmp_path / "routing"
    routed.save_routing(directory)
    _corrupt(directory, defect)
    with pytest.raises(ToolkitError, match=str(directory)):
        routing.load(model, directory)


@pytest.fixture(scope="module")
def embedded_artifact(tmp_path_factory):
    """An (untrained) routing artifact of the embedded model, which every command loads by default."""
    from saturation.core.loading import load_model

    model, _ = load_model("tiny")
    directory = tmp_path_factory.mktemp("embedded") / "run" / "routing"
    routing.build(model, 4).save_routing(directory)
    return directory


@pytest.mark.parametrize("command", ["eval", "generate", "analyze", "bench"])
@pytest.mark.parametrize("defect", ["bad json", "missing keys", "split out of range", "not safetensors"])
def test_every_command_reports_a_damaged_artifact_in_one_line(embedded_artifact, tmp_path, command, defect):
    import shutil

    from typer.testing import CliRunner

    from cli import routing_app
    from saturation.core.loading import DATA_SAMPLES

    directory = tmp_path / "run" / "routing"
    shutil.copytree(embedded_artifact, directory)
    _corrupt(directory, defect)
    image = DATA_SAMPLES / "shapes" / "images" / "heldout_00000.png"
    extra = {"eval": ["--n", "2"], "generate": ["--image", str(image), "--prompt", "what colour?"],
             "analyze": ["--n", "2"], "bench": ["--text-tokens", "8", "--repeats", "1", "--warmup", "0",
                                                "--json", str(tmp_path / "bench.json")]}[command]
    result = CliRunner().invoke(routing_app, [command, "--routing", str(directory.parent), *extra])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()  # (the model loads first: transformers' progress bar may precede)
    assert lines[-1].startswith("error:") and str(directory) in lines[-1], result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "bench.json").exists() and not (tmp_path / "run" / "analysis").exists()
