"""`--compile` (routing.compiled): compiled routed and vanilla models equal eager ones, decode steps stop
recompiling, and what cannot compile is one line.

One tiny LLaVA (4 layers, split 2) compiled once for the whole module. The backend is ``--compile-backend``
(tests/conftest.py): ``eager`` by default, dynamo's capture of every group (guards, cache appends, dynamic
shapes, recompiles: what routing could get wrong under compile) run as captured; ``inductor`` (tools/ci_compile.sh)
adds AOT autograd and the generated C++ kernels, about 4 minutes on 2 CPU cores, too slow for the main suite.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from family_fixtures import family
from routing_fixtures import SHARP_STD, decode_step_logits, make_batch, tiny_llava, without_labels
from typer.testing import CliRunner

import routing
from cli import routing_app, saturation_app
from routing.compiled import Compiled, check_compile, compile_model, is_compiled
from routing.model import routed_prefill
from saturation.core.adapters import adapter_for
from saturation.core.errors import ToolkitError

VARIANTS = ("lf", "lf-ideal", "kv", "pc")
SPLIT, NEW = 2, 3
runner = CliRunner()


@pytest.fixture(scope="module")
def models(request):
    """Eager references first, then the same models compiled: {variant: (routed, eager logits, eager decode)}."""
    torch._dynamo.reset()
    base = tiny_llava(layers=4, std=SHARP_STD)
    batch = without_labels(make_batch("plain"))
    with torch.no_grad():
        vanilla = base(**batch).logits
    eager = {}
    for variant in VARIANTS:
        routed = routing.build(base, SPLIT, variant).eval()
        with torch.no_grad():
            logits = routed(**batch).logits
        eager[variant] = (routed, logits, decode_step_logits(routed, batch, NEW)[1])
    backend = request.config.getoption("--compile-backend")
    for routed, _, _ in eager.values():
        compile_model(routed, backend=backend)
    yield base, batch, vanilla, eager
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_routed_logits_equal_eager(models, variant):
    _, batch, _, eager = models
    routed, reference, _ = eager[variant]
    assert is_compiled(routed)
    with torch.no_grad():
        got = routed(**batch).logits
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_cached_decode_equals_recomputation_and_eager(models, variant):
    _, batch, _, eager = models
    routed, _, eager_steps = eager[variant]
    _, cached, recomputed = decode_step_logits(routed, batch, NEW)
    for step, (c, r, e) in enumerate(zip(cached, recomputed, eager_steps, strict=True)):
        torch.testing.assert_close(c, r, rtol=0, atol=1e-4, msg=f"step {step}: cached != recomputed")
        torch.testing.assert_close(c, e, rtol=0, atol=1e-4, msg=f"step {step}: compiled != eager")


def _count_compiled_calls(monkeypatch) -> list:
    """Every call into a `Compiled` function from here on, by its function's name."""
    calls, call = [], Compiled.__call__

    def counting(self, *args, **kwargs):
        calls.append(self.fn.__name__)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(Compiled, "__call__", counting)
    return calls


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_routed_prompt_is_one_graph_call(models, monkeypatch, variant, use_cache):
    """A compiled routed prompt (left-padded batch: subset masks, fillers) enters compiled code once,
    `routed_prefill`, as vanilla's stack does; the per-group path made four calls for LF (shallow, side, deep,
    fusion) and one per deep layer for PC and KV. Without a cache KV's image keys sit in a stand-in cache."""
    _, batch, _, eager = models
    routed, reference, _ = eager[variant]
    calls = _count_compiled_calls(monkeypatch)
    with torch.no_grad():
        got = routed(**batch, use_cache=use_cache).logits
    assert calls == ["routed_prefill"]
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_routed_prefill_traces_to_one_graph_without_breaks(models, monkeypatch, variant):
    """dynamo's own account of `routed_prefill` on a real prompt's arguments: one graph, no graph break (a break
    would split it back into several graphs with eager code between them)."""
    _, batch, _, eager = models
    routed = eager[variant][0]
    seen = []
    monkeypatch.setattr(routed, "routed_prefill", lambda *args, **kwargs: seen.append((args, kwargs)) or args[4])
    with torch.no_grad():
        routed(**batch)
    (args, kwargs), = seen
    with torch.no_grad():
        explained = torch._dynamo.explain(routed_prefill)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_dense_prompt_is_one_graph_call(models, monkeypatch, variant, use_cache):
    """The common prompt (nothing padded, one image count per row) enters compiled code once, `dense_prefill`:
    its route, positions and rotary tables inside that graph, not eager before it. Logits and every cached decode
    step equal the same routing built afresh and run eagerly."""
    base, _, _, eager = models
    routed = eager[variant][0]
    batch = without_labels(make_batch("uniform"))
    reference = routing.build(base, SPLIT, variant).eval()
    with torch.no_grad():
        want = reference(**batch).logits
    calls = _count_compiled_calls(monkeypatch)
    with torch.no_grad():
        got = routed(**batch, use_cache=use_cache).logits
    assert calls == ["dense_prefill"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    if use_cache:
        steps = zip(decode_step_logits(routed, batch, NEW)[1], decode_step_logits(reference, batch, NEW)[1], strict=True)
        for step, (c, e) in enumerate(steps):
            torch.testing.assert_close(c, e, rtol=0, atol=1e-4, msg=f"step {step}: compiled != eager")


@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_prefill_traces_to_one_graph_without_breaks(models, monkeypatch, variant):
    """`dense_prefill` on a real dense prompt's arguments: one graph, no break (the route's sorting and slicing,
    positions and rotary tables included; sizes come from tensor shapes, never a host read)."""
    from routing.model import dense_prefill

    routed = models[3][variant][0]
    seen = []
    monkeypatch.setattr(routed, "dense_prefill", lambda *args, **kwargs: seen.append((args, kwargs)) or (
        dense_prefill(*args, **kwargs)))
    with torch.no_grad():
        routed(**without_labels(make_batch("uniform")))
    (args, kwargs), = seen
    with torch.no_grad():
        explained = torch._dynamo.explain(dense_prefill)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("kind", ["uniform", "plain"])
def test_a_model_compiled_before_any_eager_call_breaks_no_graph(request, kind):
    """A fresh model's first prompt and decode steps compiled: no graph break. (Python 3.11's
    functools.cached_property takes a lock on a first read, which dynamo cannot trace: an anatomy module first read
    inside a graph, as the rotary module or the final norm are, broke `dense_prefill` in two and `routed_prefill`.)"""
    from torch._dynamo.utils import counters

    routed = routing.build(tiny_llava(layers=4, seed=7), SPLIT, "lf").eval()
    compile_model(routed, backend=request.config.getoption("--compile-backend"))
    counters.clear()
    decode_step_logits(routed, without_labels(make_batch(kind)), NEW)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_lf_with_fastv_equals_eager(models, request):
    """LF under FastV pruning: FastV's shallow layers run as their groups, then `routed_prefill` from the split on
    (its other entry: shallow layers done, the pruned frame's masks); logits and cached decode equal eager."""
    base, batch, _, _ = models
    routed = routing.build(base, SPLIT, "lf", prune="fastv", prune_layer=1, keep=0.5).eval()
    with torch.no_grad():
        reference = routed(**batch).logits
    steps = decode_step_logits(routed, batch, NEW)[1]
    compile_model(routed, backend=request.config.getoption("--compile-backend"))
    with torch.no_grad():
        torch.testing.assert_close(routed(**batch).logits, reference, rtol=0, atol=1e-4)
    for step, (c, e) in enumerate(zip(decode_step_logits(routed, batch, NEW)[1], steps, strict=True)):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-4, msg=f"step {step}: compiled != eager")


