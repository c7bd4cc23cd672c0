"""Hooks of the local shapes tasks (shapes_gen.yaml, shapes_mc.yaml): held-out shapes records from the LLaVA
JSON in data_samples/, loaded by `datasets` (``dataset_path: json``), images opened from data_samples/shapes/.

Scored as ``routing eval`` scores them: greedy answer vs gold after `saturation.core.data.normalize_answer`.
"""

from PIL import Image

from saturation.core.data import normalize_answer
from saturation.core.loading import DATA_SAMPLES

N_DOCS = 32  # small enough for CI on two CPU cores; the test runs `routing eval` on the same records


def question(doc: dict) -> str:
    return doc["conversations"][0]["value"].removeprefix("<image>\n")


def answer(doc: dict) -> str:
    return doc["conversations"][1]["value"]


def first_docs(dataset):
    """The first `N_DOCS` held-out records, any question type (the generation task)."""
    return dataset.select(range(N_DOCS))


def first_exist_docs(dataset):
    """The first `N_DOCS` yes/no existence questions (the multiple-choice task)."""
    return dataset.filter(lambda d: d["question_type"] == "exist").select(range(N_DOCS))


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs=None) -> list:
    with Image.open(DATA_SAMPLES / "shapes" / doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    return question(doc)


def doc_to_target(doc: dict) -> str:
    return answer(doc)


def process_results(doc: dict, results: list[str]) -> dict:
    return {"shapes_exact_match": float(normalize_answer(results[0]) == normalize_answer(answer(doc)))}
