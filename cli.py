"""Command line: `saturation` (probe a model, recommend a split) and `routing` (build, train, evaluate DPVR).

Each command is a thin shell over a library function; bad input becomes one plain error line and exit code 1
(click's usage errors, caught by the console scripts `saturation_main`/`routing_main`: one line and exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from saturation.core.console import console_entry, err_console, friendly, typer_app
from saturation.core.errors import ToolkitError
from saturation.core.files import atomic_write, ensure_output_dir, ensure_output_file, write_json
from saturation.core.runs import locked

saturation_app = typer_app("Saturation probe: per-layer cosine, text→image attention and logit-lens KL of a LLaVA "
                            "model, a recommended split layer, and the paper's Figure 2.")
routing_app = typer_app("DPVR routing: build, train, evaluate, benchmark and generate with vision-token-routed LLaVA "
                        "models.")


def require_positive(**options: int | None) -> None:
    """One plain line for a count below 1 (typer's own ``min=`` would print a usage box and exit 2)."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise ToolkitError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have now, before data or weights are read."""
    if device is not None:
        from saturation.core.loading import resolve_device

        resolve_device(device)


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'tiny' (embedded, default), 'tiny-clean', 'tiny-staged', an alias (llava-1.5-7b/13b, llava-next-7b, llava-next-vicuna-7b, llava-onevision-7b/0.5b, qwen2.5-vl-3b/7b, qwen3-vl-2b/8b, gemma-3-4b/12b/27b), a hub id or a local directory.")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16 | auto (default: fp32 on CPU, checkpoint dtype on GPU).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (default: cuda if available).")]
DeviceMapOpt = Annotated[str | None, typer.Option(help="auto | balanced | sequential: accelerate places the layers across GPUs, CPU and disk (a model larger than one device); not with --device or torchrun.")]
MaxMemoryOpt = Annotated[str | None, typer.Option(help="With --device-map: per-device caps, e.g. 0=20GiB,1=20GiB,cpu=64GiB (beyond them: offload to disk).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sample selection (and anything random).")]
DATA_HELP = ("LLaVA JSON, a dataset (a save_to_disk folder, .parquet/.jsonl/.csv, an image folder with metadata, a "
             "hub name such as lmms-lab/POPE, streamed) or lmms:TASK (an installed lmms-eval task)")
DataSplitOpt = Annotated[str | None, typer.Option("--data-split", help="The dataset's split (default: its only one, else test, validation, train). Not --split, the routing split.")]
DataSubsetOpt = Annotated[str | None, typer.Option("--data-subset", help="The dataset's config name (hub datasets).")]
ImageColumnOpt = Annotated[str | None, typer.Option("--image-column", help="Column of images: PIL, bytes or paths (default: detected: image, images, img, ...).")]
QuestionColumnOpt = Annotated[str | None, typer.Option("--question-column", help="Column of questions (default: LLaVA's conversations, else detected: question, query, ...).")]
AnswerColumnOpt = Annotated[str | None, typer.Option("--answer-column", help="Column of answers (default: detected: answer, label, ...).")]
CompileOpt = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile (inductor, dynamic shapes) the routed model's layer groups and vanilla's decoder stack; the first calls compile (about a minute for the embedded model on CPU). Not with --device-map.")]


@saturation_app.callback()
def _saturation() -> None:
    """Saturation probe: where do image tokens stop changing, and where can routing split the model?"""


@routing_app.callback()
def _routing() -> None:
    """DPVR routing: build, train, evaluate, benchmark and generate with routed LLaVA models."""


def data_spec(data: str | None, data_split: str | None = None, data_subset: str | None = None,
              image_column: str | None = None, question_column: str | None = None, answer_column: str | None = None,
              image_folder: Path | None = None, option: str = "--data"):
    """The `--data` options as one `saturation.core.sources.DataSpec` (None without --data)."""
    if data is None:
        given = [name for name, v in (("--data-split", data_split), ("--data-subset", data_subset),
                                      ("--image-column", image_column), ("--question-column", question_column),
                                      ("--answer-column", answer_column)) if v is not None]
        if given:
            raise ToolkitError(f"{', '.join(given)} choose what {option} reads; pass {option} too")
        return None
    from saturation.core.sources import DataSpec

    return DataSpec(str(data), data_split, data_subset, image_column, question_column, answer_column, image_folder)


def warn_synthetic(model: str | None, data) -> None:
    """A real checkpoint without --data: say once that the embedded shapes scenes are out of its distribution."""
    from saturation.core.sources import announce, synthetic_data_warning

    warning = synthetic_data_warning(model or "tiny", data)
    if warning:
        announce(warning)


