"""Where `--data` records come from: LLaVA JSON (`saturation.core.data.read_records`), or anything `datasets`
loads (a ``save_to_disk`` folder, parquet / JSONL / CSV files, an image folder with a metadata file, a hub dataset
streamed), or ``lmms:TASK`` (an installed lmms-eval task's questions through its own ``doc_to_*`` functions).

Every form gives the same `Record`s, so nothing downstream knows where they came from. The selection rule is the
same for all of them, and is today's LLaVA JSON one: with N rows in the source's order, ``--n n --seed s`` takes
rows ``random.Random(s).sample(range(N), n)`` in that order (`selection`). A map-style dataset reads only those rows
(memory-mapped Arrow); a streamed one stops after the last of them. So one set of records gives the same sample,
sample keys (the row index) and per-sample results in every form.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from saturation.core.data import IMAGE_PLACEHOLDER, Record, parse_turns, read_records, sample_indices
from saturation.core.errors import ToolkitError, first_line
from saturation.core.files import file_digest
from saturation.core.loading import hub_reachable

FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
# Column names detected when not given (first present wins): LLaVA's, plain question/answer, lmms-lab's.
IMAGE_COLUMNS = ("image", "images", "img", "image_path", "file_name")
QUESTION_COLUMNS = ("question", "query", "prompt", "instruction")
ANSWER_COLUMNS = ("answer", "answers", "label", "target", "caption")  # answers: VQA's list, its majority taken
ID_COLUMNS = ("id", "question_id", "sample_id")
TYPE_COLUMNS = ("question_type", "category")


@dataclass(frozen=True)
class DataSpec:
    """What ``--data`` and its options name: the source and, where it is a dataset, split, subset (config name),
    the columns to read (None: detected) and the image folder relative paths are read against."""

    source: str
    split: str | None = None
    subset: str | None = None
    image_column: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    image_folder: Path | None = None

    def options(self) -> dict:
        """The options besides the source, for a digest (None where not given)."""
        return {"split": self.split, "subset": self.subset, "image_column": self.image_column,
                "question_column": self.question_column, "answer_column": self.answer_column}


def as_spec(data: DataSpec | str | Path | None, default: Path | None = None) -> DataSpec:
    """`data` as a `DataSpec` (a plain path or name takes every option's default); None gives `default`."""
    if isinstance(data, DataSpec):
        return data
    if data is None:
        if default is None:
            raise ToolkitError("no --data given")
        return DataSpec(str(default))
    return DataSpec(str(data))


def data_identity(data: DataSpec | str | Path | None) -> str | dict | None:
    """A data source as a run folder records it (`run.json`): a file's digest (a moved copy keeps it), with the
    dataset options where given (split, subset, columns); None for the embedded default."""
    if data is None:
        return None
    from saturation.core.files import file_digest

    spec = as_spec(data)
    path = Path(spec.source)
    source = file_digest(path) if path.is_file() else spec.source  # a missing source is refused where it is read
    options = {k: v for k, v in spec.options().items() if v is not None}
    return {"source": source, **options} if options else source


@dataclass(frozen=True)
class Columns:
    """The columns a dataset's rows are read from (None: absent)."""

    image: str | None
    question: str | None = None
    answer: str | None = None
    conversations: str | None = None
    id: str | None = None
    question_type: str | None = None

    def describe(self) -> str:
        text = (f"conversations={self.conversations}" if self.conversations
                else f"question={self.question}, answer={self.answer}")
        return f"image={self.image}, {text}"


@dataclass
class Source:
    """An opened `--data`: its rows (a list of records, a map-style or an iterable dataset, or lmms-eval docs),
    how they become records, and what identifies it for a digest."""

    spec: DataSpec
    kind: str  # llava-json, saved, files, imagefolder, hub, lmms
    label: str  # what the printed line calls it
    rows: object = field(repr=False)
    num_rows: int | None
    columns: Columns | None
    fingerprint: str  # the content: a file digest, a dataset fingerprint, a hub name, a task name
    to_record: object = field(default=None, repr=False)  # (row, index) -> Record, for datasets and tasks

    def identity(self) -> dict:
        """What a resume must match: the source, its split, subset, columns and the content's fingerprint."""
        return {"kind": self.kind, "source": self.label, "fingerprint": self.fingerprint, **self.spec.options(),
                "columns": None if self.columns is None else self.columns.describe()}

    def describe(self, n: int) -> str:
        split = f" (split {self.spec.split})" if self.spec.split else ""
        subset = f" (subset {self.spec.subset})" if self.spec.subset else ""
        cols = f": {self.columns.describe()}" if self.columns is not None else ""
        return f"data: {n} records from {self.label}{subset}{split}{cols}"

    def select(self, n: int | None, seed: int) -> tuple[list[Record], list[int]]:
        """The chosen records and their row indices (`selection`); every row when `n` is None."""
        if self.kind == "llava-json":
            index = selection(len(self.rows), n, seed)
            return [self.rows[i] for i in index], index
        if self.num_rows is None:
            raise ToolkitError(f"{self.label}: its number of rows is unknown while streaming, so a seeded sample "
                               f"cannot be drawn; save a local copy (datasets' save_to_disk) and pass --data PATH")
        index = selection(self.num_rows, n, seed)
        rows = self.rows.select(index) if hasattr(self.rows, "select") and self.kind != "hub" else None
        if rows is not None:
            records = [self.to_record(row, i) for row, i in zip(rows, index)]
        else:
            wanted, found = set(index), {}
            for i, row in enumerate(self.rows):  # a stream: read up to the last chosen row, keep only the chosen
                if i in wanted:
                    found[i] = self.to_record(row, i)
                    if len(found) == len(wanted):
                        break
            records = [found[i] for i in index]
        if n is not None:  # a sample is checked before any work; a whole training set names a bad image when read
            for r in records:
                check_image(r)
        return records, index


def selection(num_rows: int, n: int | None, seed: int) -> list[int]:
    """The rows ``--n n --seed s`` takes of `num_rows` (all, in order, when n is None): the same draw as
    `saturation.core.data.sample_records`, so every form of the same records gives the same sample."""
    if num_rows == 0:
        raise ToolkitError("the data selection is empty: the source has no rows")
    return sample_indices(num_rows, n, seed)


_SHOWN: set[str] = set()


def announce(line: str) -> None:
    """Print `line` on stderr once per process (the columns a source was read with)."""
    if line not in _SHOWN:
        _SHOWN.add(line)
        print(line, file=sys.stderr)


def synthetic_data_warning(model: str, data) -> str | None:
    """The warning for a real checkpoint run without --data on the embedded shapes scenes (None: not needed)."""
    from saturation.core.loading import DATA_SAMPLES, EMBEDDED, resolve_name

    if data is not None or str(model) in EMBEDDED or Path(resolve_name(model)).parent == DATA_SAMPLES:
        return None
    return (f"warning: no --data: {model} runs on the embedded shapes scenes (48-px synthetic images), which are "
            f"out of distribution for a real checkpoint; pass --data (a dataset, parquet, image folder or lmms:TASK)")


def load_records(data: DataSpec | str | Path | None, n: int | None, seed: int, *, default: Path | None = None,
                 quiet: bool = False) -> tuple[Source, list[Record], list[int]]:
    """Open `data` (or `default`), draw the seeded selection, print what was read once: (source, records, rows)."""
    source = open_source(data, default=default)
    records, index = source.select(n, seed)
    if not quiet and source.kind != "llava-json":
        announce(source.describe(len(records)))
    return source, records, index


def open_source(spec: DataSpec | str | Path | None, *, split: str | None = None, subset: str | None = None,
                image_column: str | None = None, question_column: str | None = None,
                answer_column: str | None = None, default: Path | None = None) -> Source:
    """The source `spec` names (see the module docstring); keyword options override the spec's."""
    spec = as_spec(spec, default)
    given = {"split": split, "subset": subset, "image_column": image_column, "question_column": question_column,
             "answer_column": answer_column}
    spec = replace(spec, **{k: v for k, v in given.items() if v is not None})
    text = spec.source
    if text.startswith("lmms:"):
        return _open_lmms(spec)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".json" and _is_json_list(path):
        _no_dataset_options(spec, "a LLaVA JSON file")
        records = read_records(path, spec.image_folder)
        return Source(spec, "llava-json", str(path), records, len(records), None, file_digest(path))
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _open_saved(spec, path)
        return _open_builder(spec, "imagefolder", {"data_dir": str(path)}, [*sorted(path.rglob("metadata.*"))],
                             "imagefolder", path)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ToolkitError(f"--data {path}: unknown file type '{path.suffix}' (use LLaVA JSON, .parquet, "
                               f".jsonl, .csv, a save_to_disk folder, an image folder or a dataset name)")
        return _open_builder(spec, builder, {"data_files": str(path)}, [path], "files", path.parent)
    if any(ch in text for ch in "/\\") and (path.suffix or text.startswith((".", "/", "~"))):
        raise ToolkitError(f"data file not found: {path}")
    return _open_hub(spec)


def _is_json_list(path: Path) -> bool:
    """A ``.json`` file is LLaVA JSON (one list, read as always) unless it is JSON Lines: an object on its first
    line, and more lines after it."""
    import json

    with open(path, "rb") as f:
        first, second = f.readline().strip(), f.readline().strip()
    if not first.startswith(b"{") or not second:
        return True
    try:
        return not isinstance(json.loads(first), dict)
    except ValueError:
        return True


def _no_dataset_options(spec: DataSpec, what: str) -> None:
    given = [f"--{k.replace('_', '-')}" for k, v in spec.options().items() if v is not None]
    if given:
        names = [g.replace("--split", "--data-split").replace("--subset", "--data-subset") for g in given]
        raise ToolkitError(f"{', '.join(names)} apply to datasets; --data {spec.source} is {what}")


def _datasets():
    import datasets

    datasets.disable_progress_bars()  # one line per source is printed instead
    return datasets


def _pick_split(spec: DataSpec, splits: list[str], label: str) -> str:
    """The split to read: `spec.split`, or the only one, or 'test' / 'validation' / 'train' in that order."""
    if spec.split is not None:
        if spec.split not in splits:
            raise ToolkitError(f"{label}: no split '{spec.split}'; available: {', '.join(splits)}")
        return spec.split
    if len(splits) == 1:
        return splits[0]
    for name in ("test", "validation", "train"):
        if name in splits:
            return name
    raise ToolkitError(f"{label} has several splits; choose one with --data-split ({', '.join(splits)})")


def _open_saved(spec: DataSpec, path: Path) -> Source:
    datasets = _datasets()
    if spec.subset is not None:
        raise ToolkitError(f"--data-subset applies to hub datasets; {path} is a save_to_disk folder")
    try:
        ds = datasets.load_from_disk(str(path))
    except IndexError:  # datasets 5.2 on a saved table of no rows
        raise ToolkitError(f"{path} has no rows: the data selection is empty") from None
    except (ValueError, OSError) as err:
        raise ToolkitError(f"cannot read {path} with datasets.load_from_disk: {first_line(err)}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = _pick_split(spec, list(ds), str(path))
        ds, spec = ds[split], replace(spec, split=split)
    elif spec.split is not None:
        raise ToolkitError(f"{path}: no split '{spec.split}'; it holds one dataset without splits")
    return _dataset_source(spec, "saved", str(path), ds, ds._fingerprint, path)


def _open_builder(spec: DataSpec, builder: str, kwargs: dict, files: list[Path], kind: str, folder: Path) -> Source:
    """Files through `datasets`' own builder (parquet, json, csv, imagefolder): an Arrow copy in the datasets cache
    made once, then memory-mapped, so memory does not grow with the rows."""
    datasets = _datasets()
    if spec.subset is not None:
        raise ToolkitError(f"--data-subset applies to hub datasets; {spec.source} is local files")
    label = str(Path(spec.source).expanduser())
    try:
        dd = datasets.load_dataset(builder, **kwargs)
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        if "corresponds to no data" in str(err):  # the builder's word for a table of no rows
            raise ToolkitError(f"{label} has no rows: the data selection is empty") from None
        cause = err.__cause__ or err  # the generation error wraps the reader's own message
        raise ToolkitError(f"cannot read {label} with datasets' {builder} builder: {first_line(cause)}") from None
    split = _pick_split(spec, list(dd), label)
    ds = dd[split]
    digest = file_digest(*files) if files else ds._fingerprint
    return _dataset_source(replace(spec, split=split), kind, label, ds, digest, folder)


def _open_hub(spec: DataSpec) -> Source:
    """A hub dataset, streamed: rows are read as the selection reaches them, never the whole set."""
    name = spec.source
    if not hub_reachable():
        raise ToolkitError(f"cannot load dataset '{name}': it is not a local file or folder and the hub cannot be "
                           f"reached offline. Where it can, save a local copy (datasets.load_dataset('{name}')"
                           f".save_to_disk(DIR), or download its parquet files) and pass --data DIR")
    datasets = _datasets()
    try:
        splits = datasets.get_dataset_split_names(name, spec.subset)
        split = _pick_split(spec, splits, name)
        ds = datasets.load_dataset(name, spec.subset, split=split, streaming=True)
    except ToolkitError:
        raise
    except (ValueError, OSError, FileNotFoundError) as err:
        raise ToolkitError(f"cannot load dataset '{name}': {first_line(err)}") from None
    return _dataset_source(replace(spec, split=split), "hub", name, ds, name, None, split_rows(ds, split))


def split_rows(ds, split: str) -> int | None:
    """A streamed split's row count from the dataset's card (None where it does not say): the seeded selection
    needs it, and counting would read the whole stream."""
    info = ds.info.splits.get(split) if ds.info is not None and ds.info.splits else None
    return info.num_examples if info is not None and info.num_examples else None


def _dataset_source(spec: DataSpec, kind: str, label: str, ds, fingerprint: str, folder: Path | None,
                    num_rows: int | None = None) -> Source:
    """A `Source` over a datasets table: columns detected or checked against its features, images kept encoded."""
    features = ds.features
    columns = detect_columns(spec, list(features), label)
    _check_types(features, columns, label)
    image_feature = features[columns.image]
    ds = _keep_encoded(ds, columns.image, image_feature)
    num_rows = num_rows if kind == "hub" else len(ds)
    folder = spec.image_folder or folder  # relative paths in an image column

    def to_record(row: dict, index: int) -> Record:
        return row_record(row, index, columns, folder)

    return Source(spec, kind, label, ds, num_rows, columns, fingerprint, to_record)


def _keep_encoded(ds, column: str, feature):
    """Images stay encoded (``{"bytes", "path"}``) until a batch needs them: reading a row decodes nothing."""
    import datasets

    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)  # a list of images (datasets 4+: List; 3: Sequence)
    if isinstance(inner, datasets.Image) and inner.decode:
        listed = getattr(datasets, "List", None) or datasets.Sequence
        return ds.cast_column(column, listed(datasets.Image(decode=False)))
    return ds


def detect_columns(spec: DataSpec, names: list[str], label: str) -> Columns:
    """The columns to read: the given ones (checked), else LLaVA's ``conversations``, else question + answer."""
    def given(option: str, value: str | None) -> str | None:
        if value is not None and value not in names:
            raise ToolkitError(f"{label}: no column '{value}' ({option}); available: {', '.join(names)}")
        return value

    def first(candidates: tuple[str, ...]) -> str | None:
        return next((c for c in candidates if c in names), None)

    image = given("--image-column", spec.image_column) or first(IMAGE_COLUMNS)
    question = given("--question-column", spec.question_column)
    answer = given("--answer-column", spec.answer_column)
    if image is None:
        raise ToolkitError(f"{label}: no image column found; name it with --image-column (columns: {', '.join(names)})")
    conversations = "conversations" if question is None and answer is None and "conversations" in names else None
    if conversations is None:
        question, answer = question or first(QUESTION_COLUMNS), answer or first(ANSWER_COLUMNS)
        if question is None or answer is None:
            missing = "--question-column" if question is None else "--answer-column"
            raise ToolkitError(f"{label}: no {missing[2:].replace('-', ' ')} found; name it with {missing} "
                               f"(columns: {', '.join(names)})")
    return Columns(image, question, answer, conversations, first(ID_COLUMNS), first(TYPE_COLUMNS))


def _check_types(features, columns: Columns, label: str) -> None:
    """A column of the wrong type, from the schema, before any row is read."""
    import datasets

    def is_text(f) -> bool:
        return isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")

    def is_image(f) -> bool:
        if isinstance(f, datasets.Image) or is_text(f) or (isinstance(f, datasets.Value) and f.dtype in
                                                           ("binary", "large_binary")):
            return True
        if isinstance(f, dict):  # a struct with the image feature's fields
            return "bytes" in f or "path" in f
        inner = f[0] if isinstance(f, list) and f else getattr(f, "feature", None)
        return inner is not None and is_image(inner)

    if not is_image(features[columns.image]):
        raise ToolkitError(f"{label}: column '{columns.image}' holds {features[columns.image]}, not images "
                           f"(an Image feature, bytes or file paths)")
    if columns.question is not None and not is_text(features[columns.question]):
        raise ToolkitError(f"{label}: column '{columns.question}' holds {features[columns.question]}, not text")
    answer = features[columns.answer] if columns.answer is not None else None
    if answer is not None and not (is_text(answer) or is_text(getattr(answer, "feature", None))):
        raise ToolkitError(f"{label}: column '{columns.answer}' holds {answer}, not text (or a list of texts)")


def row_record(row: dict, index: int, columns: Columns, folder: Path | None) -> Record:
    """One dataset row as a `Record` (`index` is the row: the id when the table has no id column)."""
    rid = str(row[columns.id]) if columns.id is not None and row.get(columns.id) is not None else str(index)
    where = f"record {index} (id {rid})"
    image = _image_value(row.get(columns.image), where, folder)
    n_images = 0 if image is None else len(image) if isinstance(image, tuple) else 1
    if columns.conversations is not None:
        turns = parse_turns(row[columns.conversations], where, n_images)
    else:
        question, answer = row[columns.question], majority(row[columns.answer])
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ToolkitError(f"{where}: question and answer must be text")
        turns = ((question.replace(IMAGE_PLACEHOLDER, "").strip(), answer.strip()),)
    qtype = row.get(columns.question_type) if columns.question_type is not None else None
    return Record(rid, image, turns, None if qtype is None else str(qtype))


def majority(answer):
    """A list of reference answers (VQA's ten) as its most frequent one, the first of equals; text as it is."""
    if not isinstance(answer, list) or not answer:
        return answer
    counts = {}
    for a in answer:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=counts.get)  # dicts keep insertion order, so the first of equals wins


