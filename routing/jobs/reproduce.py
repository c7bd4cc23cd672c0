"""`routing reproduce`: the paper's main result in miniature — probe, split, train PC and LF, evaluate, sweep.

The run folder (``--out``) keeps the contract of every long job (`saturation.core.runs`): its defining options
(`REPRODUCE_OPTIONS`) are recorded in ``run.json`` and a rerun with others is refused in one line (``--no-resume``
starts afresh); one process at a time. Every part (an evaluation, a training run) records the options it was made
with and is reused only when they match, so an interrupted run continues where it stopped (training resumes from
its last complete checkpoint); the tables, report and figures are written at the end, and a run with other options
removes the previous run's first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from routing import flops
from routing.jobs.evaluate import evaluate
from routing.jobs.split import validate_split
from routing.jobs.train import TrainConfig, train_side_branch, training_records
from routing.model import build
from routing.plan import plan_for
from saturation.core.data import PromptFormat, collate, encode_record, to_model
from saturation.core.files import disk_guard, write_json, write_text
from saturation.core.loading import DATA_SAMPLES, cpu_threads, load_model, resolve_name
from saturation.core.runs import locked, open_run
from saturation.core.sources import DataSpec, data_identity, load_records
from saturation.probe import ProbeConfig, run_probe
from saturation.recommend import split_range

TABLE_COLUMNS = ["variant", "accuracy", "flops_ratio", "trainable_params", "split"]
# What defines a reproduction, and the option that sets each (run.json; a rerun with others is refused).
REPRODUCE_OPTIONS = {"model": "--model", "max_steps": "--max-steps", "batch_size": "batch_size", "n_train": "n_train",
                     "probe_data": "--probe-data", "train_data": "--train-data", "eval_data": "--eval-data",
                     "n_eval": "--n-eval", "probe_n": "--probe-n", "sweep_radius": "--sweep-radius", "rule": "--rule",
                     "fusion_sweep": "fusion_sweep", "seed": "--seed", "dtype": "--dtype", "variants": "variants",
                     "max_new_tokens": "--max-new-tokens"}
# What a finished reproduction leaves beside its parts (eval/, train/, probe/): removed when a run of other options
# starts, so a run killed midway never leaves a report of work it did not do.
RESULTS = ("table.csv", "split_sweep.csv", "best_split.csv", "fusion_sweep.csv", "report.md", "facts.json",
           *(f"{stem}.{ext}" for stem in ("split_sweep", "fusion_sweep", "loss_curves") for ext in ("png", "pdf")))


@dataclass
class ReproduceConfig:
    """Options of `routing reproduce`. The defaults run in minutes on two CPU cores with the embedded model."""

    model: str = "tiny"
    out: Path = Path("runs/reproduce")
    max_steps: int = 500  # per training run, the same for every variant: one epoch of 2000 records at batch 4
    batch_size: int = 4
    n_train: int = 2000
    probe_data: Path | str | DataSpec | None = None  # default: the embedded shapes probe set
    train_data: Path | str | DataSpec | None = None  # default: a shapes-world training set generated once per seed
    eval_data: Path | str | DataSpec | None = None  # default: the embedded held-out shapes set
    n_eval: int | None = None  # default: all of it
    probe_n: int = 64
    sweep_radius: int | None = None  # split sweep: s-r .. s+r (clipped); None: every valid split
    rule: str = "auto"  # the probe's split rule (saturation.recommend)
    fusion_sweep: tuple[int, ...] = (1, 2)
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    variants: tuple[str, ...] = field(default=("pc", "lf"))
    max_new_tokens: int | None = None  # answer budget; default: the longest evaluation answer in tokens + 1 (</s>)
    resume: bool = True  # False (--no-resume): start afresh in `out` (parts of matching options are still reused)


def reproduce_identity(cfg: ReproduceConfig) -> dict:
    """The options that define a reproduction (`REPRODUCE_OPTIONS`), as `run.json` records them."""
    return {"model": resolve_name(cfg.model), "max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
            "n_train": cfg.n_train, "probe_data": data_identity(cfg.probe_data), "train_data": data_identity(cfg.train_data),
            "eval_data": data_identity(cfg.eval_data), "n_eval": cfg.n_eval, "probe_n": cfg.probe_n,
            "sweep_radius": cfg.sweep_radius, "rule": cfg.rule, "fusion_sweep": list(cfg.fusion_sweep),
            "seed": cfg.seed, "dtype": cfg.dtype, "variants": list(cfg.variants), "max_new_tokens": cfg.max_new_tokens}


@dataclass
class Context:
    """What every step shares: the loaded base, the data and the token geometry for the FLOP model."""

    cfg: ReproduceConfig
    model: torch.nn.Module
    processor: object
    eval_records: list
    train_records: list
    image_tokens: float
    text_tokens: float
    log: callable
    max_new_tokens: int = 8  # greedy answer budget of every evaluation (`answer_budget`)
    token_samples: list | None = None  # (image, text) tokens per evaluation prompt; None: the means above


def token_samples(records, processor, image_token_id: int, fmt: PromptFormat | None = None) -> list[tuple[int, int]]:
    """``(image_tokens, text_tokens)`` of each evaluation prompt (the first 64): what the FLOP ratios are priced
    at. Image-token counts differ per sample on anyres families (LLaVA-NeXT, OneVision)."""
    from saturation.core.data import encode_prompt

    ids = [encode_prompt(r, processor, fmt=fmt)["input_ids"] for r in records[:64]]
    return [(int((i == image_token_id).sum()), len(i) - int((i == image_token_id).sum())) for i in ids]


def token_counts(records, processor, image_token_id: int, fmt: PromptFormat | None = None) -> tuple[float, float]:
    """Mean image and text tokens per evaluation prompt (`token_samples`)."""
    samples = token_samples(records, processor, image_token_id, fmt)
    return sum(i for i, _ in samples) / len(samples), sum(t for _, t in samples) / len(samples)


def answer_budget(records, tokenizer) -> int:
    """Tokens to generate so that the longest first answer of `records` fits, with its ``</s>``: each answer is
    tokenized as the LLaVA template writes it after ``ASSISTANT:`` (`saturation.core.data.encode_record`)."""
    eos = tokenizer.eos_token or ""
    return max(len(tokenizer(f" {r.turns[0][1]}{eos}", add_special_tokens=False)["input_ids"]) + (not eos)
               for r in records)


def flops_ratio(ctx: Context, variant: str, split: int, fusion_layers: int = 1) -> float:
    if variant == "vanilla":
        return 1.0
    g = flops.Geometry.of(ctx.model.config.text_config)
    if ctx.token_samples:  # per-sample counts (ragged on anyres families): FLOPs summed over the prompts
        return flops.sample_ratio(g, variant, split, ctx.token_samples, fusion_layers)["total"]
    return flops.ratio(g, variant, split, round(ctx.image_tokens), round(ctx.text_tokens), fusion_layers)["total"]


def cached_json(path: Path, compute, still_valid=lambda value: True) -> dict:
    """`compute()` once; later calls read `path` (the resumability of every step) while `still_valid(value)`."""
    if path.is_file():
        value = json.loads(path.read_text())
        if still_valid(value):
            return value
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, value)
    return value


def evaluated(ctx: Context, net, name: str, made: dict | None = None) -> dict:
    """`net`'s evaluation, reused only when it scored the same questions with the same answer budget on the same
    model (`made`: what made a trained one, its run's options and steps)."""
    from routing.jobs.runs import records_digest

    key = json.loads(json.dumps({"questions": records_digest(ctx.eval_records), "max_new_tokens": ctx.max_new_tokens,
                                 "model": made}))

    def run():
        ctx.log(f"evaluating {name} on {len(ctx.eval_records)} held-out questions")
        result, table = evaluate(net, ctx.processor, ctx.eval_records, batch_size=32,
                                 max_new_tokens=ctx.max_new_tokens)
        write_text(ctx.cfg.out / "eval" / f"{name}.csv", table.to_csv(index=False))
        return {**result, "max_new_tokens": ctx.max_new_tokens, "made_with": key}

    # a result of other questions, another answer budget or another training run is scored again
    return cached_json(ctx.cfg.out / "eval" / f"{name}.json", run, lambda cached: cached.get("made_with") == key)


def trained(ctx: Context, variant: str, split: int, fusion_layers: int = 1) -> tuple[dict, dict]:
    """Train (or resume, or reuse) one routed variant with the shared budget; returns (train summary, eval)."""
    name = f"{variant}-s{split}-k{fusion_layers}"
    routed = build(ctx.model, plan_for(ctx.model, split, variant, fusion_layers))
    run = ctx.cfg.out / "train" / name
    opts = TrainConfig(variant=variant, fusion_layers=fusion_layers, max_steps=ctx.cfg.max_steps,
                       batch_size=ctx.cfg.batch_size, seed=ctx.cfg.seed, save_steps=100)
    # its own run contract: a finished run of these options is reused (its side branch loaded), one cut short
    # resumes, one of other options (a --no-resume of the whole) starts afresh
    summary = train_side_branch(routed, ctx.processor, ctx.train_records, opts, run, restart_other=True,
                                log=lambda msg: ctx.log(f"{name}: {msg}") if "already finished" not in msg else None)
    routed.eval()
    return summary, evaluated(ctx, routed, name, {"run": summary["run"], "steps": summary["steps"]})


def zero_gradient_check(ctx: Context, split: int) -> dict:
    """The side branch's gradient norm on one batch: exactly 0 for lf-ideal, non-zero for lf (Appendix A)."""
    fmt = PromptFormat.of(ctx.model)
    batch = collate([encode_record(r, ctx.processor, fmt=fmt) for r in ctx.train_records[:4]],
                    ctx.processor.tokenizer.pad_token_id)
    batch = to_model(batch, ctx.model.device, ctx.model.dtype)
    return {v: build(ctx.model, plan_for(ctx.model, split, v)).side_gradient_norm(**batch) for v in ("lf-ideal", "lf")}


def sweep_splits(split: int, radius: int | None, num_layers: int, fusion_layers: int = 1,
                 side_depth: int = 1) -> list[int]:
    """Splits for the sweep: s-radius .. s+radius within `split_range`, or all of it when radius is None."""
    valid = split_range(num_layers, fusion_layers, side_depth)
    return [s for s in valid if radius is None or abs(s - split) <= radius]


def run_reproduce(cfg: ReproduceConfig, log=print) -> dict:
    """Run every step; returns the tables (as DataFrames) and the facts the report states."""
    with locked(cfg.out), disk_guard(cfg.out):
        open_run(cfg.out, reproduce_identity(cfg), REPRODUCE_OPTIONS, cfg.resume, RESULTS, log=log)
        return _run_reproduce(cfg, log)


def _run_reproduce(cfg: ReproduceConfig, log) -> dict:
    (cfg.out / "eval").mkdir(exist_ok=True)
    probe = run_probe(ProbeConfig(model=cfg.model, n=cfg.probe_n, data=cfg.probe_data, out=cfg.out / "probe",
                                  seed=cfg.seed, rule=cfg.rule, dtype=cfg.dtype, device=cfg.device, resume=cfg.resume))
    num_layers = probe.recommendation["num_layers"]
    split = validate_split(probe.recommendation["split"], num_layers)
    log(f"probe recommends split {split} of {num_layers} layers")
    model, processor = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model.requires_grad_(False)
    with cpu_threads(model, None):
        return _reproduce(cfg, model, processor, probe, split, num_layers, log)


def _reproduce(cfg: ReproduceConfig, model, processor, probe, split: int, num_layers: int, log) -> dict:
    eval_records = load_records(cfg.eval_data, cfg.n_eval, cfg.seed, default=DATA_SAMPLES / "shapes" / "heldout.json")[1]
    samples = token_samples(eval_records, processor, int(model.config.image_token_id), PromptFormat.of(model))
    image, text = sum(i for i, _ in samples) / len(samples), sum(t for _, t in samples) / len(samples)
    budget = cfg.max_new_tokens or answer_budget(eval_records, processor.tokenizer)
    ctx = Context(cfg, model, processor, eval_records, training_records(cfg.train_data, cfg.out, cfg.n_train, cfg.seed),
                  image, text, log, budget, samples)

    rows = [{"variant": "vanilla", "accuracy": evaluated(ctx, model, "vanilla")["accuracy"], "flops_ratio": 1.0,
             "trainable_params": 0, "split": split}]
    results = {}
    for variant in cfg.variants:
        summary, result = trained(ctx, variant, split)
        results[variant] = result
        rows.append({"variant": variant, "accuracy": result["accuracy"], "flops_ratio": flops_ratio(ctx, variant, split),
                     "trainable_params": summary["trainable_params"], "split": split})
    ideal = build(model, plan_for(model, split, "lf-ideal"))
    rows.append({"variant": "lf-ideal", "accuracy": evaluated(ctx, ideal.eval(), f"lf-ideal-s{split}")["accuracy"],
                 "flops_ratio": flops_ratio(ctx, "lf-ideal", split),
                 "trainable_params": ideal.trainable_parameters().trainable, "split": split})
    gradients = cached_json(cfg.out / "gradient_check.json", lambda: zero_gradient_check(ctx, split) | {"split": split},
                            lambda cached: cached.get("split") == split)  # written by this run's options (run.json)

    split_rows = [{"split": s, "accuracy": trained(ctx, "lf", s)[1]["accuracy"], "flops_ratio": flops_ratio(ctx, "lf", s)}
                  for s in sweep_splits(split, cfg.sweep_radius, num_layers)]
    vanilla = rows[0]["accuracy"]
    good = [r for r in split_rows if r["accuracy"] >= vanilla - 0.05]
    # the PC comparison and the K sweep are only informative where LF works: the cheapest good split, if any
    best = min(good, key=lambda r: r["flops_ratio"])["split"] if good else split
    best_rows = []
    for v in cfg.variants:
        summary, result = trained(ctx, v, best)
        best_rows.append({"variant": v, "accuracy": result["accuracy"], "flops_ratio": flops_ratio(ctx, v, best),
                          "trainable_params": summary["trainable_params"], "split": best})
    fusion_rows = [{"fusion_layers": k, "accuracy": trained(ctx, "lf", best, k)[1]["accuracy"],
                    "flops_ratio": flops_ratio(ctx, "lf", best, k)}
                   for k in cfg.fusion_sweep if best <= num_layers - k - 1]
    tables = {"table": pd.DataFrame(rows, columns=TABLE_COLUMNS), "split_sweep": pd.DataFrame(split_rows),
              "best_split": pd.DataFrame(best_rows, columns=TABLE_COLUMNS), "fusion_sweep": pd.DataFrame(fusion_rows)}
    for name, frame in tables.items():
        write_text(cfg.out / f"{name}.csv", frame.to_csv(index=False))
    facts = {"model": resolve_name(cfg.model), "split": split, "best_split": best, "num_layers": num_layers,
             "gradients": gradients, "image_tokens": image, "text_tokens": text,
             "image_tokens_range": [min(i for i, _ in samples), max(i for i, _ in samples)],
             "by_type": {"vanilla": evaluated(ctx, model, "vanilla")["by_type"], **{v: r["by_type"] for v, r in results.items()}},
             "recommendation": probe.recommendation, "max_steps": cfg.max_steps, "n_eval": len(eval_records),
             "max_new_tokens": budget}
    result = {"tables": tables, "facts": facts, "probe_dir": probe.out}
    write_report(cfg.out, result)
    write_json(cfg.out / "facts.json", facts)
    return result


def _ragged(facts: dict) -> str:
    """Where image-token counts differ per prompt (anyres), say so: the counts are means, the FLOPs per prompt."""
    lo, hi = facts.get("image_tokens_range") or (0, 0)
    return f" (means; image tokens {lo}-{hi} per prompt, FLOP ratios summed over prompts)" if lo != hi else ""


def write_report(out: Path, result: dict, figures=()) -> Path:
    """``out/report.md`` for a `run_reproduce` result, naming the `figures` (paths) that exist.

    The library draws nothing (``routing`` never imports ``figures``); the `routing reproduce` command draws the
    sweeps, loss curves and Figure 2, then calls this again with what it drew.
    """
    out = Path(out)
    drawn = [Path(f).resolve().relative_to(out.resolve()).as_posix() for f in figures if Path(f).is_file()]
    path = out / "report.md"
    write_text(path, report(result["tables"], result["facts"], drawn))
    return path


def _verdict(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def report(tables: dict[str, pd.DataFrame], facts: dict, figures=()) -> str:
    """A short markdown report that states, claim by claim, whether the paper's findings hold on this model.

    `figures`: files (relative to the report's folder) to name; nothing else is named as a file.
    """
    t = tables["table"].set_index("variant")
    van, lf = t.loc["vanilla", "accuracy"], t.loc["lf", "accuracy"]
    b = tables["best_split"].set_index("variant") if "best_split" in tables else t
    at = f"s={facts.get('best_split', facts['split'])}"
    ideal = t.loc["lf-ideal", "accuracy"]
    g = facts["gradients"]
    sweep, fusion = tables["split_sweep"], tables["fusion_sweep"]
    plateau = sweep[sweep["split"] >= facts.get("best_split", facts["split"])]  # from where LF first works on
    spread = plateau["accuracy"].max() - plateau["accuracy"].min() if len(plateau) else float("nan")
    lines = [
        f"# DPVR reproduction on `{facts['model']}`",
        "",
        f"Split s={facts['split']} of {facts['num_layers']} layers (rule `{facts['recommendation']['rule']}`), "
        f"{facts['max_steps']} training steps per variant, {facts['n_eval']} held-out questions"
        + (f" (answers of up to {facts['max_new_tokens']} tokens)" if "max_new_tokens" in facts else "") + ", "
        f"{facts['image_tokens']:.0f} image + {facts['text_tokens']:.0f} text tokens per prompt{_ragged(facts)}.",
        "",
        tables["table"].to_markdown(index=False, floatfmt=".3f"),
        "",
        "## Claims",
        f"1. *LF keeps accuracy near vanilla at lower cost* (LF ≥ vanilla − 0.05 with FLOPs ratio < 1): "
        f"{_verdict(lf >= van - 0.05 and t.loc['lf', 'flops_ratio'] < 1)} — LF {lf:.3f} vs vanilla {van:.3f} at "
        f"{t.loc['lf', 'flops_ratio']:.3f}× the prefill FLOPs.",
        f"2. *LF matches the gradient-rich baseline PC* (within 0.02, at {at}): "
        f"{_verdict(abs(b.loc['lf', 'accuracy'] - b.loc['pc', 'accuracy']) <= 0.02)} — LF {b.loc['lf', 'accuracy']:.3f} "
        f"at {b.loc['lf', 'flops_ratio']:.3f}× vs PC {b.loc['pc', 'accuracy']:.3f} at {b.loc['pc', 'flops_ratio']:.3f}× "
        f"FLOPs (at the recommended s={facts['split']}: LF {lf:.3f}, PC {t.loc['pc', 'accuracy']:.3f})."
        if "pc" in b.index else "",
        f"3. *LF-ideal cannot be trained* (zero side-branch gradient): {_verdict(g['lf-ideal'] == 0 and g['lf'] > 0)} "
        f"— gradient norm {g['lf-ideal']:.3g} for lf-ideal vs {g['lf']:.3g} for lf; untrained lf-ideal scores "
        f"{ideal:.3f}.",
        f"4. *Accuracy is flat across the saturation plateau* (LF accuracy spread ≤ 0.05 over the splits from the "
        f"first one within 0.05 of vanilla on): {_verdict(spread <= 0.05)} — spread {spread:.3f} over splits "
        f"{list(plateau['split'])}; below them LF drops to {sweep['accuracy'].min():.3f}.",
    ]
    good = sweep[sweep["accuracy"] >= van - 0.05].sort_values("flops_ratio")
    lines.append(
        f"   In the split sweep, the cheapest split with LF ≥ vanilla − 0.05 is s={int(good['split'].iloc[0])} "
        f"(accuracy {good['accuracy'].iloc[0]:.3f} at {good['flops_ratio'].iloc[0]:.3f}× FLOPs)." if len(good) else
        "   No split in the sweep brings LF within 0.05 of vanilla at this budget.")
    if len(fusion) > 1:
        k1, k2 = fusion["accuracy"].iloc[0], fusion["accuracy"].iloc[1]
        lines.append(f"5. *One fusion layer is enough* (K=2 gains ≤ 0.02 over K=1, at {at}): {_verdict(k2 - k1 <= 0.02)} — "
                     f"K=1 {k1:.3f}, K=2 {k2:.3f}.")
    if "best_split" in tables:
        lines += ["", f"## PC and LF at the cheapest split within 0.05 of vanilla ({at})", "",
                  tables["best_split"].to_markdown(index=False, floatfmt=".3f")]
    lines += ["", "## Split sweep (paper Figure 4)", "", sweep.to_markdown(index=False, floatfmt=".3f"),
              "", "## Fusion-layer sweep", "", fusion.to_markdown(index=False, floatfmt=".3f"), "",
              "Figures: " + ", ".join(f"`{f}`" for f in figures) + "." if figures else
              "No figures were drawn by this run (the `routing reproduce` command draws them)."]
    if "caveat" in facts["recommendation"].get("evidence", {}):
        lines += ["", f"Caveat: {facts['recommendation']['evidence']['caveat']}."]
    return "\n".join(line for line in lines if line is not None) + "\n"