@saturation_app.command("probe")
@friendly
def probe_cmd(
    model: ModelOpt = "tiny",
    n: Annotated[int | None, typer.Option("--n", "-n", help="Number of samples to probe (default: 64, or all if the data has fewer).")] = None,
    data: Annotated[str | None, typer.Option(help=DATA_HELP + " (default: the embedded shapes samples).")] = None,
    image_folder: Annotated[Path | None, typer.Option(help="Image folder (default: the JSON's folder).")] = None,
    data_split: DataSplitOpt = None,
    data_subset: DataSubsetOpt = None,
    image_column: ImageColumnOpt = None,
    question_column: QuestionColumnOpt = None,
    answer_column: AnswerColumnOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/probe/<model>).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 8,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    rule: Annotated[str, typer.Option(help="Split rule: auto (the paper's rule as a floor, later while text still reads image tokens that are not yet close to final) | paper (as published: s = L_trans - round(L/8)) | attention | cosine | conservative (the latest of all). See saturation.recommend.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse finished shards in --out (same model, seed and data only).")] = True,
    backend: Annotated[str, typer.Option(help="hf (hooks on the anatomy) | transformer-lens (extra 'lens').")] = "hf",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    lens_positions: Annotated[int | None, typer.Option(help="Logit lens on a seeded sample of N positions per sample (half image, half text; from --seed and the record id), the other views on all (default: all).")] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="Refused: the probe's forward hooks read every layer's output and attention, which breaks a compiled graph at each layer.")] = False,
) -> None:
    """Probe every decoder layer and recommend a split layer (writes tables, recommendation.json, Figure 2)."""
    if compile:  # hooks on every layer (and eager attention for the patterns) leave nothing for a graph to fuse
        raise ToolkitError("saturation probe does not take --compile: its forward hooks read every decoder layer's "
                           "output and attention pattern, so a compiled graph would break at each layer (compile "
                           "time, no speed-up); run it without --compile")
    from figures.figure2 import figure2_from_dir
    from saturation.probe import ProbeConfig, run_probe, summary_lines

    require_positive(n=n, batch_size=batch_size)  # run_probe checks the device and --out before any work
    spec = data_spec(data, data_split, data_subset, image_column, question_column, answer_column, image_folder)
    cfg = ProbeConfig(model=model, n=n, data=spec, image_folder=image_folder, out=out, batch_size=batch_size,
                      seed=seed, dtype=dtype, device=device, rule=rule, resume=resume, backend=backend,
                      device_map=device_map, max_memory=max_memory, lens_positions=lens_positions)
    result = run_probe(cfg)
    from saturation.core.distributed import is_main

    if not is_main():  # under torchrun, rank 0 alone draws and reports
        return
    figures = figure2_from_dir(result.out)
    Console().print("\n".join(summary_lines(result, figures)), highlight=False, markup=False, soft_wrap=True)


AnswersOpt = Annotated[str | None, typer.Option("--data", help=DATA_HELP + ", with answers (default: the embedded held-out shapes set).")]
RoutingOpt = Annotated[Path | None, typer.Option("--routing", help="The run folder of `routing train` (--out), or its routing/ artifact; vanilla when omitted.")]


def held_out_records(data, n: int | None, seed: int):
    """Records of `data` (a path, name or `DataSpec`; default: the embedded held-out shapes set), a seeded sample
    of `n` when given (`saturation.core.sources.selection`)."""
    from saturation.core.loading import DATA_SAMPLES
    from saturation.core.sources import load_records

    return load_records(data, n, seed, default=DATA_SAMPLES / "shapes" / "heldout.json")[1]


def check_placement(device: str | None, device_map: str | None = None, max_memory: str | None = None) -> None:
    """`--device`, or `--device-map` with `--max-memory`, checked before data or weights are read."""
    if device is not None or device_map is not None or max_memory is not None:
        from saturation.core.loading import check_placement as check

        check(device, device_map, max_memory)


def check_compile(compile: bool, device_map: str | None) -> None:
    """`--compile` with an option it cannot serve: one line before data or weights are read."""
    if compile:
        from routing.compiled import check_compile as check

        check(device_map=device_map)


