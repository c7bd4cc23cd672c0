"""Prefill and decode speed of a routed model against vanilla, measured side by side in one run.

``python -m routing.benchmark`` runs the issue's CPU setting (h=256, 12 layers, 64 image + 32 text tokens, s=8,
batch 4) on a random LLaVA of that shape and prints the measured ratios next to the FLOP model's. The functions
here are what ``routing bench`` calls; they take a model (any LLaVA) or build the random one.

Method: both models see the same inputs; each sample times vanilla and routed back to back (order alternating),
by default in CPU time of the calling thread (one intra-op thread), and a ratio is the median of the paired
ratios. On a machine shared with other jobs, wall-clock medians of either side swing by 5-10% between runs; paired
CPU-time ratios move by about 1-2%. Prefill is generation's prefill: a cache is filled and only the last position's
logits are computed (``logits_to_keep=1``). ``lm`` timings start from the merged embeddings (the scope of the FLOP
model); ``e2e`` timings include the vision tower and the merge. Decode ms/token is read inside HF's own
``generate()`` (KV cache, greedy) from a streamer's per-token timestamps; a second figure times bare cached steps of
both models in lockstep.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from saturation.anatomy import anatomy, position_ids_from_mask

from . import flops
from .model import build


@dataclass
class BenchConfig:
    """The random model's shape, the prompt and the routing. Defaults: the issue's CPU benchmark."""

    hidden: int = 256
    layers: int = 12
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int = 688
    vocab: int = 512
    image_tokens: int = 64  # a square number: (image_size / patch)^2
    text_tokens: int = 32
    text_before_image: int = 3  # "USER:" comes before the image, the question after it
    batch: int = 4
    variant: str = "lf"
    split: int = 8
    fusion_layers: int = 1
    side_depth: int = 1
    new_tokens: int = 32
    repeats: int = 21
    warmup: int = 3
    threads: int = 1
    clock: str = "cpu"  # "cpu": this thread's CPU time (robust on a shared machine, needs threads=1); "wall"
    stat: str = "median"  # how the ms columns are reduced: "median" or "min" (ratios are always paired medians)
    attn_implementation: str = "sdpa"
    seed: int = 0


def random_llava(cfg: BenchConfig):
    """A random LLaVA-1.5-shaped model with `cfg`'s decoder (fp32, eval mode)."""
    from transformers import LlavaForConditionalGeneration

    from saturation.tiny import tiny_llava_config

    side = int(round(cfg.image_tokens ** 0.5))
    if side * side != cfg.image_tokens:
        raise ValueError(f"image_tokens must be a square number, got {cfg.image_tokens}")
    patch = 8
    config = tiny_llava_config(cfg.vocab, image_size=side * patch, patch_size=patch, hidden=cfg.hidden,
                               layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                               intermediate=cfg.intermediate)
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(cfg.attn_implementation)
    model.generation_config.eos_token_id = None  # every generate() runs its full length
    return model


