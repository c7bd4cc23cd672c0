"""Prefill and decode latency of vanilla and each DPVR variant, side by side, over a sweep of text lengths.

``routing bench`` is a thin shell over `run_bench`. The models come from one of two places:

- a real checkpoint (``--model``, default the embedded ``tiny``), routed by a trained artifact (``--routing``)
  or built at ``--split``; its prompts carry real images through the processor and the vision tower;
- a named geometry (``--geometry llava-1.5-7b``), random weights built in code from the architecture's config
  values (no download; ``--layers N`` shrinks the depth), fed random merged embeddings plus an image mask.

The number of image tokens always comes from the backbone adapter (anyres geometries: one representative 480x640
image, ``saturation.core.geometry.REPRESENTATIVE_IMAGE``) or from the processor, never a constant.

Method. Every model sees the same inputs. Each round (after warm-up) times every model's prefill and then every
decode step, all models back to back, the order rotating from round to round and step to step (A B C D, B C D A,
…), so slow spells on a shared machine hit every model of a round alike. A ratio to vanilla is the median (and
IQR) of the per-round ratios; ms columns are medians and IQRs of the samples. On CPU with one thread the clock is
the calling thread's CPU time (paired ratios then move by 1-2% between runs, where wall-clock medians swing by
5-10%); on CUDA, or with several threads, it is wall time, with the device synchronised around every call.

- ``prefill`` is generation's prefill from the merged embeddings (the FLOP model's scope): a KV cache is filled
  and only the last position's logits are computed (``logits_to_keep=1``). ``prefill_e2e`` (real images only)
  adds the vision tower and the merge.
- ``decode`` is one bare cached step (one new text token per row, no ``generate()`` bookkeeping) after that
  prefill; ms per token is per step, for the whole batch.
- ``theory`` is ``routing.flops`` for the same geometry, split and token counts: the prefill ratio of
  ``flops.ratio(...)["total"]`` and the decode ratio of the first generated token (``flops.decode_cost``).
- Memory: the prompt's KV cache size per model (exact); on CUDA the peak allocated memory of one untimed
  prefill + decode per model, on CPU the process's peak RSS.
- With ``train=True`` also one training step (forward + backward, side branch only) of each trainable variant
  against PC (LF's target: <= 0.4x of PC), with ``flops.train_step_cost``'s ratio beside it and the
  step's time per group of the plan (``routing.jobs.step_profile``: shallow, side, deep, fusion, head+loss, other,
  backward; measured in hooked rounds of their own).
"""

from __future__ import annotations

import functools
import re
import resource
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from routing import flops, memory
from routing.jobs.timing import (
    CLOCKS,
    Prompt,
    Stopwatch,
    decode_step,
    input_device,
    measure,
    paired_ratios,
    prefill,
    random_prompt,
    real_prompt,
    rotated,
    spread,
    warm,
)
from routing.model import build
from routing.plan import VARIANTS, make_plan, plan_for
from saturation.core.adapters import adapter_for
from saturation.core.errors import ToolkitError
from saturation.core.geometry import (
    CHECKPOINT_DTYPE,
    GEOMETRIES,
    REPRESENTATIVE_IMAGE,
    geometry_config,
    random_llava,
)
from saturation.core.hf_compat import cache_of

# ---------------------------------------------------------------- options


