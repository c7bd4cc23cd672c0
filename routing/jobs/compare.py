"""`routing compare`: a list of plans (vanilla, DPVR, training-free peers, compositions) on the same data, with the
same latency measurement, into one frontier table (issue 17).

Each plan is a spec (``routing.parse_plan``). Accuracy is exact match on the same records (default: the
embedded held-out set); FLOPs come from the FLOP model at the measured prompt's counts; prefill and decode latency
are paired and interleaved in one loop (sample k of every plan in the same round, the order rotated each round, as
`routing bench`), end-to-end from pixels so pre-LLM pruning pays for its scoring. Plans with a side branch are
trained here on the shapes world (or take `--routing DIR`'s side branch, when its split and depth fit).

The default sweep is one constant, `DEFAULT_PLANS` (issue 25): a row the model's family refuses is skipped with a
note (`fit_default`), and ``lf+best`` composes LF with the pruner row of best accuracy per FLOP (`best_pruner`),
trained on its kept tokens once the other rows are evaluated.

Geometry mode (``geometry="llava-1.5-7b"``, optional ``layers``) times the plans at an architecture's real size:
random weights and random image embeddings, as `routing bench --geometry` (``benchmark.load_models`` and
``random_prompt``); side branches stay untrained (latency does not depend on training) and accuracy is NaN, written
"n/a". Plans that score the vision tower's attention (prune-pre) need real pixels and are refused before loading.

The run folder keeps every long job's contract (`saturation.core.runs`): one process at a time; the defining
options (`COMPARE_OPTIONS`) in ``run.json``, a rerun with others refused in one line (``--no-resume`` starts
afresh, and removes the previous run's frontier.csv, calibration.json and figure first); results written at the
end, atomically. It resumes per plan: a side branch trained here resumes from its last checkpoint (a finished one
is kept), and a plan's accuracy is kept in ``plans/`` while what made it (data, budget, training) is the same.
The timings are always measured anew, all plans in one paired loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformers import PretrainedConfig

from routing import flops
from routing.plan import KEYED, PRUNERS, RoutingPlan, parse_spec, split_specs
from saturation.core.errors import ToolkitError
from saturation.core.sources import DataSpec

NEEDS_PIXELS = ("prune-pre", "visionzip")  # prunings that read the vision tower: not on geometry's random embeddings

# LF composed with the best training-free pruner of the same run (`best_pruner`), resolved after the other rows are
# evaluated and trained on its kept tokens; `lf@S+best` names a split.
BEST = "+best"
COMPOSED = "lf" + BEST
# The default sweep (issue 25), one constant: vanilla, DPVR's LF at the recommended split, VTW at its own layer (its KL
# search), FastV K=2 at R = 50% / 75%, PDrop (its authors' stages scaled to the depth), VisionZip (LLaVA-1.5 only: `fit_default` skips it, with a note, on a
# family that refuses it), DivPrune, and LF composed with the best of the pruners.
DEFAULT_PLANS = ("vanilla", "lf", "vtw@auto", "fastv@2:R=50%", "fastv@2:R=75%", "pdrop", "visionzip", "divprune",
                 COMPOSED)
# Geometry mode has random weights, random image embeddings and no data: VTW at the split instead of its KL search, no
# VisionZip (it reads the tower's attention on pixels), and no accuracy to pick the composition by, so LF is composed
# with a fixed pruner: FastV R=75%, the one `best_pruner` picks on the embedded model (docs/RESULTS.md).
GEOMETRY_PLANS = ("vanilla", "lf", "vtw", "fastv@2:R=50%", "fastv@2:R=75%", "pdrop", "divprune", "lf+fastv@2:R=75%")
# VisionZip's default budget, 54 dominant + 10 contextual tokens of LLaVA-1.5's 576 patches (its README)
VISIONZIP_DEFAULT = (54, 10, 576)
# What defines a comparison, and the option that sets each (run.json; a rerun with others is refused).
COMPARE_OPTIONS = {"model": "--model", "plans": "--plans", "geometry": "--geometry", "layers": "--layers",
                   "split": "--split", "routing": "--routing", "data": "--data", "n": "--n",
                   "batch_size": "batch_size", "max_new_tokens": "max_new_tokens", "train_steps": "--train-steps",
                   "repeats": "--repeats", "warmup": "warmup", "text_tokens": "text_tokens",
                   "new_tokens": "new_tokens", "seed": "--seed"}
RESULTS = ("frontier.csv", "calibration.json", "pareto.png", "pareto.pdf")  # removed when other options start
COLUMNS = ("plan", "params", "accuracy", "flops_ratio", "prefill_ratio", "decode_ratio", "trainable_params",
           "prefill_ms", "decode_ms", "decode_flops_ratio", "trained")


@dataclass
class CompareConfig:
    model: str | None = None  # checkpoint; None: 'tiny' unless a geometry is given
    plans: tuple[str, ...] | str | None = None  # None: DEFAULT_PLANS (GEOMETRY_PLANS with a geometry)
    geometry: str | None = None  # random weights of a named architecture (saturation.core.geometry.GEOMETRIES)
    layers: int | None = None  # geometry only: decoder depth to build (same widths)
    split: int | None = None  # for specs without @S (default: the recommended split, or --routing's)
    routing: Path | None = None  # a trained LF artifact whose side branch the side-branch plans start from
    data: Path | str | DataSpec | None = None  # evaluation records (default: the embedded held-out set)
    n: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 8
    train_steps: int = 150  # side-branch steps for plans trained here
    repeats: int = 5
    warmup: int = 1
    text_tokens: int = 32
    new_tokens: int = 8
    seed: int = 0
    out: Path = field(default_factory=lambda: Path("runs") / "compare")
    defaulted: bool = field(default=False, init=False)  # plans are the default sweep: a row the family refuses is skipped
    resume: bool = True  # False (--no-resume): start afresh in `out` (trained plans of the same options are kept)

    def __post_init__(self):
        if self.plans is None:
            self.plans = GEOMETRY_PLANS if self.geometry is not None else DEFAULT_PLANS
            self.defaulted = True
        if self.geometry is None:
            if self.layers is not None:
                raise ToolkitError("--layers shrinks a --geometry; a checkpoint keeps its own depth")
            return
        given = [name for name, value in (("--model", self.model), ("--routing", self.routing),
                                          ("--data", self.data), ("--n", self.n)) if value is not None]
        if given:
            raise ToolkitError(f"--geometry times random weights on random image embeddings (accuracy n/a): it "
                               f"takes no {', '.join(given)}")
        from routing.jobs.bench import BenchConfig

        BenchConfig(geometry=self.geometry, layers=self.layers)  # its one-line checks of the name and depth
        for p in parse_plans(self.plans):
            if p.get("composed"):
                raise ToolkitError(f"plan '{p['text']}' composes LF with the pruner of best accuracy per FLOP, and "
                                   "--geometry has no accuracy: write the pruner, e.g. lf+divprune")
            if p.get("auto") is not None:
                raise ToolkitError(f"plan '{p['text']}' searches VTW's layer on real data, which --geometry does not "
                                   "have (random weights and image embeddings): write its layer, e.g. vtw@6")
            if p["prune"] in NEEDS_PIXELS:
                raise ToolkitError(f"plan '{p['text']}' scores the vision tower's attention on real pixels, which "
                                   f"--geometry does not have (random image embeddings): leave it out, or use pool:R%")


def compare_identity(cfg: CompareConfig, parsed) -> dict:
    """The options that define a comparison (`COMPARE_OPTIONS`), as its `run.json` records them."""
    from saturation.core.loading import resolve_name
    from saturation.core.sources import data_identity

    data = data_identity(cfg.data)
    model = None if cfg.geometry is not None else resolve_name(cfg.model or "tiny")
    routing = None if cfg.routing is None else str(Path(cfg.routing).resolve())
    return {"model": model, "plans": [p["text"] for p in parsed], "geometry": cfg.geometry, "layers": cfg.layers,
            "split": cfg.split, "routing": routing, "data": data, "n": cfg.n, "batch_size": cfg.batch_size,
            "max_new_tokens": cfg.max_new_tokens, "train_steps": cfg.train_steps, "repeats": cfg.repeats,
            "warmup": cfg.warmup, "text_tokens": cfg.text_tokens, "new_tokens": cfg.new_tokens, "seed": cfg.seed}


def plan_folder(name: str) -> str:
    """A plan's name as a folder name (its training run, its kept accuracy)."""
    return name.replace("@", "-s").replace(":", "-").replace("%", "").replace("+", "_").replace("=", "").replace(
        ",", "-")


