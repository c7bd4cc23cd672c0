"""The probe: hook values against a brute-force reference, padding invariance, memory, shards and resume."""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model, write_dataset

from saturation import ToolkitError
from saturation.core.adapters import adapter_for
from saturation.core.data import read_records
from saturation.core.loading import load_model
from saturation.probe import (
    KEYS,
    SUMMARY_COLUMNS,
    LayerReducer,
    ProbeConfig,
    boot_bridge,
    bridge_probe_batch,
    eager_attention,
    encode_batch,
    plan_samples,
    probe_batch,
    run_probe,
)

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)

# Questions and answers of different lengths, so that a batch needs padding.
QAS = [("what colour is the circle?", "red"), ("how many are there?", "two"), ("is there a blue square?", "no"),
       ("is the red circle left?", "yes"), ("what shape is the green one?", "a circle"),
       ("what is there?", "one red circle and a blue square")]




@pytest.fixture(scope="module")
def varied_dataset(tmp_path_factory) -> Path:
    path = write_dataset(tmp_path_factory.mktemp("varied"), 8)
    records = json.loads(path.read_text())
    for i, r in enumerate(records):
        q, a = QAS[i % len(QAS)]
        r["conversations"] = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a},
                              {"from": "human", "value": "and the square?"}, {"from": "gpt", "value": "blue"}]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def mha_model(processor):
    """A second geometry: plain multi-head attention, 3 layers."""
    return make_model(processor, seed=3, kv_heads=None, layers=3)


def _values(model, processor, records):
    anat = adapter_for(model)
    batch = encode_batch(records, processor, anat.image_token_id)
    with eager_attention(model), LayerReducer(anat) as reducer:
        return probe_batch(anat, reducer, batch), batch