@dataclass
class BenchConfig:
    """What `run_bench` measures. Comma-separated strings are accepted for `variants` and `text_tokens`."""

    model: str | None = None  # checkpoint (alias, hub id, directory); None: 'tiny' unless a geometry is given
    geometry: str | None = None  # random weights of a named architecture instead of a checkpoint (GEOMETRIES)
    layers: int | None = None  # geometry only: decoder depth to build (fewer layers, same widths)
    routing: Path | None = None  # trained routing artifact: its split, K, d_v, and its side branch for its variant
    split: int | None = None  # None: the artifact's, else num_layers // 2
    fusion_layers: int = 1
    side_depth: int = 1
    variants: tuple[str, ...] | str = ("lf", "pc", "kv")
    text_tokens: tuple[int, ...] | str = (64, 128, 256, 512, 1024)
    batch: int = 1
    new_tokens: int = 16  # decode steps per round
    repeats: int = 11  # timed rounds
    warmup: int = 2  # untimed rounds first
    dtype: str | None = None
    device: str | None = None
    device_map: str | None = None  # checkpoint only: accelerate places the layers across GPUs, CPU and disk
    max_memory: str | None = None  # with device_map: "0=20GiB,1=20GiB,cpu=64GiB"
    threads: int | None = None  # None: one thread for a small model on CPU (saturation.core.loading rule)
    clock: str = "auto"  # auto: 'cpu' on CPU with one thread, else 'wall'
    train: bool = False  # also time one training step of each variant against PC
    compile: bool = False  # torch.compile vanilla's decoder stack and every routed group (routing.compiled)
    seed: int = 0

    def __post_init__(self):
        self.variants = parse_variants(self.variants)
        self.text_tokens = parse_text_tokens(self.text_tokens)
        if self.geometry is not None:
            if self.geometry not in GEOMETRIES:
                raise ToolkitError(f"unknown geometry '{self.geometry}': choose one of {', '.join(GEOMETRIES)}")
            if self.model is not None or self.routing is not None:
                raise ToolkitError("--geometry builds random weights: it takes no --model or --routing")
        elif self.layers is not None:
            raise ToolkitError("--layers shrinks a --geometry; a checkpoint keeps its own depth")
        if self.layers is not None and self.layers < 3:
            raise ToolkitError(f"--layers must be at least 3 (a shallow, a deep and a fusion layer), got {self.layers}")
        if self.routing is not None and self.split is not None:
            raise ToolkitError("give --routing (its split is saved with it) or --split, not both")
        for name in ("batch", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ToolkitError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ToolkitError(f"warmup must be 0 or more, got {self.warmup}")
        if self.clock not in ("auto", *CLOCKS):
            raise ToolkitError(f"unknown clock '{self.clock}': use auto, cpu or wall")
        if self.compile:
            from routing.compiled import check_compile

            check_compile(device_map=self.device_map)
            if self.train:
                raise ToolkitError("--compile times compiled inference; the training step (--train) is not compiled: "
                                   "give one of them")
        if self.device_map is not None or self.max_memory is not None:
            from saturation.core.loading import check_placement

            check_placement(self.device, self.device_map, self.max_memory)
            if self.geometry is not None:
                raise ToolkitError("--device-map places a checkpoint's layers; a --geometry is built on one --device")


def parse_variants(value) -> tuple[str, ...]:
    """'lf,pc,kv' or a sequence -> ('lf', 'pc', 'kv'); vanilla is always measured and may be left out."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip().lower() for n in names if n.strip() and n.strip().lower() != "vanilla"]
    for n in names:
        if n not in VARIANTS:
            raise ToolkitError(f"unknown variant '{n}': use a comma-separated list of {', '.join(VARIANTS)}")
    if not names:
        raise ToolkitError("no variant to measure: give e.g. --variants lf,pc,kv")
    return tuple(dict.fromkeys(names))


def parse_text_tokens(value) -> tuple[int, ...]:
    """'64,128' or a sequence -> (64, 128): positive integers, duplicates dropped, in the given order."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not re.fullmatch(r"-?[0-9]{1,9}", str(item).strip(), re.ASCII):  # int() also reads ６ and 1_0
            raise ToolkitError(f"--text-tokens takes comma-separated positive integers, got '{str(item)[:24]}'")
        n = int(str(item).strip())
        if n < 1:
            raise ToolkitError(f"--text-tokens must be positive, got {n}")
        out.append(n)
    if not out:
        raise ToolkitError("--text-tokens is empty")
    return tuple(dict.fromkeys(out))


@torch.no_grad()
def cuda_peak_mb(model, p: Prompt) -> dict:
    """Peak allocated CUDA memory of one prefill + decode of `model` on every GPU it uses (a device map spreads it):
    ``peak_mb`` and ``work_mb`` (above what was allocated before: activations, cache, logits) summed over them, and
    ``per_device`` {"cuda:0": {"peak_mb", "work_mb"}, ...}."""
    devices = sorted(cuda_devices(model) | {p.embeds.device}, key=str)
    before = {}
    for d in devices:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
        before[d] = torch.cuda.memory_allocated(d)
    cache = cache_of(prefill(model, p))
    for i, token in enumerate(p.next_tokens):
        cache = cache_of(decode_step(model, cache, token, p.embeds.shape[1] + i))
    per_device = {}
    for d in devices:
        torch.cuda.synchronize(d)
        peak = torch.cuda.max_memory_allocated(d)
        per_device[str(d)] = {"peak_mb": peak / 2**20, "work_mb": (peak - before[d]) / 2**20}
    del cache
    return {"peak_mb": sum(v["peak_mb"] for v in per_device.values()),
            "work_mb": sum(v["work_mb"] for v in per_device.values()), "per_device": per_device}


def cuda_devices(model) -> set[torch.device]:
    """The GPUs `model` computes on: where its weights live, and where a device map runs offloaded layers."""
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    for value in (getattr(model, "hf_device_map", None) or {}).values():
        if isinstance(value, int) or str(value).startswith("cuda"):
            devices.add(torch.device(f"cuda:{value}" if isinstance(value, int) else value))
    return devices


def _placement(model) -> dict[str, str]:
    """`model`'s device map with devices as strings (``cuda:0``, ``cpu``, ``disk``); empty when not dispatched."""
    return {k: ("disk" if v == "disk" else str(torch.device(v if not isinstance(v, int) else f"cuda:{v}")))
            for k, v in (getattr(model, "hf_device_map", None) or {}).items()}


def _placed(placement: dict[str, str], name: str, default: str) -> str:
    """Where the device map stores module or parameter `name` (its longest entry), else `default`."""
    owners = [k for k in placement if k == "" or name == k or name.startswith(f"{k}.")]
    return placement[max(owners, key=len)] if owners else default


def parameter_mb(model) -> dict[str, float]:
    """MB of `model`'s weights by where a device map placed them (``cuda:0``, ``cpu``, ``disk``), or where they
    are: what each device must hold, the frozen base included (offloaded weights count where they are stored)."""
    placement = _placement(model)
    out: dict[str, float] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        where = _placed(placement, name, str(p.device))
        out[where] = out.get(where, 0.0) + p.numel() * p.element_size() / 2**20
    return dict(sorted(out.items()))


def layer_devices(model) -> tuple[list[str], list[str]]:
    """Per decoder layer: where its weights are stored (``placement``) and where it computes (``execution``: an
    offloaded layer runs on its accelerate hook's device, and fills its cache there)."""
    placement, names = _placement(model), {id(m): n for n, m in model.named_modules()}
    stored, runs = [], []
    for layer in adapter_for(model).layers:
        here = next((str(p.device) for p in layer.parameters() if p.device.type != "meta"), "cpu")
        stored.append(_placed(placement, names[id(layer)], here))
        hooked = getattr(getattr(layer, "_hf_hook", None), "execution_device", None)
        runs.append(here if hooked is None else str(torch.device(f"cuda:{hooked}" if isinstance(hooked, int)
                                                                 else hooked)))
    return stored, runs


TRAIN_LABELS = 8  # labelled positions per row in bench's training step: a short answer at the end


def measure_train(base, variants, plan_args: dict, p: Prompt, watch: Stopwatch, repeats: int, warmup: int
                  ) -> tuple[dict, dict, int]:
    """``(samples, breakdown, labelled)``: seconds per training step (forward + backward into the side branch, no
    optimizer) of PC and each trainable variant, from the same embeddings, the answer being the last
    `TRAIN_LABELS` text positions; the median seconds per group of the step (`routing.jobs.step_profile`, hooked rounds
    after the timed ones); and the positions per row with a (shifted) label, which the head runs on."""
    from routing.jobs.step_profile import GROUPS, step_breakdown

    labels = torch.full(p.image_mask.shape, -100, dtype=torch.long, device=p.embeds.device)
    labels[:, -TRAIN_LABELS:] = p.next_tokens[0]
    inputs = {"inputs_embeds": p.embeds, "image_mask": p.image_mask, "attention_mask": p.attention_mask,
              "labels": labels}
    models = {v: build(base, plan_for(base, variant=v, **plan_args)).train()
              for v in dict.fromkeys(("pc", *variants)) if v != "lf-ideal"}

    def step(routed):
        routed(**inputs).loss.backward()
        routed.zero_grad(set_to_none=True)

    names = list(models)
    samples = {name: [] for name in names}
    parts = {name: {g: [] for g in GROUPS} for name in names}
    try:
        for rep in range(warmup + repeats):
            for name in rotated(names, rep):
                t, _ = watch.time(functools.partial(step, models[name]))
                if rep >= warmup:
                    samples[name].append(t)
        for rep in range(repeats):  # hooked rounds apart: the timed steps carry no instrumentation
            for name in rotated(names, rep):
                for g, seconds in step_breakdown(models[name], inputs, watch.now).items():
                    parts[name][g].append(seconds)
    finally:
        base.eval()
    breakdown = {name: {g: statistics.median(v) for g, v in by.items()} for name, by in parts.items()}
    return samples, breakdown, int((labels[0, 1:] != -100).sum())


def train_step_rows(steps: dict, parts: dict, geometry: flops.Geometry, plan_args: dict, p: Prompt,
                    labelled: int) -> dict:
    """Per variant: median ms, the paired ratio to PC, the FLOP model's ratio beside it (`flops.train_step_cost`)
    and its GFLOPs per sequence (forward, backward), and the measured ms per group of the step."""
    costs = {v: flops.train_step_cost(geometry, make_plan(geometry.num_layers, plan_args["split"], v,
                                                          plan_args["fusion_layers"], plan_args["side_depth"]),
                                      p.image_tokens, p.text_tokens, labelled) for v in steps}
    return {v: {"ms": 1e3 * statistics.median(s), "ratio_vs_pc": spread(paired_ratios(steps["pc"], s))[0],
                "flop_ratio_vs_pc": costs[v].total / costs["pc"].total,
                "flop_gflops": {"forward": costs[v].forward / 1e9, "backward": costs[v].backward / 1e9},
                "breakdown_ms": {g: 1e3 * t for g, t in parts[v].items()}} for v, s in steps.items()}


def train_lines(result: dict) -> list[str]:
    """What `routing bench --train` prints: per text length the step of each variant against PC with the FLOP
    model's ratio beside it, then where each variant's step goes."""
    lines = []
    for text, steps in result.get("train_step", {}).items():
        cells = ", ".join(f"{v} {s['ms']:.1f} ms ({s['ratio_vs_pc']:.3f}x PC, FLOP model {s['flop_ratio_vs_pc']:.3f})"
                          for v, s in steps.items())
        lines.append(f"train step (forward + backward into the side branch), text {text}: {cells}")
        for v, s in steps.items():
            parts = " · ".join(f"{g} {ms:.1f}" for g, ms in s["breakdown_ms"].items())
            f = s["flop_gflops"]
            lines.append(f"  {v} step in ms, by group (hooked rounds): {parts}; FLOP model {f['forward']:.3g} "
                         f"GFLOP forward + {f['backward']:.3g} backward per sequence")
    return lines


# ---------------------------------------------------------------- statistics and theory


def theory(geometry: flops.Geometry, variant: str, split: int, image_tokens: int, text_tokens: int,
           fusion_layers: int = 1, side_depth: int = 1) -> dict[str, float]:
    """The FLOP model's routed/vanilla ratios: prefill (``flops.ratio(...)["total"]``) and decode (first token)."""
    plan = make_plan(geometry.num_layers, split, variant, fusion_layers, side_depth)
    decode = (flops.decode_cost(geometry, plan, image_tokens, text_tokens).total
              / flops.decode_cost(geometry, None, image_tokens, text_tokens).total)
    return {"prefill": flops.ratio(geometry, variant, split, image_tokens, text_tokens, fusion_layers,
                                   side_depth)["total"], "decode": decode}


def rows_of(samples: dict, cache_mb: dict, text_tokens: int, image_tokens: int, theories: dict) -> list[dict]:
    """One row per model (vanilla first) at one text length: ms medians/IQRs, paired ratios, theory, cache."""
    rows = []
    for name in samples["prefill"]:
        row = {"text_tokens": text_tokens, "image_tokens": image_tokens, "model": name}
        for kind, values in samples.items():
            med, q1, q3 = spread([1e3 * s for s in values[name]])
            ratio = spread(paired_ratios(values["vanilla"], values[name]))
            row |= {f"{kind}_ms": med, f"{kind}_ms_q1": q1, f"{kind}_ms_q3": q3,
                    f"{kind}_ratio": ratio[0], f"{kind}_ratio_q1": ratio[1], f"{kind}_ratio_q3": ratio[2]}
        th = theories.get(name, {"prefill": 1.0, "decode": 1.0})
        row |= {"prefill_theory": th["prefill"], "decode_theory": th["decode"], "cache_mb": cache_mb[name]}
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the run


def load_models(cfg: BenchConfig):
    """``(base, processor or None, routed from the artifact or None, description)``."""
    from saturation.core.loading import resolve_device, resolve_dtype

    if cfg.geometry is not None:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        dtype = CHECKPOINT_DTYPE[cfg.geometry] if dtype == "auto" else dtype
        base = random_llava(geometry_config(cfg.geometry, cfg.layers), dtype, device, cfg.seed)
        depth = f", {cfg.layers} layers" if cfg.layers else ""
        return base, None, None, f"random {cfg.geometry}{depth}"
    from routing.saved import load as load_routing
    from saturation.core.loading import load_model

    base, processor = load_model(cfg.model or "tiny", dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map,
                                 max_memory=cfg.max_memory)
    routed = load_routing(base, cfg.routing).eval() if cfg.routing is not None else None
    return base, processor, routed, str(cfg.model or "tiny")


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda msg: None, model=None, processor=None) -> dict:
    """Measure every model at every text length; returns the JSON-ready result (see the module docstring).

    `model` (with `processor` for real images) skips loading: a LLaVA already in memory.
    """
    from saturation.core.loading import cpu_threads

    if model is None and cfg.routing is not None:  # a saved plan bench cannot time fails before any weights load
        from routing.artifact import read_plan

        _check_saved_plan(read_plan(cfg.routing), cfg)
    if model is None:
        base, processor, trained, source = load_models(cfg)
    else:
        base, trained, source = model, None, getattr(model, "name_or_path", "given model")
    a = adapter_for(base)
    num_layers = a.num_layers
    # before any call: accelerate's offload hooks untie tied weights (embeddings, lm_head) once they have run
    weights_mb = parameter_mb(base)
    if trained is not None:
        plan = trained.plan
        split, fusion_layers, side_depth, split_source = plan.split, plan.fusion_layers, plan.side_depth, "routing"
    else:
        # Qwen3-VL: the default must not land inside the DeepStack layers (min_split is 1 for every other family)
        split = max(num_layers // 2, a.min_split) if cfg.split is None else cfg.split
        fusion_layers, side_depth = cfg.fusion_layers, cfg.side_depth
        split_source = "default (layers // 2)" if cfg.split is None else "given"
    plan_args = {"split": split, "fusion_layers": fusion_layers, "side_depth": side_depth}
    models = {"vanilla": base}
    # A saved peer or pruned plan (routing save-plan, train --plan) is measured alone against vanilla, named by its
    # spec: lf/pc/kv at its split would be other plans than the one asked about.
    peer = trained is not None and _is_peer(trained.plan)
    variants = (trained.plan.spec,) if peer else cfg.variants
    for variant in variants:
        if trained is not None and (peer or trained.plan.variant == variant):
            models[variant] = trained
        else:
            models[variant] = build(base, plan_for(base, variant=variant, **plan_args)).eval()
    device = input_device(base)
    geometry = flops.Geometry.of(a.text_config)
    records = _bench_records() if processor is not None else None
    image_size = REPRESENTATIVE_IMAGE if cfg.geometry is not None else None  # anyres: a typical photo, not one tile

    rows, train, compile_s = [], {}, {}
    if cfg.compile:
        from routing.compiled import compile_model

        for m in models.values():
            compile_model(m)
    placed, runs = layer_devices(base)  # per decoder layer: stored where, computes where (routing.memory)
    nbytes = a.embed_tokens.weight.element_size()
    with cpu_threads(base, cfg.threads):
        threads = torch.get_num_threads()
        clock = cfg.clock
        if clock == "auto":
            clock = "cpu" if device.type == "cpu" and threads == 1 else "wall"
        if clock == "cpu" and (device.type != "cpu" or threads != 1):
            raise ToolkitError("the cpu clock times one CPU thread: use it on CPU with --threads 1, else --clock wall")
        watch = Stopwatch(clock, device)
        for text_tokens in cfg.text_tokens:
            if records is not None:
                p = real_prompt(base, processor, records, text_tokens, cfg.batch, cfg.new_tokens, cfg.seed)
            else:
                p = random_prompt(base, text_tokens, cfg.batch, cfg.new_tokens, cfg.seed, image_size=image_size)
            theories = ({variants[0]: flops.plan_ratios(geometry, trained.plan, [(p.image_tokens, p.text_tokens)])}
                        if peer else {v: theory(geometry, v, split, p.image_tokens, p.text_tokens, fusion_layers,
                                                side_depth) for v in variants})
            peaks = {name: cuda_peak_mb(m, p) for name, m in models.items()} if device.type == "cuda" else {}
            if cfg.compile:  # the first calls compile (each group's prefill, first and later decode graphs)
                compile_s[str(text_tokens)] = warm(models, p)
            samples, cache_mb = measure(models, p, watch, cfg.repeats, cfg.warmup)
            new = rows_of(samples, cache_mb, text_tokens, p.image_tokens, theories)
            for row in new:  # flat columns: the total over GPUs, and each GPU's (peak_mb_cuda:0, ...)
                peak = peaks.get(row["model"], {})
                row |= {k: v for k, v in peak.items() if k != "per_device"}
                row |= {f"peak_mb_{d}": v["peak_mb"] for d, v in peak.get("per_device", {}).items()}
            for row in new:  # routing.memory's per-device prediction for this prompt; its cache total beside KV MB
                row["memory_model"] = memory.per_device(geometry, getattr(models[row["model"]], "plan", None), placed,
                                                        runs, p.image_tokens, p.text_tokens, cfg.batch, nbytes)
                row["cache_mb_model"] = sum(d["cache_mb"] for d in row["memory_model"].values())
            rows += new
            if cfg.train:
                steps, parts, labelled = measure_train(base, cfg.variants, plan_args, p, watch, cfg.repeats,
                                                       cfg.warmup)
                train[str(text_tokens)] = train_step_rows(steps, parts, geometry, plan_args, p, labelled)
            log(_progress_line(new))
    result = {
        "model": source,
        "geometry": cfg.geometry,
        "layers": num_layers,
        "routing": str(cfg.routing) if cfg.routing else None,
        "split": split,
        "split_source": split_source,
        "fusion_layers": fusion_layers,
        "side_depth": side_depth,
        "images": "real" if records is not None else "random embeddings",
        "image_size": list(image_size) if image_size else None,
        "image_tokens": rows[0]["image_tokens"],
        "variants": list(variants),
        "text_tokens": list(cfg.text_tokens),
        "batch": cfg.batch,
        "new_tokens": cfg.new_tokens,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "device": str(device),
        "dtype": str(a.embed_tokens.weight.dtype).removeprefix("torch."),
        "threads": threads,
        "clock": clock,
        "compiled": cfg.compile,
    }
    by = {}
    for key in ("prefill_ratio", "decode_ratio", "prefill_e2e_ratio", "prefill_theory", "decode_theory"):
        if key in rows[0]:
            by[key] = {v: {str(r["text_tokens"]): r[key] for r in rows if r["model"] == v} for v in variants}
    result |= {"prefill_ratio": by["prefill_ratio"], "decode_ratio": by["decode_ratio"],
               "theory": {"prefill": by["prefill_theory"], "decode": by["decode_theory"]}}
    if "prefill_e2e_ratio" in by:
        result["prefill_e2e_ratio"] = by["prefill_e2e_ratio"]
    result["memory"] = ({"cuda_peak_mb": {m: {str(r["text_tokens"]): r["peak_mb"] for r in rows if r["model"] == m}
                                          for m in models},
                         "cuda_peak_mb_per_device": _per_device(rows, models)} if device.type == "cuda"
                        else {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    # weights each device holds: the base by its placement, and each routed model's side branch (its only extra)
    result["memory"]["parameters_mb"] = {"vanilla": weights_mb} | {
        m: parameter_mb(r.side) for m, r in models.items() if m != "vanilla" and len(r.side)}
    result["device_map"] = cfg.device_map
    result["memory"]["cache_mb"] = {m: {str(r["text_tokens"]): r["cache_mb"] for r in rows if r["model"] == m}
                                    for m in models}
    # routing.memory's prediction per device (decoder layers, side branch, prompt cache), beside the measurements
    result["memory"]["model_mb"] = {m: {str(r["text_tokens"]): r.pop("memory_model") for r in rows if r["model"] == m}
                                    for m in models}
    if cfg.train:
        result["train_step"] = train
    if cfg.compile:
        result["compile_s"] = compile_s  # wall seconds of the warm-up that compiled, per text length
    result["rows"] = rows
    return result


def _per_device(rows: list[dict], models: dict) -> dict:
    """{device: {model: {text: peak MB}}} from the rows' per-device CUDA peaks."""
    out: dict = {}
    for r in rows:
        for key in (k for k in r if k.startswith("peak_mb_")):
            out.setdefault(key.removeprefix("peak_mb_"), {m: {} for m in models})[r["model"]][str(r["text_tokens"])] = r[key]
    return out


def _is_peer(plan) -> bool:
    """A training-free or pruned plan (routing save-plan, train --plan): bench times it alone against vanilla."""
    return plan.variant not in ("lf", "pc", "kv") or plan.prune is not None


def _check_saved_plan(plan, cfg: BenchConfig) -> None:
    """One line for a saved plan this benchmark cannot time."""
    if not _is_peer(plan):
        return
    if cfg.train:
        raise ToolkitError(f"--train times lf/pc/kv training steps; the routing holds plan {plan.spec}")
    if plan.prune in ("prune-pre", "visionzip"):  # they read the vision tower, which bench's prefill skips
        raise ToolkitError(f"routing bench times prefill from merged embeddings, where {plan.spec} has no "
                           f"vision-tower attention to score: time it from pixels with `routing compare --plans "
                           f"vanilla,{plan.spec}`")


def _bench_records():
    """Real images for real-model prompts: the embedded held-out shapes set."""
    from saturation.core.data import read_records
    from saturation.core.loading import DATA_SAMPLES

    return read_records(DATA_SAMPLES / "shapes" / "heldout.json")


def _progress_line(rows: list[dict]) -> str:
    parts = [f"{r['model']} {r['prefill_ms']:.2f}/{r['decode_ms']:.2f}" for r in rows]
    return f"text {rows[0]['text_tokens']}: prefill/decode ms " + ", ".join(parts)


# ---------------------------------------------------------------- report


def summary_table(result: dict):
    """A rich Table: per text length and model, prefill and decode ms (median ± half the IQR, in %), the ratios
    to vanilla (median of paired ratios) and the FLOP model's beside them."""
    from rich import box
    from rich.table import Table

    e2e = "prefill_e2e_ratio" in result
    peak = "peak_mb" in result["rows"][0]
    gpus = [k for k in result["rows"][0] if k.startswith("peak_mb_")]
    gpus = gpus if len(gpus) > 1 else []  # one GPU: its column is the total's
    title = (f"{result['model']}: split {result['split']} ({result['split_source']}), K={result['fusion_layers']}, "
             f"d_v={result['side_depth']}; {result['image_tokens']} image tokens ({result['images']}), batch "
             f"{result['batch']}; {result['device']} {result['dtype']}, {result['threads']} thread(s), "
             f"{result['clock']} clock, {result['repeats']} rounds" + (", compiled" if result.get("compiled") else ""))
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, caption_justify="left", pad_edge=False,
                  caption="ratio: routed / vanilla (median of paired ratios); FLOPs: routing.flops' ratio; "
                  "KV MB model: routing.memory's prompt cache"
                  + _memory_caption(result.get("memory", {})))
    columns = ["text", "model", "prefill ms", "ratio", "FLOPs", "decode ms/tok", "ratio", "FLOPs"]
    columns += ["e2e ratio"] if e2e else []
    columns += ["KV MB", "model"] + (["peak MB"] if peak else [])
    columns += [f"peak MB {k.removeprefix('peak_mb_')}" for k in gpus]
    for name in columns:
        table.add_column(name, justify="left" if name in ("text", "model") else "right")
    for r in result["rows"]:
        routed = r["model"] != "vanilla"

        def ratio(key, r=r, routed=routed):
            return f"{r[key]:.3f}" if routed else ""

        cells = [str(r["text_tokens"]), r["model"], _ms(r, "prefill"), ratio("prefill_ratio"),
                 ratio("prefill_theory"), _ms(r, "decode"), ratio("decode_ratio"), ratio("decode_theory")]
        cells += [ratio("prefill_e2e_ratio")] if e2e else []
        cells += [f"{r['cache_mb']:.2f}", f"{r['cache_mb_model']:.2f}"]
        cells += ([f"{r['peak_mb']:.0f}"] if peak else []) + [f"{r[k]:.0f}" for k in gpus]
        table.add_row(*cells, end_section=r["model"] == result["variants"][-1])
    return table


def _memory_caption(memory: dict) -> str:
    """'\nweights: cpu 3.1 MB, disk 2.0 MB; process peak RSS 812 MB' (what each device holds, and the CPU peak)."""
    parts = []
    if weights := memory.get("parameters_mb", {}).get("vanilla"):
        parts.append("weights: " + ", ".join(f"{d} {mb:.1f} MB" for d, mb in weights.items()))
    if "peak_rss_mb" in memory:
        parts.append(f"process peak RSS {memory['peak_rss_mb']:.0f} MB")
    return "\n" + "; ".join(parts) if parts else ""


def _ms(row: dict, kind: str) -> str:
    """'12.34 ±3%': the median and half the interquartile range relative to it."""
    med, q1, q3 = row[f"{kind}_ms"], row[f"{kind}_ms_q1"], row[f"{kind}_ms_q3"]
    value = f"{med:.2f}" if med < 100 else f"{med:.0f}"
    return f"{value} ±{50 * (q3 - q1) / med:.0f}%" if med > 0 else value
