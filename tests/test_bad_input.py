"""Bad input through the real commands: one plain `error:` line on stderr, exit code 1, nothing written.

Most cases run in-process through typer's CliRunner; a few run the console script in a subprocess, where stderr
is exactly what a user sees.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import friendly, routing_app, saturation_app
from saturation.core.errors import ToolkitError

runner = CliRunner()
ENV = {"COLUMNS": "300", "HF_HUB_OFFLINE": "1"}


def _run(app, *args):
    return runner.invoke(app, [str(a) for a in args], env=ENV)


def one_line_error(result, *needles: str, strict: bool = True) -> str:
    """Exit 1, no traceback, one `error:` line holding every needle; with `strict`, nothing else on stderr.

    Not strict: a command that fails after loading a model may have printed the loader's progress bar first;
    the error must still be the last line and stand on a line of its own.
    """
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    stderr = result.stderr
    assert "Traceback" not in result.output, result.output
    lines = stderr.strip("\n").split("\n")  # only "\n" ends a line: "\rerror:" would sit on a bar's line
    if strict:
        assert len(lines) == 1, stderr
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error:") and lines[-1] == errors[0], stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _image(dataset: Path) -> Path:
    return dataset.parent / "images" / "0.png"


def _no_cuda(monkeypatch) -> None:
    """This machine, whatever it is, has no CUDA (so the test means the same on a GPU runner)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _one_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def _device_commands(model: Path, dataset: Path, tmp: Path) -> dict[str, tuple]:
    """Each command that takes --device, with arguments that are fine apart from the device."""
    return {
        "probe": (saturation_app, "probe", "--model", model, "--data", dataset, "--n", 2, "--out", tmp / "probe"),
        "train": (routing_app, "train", "--model", model, "--data", dataset, "--split", 2, "--max-steps", 1,
                  "--out", tmp / "train"),
        "eval": (routing_app, "eval", "--model", model, "--data", dataset, "--n", 2),
        "generate": (routing_app, "generate", "--model", model, "--image", _image(dataset), "--prompt", "what colour?"),
        "bench": (routing_app, "bench", "--model", model, "--json", tmp / "bench" / "b.json"),
    }


# --- --device ---


@pytest.mark.parametrize("command", ["probe", "train", "eval", "generate", "bench"])
def test_cuda_on_a_machine_without_cuda(command, tiny_model_dir, dataset, tmp_path, monkeypatch):
    _no_cuda(monkeypatch)
    app, *args = _device_commands(tiny_model_dir, dataset, tmp_path)[command]
    one_line_error(_run(app, *args, "--device", "cuda"), "device 'cuda'", "CUDA is not available", "--device cpu")
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("command", ["probe", "train", "eval", "generate", "bench"])
def test_nonsense_device(command, tiny_model_dir, dataset, tmp_path):
    app, *args = _device_commands(tiny_model_dir, dataset, tmp_path)[command]
    line = one_line_error(_run(app, *args, "--device", "nonsense"), "unknown device 'nonsense'", "cpu, cuda")
    assert len(line) < 120  # not torch's list of twenty device types


@pytest.mark.parametrize("command", ["probe", "train", "eval", "generate", "bench"])
def test_cuda_index_past_the_last_gpu(command, tiny_model_dir, dataset, tmp_path, monkeypatch):
    _one_gpu(monkeypatch)
    app, *args = _device_commands(tiny_model_dir, dataset, tmp_path)[command]
    one_line_error(_run(app, *args, "--device", "cuda:7"), "'cuda:7' does not exist", "1 CUDA device")


def test_unsupported_device_type(tiny_model_dir, dataset):
    one_line_error(_run(routing_app, "eval", "--model", tiny_model_dir, "--data", dataset, "--device", "meta"),
                   "'meta' is not supported")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_in_the_real_console_script(tmp_path):
    """What a user sees: stderr is exactly one line, no traceback, exit 1."""
    proc = subprocess.run([sys.executable, "-c", "import cli; cli.saturation_main()", "probe", "--n", "2",
                           "--device", "cuda", "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, env=dict(os.environ, **ENV), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: device 'cuda'"), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "p").exists()


