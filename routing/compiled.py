"""Compiled routing (``--compile``): ``torch.compile`` over the routed model's layer groups and the vanilla stack.

What is compiled, and why there:

- **Routed prompt**: ONE graph for every variant, as vanilla's stack is. The common prompt (nothing padded, one
  image count per row, positions from the mask, no mask needed: ``dense_prefill``) has its route (`Route.dense`:
  argsort and slices sized by tensor shapes), positions and rotary tables in that graph too; only `RouteSizes`' two
  host reads stay before it. Any other prompt (padding, uneven image counts, FastV, M-RoPE, Gemma's masks) runs
  ``routed_prefill`` after what needs the host (``Route.of`` reads image counts: data-dependent shapes, a graph break
  wherever it sits; HF's mask code branches on values). Both end with the final norm. On the embedded model at 64
  text tokens LF's compiled prefill is 0.99-1.00x compiled vanilla (FLOP ratio 0.956; docs/RESULTS.md); the eager
  work around the graph is 0.18 ms against vanilla's 0.13 (``tools/eager_overhead.py``).
- **Routed, other groups**: every other run of consecutive decoder layers (FastV's shallow layers, the layers
  after a route-free prompt, the whole decode step's layer loop) goes through `run_layers`; compiling it makes
  each group ONE graph (its layers unrolled, the KV-cache appends inside), with the bookkeeping between groups eager.
- **Vanilla**: the base's own decoder stack (``anatomy.text_model``: mask, rotary, every layer, norm), compiled
  whole, as HF's ``model.compile()`` would; its lm_head stays eager like the routed model's. While tracing,
  transformers builds its full causal mask even for an unpadded prompt (``_ignore_causal_mask_sdpa``, before torch
  2.14), so compiled vanilla attends under an explicit mask where the routed prompt uses sdpa's ``is_causal``: at
  long prompts that, not routing, is most of the gap between them (docs/RESULTS.md).

What does not compile into those graphs (graph breaks and recompiles, checked with ``TORCH_LOGS=graph_breaks,
recompiles``): nothing breaks inside a group. Each group is its own entry of `run_layers`' cache (dynamo guards on
which layer modules, the cache layers' state and whether a mask is given), so a model holds one entry per group
and phase: prefill, the first decode step, then one more once the cache's keys are views grown by ``torch.cat``
(a stride guard); later decode steps reuse it (dynamic sizes). Hence the raised `RECOMPILE_LIMIT`.

Not here: CUDA graphs (``mode="reduce-overhead"``) need static shapes and a static cache, and routed decoding keeps
a different length per layer group in a ``DynamicCache`` (``generation.check_cache``); with a growing cache every
decode length would record a new graph. `compile_model` takes `mode` for a GPU session to try; it was not run here.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from saturation.core.adapters import adapter_for
from saturation.core.errors import ToolkitError

from .model import RoutedModel, dense_prefill, routed_prefill, run_layers

# dynamo's default (8 per code object) is below the entries a few routed models share: `run_layers` holds one per
# group and phase of every plan compiled in one process (bench: vanilla's stack plus lf, pc, kv's groups).
RECOMPILE_LIMIT = 512
BACKEND = "inductor"  # torch.compile's backend when none is given (tests swap in dynamo's "eager": capture only)


class Compiled:
    """`fn` under ``torch.compile`` (dynamic shapes); a compile failure at run time becomes one `ToolkitError`.

    `key(*args)` (optional) gives each kind of call its own copy of `fn`'s code: dynamo keeps its graphs per code
    object and checks their guards one entry after another, so one shared `run_layers` would test every other
    group's guards before finding its own (measured: ~0.3 ms per group call on CPU). One copy per layer group keeps
    each group's entries to its own phases (prefill, first decode step, later steps).
    """

    def __init__(self, fn: Callable, mode: str | None = None, backend: str | None = None,
                 key: Callable | None = None):
        self.fn, self.key, self.options = fn, key, {"dynamic": True, "mode": mode, "backend": backend or BACKEND}
        self.compiled = torch.compile(fn, **self.options)
        self.copies: dict = {}

    def _for(self, args) -> Callable:
        if self.key is None:
            return self.compiled
        k = self.key(*args)
        if k not in self.copies:
            code = self.fn.__code__.replace(co_name=f"{self.fn.__name__}_{len(self.copies)}")
            copy = types.FunctionType(code, self.fn.__globals__, code.co_name, self.fn.__defaults__)
            self.copies[k] = torch.compile(copy, **self.options)
        return self.copies[k]

    def __call__(self, *args, **kwargs):
        try:
            return self._for(args)(*args, **kwargs)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError) as err:
            raise ToolkitError(f"--compile: torch.compile failed: {_cause(err)}; run without --compile") from None


def group_key(layers, hidden, masks, position_ids, ropes, cache=None) -> tuple:
    """`run_layers`' calls by layer group: which modules, and whether it caches (the side branch never does)."""
    return tuple(map(id, layers)), cache is None