def load_model_for_cli(model: str, routing_dir: Path | None, dtype: str | None, device: str | None,
                       device_map: str | None = None, max_memory: str | None = None, compile: bool = False):
    """`(model or routed model, processor)`: the base from `--model` (on `device`, or placed by accelerate with
    `device_map`), routed when `--routing` is given, its layer groups compiled with `compile`."""
    import torch

    from saturation.core.loading import default_threads, load_model

    base, processor = load_model(model, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
    if threads := default_threads(base):  # a CLI process runs one model: set it for the whole run
        torch.set_num_threads(threads)
    net = base
    if routing_dir is not None:
        import routing

        net = routing.load(base, routing_dir)
    if compile:
        from routing.compiled import compile_model

        compile_model(net)
    return net, processor


@routing_app.command("train")
@friendly
def train_cmd(
    model: ModelOpt = "tiny",
    split: Annotated[str, typer.Option(help="Split layer: an integer in [1, L-2], or 'auto' for the probe's recommendation (runs the probe if none exists).")] = "auto",
    probe: Annotated[Path | None, typer.Option(help="Probe folder whose recommendation.json --split auto reads (default: newest probe of this model under runs/probe).")] = None,
    variant: Annotated[str, typer.Option(help="lf (DPVR late fusion) | pc | kv. lf-ideal cannot be trained (zero gradient).")] = "lf",
    plan: Annotated[str | None, typer.Option(help="A plan spec instead of --variant/--split, pruning composed: lf@6+prune-pre:50%, pc+fastv@2:R=75% (no @S: --split). The side branch trains on the kept image tokens.")] = None,
    fusion_layers: Annotated[int, typer.Option(help="K: last layers that see image and text again.")] = 1,
    side_depth: Annotated[int, typer.Option(help="d_v: side-branch layers (copies of layers s..s+d_v-1).")] = 1,
    data: Annotated[str | None, typer.Option(help=DATA_HELP + ", to train on (default: a shapes-world set generated once per seed).")] = None,
    data_split: DataSplitOpt = None,
    data_subset: DataSubsetOpt = None,
    image_column: ImageColumnOpt = None,
    question_column: QuestionColumnOpt = None,
    answer_column: AnswerColumnOpt = None,
    n_train: Annotated[int, typer.Option(help="Records in the generated shapes training set.")] = 2000,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/train/<model>/<variant>-s<split>).")] = None,
    max_steps: Annotated[int, typer.Option(help="Stop after N optimizer steps (-1: one epoch).")] = -1,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: paper's, 1e-4 for lf, 5e-5 for pc/kv).")] = None,
    batch_size: Annotated[int, typer.Option(help="Per-device batch size (paper: 4).")] = 4,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (an interrupted run loses at most this many).")] = 50,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last complete checkpoint in --out.")] = True,
    seed: SeedOpt = 0,
    dtype: Annotated[str | None, typer.Option(help="Base model dtype: float32 | bfloat16 | float16 | auto (default: fp32 on CPU, bf16 on a CUDA GPU that has it, as the paper trains; the side branch keeps fp32 master weights under autocast).")] = None,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Train only the side branch of a DPVR-routed model (HF Trainer), and save the small routing artifact."""
    import pandas as pd

    from figures.figure2 import figure2_from_dir
    from figures.io import save_figure
    from figures.training import loss_curve
    from routing.jobs.train import TrainConfig, run_train

    spec = data_spec(data, data_split, data_subset, image_column, question_column, answer_column)
    cfg = TrainConfig(model=model, split=split, probe=probe, variant=variant, plan=plan, fusion_layers=fusion_layers,
                      side_depth=side_depth, data=spec, n_train=n_train, out=out, max_steps=max_steps, lr=lr,
                      batch_size=batch_size, save_steps=save_steps, resume=resume, seed=seed, dtype=dtype,
                      device=device, device_map=device_map, max_memory=max_memory)
    from saturation.core.distributed import is_main

    summary = run_train(cfg, log=lambda msg: Console().print(msg, highlight=False, markup=False, soft_wrap=True))
    if summary.get("unchanged") or not is_main():  # nothing changed, or another rank of torchrun: rank 0 writes
        return
    source = Path(summary["split_source"])
    if source.name == "recommendation.json" and not (source.parent / "figure2.png").exists():
        figure2_from_dir(source.parent)
    run = Path(summary["out"])
    log = pd.read_csv(run / "train_log.csv")
    save_figure(loss_curve({summary["variant"]: log}, title=f"{summary['variant']} side branch, split {summary['split']}"),
                run / "loss")
    resumed = f" (resumed from {Path(summary['resumed_from']).name})" if summary["resumed_from"] else ""
    mean = "n/a" if summary["train_loss"] is None else f"{summary['train_loss']:.4f}"
    Console().print(f"trained to step {summary['steps']}{resumed} in {summary['seconds']:.0f} s, mean loss {mean} "
                    f"(whole run), last logged {summary['final_logged_loss']:.4f}\n"
                    f"routing artifact: {run / 'routing'}\n"
                    f"log: {run / 'train_log.csv'}, figure: {run / 'loss.png'}", highlight=False, markup=False)


@routing_app.command("save-plan")
@friendly
def save_plan_cmd(
    plan: Annotated[str, typer.Option(help="A training-free plan: vtw@6, vtw@auto[:eta=0.003,n=20,seed=0], fastv@2:R=50%, prune-pre:25%, pool:25%, divprune:keep=9.8%, visionzip:dominant=54,contextual=10, lf-ideal@6.")],
    out: Annotated[Path, typer.Option(help="Artifact folder, for eval/generate/bench/analyze --routing and lmms-eval routing=.")],
    model: ModelOpt = "tiny",
    split: Annotated[int | None, typer.Option(help="The split of a plan written without @S (vtw, lf-ideal).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="vtw@auto only: " + DATA_HELP + ", whose seeded sample VTW's KL search runs on (default: the embedded shapes probe set).")] = None,
) -> None:
    """Save a training-free plan (a peer, or a pruning) as a routing artifact; no training, nothing but the plan.
    vtw@auto[:eta=0.003,n=20,seed=0] first finds VTW's layer by its KL search on --data (kept in routing.json)."""
    from routing.plan import parse_vtw_auto
    from routing.saved import save_plan, training_free_plan
    from saturation.core.loading import load_config, load_model

    auto = parse_vtw_auto(plan)
    if auto is None:
        if data is not None:
            raise ToolkitError(f"--data calibrates vtw@auto; plan '{plan}' takes no data")
        routing_plan = training_free_plan(plan, load_config(model), split)  # checked before any weights load
        ensure_output_dir(out)
        base, _ = load_model(model)
        folder = save_plan(base, routing_plan, out)
    else:
        from routing.vtw import resolve_auto

        if split is not None:
            raise ToolkitError(f"plan '{plan}' searches its own layer: leave --split out, or write vtw@{split}")
        load_config(model)  # a bad model name is one line before the data is read
        records, source = calibration_records(data, auto)
        ensure_output_dir(out)
        base, processor = load_model(model)
        routing_plan, found = resolve_auto(plan, base, processor, records,
                                           log=lambda msg: Console().print(msg, highlight=False, markup=False, soft_wrap=True))
        folder = save_plan(base, routing_plan, out, calibration=found.to_dict() | {"spec": plan, "data": str(source)})
    Console().print(f"saved plan {routing_plan.spec} on {model}: {folder}", highlight=False, markup=False)


