"""Where a compiled routed prefill's time goes against compiled vanilla's: the graph alone, and the eager work around it.

    python tools/eager_overhead.py [--variant lf] [--text-tokens 64] [--rounds 7] [--calls 200] [--cold]

The embedded model and the benchmark's prompt (`routing bench`'s, real images), both models compiled, one thread,
CPU clock. Each round times, in turn: both whole prefills; each graph called alone on the arguments a real prefill
gave it (a fresh cache each call); and each prefill with its graph stubbed out (it returns one real call's output),
which leaves only the eager work around it (the routing's host reads, cache state, LM head, HF's output objects;
vanilla's: its wrappers and LM head). The routed prompt is `dense_prefill` (the benchmark's prompt is unpadded with
one image). Medians over rounds; the ratios are of paired rounds. Steadier than the bench's whole-prefill ratio on a
shared CPU, whose load moves between runs by more than LF's saving at this size; the eager work costs more in a real
prefill than stubbed (it runs after the graph has evicted the caches). `--cold` flushes the CPU caches before every
call (a 64 MiB copy, outside the timing), as `routing bench` sees each prefill with other models' calls between.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from routing.compiled import compile_model
from routing.jobs.timing import prefill, real_prompt
from routing.model import build
from saturation.core.adapters import adapter_for
from saturation.core.data import read_records
from saturation.core.loading import DATA_SAMPLES, load_model


def per_call_ms(fn, calls: int, flush=None) -> float:
    """Mean CPU ms of `fn` over `calls`; with `flush`, it runs before every call, untimed."""
    if flush is None:
        start = time.thread_time()
        for _ in range(calls):
            fn()
        return (time.thread_time() - start) / calls * 1e3
    total = 0.0
    for _ in range(calls):
        flush()
        start = time.thread_time()
        fn()
        total += time.thread_time() - start
    return total / calls * 1e3


def captured(obj, name: str, run) -> tuple[tuple, dict]:
    """The arguments `obj.<name>` gets during `run()`."""
    real, seen = getattr(obj, name), []
    setattr(obj, name, lambda *args, **kwargs: seen.append((args, kwargs)) or real(*args, **kwargs))
    try:
        run()
    finally:
        setattr(obj, name, real)
    return seen[0]


def fresh_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The same call with every KV cache in it replaced by an empty one (a filled cache would grow per call)."""
    def swap(x):
        return DynamicCache() if isinstance(x, DynamicCache) else x
    return tuple(map(swap, args)), {k: swap(v) for k, v in kwargs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="lf")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--cold", action="store_true", help="flush the CPU caches before every call")
    args = parser.parse_args()
    flush = None
    if args.cold:
        big, sink = torch.ones(2**24), torch.empty(2**24)  # 64 MiB: more than this machine's L2 and L3
        flush = lambda: sink.copy_(big)  # noqa: E731
    torch.set_num_threads(1)
    base, processor = load_model("tiny", dtype="float32", device="cpu")
    base.eval()
    routed = build(base, adapter_for(base).num_layers // 2, args.variant).eval()
    compile_model(base)
    compile_model(routed)
    records = read_records(DATA_SAMPLES / "shapes" / "heldout.json")
    p = real_prompt(base, processor, records, args.text_tokens, 1, 1)
    stack = adapter_for(base).text_model
    times = {k: [] for k in ("routed", "vanilla", "routed graph", "vanilla graph", "routed eager", "vanilla eager")}
    with torch.no_grad():
        for _ in range(3):  # compiles
            prefill(base, p), prefill(routed, p)
        graph_call = captured(routed, "dense_prefill", lambda: prefill(routed, p))  # the prompt's one graph
        stack_call = captured(stack, "_compiled_call_impl", lambda: prefill(base, p))
        real_graph, real_stack = routed.dense_prefill, stack._compiled_call_impl
        stack_out = (lambda a, k: real_stack(*a, **k))(*fresh_cache(*stack_call))
        graph_out = (lambda a, k: real_graph(*a, **k))(*fresh_cache(*graph_call))
        for _ in range(args.rounds):
            times["routed"].append(per_call_ms(lambda: prefill(routed, p), args.calls, flush))
            times["vanilla"].append(per_call_ms(lambda: prefill(base, p), args.calls, flush))
            times["routed graph"].append(per_call_ms(
                lambda: (lambda a, k: real_graph(*a, **k))(*fresh_cache(*graph_call)), args.calls, flush))
            times["vanilla graph"].append(per_call_ms(
                lambda: (lambda a, k: real_stack(*a, **k))(*fresh_cache(*stack_call)), args.calls, flush))
            routed.dense_prefill = lambda *a, **k: graph_out  # no layer runs
            stack._compiled_call_impl = lambda *a, **k: stack_out
            try:
                times["routed eager"].append(per_call_ms(lambda: prefill(routed, p), args.calls, flush))
                times["vanilla eager"].append(per_call_ms(lambda: prefill(base, p), args.calls, flush))
            finally:
                routed.dense_prefill, stack._compiled_call_impl = real_graph, real_stack
    for name, values in times.items():  # "routed eager" -> "lf eager", "vanilla" -> "vanilla prefill"
        label = name.replace("routed", args.variant) + ("" if " " in name else " prefill")
        print(f"{label:16s} ms {statistics.median(values):.3f}  ({', '.join(f'{v:.3f}' for v in values)})")

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    print(f"{args.variant}/vanilla: prefill {ratio('routed', 'vanilla'):.3f}, graph "
          f"{ratio('routed graph', 'vanilla graph'):.3f}; eager work {statistics.median(times['routed eager']):.3f} "
          f"vs {statistics.median(times['vanilla eager']):.3f} ms")


if __name__ == "__main__":
    main()
