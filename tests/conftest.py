"""Tiny random LLaVA models of the exact llava-hf architecture, built in code, plus small LLaVA-format data."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import LlavaForConditionalGeneration

from saturation.core.tiny import tiny_llava_config, tiny_processor

# Toy models gain nothing from intra-op threads, and on a shared 2-core machine they lose a lot to contention.
torch.set_num_threads(1)

WORDS = ("what", "colour", "is", "the", "circle", "square", "shape", "red", "blue", "green", "how", "many",
         "are", "there", "yes", "no", "one", "two", "left", "right", "a")
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}


def pytest_addoption(parser):
    parser.addoption("--compile-backend", default="eager",
                     help="torch.compile backend of tests/test_compile.py: eager (dynamo's graph capture, fast), "
                          "aot_eager, or inductor (the generated kernels too; tools/ci_compile.sh)")


@pytest.fixture(scope="session")
def processor():
    """An offline LlavaProcessor: 32 px images, patch 16 → 4 image tokens."""
    return tiny_processor(WORDS, image_size=32, patch_size=16)


def make_model(processor, seed: int = 0, **overrides) -> LlavaForConditionalGeneration:
    """A random tiny LLaVA in eval mode; grouped-query attention (4 heads, 2 KV heads) unless overridden."""
    kw = {"kv_heads": 2, "layers": 6, "hidden": 64, "heads": 4} | overrides
    cfg = tiny_llava_config(len(processor.tokenizer), image_size=32, patch_size=16, **kw)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model(processor):
    return make_model(processor)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, processor, tiny_model) -> Path:
    """The tiny model and processor saved with `save_pretrained`, as a user's local checkpoint would be."""
    d = tmp_path_factory.mktemp("tiny-llava")
    tiny_model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def write_dataset(folder: Path, n: int = 12) -> Path:
    """`n` single-turn LLaVA records about one coloured shape each; returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    records = []
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        im = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(im).ellipse((4 + i % 5, 4, 24 + i % 5, 24), fill=COLOURS[colour])
        im.save(folder / "images" / f"{i}.png")
        records.append({
            "id": f"s{i}",
            "image": f"images/{i}.png",
            "question_type": "colour",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is the circle?"},
                {"from": "gpt", "value": colour},
            ],
        })
    path = folder / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))