def calibration_records(data, auto: dict):
    """The records vtw@auto's search draws from (default: the embedded shapes probe set) and their source; too few
    for its n is one line before any weights load."""
    from saturation.core.data import sample_records
    from saturation.core.loading import DATA_SAMPLES
    from saturation.core.sources import load_records

    source, records, _ = load_records(data, None, auto["seed"], default=DATA_SAMPLES / "shapes" / "probe.json")
    sample_records(records, auto["n"], auto["seed"])
    return records, source.label


@routing_app.command("eval")
@friendly
def eval_cmd(
    model: ModelOpt = "tiny",
    routing_dir: RoutingOpt = None,
    data: AnswersOpt = None,
    data_split: DataSplitOpt = None,
    data_subset: DataSubsetOpt = None,
    image_column: ImageColumnOpt = None,
    question_column: QuestionColumnOpt = None,
    answer_column: AnswerColumnOpt = None,
    n: Annotated[int | None, typer.Option("--n", "-n", help="Evaluate a seeded sample of N records (default: all).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write {accuracy, by_type, n} here (and a per-sample CSV beside it).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate() call.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit in tokens.")] = 8,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    compile: CompileOpt = False,
) -> None:
    """Exact-match accuracy (overall and per question_type) with greedy, KV-cached, batched generation."""
    require_positive(n=n, batch_size=batch_size, max_new_tokens=max_new_tokens)  # before the heavy imports
    check_compile(compile, device_map)
    check_placement(device, device_map, max_memory)
    if json_out is not None:
        ensure_output_file(json_out, "--json")
    from rich.table import Table

    from routing.jobs.evaluate import evaluate

    spec = data_spec(data, data_split, data_subset, image_column, question_column, answer_column)
    records = held_out_records(spec, n, seed)
    net, processor = load_model_for_cli(model, routing_dir, dtype, device, device_map, max_memory, compile)
    warn_synthetic(model, spec)  # once data and model are known good: a bad input stays one line
    result, table = evaluate(net, processor, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    result |= {"model": model, "routing": str(routing_dir) if routing_dir else None}
    view = Table(title=f"{model}{' + ' + str(routing_dir) if routing_dir else ' (vanilla)'}: n={result['n']}")
    view.add_column("question type")
    view.add_column("accuracy", justify="right")
    for qtype, acc in result["by_type"].items():
        view.add_row(qtype, f"{acc:.3f}")
    view.add_row("overall", f"{result['accuracy']:.3f}", style="bold")
    Console().print(view)
    if json_out is not None:
        write_json(json_out, result)
        atomic_write(json_out.with_suffix(".csv"), lambda p: table.to_csv(p, index=False))
        Console().print(f"wrote {json_out} and {json_out.with_suffix('.csv')}", highlight=False)


def check_temperature(sample: bool, temperature: float) -> None:
    """With --sample, a temperature that divides the logits: finite and above 0 (HF's own check is a traceback)."""
    import math

    if sample and not (math.isfinite(temperature) and temperature > 0):
        raise ToolkitError(f"--temperature must be a number above 0 with --sample (got {temperature}); for greedy "
                           "decoding leave --sample out")


def check_prompt_text(prompt: str, processor=None) -> None:
    """Refuse a --prompt that writes an image placeholder or another special token of `processor`'s tokenizer
    itself (without one: ``<image>`` alone, before the weights load): generate puts one image per --image before
    the prompt, and the processor would count the prompt's placeholders as images (transformers' error)."""
    from saturation.core.data import IMAGE_PLACEHOLDER

    tok = getattr(processor, "tokenizer", None)
    added = [] if tok is None else [*tok.all_special_tokens,  # not Gemma's added whitespace runs: special ones only
                                    *(t.content for t in tok.added_tokens_decoder.values() if t.special)]
    special = {IMAGE_PLACEHOLDER, *added} - {"", None}
    found = sorted((t for t in special if t in prompt), key=prompt.index)
    if found:
        raise ToolkitError(f"--prompt holds the special token '{found[0]}': leave it out (generate places one image "
                           "placeholder per --image before the question itself)")


@routing_app.command("generate")
@friendly
def generate_cmd(
    image: Annotated[list[Path], typer.Option(help="Image file(s); repeat for a batch.")],
    prompt: Annotated[str, typer.Option(help="Question asked about every image (the model's chat template applied, LLaVA-1.5's USER: … ASSISTANT: for LLaVA-1.5).")],
    model: ModelOpt = "tiny",
    routing_dir: RoutingOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 16,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --sample).")] = 1.0,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    compile: CompileOpt = False,
) -> None:
    """Answer a question about one or more images with KV-cached (routed) generation."""
    from transformers import set_seed

    from saturation.core.data import PromptFormat, Record, generation_batch, load_image, no_image_tokens, to_model
    from saturation.core.lengths import check_prompts, max_positions

    require_positive(max_new_tokens=max_new_tokens)
    check_temperature(sample, temperature)
    check_prompt_text(prompt)
    check_compile(compile, device_map)
    check_placement(device, device_map, max_memory)
    records = [Record(id=str(p), image=p, turns=((prompt, ""),)) for p in image]
    images = [load_image(r) for r in records]
    net, processor = load_model_for_cli(model, routing_dir, dtype, device, device_map, max_memory, compile)
    check_prompt_text(prompt, processor)
    batch = generation_batch(records, processor, images, PromptFormat.of(net))
    check_prompts(batch["attention_mask"].sum(1).tolist(), [str(p) for p in image], max_positions(net),
                  max_new_tokens, what="--image")
    batch = to_model(batch, net.device, net.dtype)
    set_seed(seed)
    extra = {"temperature": temperature} if sample else {}
    ids = net.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sample, **extra, **no_image_tokens(net))
    texts = processor.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for path, text in zip(image, texts):
        Console().print(f"{path}: {text.strip()}", highlight=False, markup=False, soft_wrap=True)  # one line each


