"""``python -m saturation.shapes``: build the sample sets, write datasets, train and evaluate the tiny LLaVA.

The top of the package: it imports the rest, and nothing imports it but ``__main__``. Torch and
transformers are imported only by the commands that need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from saturation.core.console import console_entry, friendly, typer_app

from .data import SAMPLES_DIR, build_samples, held_out_keys, make_dataset

app = typer_app("The synthetic shapes world and the embedded tiny LLaVA trained on it (see data_samples/README.md).")
HELD_OUT = str(SAMPLES_DIR / "heldout.json")


@app.command("build-samples")
@friendly
def build_samples_cmd(
    out: Annotated[str, typer.Option(help="Folder for probe.json, heldout.json and their images.")] = str(SAMPLES_DIR),
    n: Annotated[int, typer.Option(help="Scenes per set.")] = 500,
) -> None:
    """Write data_samples/shapes/{probe,heldout}.json and their images."""
    for path in build_samples(out, n):
        print(path)


@app.command("dataset")
@friendly
def dataset_cmd(
    out: Annotated[str, typer.Option(help="Folder to write the LLaVA JSON and images into.")],
    n: Annotated[int, typer.Option(help="Number of scenes.")],
    seed: Annotated[int, typer.Option(help="Seed of the scenes and questions.")] = 0,
    name: Annotated[str, typer.Option(help="Base name of the JSON file and image folder.")] = "shapes",
    turns: Annotated[int, typer.Option(help="Question/answer turns per scene.")] = 1,
) -> None:
    """Write any number of scenes as LLaVA JSON (for training other models); held-out scenes are excluded."""
    print(make_dataset(out, n, seed, name=name, turns=turns, exclude=held_out_keys()))


@app.command("train")
@friendly
def train_cmd(
    out: Annotated[str, typer.Option(help="Folder the trained model is saved to (resumable).")],
    recipe: Annotated[str, typer.Option(help="tiny (data_samples/tiny-llava) or tiny-clean (answer loss only).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the data and the initialisation.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Stage-2 steps (default: the recipe's).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: the recipe's).")] = None,
    eval: Annotated[str, typer.Option("--eval", help="JSON to evaluate on afterwards.")] = HELD_OUT,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue a run of the same recipe in --out (a finished one is kept); --no-resume trains afresh.")] = True,
) -> None:
    """Train the tiny LLaVA from scratch (resumable) and save it to --out."""
    from dataclasses import replace

    from saturation.core.errors import ToolkitError

    from .train import RECIPES, train

    if recipe not in RECIPES:
        raise ToolkitError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    overrides = {k: v for k, v in (("steps", steps), ("threads", threads)) if v}
    chosen = replace(RECIPES[recipe], seed=seed, **overrides)
    trained = train(out, chosen, log=lambda msg: print(msg, flush=True), resume=resume)
    if eval and Path(eval).is_file():
        print_eval(str(trained), eval, None)


@app.command("train-text")
@friendly
def train_text_cmd(
    out: Annotated[str, typer.Option(help="Folder the text-stage LM is saved to (resumable).")],
    recipe: Annotated[str, typer.Option(help="A text-stage recipe (saturation.shapes.text_stage.TEXT_RECIPES).")] = "answers",
    seed: Annotated[int, typer.Option(help="Seed of the batches and the initialisation.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the recipe's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: the recipe's).")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size (default: the recipe's).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: the recipe's).")] = None,
    eval: Annotated[str, typer.Option("--eval", help="Single-turn shapes JSON scored as text during training.")] = HELD_OUT,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue a run of the same recipe in --out; --no-resume trains afresh.")] = True,
) -> None:
    """Train the embedded model's LM on the shapes world written in words (the text stage; answer loss only)."""
    from saturation.core.data import read_records

    from .text_stage import recipe_named, train_text

    chosen = recipe_named(recipe, seed=seed, steps=steps, lr=lr, batch=batch, threads=threads)
    records = read_records(eval, check_images=False) if eval else None
    train_text(out, chosen, log=lambda msg: print(msg, flush=True), resume=resume, eval_records=records)


@app.command("train-staged")
@friendly
def train_staged_cmd(
    out: Annotated[str, typer.Option(help="Folder the model is saved to (resumable; the text stage goes to OUT/text-lm).")],
    recipe: Annotated[str, typer.Option(help="A staged recipe (saturation.shapes.staged.STAGED_RECIPES).")] = "staged",
    seed: Annotated[int, typer.Option(help="Seed of every stage.")] = 0,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: the recipe's).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue a run of the same recipe in --out; --no-resume trains afresh.")] = True,
) -> None:
    """Text stage, vision tower, alignment, instruction tuning: the embedded model with the answer loss alone."""
    from dataclasses import replace

    from saturation.core.errors import ToolkitError

    from .staged import STAGED_RECIPES, train_staged

    if recipe not in STAGED_RECIPES:
        raise ToolkitError(f"unknown staged recipe {recipe!r}; choose one of {', '.join(STAGED_RECIPES)}")
    chosen = replace(STAGED_RECIPES[recipe], seed=seed, **({"threads": threads} if threads else {}))
    trained = train_staged(out, chosen, log=lambda msg: print(msg, flush=True), resume=resume)
    print_eval(str(trained), HELD_OUT, None)


@app.command("evaluate")
@friendly
def evaluate_cmd(
    model: Annotated[str, typer.Option(help="'tiny', 'tiny-clean', 'tiny-staged' or a model folder.")] = "tiny",
    data: Annotated[str, typer.Option(help="LLaVA JSON of held-out questions.")] = HELD_OUT,
    dtype: Annotated[str | None, typer.Option(help="float32 (CPU default) or float16.")] = None,
) -> None:
    """Held-out accuracy by question type against a blank image and a blind baseline."""
    print_eval(model, data, dtype)


def print_eval(model_name: str, data: str, dtype: str | None) -> None:
    """Print the held-out table of `model_name` on `data`, then the same result as one JSON line."""
    import torch

    from saturation.core.data import read_records
    from saturation.core.loading import load_model

    from .evaluate import evaluate, markdown_table

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, processor = load_model(model_name, dtype=dtype, device="cpu")
    result = evaluate(model, processor, read_records(data))
    print(markdown_table(result))
    if (e := result["position_errors"])["shape_shared"]:
        print(f"position: {e['shape_shared_right']} of the {e['shape_shared']} questions whose object shares its shape "
              f"with another are right; of {e['wrong']} wrong answers, {e['same_shape']} name another object of "
              f"the same shape, {e['same_colour']} of the same colour, {e['other_object']} another object, "
              f"{e['no_object']} no object")
    print(json.dumps(result))


main = console_entry(app)