def prefill_key(a, plan, side_layers, *args, **kwargs) -> int:
    """`routed_prefill`'s calls by routed model (its own side branch): models sharing a process (bench's lf, pc and
    kv) would otherwise share one code object, and each call would first check the other models' guards, the
    base's layers first, before its own (on the embedded model the difference was below the bench's noise)."""
    return id(side_layers)


def _cause(err: Exception) -> str:
    """The first line of a compile error (inductor appends a long how-to-debug paragraph)."""
    line = next((s for s in str(err).splitlines() if s.strip()), type(err).__name__)
    return line.strip()


def check_compile(device_map: str | None = None, device: str | torch.device | None = None) -> None:
    """One line for a combination `--compile` cannot serve, before any work."""
    if device_map is not None:
        raise ToolkitError("--compile cannot trace a model placed by --device-map (accelerate's hooks move offloaded "
                           "weights in and out around every layer call); give one of them")
    if device is not None and torch.device(device).type not in ("cpu", "cuda"):
        raise ToolkitError(f"--compile needs inductor, which runs on cpu or cuda, not {torch.device(device).type}")


def preflight(device: torch.device, backend: str | None = None) -> None:
    """Compile one tiny function on `device`: a missing C++ compiler (CPU) or toolchain fails here, in one line,
    before the model's first call."""
    Compiled(lambda x: (x * 2).sin() + 1, backend=backend)(torch.ones(3, device=device))


def compile_model(model: nn.Module, mode: str | None = None, backend: str | None = None) -> nn.Module:
    """`model` with its layer groups compiled, in place, and returned: a routed model's `routed_prefill` (its whole
    prompt), `run_layers` (every other group) and its base's decoder stack (vanilla's path, shared by reference),
    or a vanilla LLaVA's decoder stack.

    Exactness: the same modules and inputs; fp32 logits match eager within ~1e-5 (tests/test_compile.py).
    """
    base = model.base if isinstance(model, RoutedModel) else model
    if getattr(base, "hf_device_map", None):
        check_compile(device_map="given")
    a = model.adapter if isinstance(model, RoutedModel) else adapter_for(base)  # the routed model's own: it keeps it
    device = a.embed_tokens.weight.device
    check_compile(device=device)
    # Python ints are the plan's (split, layer counts: fixed per model), never sizes (those come from tensors): keep
    # them static. With dynamic shapes dynamo may trace one as a symbol, and Qwen3-VL's prompt (DeepStack hooks)
    # then failed inside dynamo on `range(plan.split)` (InternalTorchDynamoError) instead of specialising it.
    torch._dynamo.config.specialize_int = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * RECOMPILE_LIMIT)
    preflight(device, backend)
    # functools.cached_property takes a lock on its first read (Python 3.11), which dynamo cannot trace: a graph
    # break. Read the anatomy's modules that compiled code reads now, so that no graph is the first to.
    for name in ("layers", "norm", "rotary_emb", "text_model"):
        getattr(a, name)
    stack = a.text_model
    if not isinstance(getattr(stack, "_compiled_call_impl", None), Compiled):
        # what nn.Module.compile() sets, behind the one-line error translation
        stack._compiled_call_impl = Compiled(stack._call_impl, mode=mode, backend=backend)
    if isinstance(model, RoutedModel):
        model.run_layers = Compiled(run_layers, mode=mode, backend=backend, key=group_key)
        model.routed_prefill = Compiled(routed_prefill, mode=mode, backend=backend, key=prefill_key)
        model.dense_prefill = Compiled(dense_prefill, mode=mode, backend=backend, key=prefill_key)
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile_model` compiled this routed model's groups."""
    return isinstance(getattr(model, "run_layers", None), Compiled)
