"""``python -m saturation.shapes``: build the sample sets, write datasets, train and evaluate the tiny LLaVA.

The top of the package: it imports the rest, and nothing imports it but ``__main__``. Torch and
transformers are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .data import SAMPLES_DIR, build_samples, held_out_keys, make_dataset


def parser() -> argparse.ArgumentParser:
    """The argument parser of all four commands."""
    p0 = argparse.ArgumentParser(prog="python -m saturation.shapes",
                                 description="The synthetic shapes world and the embedded tiny LLaVA trained on it.")
    sub = p0.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build-samples", help="write data_samples/shapes/{probe,heldout}.json and their images")
    p.add_argument("--out", default=str(SAMPLES_DIR))
    p.add_argument("--n", type=int, default=500)
    p = sub.add_parser("dataset", help="write any number of scenes as LLaVA JSON (for training other models)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="shapes")
    p.add_argument("--turns", type=int, default=1)
    p = sub.add_parser("train", help="train the tiny LLaVA from scratch (resumable); save it to --out")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", default="tiny", help="tiny (data_samples/tiny-llava) or tiny-clean (answer loss only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the recipe's)")
    p.add_argument("--eval", default=str(SAMPLES_DIR / "heldout.json"), help="JSON to evaluate on afterwards")
    p = sub.add_parser("evaluate", help="held-out accuracy by question type vs blank image and blind baseline")
    p.add_argument("--model", default="tiny")
    p.add_argument("--data", default=str(SAMPLES_DIR / "heldout.json"))
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or float16")
    return p0


def main(argv: list[str] | None = None) -> None:
    """Run one command; see ``data_samples/README.md``."""
    args = parser().parse_args(argv)
    if args.command == "build-samples":
        for path in build_samples(args.out, args.n):
            print(path)
    elif args.command == "dataset":
        print(make_dataset(args.out, args.n, args.seed, name=args.name, turns=args.turns, exclude=held_out_keys()))
    elif args.command == "train":
        from dataclasses import replace

        from saturation.core.errors import ToolkitError

        from .train import RECIPES, train

        if args.recipe not in RECIPES:
            raise ToolkitError(f"unknown recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
        overrides = {k: v for k, v in (("steps", args.steps), ("threads", args.threads)) if v}
        recipe = replace(RECIPES[args.recipe], seed=args.seed, **overrides)
        out = train(args.out, recipe, log=lambda msg: print(msg, flush=True))
        if args.eval and Path(args.eval).is_file():
            print_eval(str(out), args.eval, None)
    else:
        print_eval(args.model, args.data, args.dtype)


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
    print(json.dumps(result))