FAMILIES = ("llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl", "gemma3")


def _family(name: str):
    """A tiny random model of the family with sharp logits, a padded batch of its processor's, and the special tokens
    a decode must not produce (after the prompt the routed model takes text only)."""
    fam = family(name)
    base = fam.model(std=SHARP_STD)  # 4 layers (Gemma: 6)
    return base, fam.batch(), tuple(fam.suppressed(base))


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_families_equal_eager(name, monkeypatch, request):
    """Every other family under --compile (LF at its lowest split; Qwen3-VL's is above DeepStack): the prompt is one
    compiled call, its logits and every cached decode step equal eager. Qwen3-VL failed inside dynamo before
    `compile_model` kept Python ints static (`range(plan.split)` traced as a symbol beside the DeepStack hooks)."""
    base, batch, suppress = _family(name)
    a = adapter_for(base)
    routed = routing.build(base, max(2, a.min_split), "lf").eval()
    with torch.no_grad():
        reference = routed(**batch).logits
    steps = decode_step_logits(routed, batch, NEW, suppress)[1]
    compile_model(routed, backend=request.config.getoption("--compile-backend"))
    calls = _count_compiled_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(routed(**batch).logits, reference, rtol=0, atol=1e-4)
    assert calls == ["routed_prefill"]
    for step, (c, e) in enumerate(zip(decode_step_logits(routed, batch, NEW, suppress)[1], steps, strict=True)):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-4, msg=f"{name} step {step}: compiled != eager")


def test_compiled_vanilla_equals_eager(models):
    base, batch, vanilla, _ = models
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).logits, vanilla, rtol=0, atol=1e-4)