def _reference(model, processor, record):
    """The three views from `model(..., output_attentions, output_hidden_states)`, written out by hand."""
    anat = adapter_for(model)
    batch = encode_batch([record], processor, anat.image_token_id)
    raw_last = {}
    handle = anat.layers[-1].register_forward_hook(lambda m, a, o: raw_last.setdefault("h", o))
    with torch.no_grad(), eager_attention(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    handle.remove()
    ids = batch["input_ids"][0]
    image = ids == anat.image_token_id
    positions = torch.arange(len(ids))
    text = ~image & (positions > 0)
    query = text & (positions > positions[image].max())
    resid = list(out.hidden_states[:-1]) + [raw_last["h"]]  # hidden_states[-1] is normed: use the raw output
    log_final = out.logits[0].float().log_softmax(-1)
    ref = {k: [] for k in KEYS}
    for layer in range(anat.num_layers):
        cos = torch.nn.functional.cosine_similarity(resid[layer][0], resid[layer + 1][0], dim=-1)
        ref["cosine", "image"].append(cos[image].mean())
        ref["cosine", "text"].append(cos[text].mean())
        att = out.attentions[layer][0][:, query]  # [heads, queries, keys]
        per_head = att[..., image].sum(-1).mean(-1)
        ref["attention_mass", "image"].append(per_head.mean())
        ref["attention_mass_max_head", "image"].append(per_head.max())
        ref["attention_mass", "text"].append(att[..., text].sum(-1).mean())
        ref["attention_mass", "bos"].append(att[..., 0].mean())
        uniform = (image.cumsum(0).float() / (positions + 1))[query].mean()
        ref["attention_mass_uniform", "image"].append(uniform)
        log_lens = anat.unembed(resid[layer + 1][0]).float().log_softmax(-1)
        kl = (log_final.exp() * (log_final - log_lens)).sum(-1)
        ref["logit_lens_kl", "image"].append(kl[image].mean())
        ref["logit_lens_kl", "text"].append(kl[text].mean())
    return {k: torch.stack(v) for k, v in ref.items()}


@pytest.fixture(scope="module")
def embedded():
    """The embedded default model `tiny` and its processor (data_samples/tiny-llava)."""
    return load_model("tiny")


@pytest.mark.parametrize("which", ["tiny_model", "mha_model", "embedded"])
def test_hook_values_match_a_brute_force_reference(request, which, processor, varied_dataset):
    model = request.getfixturevalue(which)
    if which == "embedded":
        model, processor = model
    record = read_records(varied_dataset)[4]
    values, _ = _values(model, processor, [record])
    ref = _reference(model, processor, record)
    for key in KEYS:
        assert torch.allclose(values[key][0], ref[key].float(), atol=1e-5), key
    assert values["logit_lens_kl", "image"][0, -1] == 0  # the lens at the last layer is the model itself
    assert model.config.text_config._attn_implementation == "sdpa"  # eager was local to the probe


def test_padded_batch_gives_each_sample_its_own_numbers(tiny_model, processor, varied_dataset):
    records = read_records(varied_dataset)[:6]
    together, batch = _values(tiny_model, processor, records)
    assert (batch["attention_mask"] == 0).any(), "the batch should need padding"
    for i, record in enumerate(records):
        alone, _ = _values(tiny_model, processor, [record])
        for key in KEYS:
            assert torch.allclose(together[key][i], alone[key][0], atol=1e-5), (i, key)


def test_nothing_large_outlives_the_forward(tiny_model, processor, varied_dataset):
    anat = adapter_for(tiny_model)
    batch = encode_batch(read_records(varied_dataset)[:4], processor, anat.image_token_id)
    before = (len(anat.layers[0]._forward_hooks), len(anat.attention(0)._forward_hooks))
    with eager_attention(tiny_model), LayerReducer(anat) as reducer:
        seen = []
        grab = anat.attention(0).register_forward_hook(lambda m, a, o: seen.append(o[1].shape))
        probe_batch(anat, reducer, batch)
        grab.remove()
        kept = [v for v in vars(reducer).values() if isinstance(v, torch.Tensor) and v.dim() >= 3]
        assert not kept and all(h is None for h in reducer.hidden)
        assert all(v.shape == (4, anat.num_layers) for v in reducer.values.values())
    assert len(seen[0]) == 4  # the pattern existed ([b, h, q, k]) but was reduced in the hook
    assert (len(anat.layers[0]._forward_hooks), len(anat.attention(0)._forward_hooks)) == before  # hooks removed


def _config(out, data, **kw):
    return ProbeConfig(model="tiny-test", data=data, out=out, batch_size=3, progress=False, **kw)


def test_run_writes_tables_and_resumes(tiny_model, processor, varied_dataset, tmp_path):
    out = tmp_path / "probe"
    res = run_probe(_config(out, varied_dataset, n=5), model=tiny_model, processor=processor)
    assert res.probed == 5 and len(list((out / "samples").glob("shard-*.parquet"))) == 2
    table = pd.read_parquet(out / "per_sample.parquet")
    assert len(table) == 5 * tiny_model.config.text_config.num_hidden_layers * len(KEYS)
    assert table["sample"].nunique() == 5 and set(table["metric"]) >= {"cosine", "attention_mass", "logit_lens_kl"}
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert (summary["q25"] <= summary["median"] + 1e-12).all() and (summary["median"] <= summary["q75"] + 1e-12).all()
    rec = json.loads((out / "recommendation.json").read_text())
    assert isinstance(rec["split"], int) and rec["num_layers"] == 6 and rec["evidence"]["n"] == 5
    assert 1 <= rec["split"] <= 4

    again = run_probe(_config(out, varied_dataset, n=5), model=tiny_model, processor=processor)
    assert again.probed == 0
    assert (out / "summary.csv").read_text() == summary.to_csv(index=False)

    more = run_probe(_config(out, varied_dataset, n=8), model=tiny_model, processor=processor)
    assert more.n == 8 and more.probed < 8  # samples already in shards are reused

    with pytest.raises(ToolkitError, match="seed") as err:
        run_probe(_config(out, varied_dataset, n=5, seed=1), model=tiny_model, processor=processor)
    assert "\n" not in str(err.value) and "--no-resume" in str(err.value)
    fresh = run_probe(_config(out, varied_dataset, n=5, seed=1, resume=False), model=tiny_model, processor=processor)
    assert fresh.probed == 5


def test_interrupted_run_resumes_where_it_stopped(tiny_model, processor, varied_dataset, tmp_path, monkeypatch):
    import saturation.probe as probe

    real, calls = probe.encode_batch, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(probe, "encode_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_probe(_config(tmp_path / "a", varied_dataset, n=7), model=tiny_model, processor=processor)
    assert len(list((tmp_path / "a" / "samples").glob("shard-*.parquet"))) == 1
    resumed = run_probe(_config(tmp_path / "a", varied_dataset, n=7), model=tiny_model, processor=processor)
    assert resumed.probed == 4
    monkeypatch.setattr(probe, "encode_batch", real)
    whole = run_probe(_config(tmp_path / "b", varied_dataset, n=7), model=tiny_model, processor=processor)
    pd.testing.assert_frame_equal(resumed.summary, whole.summary, atol=1e-6)


def test_same_seed_gives_identical_summary(tiny_model, processor, dataset, tmp_path):
    a = run_probe(_config(tmp_path / "a", dataset, n=4, seed=7), model=tiny_model, processor=processor)
    b = run_probe(_config(tmp_path / "b", dataset, n=4, seed=7), model=tiny_model, processor=processor)
    assert a.summary_path.read_bytes() == b.summary_path.read_bytes()


def test_bad_options_are_one_line_errors(tiny_model, processor, dataset, tmp_path):
    for kw, text in (({"batch_size": 0}, "batch-size"), ({"rule": "magic"}, "unknown rule"),
                     ({"backend": "jax"}, "unknown backend"), ({"n": 99}, "only 12")):
        cfg = ProbeConfig(model="x", data=dataset, out=tmp_path, progress=False, **{"batch_size": 2, **kw})
        with pytest.raises(ToolkitError, match=text):
            run_probe(cfg, model=tiny_model, processor=processor)


def test_transformer_lens_backend_agrees(tiny_model_dir, varied_dataset):
    """The same reductions fed by TransformerBridge hook points give the same numbers (extra `lens` only)."""
    pytest.importorskip("transformer_lens")
    model, processor = load_model(tiny_model_dir)  # a fresh copy: the bridge wraps the model in place
    records = read_records(varied_dataset)[:6]
    ref, batch = _values(model, processor, records)
    anat = adapter_for(model)
    bridge = boot_bridge(model, processor)
    got = bridge_probe_batch(bridge, LayerReducer(anat), batch)
    for key in KEYS:
        assert torch.allclose(got[key], ref[key], atol=1e-4), key


def test_transformer_lens_backend_without_the_extra(tiny_model, processor, dataset, tmp_path):
    if importlib.util.find_spec("transformer_lens") is not None:
        pytest.skip("the lens extra is installed")
    cfg = ProbeConfig(model="x", data=dataset, out=tmp_path, n=2, progress=False, backend="transformer-lens")
    with pytest.raises(ToolkitError, match="lens"):
        run_probe(cfg, model=tiny_model, processor=processor)


def _lens_case(rows=37, layers=5, d=16, vocab=50, dtype=torch.float32):
    torch.manual_seed(0)
    norm, head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.mul_(8.0)  # logits of a few units, like a trained model's
    norm, head = norm.to(dtype), head.to(dtype)
    hidden = [torch.randn(rows, d, dtype=dtype) for _ in range(layers)]
    return (lambda h: head(norm(h))), hidden


@pytest.mark.parametrize("chunk", [50, 50 * 7, 50 * 37 * 2, 1 << 25])  # 1 pair, row chunks, 2 layers, everything
def test_chunked_lens_equals_the_plain_kl(chunk, monkeypatch):
    """The chunked, streamed lens = KL(p_final ‖ p_ℓ) from full log-softmaxes (the previous code's values), and no
    chunk of lens logits is larger than LENS_CHUNK_ELEMENTS."""
    import saturation.probe as probe
    from saturation import metrics

    monkeypatch.setattr(probe, "LENS_CHUNK_ELEMENTS", chunk)
    unembed, hidden = _lens_case()
    sizes = []

    def recording(h):
        z = unembed(h)
        sizes.append(z.numel())
        return z

    with torch.no_grad():
        final = unembed(hidden[-1])
        ref = torch.stack([metrics.kl_from_logits(final, unembed(h)) for h in hidden])
        got = probe.logit_lens_kl(recording, hidden[:-1] + [None], final)
        index = torch.arange(37 * 2)[::2]  # rows picked out of a larger [N, vocab] logits tensor
        padded = torch.zeros(74, 50).index_copy_(0, index, final)
        picked = probe.logit_lens_kl(unembed, hidden, padded, index)
    assert ref[-1].abs().max() < 1e-5 and (got[-1] == 0).all()
    assert torch.allclose(got, ref.clamp(min=0), atol=1e-5, rtol=0) and torch.equal(picked, got)
    assert max(sizes) <= max(chunk, 50) and sum(sizes) == 4 * 37 * 50  # every (layer, row) once, the last layer never


def test_half_precision_lens_accumulates_in_fp32():
    """bf16 lens logits: the KL of those very logits (taken in fp32) to ~1e-3, though bf16 sums would be ~1e-2 off."""
    from saturation import metrics

    unembed, hidden = _lens_case(rows=64, vocab=3000, d=32, dtype=torch.bfloat16)
    with torch.no_grad():
        final = unembed(hidden[-1])
        got = metrics.kl_against_logits(*metrics.final_distribution(final), unembed(hidden[0]))
        ref = metrics.kl_from_logits(final.double(), unembed(hidden[0]).double())
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3), (got - ref).abs().max()


def _lens_medians(summary: pd.DataFrame) -> pd.Series:
    return summary[summary["metric"] == "logit_lens_kl"].set_index(["modality", "layer"])["median"]


def _lens_kl_at_positions(model, processor, record) -> dict[str, np.ndarray]:
    """KL(p_final || p_layer) at every image and every text position of `record`, [layers, positions] per modality,
    from a plain forward with output_hidden_states (the positions and residuals as `_reference` writes them)."""
    anat = adapter_for(model)
    batch = encode_batch([record], processor, anat.image_token_id)
    raw_last = {}
    handle = anat.layers[-1].register_forward_hook(lambda m, a, o: raw_last.setdefault("h", o))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], output_hidden_states=True)
        handle.remove()
        ids = batch["input_ids"][0]
        image = ids == anat.image_token_id
        text = ~image & (torch.arange(len(ids)) > 0)
        resid = list(out.hidden_states[:-1]) + [raw_last["h"]]
        log_final = out.logits[0].float().log_softmax(-1)
        kl = torch.stack([(log_final.exp() * (log_final - anat.unembed(resid[layer + 1][0]).float().log_softmax(-1)))
                          .sum(-1) for layer in range(anat.num_layers)])
    return {"image": kl[:, image].numpy(), "text": kl[:, text].numpy()}