def parse_plans(plans) -> tuple[dict, ...]:
    """Specs (a comma-separated string or a list) -> parsed dicts; a bad one is one line naming it."""
    specs = [s.strip() for s in (split_specs(plans) if isinstance(plans, str) else plans) if s.strip()]
    if not specs:
        raise ToolkitError("--plans is empty: give e.g. vanilla,lf,fastv@2:R=50%")
    if len(set(specs)) != len(specs):
        raise ToolkitError(f"--plans names a plan twice: {', '.join(specs)}")
    return tuple(_parse_one(s) | {"text": s} for s in specs)


def _parse_one(spec: str) -> dict:
    """`parse_spec`, plus ``lf[@S]+best`` (a DPVR variant composed with the run's best pruner): ``"composed": True``."""
    if not spec.endswith(BEST):
        return parse_spec(spec)
    base = parse_spec(spec[:-len(BEST)])
    if base["variant"] in (None, "vtw", *PRUNERS) or base["prune"] is not None or base.get("auto") is not None:
        raise ToolkitError(f"cannot read plan '{spec}': +best composes a DPVR variant (lf, lf@S, pc, kv) with the "
                           "run's best pruner")
    return base | {"composed": True}


def fit_default(spec: str, model, split: int) -> tuple[str | None, str]:
    """A row of the default sweep on this model (a loaded model or its config): ``(spec to run, note)``. VisionZip's
    default budget (54 + 10 of 576 patches) is scaled to a smaller tower's patches (at least [CLS] + 1 dominant and 1
    contextual token: the embedded model's 9 patches keep 3); a row the family refuses (VisionZip without a [CLS]
    tower or with anyres crops, a pre-LLM pruning under M-RoPE, ...) is ``(None, its one-line reason)``: the default
    sweep goes on without it, where an explicit ``--plans`` fails."""
    import routing
    from saturation.core.adapters import adapter_class

    if spec.endswith(BEST) or parse_spec(spec).get("auto") is not None:
        return spec, ""
    asked, note = spec, ""
    try:
        if spec == "visionzip":
            config = model if isinstance(model, PretrainedConfig) else model.config
            patches = adapter_class(config).image_tokens(config)
            dominant, contextual, of = VISIONZIP_DEFAULT
            if dominant + contextual - 1 > patches:
                dominant = min(max(2, round(dominant * patches / of)), patches)
                contextual = min(max(1, round(contextual * patches / of)), patches + 1 - dominant)
                spec, note = (f"visionzip:dominant={dominant},contextual={contextual}",
                              f"visionzip's 54 + 10 of 576 scaled to this tower's {patches} patches")
        routing.parse_plan(spec, model, split=split)
    except ToolkitError as err:
        return None, f"skipped default row {asked}: {err}"
    return spec, note