@routing_app.command("reproduce")
@friendly
def reproduce_cmd(
    model: ModelOpt = "tiny",
    out: Annotated[Path, typer.Option(help="Output folder (tables, figures, report.md; reruns resume here).")] = Path("runs/reproduce"),
    max_steps: Annotated[int, typer.Option(help="Training steps per routed variant (same budget for all; 500 = one epoch of the default data).")] = 500,
    n_eval: Annotated[int | None, typer.Option(help="Held-out questions to evaluate (default: all).")] = None,
    probe_n: Annotated[int, typer.Option(help="Samples for the saturation probe.")] = 64,
    sweep_radius: Annotated[int | None, typer.Option(help="Split sweep covers s-r .. s+r (default: every split 1..L-2).")] = None,
    rule: Annotated[str, typer.Option(help="The probe's split rule: auto (default) | paper | attention | cosine | conservative (see saturation probe --help).")] = "auto",
    probe_data: Annotated[str | None, typer.Option(help="LLaVA JSON or a dataset (as saturation probe --data) for the probe (default: embedded shapes probe set).")] = None,
    train_data: Annotated[str | None, typer.Option(help="LLaVA JSON or a dataset to train on (default: generated shapes world).")] = None,
    eval_data: Annotated[str | None, typer.Option(help="LLaVA JSON or a dataset with answers (default: embedded held-out shapes set).")] = None,
    data_split: DataSplitOpt = None,
    data_subset: DataSubsetOpt = None,
    image_column: ImageColumnOpt = None,
    question_column: QuestionColumnOpt = None,
    answer_column: AnswerColumnOpt = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Answer budget in tokens (default: the longest --eval-data answer + </s>).")] = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue the run in --out (same options only; --no-resume starts afresh, keeping parts made with the same options).")] = True,
) -> None:
    """Probe → split → train PC and LF → evaluate vanilla/PC/LF/LF-ideal → split and K sweeps → report.md."""
    import time

    from routing.jobs.reproduce import ReproduceConfig, run_reproduce, write_report

    ensure_output_dir(out)
    check_device(device)
    require_positive(n_eval=n_eval, probe_n=probe_n, max_new_tokens=max_new_tokens)
    started = time.perf_counter()
    # the dataset options apply to each of --probe-data, --train-data, --eval-data that is given
    given = [d for d in (probe_data, train_data, eval_data) if d is not None]
    data_spec(given[0] if given else None, data_split, data_subset, image_column, question_column, answer_column,
              option="--probe-data, --train-data or --eval-data")
    probe_data, train_data, eval_data = (data_spec(d, data_split, data_subset, image_column, question_column,
                                                   answer_column) for d in (probe_data, train_data, eval_data))
    cfg = ReproduceConfig(model=model, out=out, max_steps=max_steps, n_eval=n_eval, probe_n=probe_n,
                          sweep_radius=sweep_radius, rule=rule, probe_data=probe_data, train_data=train_data, eval_data=eval_data,
                          max_new_tokens=max_new_tokens,
                          seed=seed, dtype=dtype, device=device, resume=resume)
    with locked(out):  # the figures too: no other run writes here meanwhile
        _reproduce_into(out, cfg, run_reproduce, write_report, started)