def prompt_batch(model, cfg: BenchConfig) -> dict:
    """`batch` identical-length prompts: a few text tokens, the image, the rest of the text."""
    a = anatomy(model)
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = a.text_config.vocab_size
    text = torch.randint(5, vocab, (cfg.batch, cfg.text_tokens), generator=g)
    image = torch.full((cfg.batch, cfg.image_tokens), a.image_token_id)
    before = cfg.text_before_image
    input_ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
    vision = model.config.vision_config
    pixel_values = torch.randn(cfg.batch, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


@dataclass
class Timing:
    """Samples (seconds) of a baseline (vanilla; PC for training steps) and the routed model, paired: sample k of
    each side was taken back to back."""

    baseline: list[float]
    routed: list[float]

    def ms(self, stat: str = "median") -> dict[str, float]:
        reduce = min if stat == "min" else statistics.median
        return {"baseline": 1e3 * reduce(self.baseline), "routed": 1e3 * reduce(self.routed)}

    def ratio(self) -> float:
        """Median of the paired ratios: load changes on a shared machine hit both sides of a pair alike."""
        return statistics.median(r / b for b, r in zip(self.baseline, self.routed, strict=True))


def _side_by_side(baseline, routed, cfg: BenchConfig) -> Timing:
    """Time two callables back to back, order alternating, `repeats` times after `warmup`."""
    clock = CLOCKS[cfg.clock]
    fns = {"baseline": baseline, "routed": routed}
    times = {name: [] for name in fns}
    for rep in range(cfg.warmup + cfg.repeats):
        for name in fns if rep % 2 == 0 else list(fns)[::-1]:
            start = clock()
            fns[name]()
            if rep >= cfg.warmup:
                times[name].append(clock() - start)
    return Timing(**times)


@torch.no_grad()
def prefill_timings(model, routed, batch: dict, cfg: BenchConfig) -> dict[str, Timing]:
    """Generation prefill (cache filled, last logits only): ``lm`` from the merged embeddings, ``e2e`` with the
    vision tower and the merge."""
    a = anatomy(model)
    h, image_mask = a.embed(batch["input_ids"], batch["pixel_values"])
    mask = batch["attention_mask"]
    pos = position_ids_from_mask(mask)
    return {
        "lm": _side_by_side(
            lambda: model(inputs_embeds=h, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1),
            lambda: routed(inputs_embeds=h, image_mask=image_mask, attention_mask=mask, use_cache=True,
                           logits_to_keep=1), cfg),
        "e2e": _side_by_side(lambda: model(**batch, position_ids=pos, use_cache=True, logits_to_keep=1),
                             lambda: routed(**batch, use_cache=True, logits_to_keep=1), cfg),
    }


class _StepClock:
    """A generate() streamer used as a stopwatch: ``put`` is called once per step, right after the new token."""

    def __init__(self, clock):
        self.clock, self.stamps = clock, []

    def put(self, value):
        self.stamps.append(self.clock())

    def end(self):
        pass


@torch.no_grad()
def generate_timing(model, routed, batch: dict, cfg: BenchConfig) -> Timing:
    """Seconds per generated token inside HF generate() (KV cache, greedy), read from a streamer: the time between
    consecutive tokens after the first, vanilla and routed calls alternating; step i of one call pairs with step i
    of the other."""
    models = {"baseline": model, "routed": routed}
    times = {name: [] for name in models}
    for rep in range(cfg.warmup + cfg.repeats):
        for name in models if rep % 2 == 0 else list(models)[::-1]:
            watch = _StepClock(CLOCKS[cfg.clock])
            models[name].generate(**batch, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                                  do_sample=False, streamer=watch)
            if rep >= cfg.warmup:  # stamps: the prompt, the first token (after prefill), then one per step
                times[name] += [b - a for a, b in zip(watch.stamps[1:], watch.stamps[2:])]
    return Timing(**times)


@torch.no_grad()
def decode_step_timing(model, routed, batch: dict, cfg: BenchConfig) -> Timing:
    """Seconds per bare cached decode step (no generate() bookkeeping), vanilla and routed in lockstep: each repeat
    prefills both (untimed), then times step i of each back to back, order alternating."""
    n = batch["input_ids"].shape[1]
    clock = CLOCKS[cfg.clock]

    def vanilla(cache, token, i):
        return model(input_ids=token, position_ids=torch.full_like(token, n + i), past_key_values=cache,
                     use_cache=True, logits_to_keep=1)

    def routed_step(cache, token, i):
        return routed(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)

    steps = {"baseline": vanilla, "routed": routed_step}
    times = {name: [] for name in steps}
    for rep in range(cfg.warmup + cfg.repeats):
        state = {}
        for name, m in (("baseline", model), ("routed", routed)):
            out = m(**batch, use_cache=True, logits_to_keep=1)
            state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
        for i in range(cfg.new_tokens):
            for name in steps if (rep + i) % 2 == 0 else list(steps)[::-1]:
                start = clock()
                out = steps[name](*state[name], i)
                elapsed = clock() - start
                state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
                if rep >= cfg.warmup:
                    times[name].append(elapsed)
    return Timing(**times)


def train_step_timing(model, batch: dict, cfg: BenchConfig) -> Timing:
    """Seconds per training step (forward + backward of the side branch, no optimizer) of the routed variant
    against PC on the same batch (DESIGN's target for LF: <= 0.4x of PC)."""
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] - 8] = -100  # the answer: the last 8 tokens
    runs = {}
    for name, variant in (("baseline", "pc"), ("routed", cfg.variant)):
        routed = build(model, cfg.split, variant, cfg.fusion_layers, cfg.side_depth).train()

        def step(routed=routed):
            routed(**batch, labels=labels).loss.backward()
            routed.zero_grad(set_to_none=True)

        runs[name] = step
    timing = _side_by_side(runs["baseline"], runs["routed"], cfg)
    model.eval()
    return timing


