"""The CUDA paths: device and dtype flow, bf16 training with fp32 master weights, synchronised timing, peak memory.

Skipped where no CUDA device is present (CI has none). They ran on a lent GPU: see README, "Measured on a GPU".
"""

from __future__ import annotations

import copy

import pytest
import torch
from routing_fixtures import (
    SHARP_STD,
    assert_informative,
    decode_step_logits,
    make_batch,
    perturb_side,
    tiny_llava,
    without_labels,
)
from transformers import TrainerCallback

import routing
from saturation.core.adapters import adapter_for, position_ids_from_mask
from saturation.core.data import read_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VARIANTS = ("lf", "pc", "kv")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 means fp32: no TF32 in the vision tower's convolution or the matmuls, so CPU and GPU can agree."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_routed_logits_on_cuda_match_the_cpu(variant):
    cpu = tiny_llava()
    gpu = copy.deepcopy(cpu).cuda()
    batch = without_labels(make_batch("mixed", "left"))
    with torch.no_grad():
        want = routing.build(cpu, 2, variant).eval()(**batch).logits
        got = routing.build(gpu, 2, variant).eval()(**_to(batch, "cuda")).logits
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("kind", ("mixed", "uniform"))  # ragged, left-padded (a row has no image) | no mask at all
@pytest.mark.parametrize(("variant", "fusion_layers"), [("lf", 1), ("pc", 1), ("kv", 1), ("lf-ideal", 0), ("kv", 0)])
def test_every_decode_step_logits_equal_recomputation_on_cuda(attn, kind, variant, fusion_layers):
    """Cached decoding on CUDA against recomputation, logits at every step (ids alone hide an off-by-one: see
    tests/test_routing_generation.py). fp32 without TF32, init std 0.2 so greedy continuations vary."""
    routed = perturb_side(routing.build(tiny_llava(attn, std=SHARP_STD).cuda(), 2, variant,
                                        fusion_layers=fusion_layers).eval())
    routed.generation_config.eos_token_id = None  # run every step
    batch = _to(without_labels(make_batch(kind, "left")), "cuda")
    new, cached, recomputed = decode_step_logits(routed, batch, 6)
    assert new.device.type == "cuda"
    assert_informative(new)
    for step, (got, want) in enumerate(zip(cached, recomputed, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m, step=step: f"decode step {step}: {m}")


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("kv_heads", (2, 4))  # grouped-query and plain multi-head attention
def test_no_image_routing_equals_vanilla_in_bf16_on_cuda(attn, kv_heads):
    """Without images the routed model IS vanilla, bit for bit, in bf16 on CUDA: against our walk of the map and
    against HF's own forward called with the same settings.

    Why this once compared with HF at 2e-2 (reasoned from the code; CPU bf16 is bit-identical in every case, see
    tests/test_routing_model.py): two settings differ in a plain ``model(**batch)``.
    1. Positions: HF's forward uses ``arange`` even with left padding, generate (and we) ``cumsum(mask) - 1``;
       on this batch that moves bf16 logits by ~4e-3 (0.1-0.2 at init std 0.2). Passing our position ids fixes it.
    2. The cache: HF's forward builds a ``DynamicCache`` by default (``config.use_cache``), whose ``update``
       ``torch.cat``s K/V into contiguous buffers, where the walk hands attention the transposed projection
       views. Under GQA ``repeat_kv`` copies both layouts into the same contiguous tensor, so nothing changes;
       with as many K/V heads as query heads, SDPA's CUDA kernels get other strides, and whether they round alike
       is the kernel's business. ``use_cache=False`` makes the call identical to the walk: same modules, same
       masks, same positions, same tensors, hence exact. HF's default (cached) call is held to bf16 rounding only.
    """
    model = tiny_llava(attn, kv_heads=kv_heads).to("cuda", torch.bfloat16)
    routed = perturb_side(routing.build(model, 2, "lf").eval())
    assert {(p.device.type, p.dtype) for p in routed.side.parameters()} == {("cuda", torch.bfloat16)}
    batch = _to(without_labels(make_batch("text", "left")), "cuda")
    batch.pop("pixel_values")
    positions = position_ids_from_mask(batch["attention_mask"])
    with torch.no_grad():
        ours = routed(**batch).logits
        walked = adapter_for(model).forward(**batch)  # the same layers, masks and positions, walked by hand
        hf = model(**batch, position_ids=positions, use_cache=False).logits
        hf_cached = model(**batch, position_ids=positions).logits
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, walked)
    assert torch.equal(ours, hf)
    torch.testing.assert_close(ours, hf_cached, atol=2e-2, rtol=2e-2)