def _reproduce_into(out: Path, cfg, run_reproduce, write_report, started: float) -> None:
    import time

    import pandas as pd

    from figures.figure2 import figure2_from_dir
    from figures.io import save_figure
    from figures.sweeps import sweep_figure
    from figures.training import loss_curve

    result = run_reproduce(cfg, log=lambda msg: Console().print(msg, highlight=False, markup=False))
    drawn = figure2_from_dir(result["probe_dir"])
    tables, facts = result["tables"], result["facts"]
    vanilla = float(tables["table"].set_index("variant").loc["vanilla", "accuracy"])
    drawn += save_figure(sweep_figure(tables["split_sweep"], "split", reference=vanilla, chosen=facts["split"],
                                      xlabel="split layer s", title="LF accuracy across the split"), out / "split_sweep")
    drawn += save_figure(sweep_figure(tables["fusion_sweep"], "fusion_layers", reference=vanilla,
                                      xlabel="fusion layers K",
                                      title=f"LF accuracy vs fusion layers (s={facts['best_split']})"), out / "fusion_sweep")
    logs = {p.name: pd.read_csv(p / "train_log.csv") for p in sorted((out / "train").iterdir())
            if (p / "train_log.csv").is_file()}
    drawn += save_figure(loss_curve(logs, title="side-branch training, same budget"), out / "loss_curves")
    write_report(out, result, drawn)  # the report names the figures now that they exist
    Console().print(tables["table"].to_string(index=False), highlight=False)
    Console().print(f"report: {out / 'report.md'} ({time.perf_counter() - started:.0f} s)", highlight=False)


