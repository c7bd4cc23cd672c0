"""What the probe costs: time against a plain eager forward of the same batches, and peak memory against n.

    python -m saturation.benchmark [--model tiny | --geometry llava-1.5-7b [--layers N]] [--n 32] [--batch-size 8]
                                   [--repeats 3] [--threads 1] [--dtype D] [--device D]

Prints the ratio probe time / forward time, split into the hooked forward and the logit lens (the lens runs
lm_head once per layer, so its share grows with vocabulary size and depth; the target is
ratio <= 1.6 + lens share), then the peak memory of whole probe runs at n=16 and n=64, each in a fresh
process (peak RSS on CPU, peak allocated CUDA memory on a GPU), which should be flat in n.

``--geometry`` measures random weights of a named architecture instead of a checkpoint (``saturation.geometry``:
the real widths, depth, vocabulary and image pipeline of llava-1.5-7b/13b, llava-next-7b, llava-onevision-7b, no
download; anyres families tile the probe images as their processors do).

Without the embedded model in ``data_samples/`` (it is trained separately), a random model of the same
shape and freshly drawn shapes samples stand in, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .anatomy import anatomy, position_ids_from_mask
from .data import PromptFormat, image_inputs, read_records, sample_records, to_model
from .loading import TINY_DIR, cpu_threads, load_llava, resolve_name
from .probe import (
    DEFAULT_DATA,
    LayerReducer,
    ProbeConfig,
    eager_attention,
    encode_batch,
    probe_batch,
    run_probe,
    values_table,
)


def stand_in(folder: Path) -> tuple[Path, Path]:
    """A random LLaVA shaped like the embedded model (geometry ``tiny``) saved to disk, and 64 shapes samples."""
    from .geometry import random_checkpoint
    from .shapes import PROBE_SEED, make_dataset

    model, processor = random_checkpoint("tiny", None, "float32", "cpu")
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model", make_dataset(folder / "data", 64, PROBE_SEED, name="probe")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(model, batches, repeats: int) -> dict[str, float]:
    """Seconds for one pass over `batches`: plain eager forward, and the probe (hooked forward, lens, table).

    Each figure is the median over `repeats` passes after one warm-up pass, so a busy shared machine
    skews it less.
    """
    anat = anatomy(model)
    device = next(model.parameters()).device
    plain, hooked, lens, table = [], [], [], []
    with eager_attention(model), torch.inference_mode():
        for rep in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **image_inputs(b),
                      position_ids=position_ids_from_mask(b["attention_mask"]))
            _sync(device)
            t1 = time.perf_counter()
            timings: dict[str, float] = {}
            with LayerReducer(anat) as reducer:
                for i, b in enumerate(batches):
                    values = probe_batch(anat, reducer, b, timings)
                    t = time.perf_counter()
                    values_table(values, list(range(len(b["input_ids"]))), [str(i)] * len(b["input_ids"]))
                    timings["table"] = timings.get("table", 0.0) + time.perf_counter() - t
            if rep:  # the first pass is warm-up
                plain.append(t1 - t0)
                hooked.append(timings["forward"])
                lens.append(timings["lens"])
                table.append(timings["table"])
    med = statistics.median
    return {"forward": med(plain), "hooked_forward": med(hooked), "lens": med(lens), "table": med(table)}


def _load(args):
    """The model under test: a checkpoint (`--model`) or random weights of a named geometry (`--geometry`)."""
    if args.geometry is not None:
        from .geometry import random_checkpoint

        return random_checkpoint(args.geometry, args.layers, args.dtype, args.device, args.seed)
    return load_llava(args.model, dtype=args.dtype, device=args.device)


def _peak_memory_child(args) -> None:
    """Run one whole probe and print its peak memory as JSON (a fresh process per n, so peaks do not mix)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = _load(args)
        device = next(model.parameters()).device
        loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cfg = ProbeConfig(model=args.model, n=args.child_n, data=args.data, out=Path(tmp), batch_size=args.batch_size,
                          seed=args.seed, progress=False, resume=False, threads=args.threads)
        run_probe(cfg, model=model, processor=processor)
        out = {"n": args.child_n, "rss_after_load_mb": loaded,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if device.type == "cuda":
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out))