def best_pruner(rows: list[dict]) -> str | None:
    """The composition rule of the default sweep (``lf+best``): among the training-free pruner rows (a plan that is
    a pruning alone: fastv, divprune, visionzip, prune-pre, pool, ...; not vanilla, VTW, DPVR or a composition) with
    an accuracy and a FLOP saving, the one of best accuracy per FLOP (accuracy / FLOPs ratio); ties go to the lower
    FLOPs ratio, then to the earlier row. Rows are dicts with ``plan``, ``accuracy``, ``flops_ratio``; None when no
    row qualifies."""
    ranked = ranked_pruners(rows)
    return ranked[0] if ranked else None


def ranked_pruners(rows: list[dict]) -> list[str]:
    """`best_pruner`'s candidates, best first: the next one is tried when LF cannot compose with the best (PDrop with
    a stage after the split)."""
    scored = []
    for i, row in enumerate(rows):
        p = _parse_one(row["plan"])
        acc, cost = float(row["accuracy"]), float(row["flops_ratio"])
        if p.get("composed") or p["variant"] not in PRUNERS or math.isnan(acc) or not 0 < cost < 1:
            continue
        scored.append(((-acc / cost, cost, i), row["plan"]))
    return [plan for _, plan in sorted(scored)]


def params_of(plan: RoutingPlan | None) -> str:
    if plan is None:
        return ""
    parts = [f"s={plan.split}"] if plan.routes else []
    if plan.side_depth:
        parts.append(f"K={plan.fusion_layers} d_v={plan.side_depth}")
    if plan.prune == "fastv":  # FastV's own terms: K, R = the share dropped, the rank rule
        parts.append(f"fastv {plan.pruning_terms}")
    elif plan.prune in KEYED or plan.prune == "pdrop":  # their options as their authors name them
        parts.append(plan.pruning_terms)
    elif plan.prune is not None:
        parts.append(f"R={100 * plan.keep:g}% kept")
    return " ".join(parts)