@routing_app.command("analyze")
@friendly
def analyze_cmd(
    routing_dir: Annotated[Path, typer.Option("--routing", help="The run folder of `routing train` (--out), or its routing/ artifact.")],
    model: ModelOpt = "tiny",
    data: AnswersOpt = None,
    n: Annotated[int, typer.Option("--n", "-n", help="Samples to analyse.")] = 64,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: next to the routing artifact, analysis/).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 16,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Mechanism checks: fusion-layer text→image attention (routed vs vanilla) and shallow drift (must be 1)."""
    import json

    from figures.io import save_figure
    from figures.mechanism import mechanism_figure
    from routing.artifact import artifact_dir, read_plan
    from routing.jobs.analysis import check_analyzable, mechanism, summarize

    require_positive(n=n, batch_size=batch_size)
    check_placement(device, device_map, max_memory)
    check_analyzable(read_plan(routing_dir))  # a plan these checks do not apply to: one line before any work
    out = ensure_output_dir(out or artifact_dir(routing_dir).parent / "analysis")
    records = held_out_records(data, n, seed)
    routed, processor = load_model_for_cli(model, routing_dir, dtype, device, device_map, max_memory)
    tables = mechanism(routed.base, routed.eval(), processor, records, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_csv(out / f"{name}.csv", index=False)
    summary = summarize(tables) | {"n": len(records), "routing": str(routing_dir)}
    (out / "mechanism.json").write_text(json.dumps(summary, indent=1))
    save_figure(mechanism_figure(tables["fusion_attention"], tables["shallow_drift"],
                                 title=f"{model}, split {routed.plan.split}, n={len(records)}"), out / "mechanism")
    for layer, s in summary["fusion_layers"].items():
        Console().print(f"fusion layer {layer}: text→image head-mean {s['head_mean']['routed']:.3f} routed vs "
                        f"{s['head_mean']['vanilla']:.3f} vanilla ({s['ratio']:.2f}×); top head {s['top_head']['head']} "
                        f"{s['top_head']['routed']:.3f} vs {s['top_head']['vanilla']:.3f}", highlight=False)
    Console().print(f"shallow drift: min cosine {summary['shallow_drift_min_cosine']:.6f} (layers 0..{routed.plan.split - 1})\n"
                    f"wrote {out}/mechanism.json, fusion_attention.csv, shallow_drift.csv, mechanism.png/pdf",
                    highlight=False)


@routing_app.command("bench")
@friendly
def bench_cmd(
    model: Annotated[str | None, typer.Option("--model", "-m", help="'tiny' (embedded, the default), 'tiny-clean', 'tiny-staged', an alias (see saturation probe --help), a hub id or a local directory.")] = None,
    routing_dir: Annotated[Path | None, typer.Option("--routing", help="The run folder of `routing train`, or its routing/ artifact: its split, K and d_v; its side branch for its own variant.")] = None,
    split: Annotated[int | None, typer.Option(help="Split layer for the variants built here (default: layers // 2). Not with --routing.")] = None,
    variants: Annotated[str, typer.Option(help="Comma-separated variants measured against vanilla: lf, pc, kv, lf-ideal.")] = "lf,pc,kv",
    text_tokens: Annotated[str, typer.Option(help="Comma-separated text lengths (tokens beside the image tokens) to sweep.")] = "64,128,256,512,1024",
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 1,
    geometry: Annotated[str | None, typer.Option(help="Random weights of a named architecture instead of a checkpoint, no download: llava-1.5-7b | llava-1.5-13b | llava-next-7b | llava-onevision-7b | qwen2.5-vl-7b | qwen3-vl-8b | gemma-3-4b | gemma-3-12b (sizes that depend on the image: a 480x640 image's tokens) | tiny (the embedded model's shape) | cpu-bench (h=256, 12 layers, 64 image tokens).")] = None,
    layers: Annotated[int | None, typer.Option(help="With --geometry: build only N decoder layers (same widths).")] = None,
    fusion_layers: Annotated[int, typer.Option(help="K: last layers that see image and text again.")] = 1,
    side_depth: Annotated[int, typer.Option(help="d_v: side-branch layers.")] = 1,
    new_tokens: Annotated[int, typer.Option(help="Decode steps timed per round.")] = 16,
    repeats: Annotated[int, typer.Option(help="Timed rounds (every model, prefill then decode, order rotating).")] = 11,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.")] = 2,
    clock: Annotated[str, typer.Option(help="auto (CPU time of the one thread on CPU, else wall time) | cpu | wall.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: 1 for small models on CPU).")] = None,
    train: Annotated[bool, typer.Option("--train/--no-train", help="Also time one training step of each variant against PC.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Result JSON (default: runs/bench/<model>/bench.json); the figure is written beside it (.png/.pdf).")] = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="Time compiled vanilla against compiled routed models (torch.compile, inductor; routing.compiled): ratios to the compiled vanilla. Compiling happens in the first warm-up round (at least one is run). Not with --device-map or --train.")] = False,
) -> None:
    """Prefill and decode latency of vanilla and each variant, interleaved, with the FLOP model's ratios beside."""
    import pandas as pd

    from figures.io import save_figure
    from figures.latency import latency_figure
    from routing.jobs.bench import BenchConfig, run_bench, summary_table, train_lines

    require_positive(batch_size=batch_size)
    check_compile(compile, device_map)
    check_placement(device, device_map, max_memory)
    if json_out is not None:
        ensure_output_file(json_out, "--json")
    else:
        ensure_output_dir(Path("runs/bench"), "--json's default folder")
    cfg = BenchConfig(model=model, geometry=geometry, layers=layers, routing=routing_dir, split=split,
                      fusion_layers=fusion_layers, side_depth=side_depth, variants=variants, text_tokens=text_tokens,
                      batch=batch_size, new_tokens=new_tokens, repeats=repeats, warmup=warmup, dtype=dtype,
                      device=device, device_map=device_map, max_memory=max_memory, threads=threads, clock=clock,
                      train=train, seed=seed, compile=compile)
    result = run_bench(cfg, log=lambda msg: err_console.print(msg, highlight=False, markup=False))
    Console().print(summary_table(result))
    for line in train_lines(result):  # --train: each step against PC, the FLOP model's ratio, where it goes
        Console().print(line, highlight=False, soft_wrap=True)
    name = f"{geometry}-L{result['layers']}" if geometry else Path(model or "tiny").name
    out = json_out or Path("runs/bench") / name / "bench.json"
    write_json(out, result)
    title = (f"{result['model']}: split {result['split']}, {result['image_tokens']} image tokens, batch "
             f"{result['batch']}, {result['device']} {result['dtype']}")
    figure = save_figure(latency_figure(pd.DataFrame(result["rows"]), title=title), out.with_suffix(""))
    Console().print(f"wrote {out}, {figure[0]}, {figure[1]}", highlight=False)