USAGE = [  # click's own checks, before any command runs
    (("routing", "bench", "--out", "x"), "No such option: --out", "routing bench --help"),
    (("routing", "bench", "--repeats", "abc"), "Invalid value for '--repeats'", "routing bench --help"),
    (("routing", "nosuch"), "No such command 'nosuch'", "routing --help"),
    (("saturation", "probe", "--n"), "Option '--n' requires an argument", ""),
    (("saturation", "probe", "extra"), "Got unexpected extra argument", "saturation probe --help"),
]


@pytest.mark.parametrize(("argv", "message", "hint"), USAGE, ids=[" ".join(c[0]) for c in USAGE])
def test_usage_errors_are_one_line_in_the_installed_scripts(tmp_path, argv, message, hint):
    """The console scripts as installed (pyproject's entry points): an unknown option, a wrong type, an unknown
    command, a missing value or an extra argument is one `error:` line naming the --help to read, exit 2; typer
    alone prints a usage line and a boxed panel."""
    script = Path(sys.executable).parent / argv[0]
    proc = subprocess.run([str(script), *argv[1:]], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, **ENV), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {message}"), proc.stderr
    assert f"(see '{hint}')" in proc.stderr if hint else "(see" not in proc.stderr
    assert proc.stdout == "" and not any(tmp_path.iterdir())