def test_decode_steps_do_not_recompile(models):
    """After a warm-up generate (prefill, the first step, the step after the cache was first grown), longer
    generations and a prompt of another length reuse the graphs: dynamic shapes, no per-step recompile."""
    base, batch, _, eager = models
    routed = eager["lf"][0]
    ask = {"do_sample": False, "suppress_tokens": [4]}
    with torch.no_grad():
        routed.generate(**batch, max_new_tokens=3, **ask)
        base.generate(**batch, max_new_tokens=3, **ask)
        longer = make_batch("plain")  # two more text tokens in front of every row
        longer = without_labels(longer) | {
            "input_ids": torch.cat([torch.full((3, 2), 9), longer["input_ids"]], 1),
            "attention_mask": torch.cat([torch.ones(3, 2, dtype=torch.long), longer["attention_mask"]], 1)}
        with torch._dynamo.config.patch(error_on_recompile=True):
            routed.generate(**batch, max_new_tokens=6, **ask)
            base.generate(**batch, max_new_tokens=6, **ask)
            routed.generate(**longer, max_new_tokens=4, **ask)


def no_compiler():
    """Inductor as on a machine without a C++ compiler (and no cached kernel, which would need none)."""
    return torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False})


def test_compile_failure_is_one_toolkit_error():
    """A missing C++ compiler surfaces as a ToolkitError naming the cause (inductor's own error otherwise)."""
    with no_compiler(), pytest.raises(ToolkitError, match="No working C\\+\\+ compiler"):
        Compiled(lambda x: x.cos() * 3 + 0.5)(torch.ones(4))


def test_unsupported_combinations_refused():
    with pytest.raises(ToolkitError, match="--device-map"):
        check_compile(device_map="auto")
    with pytest.raises(ToolkitError, match="inductor"):
        check_compile(device="meta")


@pytest.mark.parametrize("args", [
    ["bench", "--compile", "--device-map", "auto"],
    ["bench", "--compile", "--train"],
    ["eval", "--compile", "--device-map", "auto"],
])
def test_cli_refuses_unsupported_compile_in_one_line(args, tmp_path):
    result = runner.invoke(routing_app, [*args, "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--compile" in lines[0], result.stderr
    assert not (tmp_path / "out.json").exists()


def test_probe_refuses_compile_in_one_line(tmp_path):
    result = runner.invoke(saturation_app, ["probe", "--compile", "--out", str(tmp_path / "p")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "hook" in lines[0], result.stderr
    assert not (tmp_path / "p").exists()


def test_cli_compile_failure_is_one_line():
    """routing generate --compile on a machine whose C++ compiler is missing: one line naming it, no traceback."""
    from saturation.core.loading import DATA_SAMPLES

    image = next((DATA_SAMPLES / "shapes").rglob("*.png"))
    torch._dynamo.reset()  # the preflight must really compile
    try:
        with no_compiler():
            result = runner.invoke(routing_app, ["generate", "--compile", "--image", str(image), "--prompt", "colour?",
                                                 "--max-new-tokens", "2"])
    finally:
        torch._dynamo.reset()
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "C++ compiler" in errors[0], result.stderr
    assert result.stderr.rstrip().endswith(errors[0]) and "Traceback" not in result.output, result.stderr


def test_lmms_compile_model_arg():
    """lmms-eval's ``--model_args ...,compile=true`` (a bool or text there); anything else is one line."""
    from routing.lmms.plugin import MODEL_ARGS, flag_of, model_args

    assert "compile" in MODEL_ARGS and model_args({"compile": "true"}, {}) == {"compile": "true"}
    assert flag_of("true", "compile") and flag_of(True, "compile") and flag_of("1", "compile")
    assert not flag_of("false", "compile") and not flag_of(False, "compile") and not flag_of(None, "compile")
    with pytest.raises(ToolkitError, match="compile must be true or false"):
        flag_of("fast", "compile")


def test_bench_times_compiled_models(monkeypatch):
    """routing bench --compile: every model compiled before timing, the compile in an untimed warm-up, the result
    says so (dynamo's eager backend here: the wiring, not inductor's speed)."""
    import routing.compiled
    from routing.jobs.bench import BenchConfig, run_bench

    monkeypatch.setattr(routing.compiled, "BACKEND", "eager")
    compiled = []
    real = routing.compiled.compile_model
    monkeypatch.setattr(routing.compiled, "compile_model", lambda m, **kw: compiled.append(real(m, **kw)) or m)
    cfg = BenchConfig(geometry="tiny", layers=3, variants="lf", text_tokens="4,6", repeats=1, warmup=0, new_tokens=3,
                      compile=True)
    result = run_bench(cfg)
    assert result["compiled"] is True and set(result["compile_s"]) == {"4", "6"}
    assert len(compiled) == 2 and is_compiled(compiled[1])  # vanilla, then lf's groups
    assert {r["model"] for r in result["rows"]} == {"vanilla", "lf"}
    torch._dynamo.reset()