def _image_value(value, where: str, folder: Path | None):
    """A cell of the image column as what `Record.image` holds: bytes, a path, or a PIL image; a tuple of them for a
    list of images (``Sequence(Image())``), None for no image (None, an empty list, an image without bytes or path:
    a text-only record)."""
    if isinstance(value, (list, tuple)):
        images = tuple(_one_image(v, where, folder) for v in value)
        return tuple(i for i in images if i is not None) or None
    return _one_image(value, where, folder)


def _one_image(value, where: str, folder: Path | None):
    from PIL import Image

    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, (str, Path)):
        raise ToolkitError(f"{where}: the image column holds {type(value).__name__}, not an image or a path")
    path = Path(value)
    return path if path.is_absolute() or folder is None else folder / path


def check_image(record: Record) -> None:
    """An image that cannot be decoded (or a missing file) is one line naming the record, before any work: PIL's
    `verify` reads the file's structure without decoding the pixels."""
    import io

    from PIL import Image, UnidentifiedImageError

    for image in record.images:
        if isinstance(image, Image.Image):
            continue
        if isinstance(image, Path) and not image.is_file():
            raise ToolkitError(f"record {record.id}: image file not found: {image}")
        what = image if isinstance(image, Path) else io.BytesIO(image)
        try:
            with Image.open(what) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            size = "" if isinstance(image, Path) else f" ({len(image)} bytes)"
            raise ToolkitError(f"record {record.id}: cannot decode its image{size}: {first_line(err)}") from None