def test_console_scripts_keep_help_and_exit_codes():
    """--help exits 0; no arguments prints the help and exits 2 (click's rule); a toolkit error exits 1."""
    bin_dir = Path(sys.executable).parent
    ok = subprocess.run([str(bin_dir / "routing"), "bench", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "--text-tokens" in ok.stdout and ok.stderr == ""
    bare = subprocess.run([str(bin_dir / "saturation")], capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2 and "probe" in bare.stdout and "error" not in bare.stderr
    bad = subprocess.run([str(bin_dir / "saturation"), "probe", "--n", "0"], capture_output=True, text=True,
                         env=dict(os.environ, **ENV), timeout=120)
    assert bad.returncode == 1 and bad.stderr == "error: --n must be at least 1 (got 0)\n", bad.stderr


# --- --out and --json ---


def _read_only_dir(tmp_path: Path) -> Path | None:
    """A 0o555 folder, or None where chmod does not stop writes (root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("")
    except PermissionError:
        return folder
    (folder / "probe").unlink()
    return None


def _bad_out_dirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Output folders that cannot be used, with the words the error must hold."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = {
        "is a file": (a_file, "is a file"),
        "under a file": (a_file / "run", "is a file"),
        "read-only": (Path("/proc/dpvr-never-writable/run"), "cannot write in /proc"),
    }
    if (ro := _read_only_dir(tmp_path)) is not None:
        cases["chmod 555"] = (ro / "run", "cannot write in")
    return cases


OUT_COMMANDS = {
    "probe": lambda m, d, out: (saturation_app, "probe", "--model", m, "--data", d, "--n", 2, "--out", out),
    "train": lambda m, d, out: (routing_app, "train", "--model", m, "--data", d, "--split", 2, "--max-steps", 1,
                                "--out", out),
    "reproduce": lambda m, d, out: (routing_app, "reproduce", "--model", m, "--probe-data", d, "--out", out),
}


@pytest.mark.parametrize("command", list(OUT_COMMANDS))
def test_unusable_out_folder(command, tiny_model_dir, dataset, tmp_path):
    for name, (out, needle) in _bad_out_dirs(tmp_path).items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        app, *args = OUT_COMMANDS[command](tiny_model_dir, dataset, out)
        one_line_error(_run(app, *args), f"--out {out}", needle)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, name  # nothing made, nothing half-written


def _json_commands(model: Path, dataset: Path, path: Path) -> dict[str, tuple]:
    return {
        "eval": (routing_app, "eval", "--model", model, "--data", dataset, "--n", 2, "--json", path),
        "bench": (routing_app, "bench", "--model", model, "--repeats", 1, "--warmup", 0, "--text-tokens", 8,
                  "--json", path),
    }


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_json_whose_parent_is_a_file(command, tiny_model_dir, dataset, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    app, *args = _json_commands(tiny_model_dir, dataset, a_file / "result.json")[command]
    one_line_error(_run(app, *args), f"--json {a_file / 'result.json'}", "is a file")
    app, *args = _json_commands(tiny_model_dir, dataset, tmp_path)[command]
    one_line_error(_run(app, *args), "is a folder")
    assert a_file.read_text() == "not a folder"


def test_json_under_a_file_in_the_real_console_script(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    proc = subprocess.run([sys.executable, "-c", "import cli; cli.routing_main()", "eval", "--n", "2", "--json",
                           str(a_file / "eval.json")], capture_output=True, text=True,
                          env=dict(os.environ, **ENV), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --json "), proc.stderr
    assert "Traceback" not in proc.stderr


# --- images and records ---


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` pixels: PIL refuses it before decoding a byte."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_decompression_bomb_image(tiny_model_dir, tmp_path):
    bomb = _png_header(tmp_path / "bomb.png", 100_000, 100_000)  # 1e10 pixels, over 2 x MAX_IMAGE_PIXELS
    one_line_error(_run(routing_app, "generate", "--model", tiny_model_dir, "--image", bomb, "--prompt", "hi"),
                   str(bomb), "too large to open safely")


def test_decompression_bomb_in_probe_data_names_the_record(tiny_model_dir, dataset, tmp_path):
    records = json.loads(dataset.read_text())[:2]
    _png_header(dataset.parent / "images" / "bomb.png", 100_000, 100_000)
    records[1] = records[1] | {"id": "the-bomb", "image": "images/bomb.png"}
    data = dataset.parent / "bomb.json"
    data.write_text(json.dumps(records))
    result = _run(saturation_app, "probe", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "p")
    one_line_error(result, "record the-bomb", "too large to open safely", strict=False)


def test_null_image_names_the_record(tiny_model_dir, dataset, tmp_path):
    records = json.loads(dataset.read_text())[:2]
    records[1] = records[1] | {"id": "no-picture", "image": None}
    data = dataset.parent / "null_image.json"
    data.write_text(json.dumps(records))
    line = one_line_error(_run(saturation_app, "probe", "--model", tiny_model_dir, "--data", data,
                               "--out", tmp_path / "p"), "id no-picture", "'image' must be", "null")
    assert "None" not in line


# --- counts ---


def test_batch_size_zero(tiny_model_dir, dataset, tmp_path):
    m, d = tiny_model_dir, dataset
    for app, *args in [
        (saturation_app, "probe", "--model", m, "--data", d, "--out", tmp_path / "p"),
        (routing_app, "eval", "--model", m, "--data", d, "--n", 2),
        (routing_app, "bench", "--model", m, "--json", tmp_path / "b.json"),
        (routing_app, "analyze", "--model", m, "--data", d, "--routing", tmp_path / "no-artifact"),
    ]:
        one_line_error(_run(app, *args, "--batch-size", 0), "--batch-size must be at least 1 (got 0)")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("n", [0, -3])
def test_n_zero_or_negative(n, tiny_model_dir, dataset, tmp_path):
    m, d = tiny_model_dir, dataset
    for app, *args in [
        (saturation_app, "probe", "--model", m, "--data", d, "--out", tmp_path / "p"),
        (routing_app, "eval", "--model", m, "--data", d),
        (routing_app, "analyze", "--model", m, "--data", d, "--routing", tmp_path / "no-artifact"),
    ]:
        one_line_error(_run(app, *args, "--n", n), f"--n must be at least 1 (got {n})")


@pytest.mark.parametrize("command", ["train", "bench"])
def test_fusion_layers_larger_than_the_model(command, tiny_model_dir, dataset, tmp_path):
    """The message must name a range that exists, never 'choose 1..-35'."""
    app, *args = {
        "train": (routing_app, "train", "--model", tiny_model_dir, "--data", dataset, "--split", 2,
                  "--max-steps", 1, "--out", tmp_path / "t"),
        "bench": (routing_app, "bench", "--model", tiny_model_dir, "--repeats", 1, "--warmup", 0,
                  "--text-tokens", 8, "--json", tmp_path / "b.json"),
    }[command]
    line = one_line_error(_run(app, *args, "--fusion-layers", 40), strict=False)
    assert "40" in line and "..-" not in line, line


# --- a failed fresh probe leaves no stale results ---


def _corrupt_copy(dataset: Path, name: str) -> Path:
    """The dataset with one record's image replaced by bytes no image reader accepts."""
    records = json.loads(dataset.read_text())
    (dataset.parent / "images" / "corrupt.png").write_bytes(b"this is not a png")
    records[-1] = records[-1] | {"id": "broken", "image": "images/corrupt.png"}
    path = dataset.parent / name
    path.write_text(json.dumps(records))
    return path


def test_failed_no_resume_probe_leaves_no_stale_recommendation(tiny_model_dir, dataset, tmp_path):
    from routing.jobs.split import resolve_split

    out = tmp_path / "probe"
    first = _run(saturation_app, "probe", "--model", tiny_model_dir, "--data", dataset, "--n", 4, "--out", out)
    assert first.exit_code == 0, first.output
    assert (out / "recommendation.json").is_file() and (out / "figure2.png").is_file()

    bad = _corrupt_copy(dataset, "corrupt.json")
    failed = _run(saturation_app, "probe", "--model", tiny_model_dir, "--data", bad, "--batch-size", 4,
                  "--no-resume", "--out", out)
    one_line_error(failed, "record broken", "cannot read image", strict=False)
    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    assert manifest["data"] == str(bad.resolve())  # the new run's manifest ...
    for name in ("recommendation.json", "summary.csv", "per_sample.parquet", "figure2.png", "figure2.pdf"):
        assert not (out / name).exists(), name  # ... and none of the old run's results beside it
    with pytest.raises(ToolkitError, match="no recommendation.json"):
        resolve_split("auto", 6, str(tiny_model_dir), out, tmp_path)
    train = _run(routing_app, "train", "--model", tiny_model_dir, "--split", "auto", "--probe", out,
                 "--out", tmp_path / "t")
    one_line_error(train, "no recommendation.json")


def test_no_resume_refused_on_bad_data_keeps_the_old_run(tiny_model_dir, dataset, tmp_path):
    """Data that fails validation stops the run before anything is touched: the old run stays whole."""
    out = tmp_path / "probe"
    assert _run(saturation_app, "probe", "--model", tiny_model_dir, "--data", dataset, "--n", 4,
                "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,')
    one_line_error(_run(saturation_app, "probe", "--model", tiny_model_dir, "--data", bad, "--no-resume",
                        "--out", out), "malformed JSON")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- the error line stands on its own line ---


def test_error_after_a_half_drawn_progress_bar_starts_a_fresh_line():
    """A tqdm bar left open mid-line (as HF's Trainer leaves its bar when a batch fails) is closed first."""
    import typer
    from tqdm.auto import tqdm

    app = typer.Typer()

    @app.command()
    @friendly
    def work() -> None:
        bar = tqdm(total=10, desc="steps")
        bar.update(3)
        sys.stderr.write("a line without its end")
        raise ToolkitError("step 4 failed")

    result = runner.invoke(app, [], env=ENV)
    assert result.exit_code == 1
    lines = result.stderr.split("\n")
    assert lines[-2:] == ["error: step 4 failed", ""], result.stderr  # last: the bar does not redraw after it
    assert sum("error:" in line for line in lines) == 1 and "a line without its end" in lines[-3]


def test_error_after_a_training_bar_in_the_real_command(tiny_model_dir, dataset, tmp_path):
    """`routing train` on data with an unreadable image: the Trainer's bar is open when the batch fails."""
    bad = _corrupt_copy(dataset, "corrupt_train.json")
    records = json.loads(bad.read_text())
    records = records[:4] + [records[-1]]  # the broken record is read in the second step
    bad.write_text(json.dumps(records))
    result = _run(routing_app, "train", "--model", tiny_model_dir, "--data", bad, "--split", 2, "--batch-size", 4,
                  "--max-steps", 2, "--save-steps", 100, "--out", tmp_path / "t")
    line = one_line_error(result, "record broken", "cannot read image", strict=False)
    assert result.stderr.endswith("\n" + line + "\n"), result.stderr


def test_multi_line_message_is_printed_as_one_line():
    import typer

    app = typer.Typer()

    @app.command()
    @friendly
    def work() -> None:
        raise ToolkitError("first part\nsecond part [/] with brackets")

    result = runner.invoke(app, [], env=ENV)
    assert result.exit_code == 1 and result.stderr == "error: first part second part [/] with brackets\n"


# --- issue 28: what still gave a traceback, or was silently accepted ---


MALFORMED_PLANS = {
    "a ratio with two dots": ("fastv@2:R=1.2.3%", "'1.2.3%' is not a ratio"),
    "a ratio of a dot": ("pool:.%", "'.%' is not a ratio"),
    "a 5000-digit layer": ("lf@" + "9" * 5000, "far past any model's depth"),  # int()'s ValueError before
    "a full-width digit": ("vtw@６", "'６' is not an ASCII digit"),  # saved as vtw@6 before
    "an Arabic-Indic digit": ("vtw@٦", "'٦' is not an ASCII digit"),
    "vtw under a pruning": ("vtw@6+fastv@2:R=50%", "after lf/pc/kv/lf-ideal"),  # saved before
}


def _plan_commands(model: Path, tmp: Path) -> dict[str, callable]:
    return {
        "save-plan": lambda spec: (routing_app, "save-plan", "--model", model, "--plan", spec, "--out", tmp / "plan"),
        "compare": lambda spec: (routing_app, "compare", "--model", model, "--plans", f"vanilla,{spec}",
                                 "--out", tmp / "compare"),
        "train": lambda spec: (routing_app, "train", "--model", model, "--plan", spec, "--max-steps", 1,
                               "--out", tmp / "train"),
    }


@pytest.mark.parametrize("case", list(MALFORMED_PLANS))
@pytest.mark.parametrize("command", ["save-plan", "compare", "train"])
def test_a_malformed_number_in_a_plan_is_one_line(command, case, tiny_model_dir, tmp_path):
    spec, needle = MALFORMED_PLANS[case]
    app, *args = _plan_commands(tiny_model_dir, tmp_path)[command](spec)
    line = one_line_error(_run(app, *args), needle)
    assert len(line) < 400  # a 5000-digit spec is not echoed whole
    assert not (tmp_path / "plan").exists() and not (tmp_path / "train").exists()


@pytest.mark.parametrize("prompt", ["<image> what colour?", "what <image> is it? <image>", "what </s> colour?"])
def test_generate_refuses_a_prompt_that_writes_special_tokens(prompt, tiny_model_dir, dataset):
    """transformers' own message (and count) came as a ValueError traceback; generate places the images itself."""
    one_line_error(_run(routing_app, "generate", "--model", tiny_model_dir, "--image", _image(dataset),
                        "--prompt", prompt), "--prompt holds the special token", strict=False)


@pytest.mark.parametrize("temperature", ["0", "-1", "nan", "inf"])
def test_generate_refuses_a_temperature_that_is_not_above_zero(temperature, tiny_model_dir, dataset):
    one_line_error(_run(routing_app, "generate", "--model", tiny_model_dir, "--image", _image(dataset), "--prompt",
                        "what colour?", "--sample", "--temperature", temperature), "--temperature must be a number")


BAD_MAX_MEMORY = {
    "no such GPU": ("7=1GiB", "caps GPU 7, but this machine has 0 CUDA device(s)"),  # accelerate's RuntimeError
    "an infinite size": ("cpu=1e400GiB", "'1e400GiB' is not a size"),  # accelerate's OverflowError
    "a size past 1 EiB": ("cpu=99999999999999GiB", "under 1 EiB"),
    "a zero size": ("cpu=0GiB", "at least 1 byte"),
    "a key given twice": ("cpu=1GiB,cpu=2GiB", "caps cpu twice"),  # the last one won silently
    "a full-width GPU index": ("０=1GiB", "write DEVICE=SIZE pairs"),  # read as GPU 0
}


@pytest.mark.parametrize("case", list(BAD_MAX_MEMORY))
@pytest.mark.parametrize("command", ["probe", "train", "eval", "generate", "bench"])
def test_bad_max_memory_is_one_line(command, case, tiny_model_dir, dataset, tmp_path, monkeypatch):
    _no_cuda(monkeypatch)
    text, needle = BAD_MAX_MEMORY[case]
    app, *args = _device_commands(tiny_model_dir, dataset, tmp_path)[command]
    one_line_error(_run(app, *args, "--device-map", "auto", "--max-memory", text), f"--max-memory '{text}'",
                   needle)
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("command", ["probe", "train", "eval", "generate", "bench"])
def test_max_memory_without_a_device_map_is_refused(command, tiny_model_dir, dataset, tmp_path):
    app, *args = _device_commands(tiny_model_dir, dataset, tmp_path)[command]
    one_line_error(_run(app, *args, "--max-memory", "cpu=1GiB"), "--max-memory goes with --device-map")
    assert not any(tmp_path.iterdir())


def _long_dataset(dataset: Path, name: str, words: int = 700) -> Path:
    """The dataset with its first record's question `words` words long (the test model has 512 positions)."""
    records = json.loads(dataset.read_text())
    question = "<image>\n" + " ".join(["what colour is the circle"] * (words // 5)) + "?"
    records[0] = records[0] | {"id": "too-long", "conversations": [
        {"from": "human", "value": question}, records[0]["conversations"][1]]}
    path = dataset.parent / name
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("command", ["eval", "probe"])
def test_a_prompt_longer_than_the_models_positions_is_refused(command, tiny_model_dir, dataset, tmp_path):
    """It ran on positions the model was never trained for, silently (rotary positions do not stop it)."""
    data = _long_dataset(dataset, "long.json")
    app, *args = {"eval": (routing_app, "eval", "--model", tiny_model_dir, "--data", data, "--n", 3, "--seed", 0),
                  "probe": (saturation_app, "probe", "--model", tiny_model_dir, "--data", data,
                            "--out", tmp_path / "p")}[command]
    if command == "eval":  # the whole set, so that the long record is in it
        args = [a for a in args if a not in ("--n", 3, "--seed", 0)]
    one_line_error(_run(app, *args), "record too-long", "more than the model's 512 positions", strict=False)


def test_generate_refuses_a_prompt_longer_than_the_models_positions(tiny_model_dir, dataset):
    line = one_line_error(_run(routing_app, "generate", "--model", tiny_model_dir, "--image", _image(dataset),
                               "--prompt", " ".join(["what colour is the circle"] * 120)),
                          "--image", "more than the model's 512 positions", strict=False)
    assert "600 tokens" in line or "tokens (image tokens included) + 16 new" in line


def test_train_cuts_a_record_longer_than_the_models_positions_and_says_so(tiny_model_dir, dataset, tmp_path):
    """Training truncates from the right as LLaVA's training does, with one warning naming the tokens cut."""
    records = json.loads(_long_dataset(dataset, "long_train.json").read_text())
    answer = records[0]["conversations"][1]
    question = "<image>\n" + " ".join(["what colour is the circle"] * 100)  # ~ 505 tokens + image: the answer cut
    records[0]["conversations"] = [{"from": "human", "value": question}, answer | {
        "value": " ".join(["red"] * 40)}]
    data = dataset.parent / "long_answer.json"
    data.write_text(json.dumps(records[:4]))
    result = _run(routing_app, "train", "--model", tiny_model_dir, "--data", data, "--split", 2, "--batch-size", 4,
                  "--max-steps", 1, "--save-steps", 100, "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.replace("\r", "\n").split("\n")
                if line.startswith("warning: record too-long")]
    assert len(warnings) == 1 and "more than the model's 512 positions" in warnings[0], result.output
    assert "tokens are cut for training" in warnings[0]


def test_train_refuses_a_record_whose_cut_leaves_no_answer(tiny_model_dir, dataset, tmp_path):
    data = _long_dataset(dataset, "long_question.json")
    records = json.loads(data.read_text())[:4]
    data.write_text(json.dumps(records))
    result = _run(routing_app, "train", "--model", tiny_model_dir, "--data", data, "--split", 2, "--batch-size", 4,
                  "--max-steps", 1, "--save-steps", 100, "--out", tmp_path / "t")
    one_line_error(result, "record too-long", "leaves no answer token", strict=False)