def test_bf16_training_keeps_fp32_master_weights_and_saves_in_the_base_dtype(tiny_model_dir, dataset, tmp_path):
    """On CUDA the base trains in bf16 (the paper's recipe), the side branch in fp32 under autocast with gradient
    checkpointing; the artifact is written in the base's dtype and the base never changes."""
    import pandas as pd

    from routing.jobs.train import TrainConfig, train_side_branch, training_dtype
    from saturation.core.loading import load_model

    assert training_dtype(None, "cuda") == "bfloat16" and training_dtype("float16", "cuda") == "float16"
    model, processor = load_model(str(tiny_model_dir), dtype="bfloat16", device="cuda")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    routed = routing.build(model, 2)
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(({p.dtype for p in model.side.parameters()}, model.side[0].gradient_checkpointing))

    out = tmp_path / "r"
    opts = TrainConfig(model=str(tiny_model_dir), split="2", out=out, max_steps=12, save_steps=100, logging_steps=1,
                       lr=3e-3, batch_size=4, device="cuda")
    summary = train_side_branch(routed, processor, read_records(dataset), opts, out, callbacks=[Watch()])
    assert len(seen) == 12 and all(dtypes == {torch.float32} and checkpointing for dtypes, checkpointing in seen)
    assert {p.dtype for p in routed.side.parameters()} == {torch.bfloat16}
    assert routing.artifact.read_manifest(out / "routing")["dtype"] == "bfloat16"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    losses = pd.read_csv(out / "train_log.csv")["loss"]
    assert summary["steps"] == 12 and losses.notna().all() and losses.iloc[-3:].mean() < losses.iloc[:3].mean()


def test_probe_on_cuda_matches_the_cpu(tiny_model_dir, dataset, tmp_path):
    import pandas as pd

    from saturation.probe import ProbeConfig, run_probe

    summaries = {}
    for device in ("cpu", "cuda"):
        result = run_probe(ProbeConfig(model=str(tiny_model_dir), data=dataset, n=8, dtype="float32", device=device,
                                       out=tmp_path / device, progress=False))
        summaries[device] = pd.read_csv(result.summary_path).select_dtypes("number")
    pd.testing.assert_frame_equal(summaries["cuda"], summaries["cpu"], atol=1e-4, rtol=1e-3)


def test_embedded_model_answers_on_cuda_in_its_checkpoint_dtype():
    """On CUDA the embedded model loads in its stored fp16 and answers the first 64 held-out questions as the same
    weights do in fp32 on the CPU (the reference; fp32 answers equal the stored fp16 weights' answers there,
    test_shapes): fp16 arithmetic may flip a near-tie, so at most 3 of 64 answers differ. Measured against the model itself, not a constant of one set of weights."""
    from routing.jobs.evaluate import evaluate
    from saturation.core.loading import DATA_SAMPLES, load_model

    model, processor = load_model("tiny", device="cuda")
    assert model.dtype == torch.float16 and model.device.type == "cuda"
    records = read_records(DATA_SAMPLES / "shapes" / "heldout.json")[:64]
    result, table = evaluate(model, processor, records)
    cpu_model, cpu_processor = load_model("tiny", device="cpu")
    assert cpu_model.dtype == torch.float32
    reference, reference_table = evaluate(cpu_model, cpu_processor, records)
    assert result["n"] == reference["n"] == 64 and list(table["id"]) == list(reference_table["id"])
    agree = (table["prediction"] == reference_table["prediction"]).mean()
    assert agree >= 0.95, table[table["prediction"] != reference_table["prediction"]].assign(
        cpu=reference_table["prediction"])


def test_bench_on_cuda_times_with_the_wall_clock_and_reports_peak_memory():
    from routing.jobs.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(geometry="tiny", device="cuda", text_tokens="16,64", variants="lf,pc,kv",
                                   repeats=3, warmup=1, new_tokens=4, train=True))
    assert result["clock"] == "wall" and result["device"].startswith("cuda")
    peaks = result["memory"]["cuda_peak_mb"]
    assert set(peaks) == {"vanilla", "lf", "pc", "kv"} and all(v > 0 for m in peaks.values() for v in m.values())
    assert set(result["train_step"]["64"]) == {"pc", "lf", "kv"}