# --- lmms-eval tasks ---


def _open_lmms(spec: DataSpec) -> Source:
    """``lmms:TASK`` (or ``lmms:TASK@DIR``, task YAMLs in DIR as lmms-eval's --include_path): the task's
    evaluation documents, each through the task's own doc_to_visual / doc_to_text / doc_to_target."""
    name, _, include = spec.source.removeprefix("lmms:").partition("@")
    if not name:
        raise ToolkitError("--data lmms:TASK needs a task name (e.g. lmms:pope)")
    if importlib.util.find_spec("lmms_eval") is None:
        raise ToolkitError("--data lmms:TASK needs lmms-eval: pip install 'dpvr-toolkit[eval]'")
    _no_dataset_options(spec, "an lmms-eval task (its YAML chooses split and columns)")
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=include or None)
    if name not in manager.all_tasks:
        close = sorted(t for t in manager.all_tasks if name.split("_")[0] in t)[:8]
        raise ToolkitError(f"unknown lmms-eval task '{name}'" + (f"; similar: {', '.join(close)}" if close else ""))
    leaves = _leaf_tasks(get_task_dict([name], manager))
    if len(leaves) != 1:  # a group (or tag) of tasks: the records must come from one
        raise ToolkitError(f"lmms:{name} is a group of {len(leaves)} tasks; name one: "
                           f"{', '.join(sorted(map(str, leaves)))}")
    task = next(iter(leaves.values()))
    docs = task.eval_docs
    label = f"lmms:{name}"

    def to_record(doc: dict, index: int) -> Record:
        where = f"record {index} of {label}"
        image = _image_value(list(task.doc_to_visual(doc) or []), where, None)
        target = task.doc_to_target(doc)
        if isinstance(target, list):
            target = target[0] if target else ""
        text = task.doc_to_text(doc)
        if not isinstance(text, str):
            raise ToolkitError(f"{where}: the task's doc_to_text gave {type(text).__name__}, not text")
        rid = str(doc.get("id", doc.get("question_id", index))) if isinstance(doc, dict) else str(index)
        qtype = doc.get("question_type", doc.get("category")) if isinstance(doc, dict) else None
        return Record(rid, image, ((text.replace(IMAGE_PLACEHOLDER, "").strip(), str(target).strip()),),
                      None if qtype is None else str(qtype))

    import lmms_eval

    version = getattr(lmms_eval, "__version__", "?")
    return Source(spec, "lmms", label, docs, len(docs), None, f"{label}@{include or ''}:{version}", to_record)


def _leaf_tasks(tree: dict) -> dict:
    """The tasks of lmms-eval's ``get_task_dict`` answer, groups (nested dicts) flattened."""
    leaves = {}
    for key, value in tree.items():
        leaves.update(_leaf_tasks(value) if isinstance(value, dict) else {key: value})
    return leaves

