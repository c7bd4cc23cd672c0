"""Command line: `saturation` (probe a model, recommend a split) and `routing` (build, train, evaluate DPVR).

Each command is a thin shell over a library function; bad input becomes one plain error line and exit code 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from saturation.errors import ToolkitError

err_console = Console(stderr=True)

saturation_app = typer.Typer(
    help="Saturation probe: per-layer cosine, text→image attention and logit-lens KL of a LLaVA model, "
    "a recommended split layer, and the paper's Figure 2.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
routing_app = typer.Typer(
    help="DPVR routing: build, train, evaluate, benchmark and generate with vision-token-routed LLaVA models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def friendly(fn):
    """Turn `ToolkitError` into one red line on stderr and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ToolkitError as err:
            err_console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/] (finished work is kept; rerun to resume)")
            raise typer.Exit(130) from None

    return wrapper


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'tiny' (embedded), 'llava-1.5-7b', 'llava-1.5-13b', a hub id or a local directory.")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16 | auto (default: fp32 on CPU, checkpoint dtype on GPU).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (default: cuda if available).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sample selection (and anything random).")]


@saturation_app.callback()
def _saturation() -> None:
    """Saturation probe: where do image tokens stop changing, and where can routing split the model?"""


@routing_app.callback()
def _routing() -> None:
    """DPVR routing: build, train, evaluate, benchmark and generate with routed LLaVA models."""


@saturation_app.command("probe")
@friendly
def probe_cmd(
    model: ModelOpt = "tiny",
    n: Annotated[int | None, typer.Option("--n", "-n", help="Number of samples to probe (default: 64, or all if the data has fewer).")] = None,
    data: Annotated[Path | None, typer.Option(help="LLaVA-format JSON (default: the embedded shapes samples).")] = None,
    image_folder: Annotated[Path | None, typer.Option(help="Image folder (default: the JSON's folder).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/probe/<model>).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 8,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    rule: Annotated[str, typer.Option(help="Split rule: paper | attention | cosine | conservative (see saturation.recommend).")] = "paper",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse finished shards in --out (same model, seed and data only).")] = True,
    backend: Annotated[str, typer.Option(help="hf (hooks on the anatomy) | transformer-lens (extra 'lens').")] = "hf",
) -> None:
    """Probe every decoder layer and recommend a split layer (writes tables, recommendation.json, Figure 2)."""
    from figures.figure2 import figure2_from_dir
    from saturation.probe import ProbeConfig, run_probe, summary_lines

    cfg = ProbeConfig(model=model, n=n, data=data, image_folder=image_folder, out=out, batch_size=batch_size,
                      seed=seed, dtype=dtype, device=device, rule=rule, resume=resume, backend=backend)
    result = run_probe(cfg)
    figures = figure2_from_dir(result.out)
    Console().print("\n".join(summary_lines(result, figures)), highlight=False, markup=False)


def saturation_main() -> None:  # pragma: no cover - console entry point
    saturation_app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(saturation_app())