def run_benchmark(cfg: BenchConfig, model=None) -> dict:
    """Measured prefill and decode ratios (routed / vanilla) next to the FLOP model's, as one dict."""
    if cfg.clock not in CLOCKS or (cfg.clock == "cpu" and cfg.threads != 1):
        raise ValueError("clock must be 'wall', or 'cpu' with threads=1 (CPU time of one thread)")
    if cfg.stat not in ("min", "median"):
        raise ValueError("stat must be 'min' or 'median'")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model = random_llava(cfg) if model is None else model
        routed = build(model, cfg.split, cfg.variant, cfg.fusion_layers, cfg.side_depth)
        routed.generation_config.eos_token_id = None
        batch = prompt_batch(model, cfg)
        timings = {**prefill_timings(model, routed, batch, cfg),
                   "generate": generate_timing(model, routed, batch, cfg),
                   "decode_step": decode_step_timing(model, routed, batch, cfg)}
        if cfg.variant != "lf-ideal":
            timings["train_step"] = train_step_timing(model, batch, cfg)
    finally:
        torch.set_num_threads(threads)
    geometry = flops.Geometry.of(anatomy(model).text_config)
    plan = routed.plan
    prefill_flops = flops.ratio(geometry, plan.variant, plan.split, cfg.image_tokens, cfg.text_tokens,
                                plan.fusion_layers, plan.side_depth)
    decode_flops = (flops.decode_cost(geometry, plan, cfg.image_tokens, cfg.text_tokens).total
                    / flops.decode_cost(geometry, None, cfg.image_tokens, cfg.text_tokens).total)
    return {
        "config": asdict(cfg),
        "ms": {name: t.ms(cfg.stat) for name, t in timings.items()},
        "ratio": {name: t.ratio() for name, t in timings.items()},
        "samples": {name: len(t.baseline) for name, t in timings.items()},
        "flop_ratio": {"prefill": prefill_flops["total"], "prefill_linear": prefill_flops["linear"],
                       "decode": decode_flops},
    }


def format_report(result: dict) -> str:
    c, ms, ratio, n, f = (result[k] for k in ("config", "ms", "ratio", "samples", "flop_ratio"))
    lines = [
        f"{c['variant']} s={c['split']} K={c['fusion_layers']} d_v={c['side_depth']} | h={c['hidden']} "
        f"L={c['layers']} heads={c['heads']} i={c['intermediate']} | {c['image_tokens']} image + "
        f"{c['text_tokens']} text tokens, batch {c['batch']} | {c['threads']} thread(s), {c['attn_implementation']}, "
        f"{c['clock']} time; ms = {c['stat']}, ratio = median of paired ratios",
        f"FLOP model: prefill {f['prefill']:.3f} (linear {f['prefill_linear']:.3f}), decode {f['decode']:.3f}",
    ]
    rows = {"lm": ("prefill LM", "vanilla", "from merged embeddings: the FLOP model's scope"),
            "e2e": ("prefill e2e", "vanilla", "incl. vision tower and merge"),
            "generate": ("decode/token", "vanilla", "inside HF generate(), KV cache"),
            "decode_step": ("decode step", "vanilla", "bare cached steps in lockstep"),
            "train_step": ("train step", "pc", "forward + backward, side branch only")}
    for name, (label, baseline, note) in rows.items():
        if name in ms:
            lines.append(f"{label:13s} {baseline:7s} {ms[name]['baseline']:8.2f} ms  {c['variant']:7s} "
                         f"{ms[name]['routed']:8.2f} ms  ratio {ratio[name]:.3f}  ({note}; {n[name]} pairs)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in asdict(BenchConfig()).items():
        kind = str if isinstance(value, str) else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = vars(parser.parse_args(argv))
    as_json = args.pop("json")
    result = run_benchmark(BenchConfig(**args))
    print(json.dumps(result, indent=1) if as_json else format_report(result))


if __name__ == "__main__":
    main()