def test_sampled_lens_is_close_to_all_positions_on_the_embedded_model(embedded, tmp_path):
    """--lens-positions 8 (4 image + 4 text of ~21) reads each sample's lens as the mean of 4 of its positions per
    modality, moves the median KL curves no further than 4 positions drawn at random do, leaves the other views as
    they are, and a sample at least as large as every sample keeps all positions (same table).

    Both bounds come from the model's own per-position KLs (a plain forward, `_lens_kl_at_positions`), not from
    constants. Why not a fixed share of the peak: one position's KL is spread around its sample's mean (on the
    embedded models' early layers a standard deviation about as large as the mean, the largest position 2-3 times
    it), so the mean of 4 of a sample's ~12 text positions is a noisy estimate, and the median of 32 of them moves
    between seeds by more than 10% of the curve's peak for about one seed in four on either embedded model.
    - Each sample's sampled value lies between the mean of its 4 lowest and of its 4 highest positions' KL: true
      of every 4 positions, whatever the draw; reading the lens at other positions or layers, or over another
      number of positions, leaves it somewhere (seen with the positions shifted by one, or 1 per modality).
    - Each median curve moves at most the 99.9th percentile of its moves under 2000 draws of as many positions per
      sample, uniform without replacement (written here by hand, not with `metrics.lens_sample`). A correct probe is
      one such draw, so it fails this one time in a thousand per modality on any weights; a draw biased towards
      some positions (seen with the first or the last 4 of each modality) lands outside it."""
    model, processor = embedded
    runs = {lp: run_probe(ProbeConfig(model="tiny", n=32, out=tmp_path / str(lp), progress=False, lens_positions=lp),
                          model=model, processor=processor) for lp in (None, 8, 64)}
    tables = {lp: pd.read_parquet(r.table_path) for lp, r in runs.items()}
    full, sampled = _lens_medians(runs[None].summary), _lens_medians(runs[8].summary)
    diff = (sampled - full).abs()
    lens = tables[8][tables[8]["metric"] == "logit_lens_kl"].set_index(["modality", "sample", "layer"])["value"].sort_index()

    _, records, rows = plan_samples(ProbeConfig(model="tiny", n=32))
    per_position = [_lens_kl_at_positions(model, processor, r) for r in records]
    rng = np.random.default_rng(0)
    for modality, take in (("text", 8 // 2), ("image", 8 - 8 // 2)):  # metrics.lens_sample's shares at N = 8
        kls = [p[modality] for p in per_position]  # [layers, positions] per sample
        assert min(k.shape[1] for k in kls) > take  # every sample has positions left out, in both modalities
        reference = np.median(np.stack([k.mean(1) for k in kls]), 0)  # [layers]: the all-positions curve, by hand
        np.testing.assert_allclose(full[modality].to_numpy(), reference, atol=1e-4)

        for row, k in zip(rows, kls):
            ordered = np.sort(k, 1)
            got = lens[modality, row].to_numpy()  # [layers]
            assert (ordered[:, :take].mean(1) - 1e-4 <= got).all() and (got <= ordered[:, -take:].mean(1) + 1e-4).all(), (
                modality, row)

        draws = np.stack([k[:, rng.random((2000, k.shape[1])).argsort(1)[:, :take]].mean(-1) for k in kls])
        moves = np.abs(np.median(draws, 0) - reference[:, None]).max(0)  # [draws]: each draw's largest move
        assert 0 < diff[modality].max() <= np.quantile(moves, 0.999), (modality, diff[modality].max(), moves.max())
    other = tables[None]["metric"] != "logit_lens_kl"
    pd.testing.assert_frame_equal(tables[8][other], tables[None][other])
    pd.testing.assert_frame_equal(tables[64], tables[None])
    assert json.loads(runs[8].recommendation_path.read_text())["lens_positions"] == 8
    assert json.loads(runs[None].recommendation_path.read_text())["lens_positions"] is None


def test_sampled_lens_does_not_depend_on_the_batch(tiny_model, processor, varied_dataset, tmp_path):
    """The positions come from --seed and the record id: batches of 1, 3 and 8 give each sample the same numbers,
    another seed draws other positions, and a resume with another --lens-positions is refused in one line."""
    tables = [pd.read_parquet(run_probe(replace(_config(tmp_path / str(b), varied_dataset, n=8, lens_positions=3),
                                                batch_size=b), model=tiny_model, processor=processor).table_path)
              for b in (1, 3, 8)]
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table, tables[0], atol=1e-6, rtol=0)
    reseeded = run_probe(_config(tmp_path / "s", varied_dataset, n=8, lens_positions=3, seed=5),
                         model=tiny_model, processor=processor)
    kl = tables[0][tables[0]["metric"] == "logit_lens_kl"].set_index(["sample", "modality", "layer"])["value"]
    other = pd.read_parquet(reseeded.table_path)
    other = other[other["metric"] == "logit_lens_kl"].set_index(["sample", "modality", "layer"])["value"]
    assert not kl.reindex(other.index).sub(other).abs().lt(1e-7).all()

    for lp in (None, 4):
        with pytest.raises(ToolkitError, match="lens_positions") as err:
            run_probe(_config(tmp_path / "1", varied_dataset, n=8, lens_positions=lp), model=tiny_model,
                      processor=processor)
        assert "\n" not in str(err.value) and "--no-resume" in str(err.value)


def test_bad_lens_positions_are_one_line_errors(tiny_model, processor, dataset, tmp_path):
    for bad in (0, -3, 1):
        cfg = ProbeConfig(model="x", data=dataset, out=tmp_path / "out", progress=False, lens_positions=bad)
        with pytest.raises(ToolkitError, match="--lens-positions must be at least 2") as err:
            run_probe(cfg, model=tiny_model, processor=processor)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_benchmark_times_the_sampled_lens_beside_all_positions(tiny_model_dir, dataset, capsys):
    from saturation.benchmark import main

    with pytest.raises(SystemExit) as done:
        main(["--model", str(tiny_model_dir), "--data", str(dataset), "--n", "4", "--batch-size", "2", "--repeats",
              "1", "--memory-n", "none", "--lens-positions", "3"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.count("ratio probe/forward") == 2 and "probe, lens on 3" in out and "FLOP ratio" in out
    assert "max |diff| over layers: image" in out and "issue 18 targets" in out
    with pytest.raises(SystemExit) as refused:
        main(["--model", str(tiny_model_dir), "--lens-positions", "0"])
    assert refused.value.code == 1
    assert capsys.readouterr().err.strip() == "error: --lens-positions must be at least 2 (got 0)"