def _side_from(routed, artifact) -> bool:
    """Start `routed`'s side branch from a trained artifact's when the shapes fit (same split and depth)."""
    if artifact is None or routed.plan.side_depth == 0:
        return False
    if (artifact.plan.split, artifact.plan.side_depth) != (routed.plan.split, routed.plan.side_depth):
        return False
    routed.side.load_state_dict(artifact.side.state_dict())
    return True


def build_plans(cfg: CompareConfig, model, processor, parsed, log: Callable[[str], None],
                searches: dict | None = None) -> dict:
    """name -> (plan or None, model to run, how its side branch came to be). Geometry mode trains nothing: its
    default split is layers // 2 (random weights have no probe recommendation), as `routing bench`'s.
    ``vtw@auto[:...]`` runs VTW's KL search (`routing.vtw`) on --data (default: the embedded probe set); its row
    keeps the spec as written, and `searches` (when given) gets name -> `VtwSearch`."""
    import routing
    from routing.jobs.train import TrainConfig, train_side_branch, training_records
    from saturation.core.adapters import adapter_for

    a = adapter_for(model)
    artifact = routing.load(model, cfg.routing) if cfg.routing is not None else None
    split = cfg.split if cfg.split is not None else (artifact.plan.split if artifact else None)
    if split is None and cfg.geometry is not None:
        split = max(a.num_layers // 2, a.min_split)
    if split is None and any(p["variant"] and p["split"] is None and p.get("auto") is None for p in parsed):
        split = _recommended_split(cfg, a.num_layers, log)
    built, records = {}, None
    for p in parsed:
        if p.get("composed"):  # lf+best: `compose_best`, once the other rows have their accuracy
            continue
        if p.get("auto") is not None:
            from routing.vtw import resolve_auto
            from saturation.core.loading import DATA_SAMPLES
            from saturation.core.sources import load_records

            calibration = load_records(cfg.data, None, cfg.seed, default=DATA_SAMPLES / "shapes" / "probe.json")[1]
            plan, found = resolve_auto(p["text"], model, processor, calibration, log=log)
            name = p["text"]  # the search's row: another plan may be the vtw@K it found
            if searches is not None:
                searches[name] = found
        else:
            text = p["text"]
            if cfg.defaulted:  # the default sweep fits the family: a refused row is a note, not a failure
                text, note = fit_default(text, model, split if split is not None else a.num_layers // 2)
                if note:
                    log(note)
                if text is None:
                    continue
            plan = routing.parse_plan(text, model, split=split if split is not None else a.num_layers // 2)
            name = "vanilla" if plan is None else plan.spec
        if plan is None:
            built[name] = (None, model, "")
            continue
        routed = routing.build(model, plan)
        how = ""
        if plan.trainable and cfg.geometry is not None:
            how = "untrained (geometry)"
        elif plan.trainable:
            if _side_from(routed, artifact) and plan.prune is None:
                how = f"side branch from {cfg.routing}"
            else:
                if records is None:
                    records = training_records(None, cfg.out / "train-data", 2000, cfg.seed)
                # checkpoints as it goes (every 50 steps, at least halfway), so a killed comparison resumes each
                # plan's training where it stopped
                opts = TrainConfig(model=cfg.model or "tiny", variant=plan.variant, max_steps=cfg.train_steps,
                                   seed=cfg.seed, save_steps=max(1, min(50, cfg.train_steps // 2)))
                folder = cfg.out / "train" / plan_folder(name)
                log(f"training {name} ({cfg.train_steps} steps, side branch on the {'kept' if plan.prune else 'image'} tokens)")
                summary = train_side_branch(routed, processor, records, opts, folder, restart_other=True,
                                            log=lambda m, name=name: log(f"{name}: {m}") if "resuming" in m else None)
                if summary.get("unchanged"):
                    log(f"{name}: trained before ({folder}), kept")
                how = f"trained {cfg.train_steps} steps"
        built[name] = (plan, routed.eval(), how)
    return built


def _recommended_split(cfg: CompareConfig, num_layers: int, log) -> int:
    from routing.jobs.train import TrainConfig, resolve_training_split

    split, source = resolve_training_split(TrainConfig(model=cfg.model or "tiny", split="auto", seed=cfg.seed), num_layers, log)
    log(f"split {split} (from {source})")
    return split


@torch.no_grad()
def measure_latency(models: dict, prompt, repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """samples[kind][name] (seconds), kind prefill (end to end from pixels; from the merged embeddings when the
    prompt has none, geometry mode) / decode (per token): paired rounds, the order rotated every round and every
    decode step, as `routing bench`, on its clock rule (one thread's CPU time on CPU with one thread, else wall)."""
    from routing.jobs.timing import Stopwatch, decode_step, prefill, rotated
    from saturation.core.hf_compat import cache_of

    device = prompt.embeds.device
    watch = Stopwatch("cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall", device)
    e2e = prompt.batch is not None
    names = list(models)
    samples = {kind: {name: [] for name in names} for kind in ("prefill", "decode")}
    n = prompt.embeds.shape[1]
    for rep in range(warmup + repeats):
        caches = {}
        for name in rotated(names, rep):
            t, out = watch.time(functools.partial(prefill, models[name], prompt, e2e))
            caches[name] = cache_of(out)
            if rep >= warmup:
                samples["prefill"][name].append(t)
        for i, token in enumerate(prompt.next_tokens):
            for name in rotated(names, rep + i):
                t, out = watch.time(functools.partial(decode_step, models[name], caches[name], token, n + i))
                caches[name] = cache_of(out)
                if rep >= warmup:
                    samples["decode"][name].append(t)
    return samples


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median()) if xs else float("nan")


def run_compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Evaluate, price and time every plan of `cfg`; returns the frontier table (also written to
    ``cfg.out/frontier.csv``, NaN accuracy as "n/a")."""
    from saturation.core.files import disk_guard, ensure_output_dir
    from saturation.core.runs import locked, open_run

    parsed = parse_plans(cfg.plans)
    ensure_output_dir(cfg.out, "--out")
    with locked(cfg.out), disk_guard(cfg.out):
        open_run(cfg.out, compare_identity(cfg, parsed), COMPARE_OPTIONS, cfg.resume, RESULTS, log=log)
        return _run_compare(cfg, parsed, log)


def _kept_accuracy(cfg: CompareConfig, name: str, key: dict, compute: Callable[[], float]) -> float:
    """A plan's accuracy, kept in ``plans/<plan>.json`` while `key` (what made it) is the same."""
    import json

    from saturation.core.files import write_json

    key = json.loads(json.dumps(key))
    path = cfg.out / "plans" / f"{plan_folder(name)}.json"
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept.get("made_with") == key:
            return float(kept["accuracy"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    accuracy = compute()
    write_json(path, {"accuracy": accuracy, "made_with": key})
    return accuracy


def _run_compare(cfg: CompareConfig, parsed, log: Callable[[str], None]) -> pd.DataFrame:
    """`run_compare` in its locked, opened run folder."""
    from routing.jobs.bench import BenchConfig, load_models
    from routing.jobs.evaluate import evaluate
    from routing.jobs.runs import records_digest
    from routing.jobs.timing import paired_ratios, random_prompt, real_prompt
    from saturation.core.files import atomic_write, write_json
    from saturation.core.geometry import REPRESENTATIVE_IMAGE
    from saturation.core.loading import DATA_SAMPLES, cpu_threads, load_model
    from saturation.core.sources import load_records

    records = None
    if cfg.geometry is None:
        records = load_records(cfg.data, cfg.n, cfg.seed, default=DATA_SAMPLES / "shapes" / "heldout.json")[1]
        model, processor = load_model(cfg.model or "tiny")
    else:
        model, processor, _, source = load_models(BenchConfig(geometry=cfg.geometry, layers=cfg.layers,
                                                              seed=cfg.seed))
        log(f"{source}: untrained side branches, random image embeddings (accuracy n/a)")
    searches = {}  # vtw@auto rows: VTW's KL table and its choice
    with cpu_threads(model, None):
        built = build_plans(cfg, model, processor, parsed, log, searches)
        if "vanilla" not in built:
            built = {"vanilla": (None, model, "")} | built  # every ratio is to vanilla
        if records is None:  # anyres families: a typical photo's tokens, as `routing bench --geometry`
            prompt = random_prompt(model, cfg.text_tokens, 1, cfg.new_tokens, cfg.seed, image_size=REPRESENTATIVE_IMAGE)
        else:
            prompt = real_prompt(model, processor, records, cfg.text_tokens, 1, cfg.new_tokens, cfg.seed)
        geometry = flops.Geometry.of(model.config.text_config)
        samples = [(prompt.image_tokens, prompt.text_tokens)]

        def row(name: str, plan, net, how: str, params: str) -> dict:
            accuracy = float("nan")
            if records is not None:
                def score(name=name, net=net) -> float:
                    log(f"evaluating {name} on {len(records)} records")
                    result, _ = evaluate(net, processor, records, batch_size=cfg.batch_size,
                                         max_new_tokens=cfg.max_new_tokens)
                    return result["accuracy"]

                made = {"plan": None if plan is None else plan.to_manifest(), "how": how, "routing": cfg.routing and
                        str(cfg.routing), "questions": records_digest(records), "batch_size": cfg.batch_size,
                        "max_new_tokens": cfg.max_new_tokens, "train_steps": cfg.train_steps, "seed": cfg.seed,
                        "search": searches[name].to_dict() if name in searches else None}
                accuracy = _kept_accuracy(cfg, name, made, score)
            ratios = flops.plan_ratios(geometry, plan, samples)
            trainable = 0 if plan is None else net.trainable_parameters().trainable
            return {"plan": name, "params": params, "accuracy": accuracy, "flops_ratio": ratios["prefill"],
                    "decode_flops_ratio": ratios["decode"], "trainable_params": trainable, "trained": how}

        rows = [row(name, plan, net, how, searches[name].describe() if name in searches else params_of(plan))
                for name, (plan, net, how) in built.items()]
        for p in (p for p in parsed if p.get("composed")):  # lf+best, now that the pruners have their accuracy
            made = None
            for best in ranked_pruners(rows):
                spec = p["text"][:-len(BEST)] + "+" + best
                try:  # a default row LF cannot compose with is skipped with a note (fit_default): the next best
                    made = build_plans(cfg, model, processor, parse_plans([spec]), log) or None
                except ToolkitError as err:  # e.g. PDrop with a stage after LF's split, given in --plans
                    log(f"{p['text']}: not {spec} ({err})")
                    made = None
                if made is None:
                    continue
                log(f"{p['text']} -> {spec}: the pruner of best accuracy per FLOP that LF composes with")
                break
            if made is None:
                log(f"skipped {p['text']}: no training-free pruner row with an accuracy and a FLOP saving that LF "
                    "composes with")
                continue
            for name, (plan, net, how) in made.items():
                if name in built:  # --plans named it already: one row
                    log(f"skipped {p['text']}: {name} is already a row")
                    continue
                built[name] = (plan, net, how)
                rows.append(row(name, plan, net, how, f"{params_of(plan)}; {p['text']}: {best} best accuracy/FLOP"))
        log(f"timing {len(built)} plans, {cfg.repeats} paired rounds ({prompt.image_tokens} image + "
            f"{prompt.text_tokens} text tokens)")
        timing = measure_latency({name: net for name, (_, net, _) in built.items()}, prompt, cfg.repeats, cfg.warmup)
    for row in rows:
        for kind in ("prefill", "decode"):
            row[f"{kind}_ms"] = 1e3 * _median(timing[kind][row["plan"]])
            row[f"{kind}_ratio"] = _median(paired_ratios(timing[kind]["vanilla"], timing[kind][row["plan"]]))
    table = pd.DataFrame(rows)[list(COLUMNS)]
    atomic_write(cfg.out / "frontier.csv",
                 lambda p: table.to_csv(p, index=False, float_format="%.4g", na_rep=NA))
    if searches:  # the full per-layer KL table of every vtw@auto row
        write_json(cfg.out / CALIBRATION, {name: found.to_dict() | {"plan": built[name][0].spec}
                                           for name, found in searches.items()})
    else:  # an older run's searches are not this table's
        (cfg.out / CALIBRATION).unlink(missing_ok=True)
    return table


NA = "n/a"  # a column that has no value in this mode (accuracy under --geometry)
CALIBRATION = "calibration.json"  # vtw@auto's searches, beside frontier.csv