@routing_app.command("compare")
@friendly
def compare_cmd(
    model: Annotated[str | None, typer.Option("--model", "-m", help="'tiny' (embedded, the default), 'tiny-clean', 'tiny-staged', an alias (see saturation probe --help), a hub id or a local directory.")] = None,
    plans: Annotated[str | None, typer.Option(help="Comma-separated plan specs: vanilla, lf@S, vtw@S, vtw@auto[:eta=0.003,n=20,seed=0] (VTW's KL search on --data, default the probe set), fastv@K:R=D% (D = the share dropped, FastV's R; ,rank=last|all|text), prune-pre:R%, pool:R% (R = the share kept), divprune:keep=R% (or keep=N), visionzip:dominant=D,contextual=C, lf@S+prune-pre:R%, lf@S+fastv@K:R=D% (no @S: the recommended split, or --routing's), lf+best (LF with the listed pruner of best accuracy per FLOP, trained on its kept tokens). Default: vanilla,lf,vtw@auto,fastv@2:R=50%,fastv@2:R=75%,visionzip,divprune,lf+best (visionzip scaled to a small tower, skipped with a note where the family refuses it; with --geometry: vanilla,lf,vtw,fastv@2:R=50%,fastv@2:R=75%,divprune,lf+fastv@2:R=75%).")] = None,
    geometry: Annotated[str | None, typer.Option(help="Latency at an architecture's real size: random weights (as routing bench --geometry, e.g. llava-1.5-7b, tiny, cpu-bench), random image embeddings, untrained side branches; accuracy n/a. Not with --model/--routing/--data/--n or prune-pre plans.")] = None,
    layers: Annotated[int | None, typer.Option(help="With --geometry: build only N decoder layers (same widths).")] = None,
    routing_dir: Annotated[Path | None, typer.Option("--routing", help="A trained LF run folder or artifact: its split is the default and its side branch serves plans of the same split (pruned ones are trained on the kept tokens).")] = None,
    split: Annotated[int | None, typer.Option(help="Split for specs without @S (default: the probe's recommendation).")] = None,
    data: AnswersOpt = None,
    data_split: DataSplitOpt = None,
    data_subset: DataSubsetOpt = None,
    image_column: ImageColumnOpt = None,
    question_column: QuestionColumnOpt = None,
    answer_column: AnswerColumnOpt = None,
    n: Annotated[int | None, typer.Option("--n", "-n", help="Evaluate a seeded sample of N records (default: all).")] = None,
    train_steps: Annotated[int, typer.Option(help="Side-branch training steps for plans trained here.")] = 150,
    repeats: Annotated[int, typer.Option(help="Paired timing rounds.")] = 5,
    text_tokens: Annotated[int, typer.Option(help="Text tokens of the timed prompt (beside its image tokens).")] = 32,
    out: Annotated[Path, typer.Option(help="Folder for frontier.csv and pareto.png/.pdf.")] = Path("runs/compare"),
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue the comparison in --out (same options only: trained plans resume from their checkpoints, finished ones are kept); --no-resume starts afresh.")] = True,
) -> None:
    """Accuracy, FLOPs and measured prefill/decode latency of a list of plans on the same data: frontier.csv and a
    Pareto figure (accuracy vs FLOPs ratio and vs measured prefill ratio)."""
    require_positive(n=n, train_steps=train_steps, repeats=repeats, text_tokens=text_tokens)
    ensure_output_dir(out)
    from figures.io import save_figure
    from figures.pareto import pareto_figure
    from routing.jobs.compare import CALIBRATION, DEFAULT_PLANS, NA, CompareConfig, parse_plans, run_compare

    data = data_spec(data, data_split, data_subset, image_column, question_column, answer_column)
    if plans is not None or geometry is None:  # a bad spec is one line before any model loads, and so is too
        for p in parse_plans(plans if plans is not None else DEFAULT_PLANS):  # little data for vtw@auto
            if p.get("auto") is not None and geometry is None:
                calibration_records(data, p["auto"])
    cfg = CompareConfig(model=model, plans=plans, geometry=geometry, layers=layers, split=split, routing=routing_dir,
                        data=data, n=n, train_steps=train_steps, repeats=repeats, text_tokens=text_tokens,
                        out=out, seed=seed, resume=resume)
    with locked(out):  # the figure too: no other run writes here meanwhile
        table = run_compare(cfg, log=lambda msg: Console().print(msg, highlight=False, soft_wrap=True))  # a line each
        if geometry is None:
            warn_synthetic(model, data)
        name = f"random {geometry}" + (f", {layers} layers" if layers else "") if geometry else (model or "tiny")
        what = "measured prefill against FLOPs" if geometry else "accuracy against cost"
        drawn = save_figure(pareto_figure(table, title=f"{name}: {what}"), out / "pareto")
    Console().print(table.to_string(index=False, na_rep=NA), highlight=False, soft_wrap=True)  # one row a line
    searched = [out / CALIBRATION] if (out / CALIBRATION).exists() else []  # vtw@auto's KL tables
    Console().print(f"wrote {out / 'frontier.csv'}, {', '.join(map(str, [*searched, *drawn]))}", highlight=False)


saturation_main = console_entry(saturation_app)
routing_main = console_entry(routing_app)


if __name__ == "__main__":  # pragma: no cover
    saturation_main()