def peak_memory(args, n: int) -> dict:
    cmd = [sys.executable, "-m", "saturation.benchmark", "--model", str(args.model), "--data", str(args.data),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--child-n", str(n)]
    for flag in ("dtype", "device", "threads", "geometry", "layers"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"memory run for n={n} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saturation.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--geometry", default=None, help="random weights of a named architecture instead of --model: "
                   "llava-1.5-7b | llava-1.5-13b | llava-next-7b | llava-onevision-7b | tiny | cpu-bench (no download)")
    p.add_argument("--layers", type=int, default=None, help="with --geometry: build only N decoder layers")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--n", type=int, default=32, help="samples in the timed batches")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the probe's rule)")
    p.add_argument("--memory-n", type=int, nargs="*", default=[16, 64], help="n for the peak-memory runs")
    p.add_argument("--child-n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    tmp = None
    if args.geometry is not None:
        from .geometry import GEOMETRIES

        if args.geometry not in GEOMETRIES:
            raise SystemExit(f"unknown geometry '{args.geometry}': choose one of {', '.join(GEOMETRIES)}")
        args.model = f"random {args.geometry}" + (f", {args.layers} layers" if args.layers else "")
    elif args.layers is not None:
        raise SystemExit("--layers shrinks a --geometry; a checkpoint keeps its own depth")
    elif resolve_name(args.model) == str(TINY_DIR) and not TINY_DIR.is_dir():
        tmp = tempfile.TemporaryDirectory()
        args.model, args.data = stand_in(Path(tmp.name))
        print(f"note: no embedded model in {TINY_DIR}; using a random model of its shape and fresh shapes samples")
    args.data = args.data or DEFAULT_DATA
    if args.child_n is not None:
        return _peak_memory_child(args)
    model, processor = _load(args)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    records = sample_records(read_records(args.data), min(args.n, len(read_records(args.data))), args.seed)
    image_id = anatomy(model).image_token_id
    fmt = PromptFormat.of(model)
    batches = [to_model(encode_batch(records[i:i + args.batch_size], processor, image_id, fmt), device, dtype)
               for i in range(0, len(records), args.batch_size)]
    cfg = model.config.text_config
    threads = cpu_threads(model, args.threads)
    threads.__enter__()  # the probe's own thread rule, so both sides run as the probe would
    print(f"model {args.model}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
          f"{device}, {dtype}, {torch.get_num_threads()} threads; {len(records)} samples in batches of {args.batch_size}, "
          f"{int(batches[0]['attention_mask'].sum(1).float().mean())} tokens per sample")
    t = time_batches(model, batches, args.repeats)
    threads.__exit__(None, None, None)
    total = t["hooked_forward"] + t["lens"] + t["table"]
    print(f"plain eager forward   {t['forward'] * 1e3:9.1f} ms")
    print(f"probe                 {total * 1e3:9.1f} ms  = hooked forward {t['hooked_forward'] * 1e3:.1f} + "
          f"logit lens {t['lens'] * 1e3:.1f} + table {t['table'] * 1e3:.1f}")
    ratio, lens_share = total / t["forward"], t["lens"] / t["forward"]
    verdict = "meets" if ratio <= 1.6 + lens_share else "MISSES"
    print(f"ratio probe/forward   {ratio:.2f}  (lens share {lens_share:.2f}; without the lens {ratio - lens_share:.2f}; "
          f"target <= 1.6 + lens share = {1.6 + lens_share:.2f}: {verdict})")
    del model
    if tmp is not None:
        import atexit

        atexit.register(tmp.cleanup)
    peaks = [peak_memory(args, n) for n in args.memory_n]
    if not peaks:
        return
    key = "peak_cuda_mb" if "peak_cuda_mb" in peaks[0] else "peak_rss_mb"
    for m in peaks:
        extra = f", after loading {m['rss_after_load_mb']:.0f} MB RSS" if key == "peak_rss_mb" else ""
        print(f"peak memory n={m['n']:<4d} {m[key]:9.1f} MB ({key}{extra})")
    if len(peaks) > 1:
        growth = peaks[-1][key] - peaks[0][key]
        print(f"growth from n={peaks[0]['n']} to n={peaks[-1]['n']}: {growth:+.1f} MB")


if __name__ == "__main__":
    main()
