"""`--data` beyond LLaVA JSON (`saturation.core.sources`): the same shapes records as a `save_to_disk` folder (PIL
images), parquet (image bytes), an image folder with ``metadata.jsonl`` and JSON Lines with LLaVA conversations give
the same seeded sample, the same probe per-sample results and the same `routing eval` answers as the LLaVA JSON
they came from; bad input is one line. No network: ``HF_HUB_OFFLINE=1`` (conftest)."""

import io
import json
import shutil

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import routing_app, saturation_app
from saturation.core.data import load_image, read_records
from saturation.core.errors import ToolkitError
from saturation.core.loading import DATA_SAMPLES, load_model
from saturation.core.sources import DataSpec, load_records, open_source, selection, synthetic_data_warning
from saturation.probe import ProbeConfig, run_probe

datasets = pytest.importorskip("datasets")
runner = CliRunner()
SHAPES = DATA_SAMPLES / "shapes"
N_ROWS = 40  # the first rows of the embedded probe set: enough for a seeded sample of 6


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """The builders' Arrow copies go to a temporary cache, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict:
    """The first `N_ROWS` embedded probe records in every form `--data` reads."""
    root = tmp_path_factory.mktemp("forms")
    raw = json.loads((SHAPES / "probe.json").read_text())[:N_ROWS]
    (root / "llava").mkdir()
    (root / "llava" / "probe.json").write_text(json.dumps(raw))
    (root / "llava" / "images").symlink_to(SHAPES / "images")

    def pil(r):  # a copy has no file name behind it, so datasets stores the PNG bytes
        with Image.open(SHAPES / r["image"]) as im:
            return im.convert("RGB").copy()

    rows = {"id": [r["id"] for r in raw], "image": [pil(r) for r in raw],
            "question": [r["conversations"][0]["value"].replace("<image>\n", "") for r in raw],
            "answer": [r["conversations"][1]["value"] for r in raw],
            "question_type": [r["question_type"] for r in raw], "count": list(range(len(raw)))}
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    ds.save_to_disk(str(root / "saved"))
    ds.to_parquet(str(root / "rows.parquet"))
    folder = root / "imagefolder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for r in raw:
            shutil.copy(SHAPES / r["image"], folder / r["image"].split("/")[-1])
            f.write(json.dumps({"file_name": r["image"].split("/")[-1], "id": r["id"], "question_type": r["question_type"],
                                "question": r["conversations"][0]["value"], "answer": r["conversations"][1]["value"]}) + "\n")
    (root / "jsonl").mkdir()
    (root / "jsonl" / "images").symlink_to(SHAPES / "images")
    with open(root / "jsonl" / "rows.jsonl", "w") as f:
        for r in raw:
            f.write(json.dumps({k: r[k] for k in ("id", "image", "conversations", "question_type")}) + "\n")
    return {"llava": root / "llava" / "probe.json", "saved": root / "saved", "parquet": root / "rows.parquet",
            "imagefolder": folder, "jsonl": root / "jsonl" / "rows.jsonl"}


def pixels(record) -> bytes:
    return load_image(record).tobytes()


@pytest.mark.parametrize("form", ["saved", "parquet", "imagefolder", "jsonl"])
def test_every_form_gives_the_llava_json_sample(forms, form):
    _, want, want_rows = load_records(forms["llava"], 6, 3)
    source, got, rows = load_records(forms[form], 6, 3)
    assert rows == want_rows == selection(N_ROWS, 6, 3)
    assert [r.id for r in got] == [r.id for r in want]
    assert [r.turns for r in got] == [r.turns for r in want]
    assert [r.question_type for r in got] == [r.question_type for r in want]
    assert [pixels(r) for r in got] == [pixels(r) for r in want]
    assert source.columns.image == "image"
    if form == "parquet":  # the parquet holds the images as bytes, and a record keeps them encoded
        assert all(isinstance(r.image, bytes) for r in got)


def test_selection_is_todays_llava_json_draw(forms):
    from saturation.core.data import sample_records

    records = read_records(forms["llava"])
    assert [r.id for r in load_records(forms["llava"], 9, 5)[1]] == [r.id for r in sample_records(records, 9, 5)]


def test_a_list_of_answers_gives_its_majority(forms, tmp_path):
    from saturation.core.sources import majority

    assert majority(["two", "2", "two", "2"]) == "two" and majority(["a", "b", "b"]) == "b" and majority("x") == "x"
    ds = datasets.load_from_disk(str(forms["saved"]))
    ds = ds.map(lambda r: {"answers": [r["question_type"], r["answer"], r["answer"]]}).remove_columns("answer")
    ds.save_to_disk(str(tmp_path / "vqa"))
    source, got, _ = load_records(tmp_path / "vqa", 6, 3)
    assert source.columns.answer == "answers"
    assert [r.turns for r in got] == [r.turns for r in load_records(forms["llava"], 6, 3)[1]]


def test_the_columns_are_printed_once(forms, capsys):
    load_records(DataSpec(str(forms["parquet"]), split="train"), 5, 0)
    load_records(DataSpec(str(forms["parquet"]), split="train"), 5, 0)
    err = capsys.readouterr().err
    line = f"data: 5 records from {forms['parquet']} (split train): image=image, question=question, answer=answer"
    assert err.count(line) == 1, err


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def probe_table(tiny, data, out) -> pd.DataFrame:
    model, processor = tiny
    result = run_probe(ProbeConfig(n=6, data=data, out=out, batch_size=3, progress=False, seed=1),
                       model=model, processor=processor)
    return pd.read_parquet(result.table_path)


def test_probe_results_are_identical_in_every_form(forms, tiny, tmp_path):
    want = probe_table(tiny, forms["llava"], tmp_path / "llava")
    assert len(want["sample"].unique()) == 6
    for form in ("saved", "parquet", "imagefolder", "jsonl"):
        got = probe_table(tiny, forms[form], tmp_path / form)
        pd.testing.assert_frame_equal(got, want, check_exact=True, obj=form)


def test_eval_answers_are_identical_in_every_form(forms, tiny):
    from routing.jobs.evaluate import evaluate

    model, processor = tiny
    tables = {form: evaluate(model, processor, load_records(forms[form], 8, 0)[1], batch_size=4)[1]
              for form in ("llava", "saved", "parquet", "imagefolder")}
    for form, table in tables.items():
        pd.testing.assert_frame_equal(table, tables["llava"], obj=form)


def test_eval_command_reads_a_dataset_with_its_options(forms, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--data", str(forms["saved"]), "--question-column", "question", "--answer-column", "answer",
            "--image-column", "image", "--n", "4", "--json", str(out)]
    result = runner.invoke(routing_app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["n"] == 4


def test_the_manifest_covers_how_the_data_was_read(forms, tiny, tmp_path):
    """A resume with other columns would mix data: the manifest has them and the probe refuses."""
    model, processor = tiny
    probe_table(tiny, forms["parquet"], tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "samples" / "manifest.json").read_text())
    assert manifest["data_source"]["split"] == "train" and "answer=answer" in manifest["data_source"]["columns"]
    other = DataSpec(str(forms["parquet"]), answer_column="question_type")
    with pytest.raises(ToolkitError, match="different run"):
        run_probe(ProbeConfig(n=6, data=other, out=tmp_path / "p", batch_size=3, progress=False, seed=1),
                  model=model, processor=processor)


def test_run_digest_covers_how_the_data_was_read(forms):
    from routing.jobs.runs import records_digest

    records = load_records(forms["saved"], None, 0)[1]
    plain = records_digest(records, DataSpec(str(forms["saved"])))
    assert plain == records_digest(records)  # nothing chosen beyond the path: the records alone
    assert records_digest(records, DataSpec(str(forms["saved"]), answer_column="answer")) != plain
    assert records_digest(load_records(forms["llava"], None, 0)[1]) != plain  # paths vs in-memory images


def test_a_streamed_hub_dataset_reads_only_up_to_the_last_chosen_row(forms, monkeypatch):
    """The hub path with the network faked: the parquet streamed (an IterableDataset, as load_dataset(name,
    streaming=True) gives) yields the same sample, and iteration stops after the last chosen row."""
    from saturation.core import sources

    stream = datasets.load_dataset("parquet", data_files=str(forms["parquet"]), split="train", streaming=True)
    monkeypatch.setattr(sources, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, subset=None: ["test", "train"])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, subset, split, streaming: stream)
    monkeypatch.setattr(sources, "split_rows", lambda ds, split: N_ROWS)
    seen = []
    real = sources.row_record
    monkeypatch.setattr(sources, "row_record", lambda row, i, *a: seen.append(i) or real(row, i, *a))
    source, got, rows = load_records(DataSpec("someone/shapes", split="test"), 6, 3)
    _, want, want_rows = load_records(forms["llava"], 6, 3)
    assert source.kind == "hub" and rows == want_rows
    assert [r.id for r in got] == [r.id for r in want] and [pixels(r) for r in got] == [pixels(r) for r in want]
    assert sorted(seen) == sorted(rows)  # only the chosen rows became records
    with pytest.raises(ToolkitError, match="no split 'val'; available: test, train"):
        open_source(DataSpec("someone/shapes", split="val"))
    monkeypatch.setattr(sources, "split_rows", lambda ds, split: None)
    with pytest.raises(ToolkitError, match="unknown while streaming"):
        load_records(DataSpec("someone/shapes", split="test"), 6, 3)


# --- bad input: one line, nothing created ---


def one_line(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def probe_cli(tmp_path, *args):
    out = tmp_path / "out"
    result = runner.invoke(saturation_app, ["probe", "--out", str(out), "--n", "4", *map(str, args)])
    assert not out.exists()
    return result


def test_a_hub_dataset_offline_is_one_line(tmp_path):
    one_line(probe_cli(tmp_path, "--data", "lmms-lab/POPE", "--data-split", "test"),
             "lmms-lab/POPE", "offline", "save_to_disk")


def test_unknown_split_lists_the_splits(forms, tmp_path):
    one_line(probe_cli(tmp_path, "--data", forms["parquet"], "--data-split", "test"), "no split 'test'", "train")


def test_unknown_column_lists_the_columns(forms, tmp_path):
    one_line(probe_cli(tmp_path, "--data", forms["saved"], "--answer-column", "reply"),
             "no column 'reply'", "question_type")


def test_a_column_of_the_wrong_type(forms, tmp_path):
    one_line(probe_cli(tmp_path, "--data", forms["saved"], "--answer-column", "count"), "'count'", "not text")


def test_an_empty_selection(forms, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("id,image,question,answer\n")
    one_line(probe_cli(tmp_path, "--data", empty), "no rows", "selection is empty")
    one_line(probe_cli(tmp_path, "--data", forms["saved"], "--n", "41"), "only 40")


def test_an_image_that_fails_to_decode_names_the_record(forms, tmp_path):
    table = pd.read_parquet(forms["parquet"])
    table.at[0, "image"] = {"bytes": b"not a png", "path": None}
    bad = tmp_path / "bad.parquet"
    table.to_parquet(bad)
    one_line(probe_cli(tmp_path, "--data", bad, "--n", str(N_ROWS)), "record probe-00000", "cannot decode")


def test_a_list_of_images_is_one_record_with_several_and_none_is_text_only(forms, tmp_path):
    """An image column of lists (``Sequence(Image())``) gives records with several images, in order; a row whose
    image is None is a text-only record, which the probe refuses in one line naming it (nothing to compare)."""
    ds = datasets.load_from_disk(str(forms["saved"]))
    two = ds.map(lambda r: {"images": [r["image"], r["image"]]}).remove_columns("image")
    two.save_to_disk(str(tmp_path / "two"))
    records = load_records(tmp_path / "two", 2, 0)[1]
    assert all(len(r.images) == 2 and r.images[0] == r.images[1] for r in records)
    rows = pd.read_parquet(forms["parquet"])
    rows.at[0, "image"] = None
    rows.to_parquet(tmp_path / "none.parquet")
    text_only = load_records(tmp_path / "none.parquet", None, 0)[1][0]
    assert text_only.image is None and text_only.images == ()
    one_line(probe_cli(tmp_path, "--data", tmp_path / "none.parquet", "--n", str(N_ROWS)), "record probe-00000",
             "no image", "text-only")


def test_dataset_options_without_data_are_one_line(tmp_path):
    one_line(probe_cli(tmp_path, "--data-split", "test"), "--data-split", "pass --data")


@pytest.mark.skipif(__import__("importlib").util.find_spec("lmms_eval") is not None, reason="lmms-eval is installed")
def test_lmms_task_without_lmms_eval_names_the_extra(tmp_path):
    one_line(probe_cli(tmp_path, "--data", "lmms:pope"), "lmms-eval", "[eval]")


def test_real_checkpoint_without_data_is_warned():
    text = synthetic_data_warning("llava-1.5-7b", None)
    assert "synthetic" in text and "--data" in text
    assert synthetic_data_warning("tiny", None) is None and synthetic_data_warning("tiny-clean", None) is None
    assert synthetic_data_warning("llava-1.5-7b", "lmms:pope") is None


def test_a_checkpoint_probed_without_data_is_warned_once(tiny_model_dir, tmp_path):
    result = runner.invoke(saturation_app, ["probe", "--model", str(tiny_model_dir), "--n", "2", "--batch-size", "2",
                                            "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: no --data") == 1 and "out of distribution" in result.output
    embedded = runner.invoke(saturation_app, ["probe", "--n", "2", "--batch-size", "2", "--out", str(tmp_path / "t")])
    assert embedded.exit_code == 0 and "warning" not in embedded.output


def test_a_bytes_image_opens_like_its_file(forms):
    record = load_records(forms["parquet"], 1, 0)[1][0]
    with Image.open(io.BytesIO(record.image)) as im:
        assert im.format == "PNG"
    assert open_source(forms["parquet"]).identity()["kind"] == "files"


# --- lmms-eval tasks ---


@pytest.fixture
def heldout_json(tmp_path) -> object:
    """The first 32 held-out records (the documents of tests/lmms_tasks/shapes_gen.yaml) as LLaVA JSON."""
    heldout = json.loads((SHAPES / "heldout.json").read_text())[:32]
    (tmp_path / "images").symlink_to(SHAPES / "images")
    (tmp_path / "heldout.json").write_text(json.dumps(heldout))
    return tmp_path / "heldout.json"


def test_lmms_task_through_its_own_doc_functions(heldout_json, tiny, tmp_path, monkeypatch):
    """Our side of ``lmms:TASK`` with lmms-eval's TaskManager / get_task_dict stood in for (the main venv has no
    lmms-eval): shapes_gen's documents through its own utils.doc_to_visual / doc_to_text / doc_to_target give the
    LLaVA JSON form's records and probe results; a group names its tasks; an unknown task is one line."""
    import importlib.machinery
    import sys
    import types

    sys.path.insert(0, str(DATA_SAMPLES.parent / "tests" / "lmms_tasks"))
    try:
        import utils as task_utils
    finally:
        sys.path.pop(0)
    docs = datasets.load_dataset("json", data_files=str(SHAPES / "heldout.json"), split="train").select(range(32))
    task = types.SimpleNamespace(eval_docs=docs, doc_to_visual=task_utils.doc_to_visual,
                                 doc_to_text=task_utils.doc_to_text, doc_to_target=task_utils.doc_to_target)
    tasks = {"shapes_gen": {"shapes_gen": task}, "shapes_all": {"group": {"a": task, "b": task}}}
    fake = types.ModuleType("lmms_eval")
    fake.__spec__ = importlib.machinery.ModuleSpec("lmms_eval", None)
    fake.tasks = types.ModuleType("lmms_eval.tasks")
    fake.tasks.TaskManager = lambda include_path=None: types.SimpleNamespace(all_tasks=sorted(tasks))
    fake.tasks.get_task_dict = lambda names, manager: tasks[names[0]]
    monkeypatch.setitem(sys.modules, "lmms_eval", fake)
    monkeypatch.setitem(sys.modules, "lmms_eval.tasks", fake.tasks)

    _, want, _ = load_records(heldout_json, 6, 0)
    source, got, _ = load_records("lmms:shapes_gen", 6, 0)
    assert source.kind == "lmms" and [r.id for r in got] == [r.id for r in want]
    assert [r.turns for r in got] == [r.turns for r in want]
    assert [pixels(r) for r in got] == [pixels(r) for r in want]
    pd.testing.assert_frame_equal(probe_table(tiny, "lmms:shapes_gen", tmp_path / "lmms"),
                                  probe_table(tiny, heldout_json, tmp_path / "json"), check_exact=True)
    with pytest.raises(ToolkitError, match="group of 2 tasks; name one: a, b"):
        open_source("lmms:shapes_all")
    with pytest.raises(ToolkitError, match="unknown lmms-eval task 'shapes_nope'; similar: shapes_all, shapes_gen"):
        open_source("lmms:shapes_nope")


# --- a real lmms-eval task (only where lmms-eval is installed: tools/ci_eval.sh) ---


def test_lmms_task_gives_the_llava_json_records(heldout_json, monkeypatch):
    pytest.importorskip("lmms_eval")
    repo = DATA_SAMPLES.parent
    monkeypatch.chdir(repo)  # the task's data_files is relative to the repository root
    spec = f"lmms:shapes_gen@{repo / 'tests' / 'lmms_tasks'}"
    _, want, _ = load_records(heldout_json, 6, 0)
    _, got, _ = load_records(spec, 6, 0)
    assert [r.id for r in got] == [r.id for r in want] and [r.turns for r in got] == [r.turns for r in want]
    assert [pixels(r) for r in got] == [pixels(r) for r in want]
    with pytest.raises(ToolkitError, match="unknown lmms-eval task"):
        open_source(f"lmms:no_such_task@{repo / 'tests' / 'lmms_tasks'}")


def test_compare_and_reproduce_record_a_dataset_source_in_run_json(tmp_path):
    """A dataset given to compare or reproduce is part of its run identity, options included (a rerun on another
    split is another run); it once crashed there (Path(DataSpec))."""
    from routing.jobs.compare import CompareConfig, compare_identity, parse_plans
    from routing.jobs.reproduce import ReproduceConfig, reproduce_identity
    from saturation.core.sources import DataSpec, data_identity

    spec = DataSpec(str(tmp_path / "pope"), split="test", question_column="q")
    expected = {"source": str(tmp_path / "pope"), "split": "test", "question_column": "q"}
    assert data_identity(spec) == expected and data_identity(None) is None
    assert data_identity(DataSpec(str(tmp_path / "pope"))) == str(tmp_path / "pope")
    cfg = CompareConfig(plans="vanilla", data=spec, out=tmp_path / "cmp")
    assert compare_identity(cfg, parse_plans("vanilla"))["data"] == expected
    rep = ReproduceConfig(model="tiny", out=tmp_path / "rep", eval_data=spec)
    assert reproduce_identity(rep)["eval_data"] == expected
    other = ReproduceConfig(model="tiny", out=tmp_path / "rep", eval_data=DataSpec(spec.source, split="val"))
    assert reproduce_identity(other) != reproduce_identity(rep)
