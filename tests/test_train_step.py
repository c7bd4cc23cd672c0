"""The training step (issue 18 §2): the LM head only at labelled positions, no graph (and no checkpoint recompute)
where nothing reaches the side branch, and the train-step FLOP model."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import family
from routing_fixtures import make_batch, perturb_side, tiny_llava

import routing
from routing import flops
from routing.plan import make_plan
from saturation.core.adapters import adapter_for


def _labelled(batch: dict, last: int = 3) -> dict:
    """`batch` with labels on the last `last` real tokens of each row (right or left padding alike)."""
    labels = torch.full_like(batch["input_ids"], -100)
    ends = batch["attention_mask"].cumsum(1).argmax(1) + 1  # one past each row's last real token
    for b, end in enumerate(ends.tolist()):
        labels[b, end - last:end] = batch["input_ids"][b, end - last:end]
    return batch | {"labels": labels}


def _llava():
    return tiny_llava(), 2, make_batch("mixed", "left")  # ragged: one row without an image, one with two


def _gemma():
    return family("gemma3").model(), 2, _labelled(family("gemma3").batch())


def _qwen():
    return family("qwen2_5_vl").model(), 1, _labelled(family("qwen2_5_vl").batch())


def _loss_and_grads(routed, batch: dict, train: bool, items) -> tuple[torch.Tensor, list[torch.Tensor], object]:
    routed.train(train)
    routed.zero_grad(set_to_none=True)
    out = routed(**batch, num_items_in_batch=items)  # eval mode: the full-head path (today's), graph and all
    out.loss.backward()
    routed.eval()
    return out.loss.detach(), [p.grad.clone() for p in routed.side.parameters()], out


@pytest.mark.parametrize("make", [_llava, _gemma, _qwen], ids=["llava", "gemma3", "qwen2_5_vl"])
def test_head_at_labelled_positions_gives_todays_loss_and_gradient(make):
    """In training mode the head sees only the labelled rows (shifted as HF does), and the loss and side-branch
    gradient equal the full-head path's (eval mode: unembed everything, HF's ForCausalLMLoss) in fp32."""
    model, split, batch = make()
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    n_labelled = int((shifted != -100).sum())
    a = adapter_for(model)
    for variant in ("lf", "pc", "kv"):
        routed = perturb_side(routing.build(model, split, variant))
        for items in (None, torch.tensor(n_labelled + 5)):  # HF's mean, and the Trainer's sum over a global count
            rows = []
            handle = a.lm_head.register_forward_hook(lambda _m, args, _out, rows=rows: rows.append(args[0].shape))
            try:
                loss, grads, out = _loss_and_grads(routed, batch, True, items)
            finally:
                handle.remove()
            assert out.logits is None and rows == [torch.Size([n_labelled, a.text_config.hidden_size])]
            ref_loss, ref_grads, ref = _loss_and_grads(routed, batch, False, items)
            assert ref.logits.shape[:2] == batch["input_ids"].shape  # eval mode: every position, as before
            torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
            for g, r in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_logits_stay_whole_outside_a_training_step():
    """The contract: only a training step (training mode, gradients on, labels) drops `logits`; under no_grad or in
    eval mode with labels, or without labels, every position's logits come back as before."""
    model, split, batch = _llava()
    routed = routing.build(model, split).train()
    try:
        with torch.no_grad():
            assert routed(**batch).logits.shape[:2] == batch["input_ids"].shape
        assert routed(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape[:2] == batch["input_ids"].shape
        assert routed(**batch).logits is None
    finally:
        routed.eval()
    assert routed(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_no_label_in_the_batch_gives_hfs_nan_mean_and_zero_sum():
    """Nothing to predict: HF's mean is NaN (0/0) and its sum over `num_items_in_batch` is 0; so is ours."""
    model, split, batch = _llava()
    batch = batch | {"labels": torch.full_like(batch["input_ids"], -100)}
    routed = routing.build(model, split).train()
    try:
        assert routed(**batch).loss.isnan()
        assert routed(**batch, num_items_in_batch=torch.tensor(4)).loss == 0
    finally:
        routed.eval()


def _mlp_calls(routed) -> tuple[dict, list]:
    """Per-layer counts of MLP calls (a checkpointed layer's recompute calls its MLP again, not the layer's hooks)."""
    calls, handles = {}, []
    layers = {**dict(enumerate(routed.adapter.layers)), **{f"side{i}": m for i, m in enumerate(routed.side)}}
    for key, layer in layers.items():
        calls[key] = 0
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda *_, key=key: calls.__setitem__(key, calls[key] + 1)))
    return calls, handles


@pytest.mark.parametrize("variant", ["lf", "pc"])
def test_checkpointing_recomputes_only_layers_with_a_backward(variant):
    """With gradient checkpointing on (the paper's setting), layers under no_grad (LF: shallow and the text-only deep
    stack; every variant: the shallow stack) run once; layers the gradient passes (side, fusion, PC's deep) run again
    in backward. The side-branch gradient is the one without checkpointing."""
    model, split, batch = _llava()
    routed = routing.build(model, split, variant).train()
    plan = routed.plan
    grads = []
    try:
        for checkpointing in (False, True):
            if checkpointing:
                (getattr(routed, "activation_checkpointing_enable", None)
                 or routed.gradient_checkpointing_enable)({"use_reentrant": False})
            calls, handles = _mlp_calls(routed)
            routed.zero_grad(set_to_none=True)
            routed(**batch).loss.backward()
            for h in handles:
                h.remove()
            grads.append([p.grad.clone() for p in routed.side.parameters()])
        backward = {*plan.fusion, "side0", *(plan.deep if variant == "pc" else ())}
        assert calls == {k: 2 if k in backward else 1 for k in calls}
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    finally:
        (getattr(routed, "activation_checkpointing_disable", None) or routed.gradient_checkpointing_disable)()
        routed.eval()


def test_lf_builds_no_graph_before_fusion_but_the_side_branch():
    """LF: the states after the shallow stack and after the text-only deep stack have no grad_fn; the side output
    and the fusion layer's output have one."""
    model, split, batch = _llava()
    routed = routing.build(model, split, "lf").train()
    a, plan = routed.adapter, routed.plan
    seen, handles = {}, []
    for name, layer in {"shallow": a.layers[plan.shallow[-1]], "deep": a.layers[plan.deep[-1]],
                        "side": routed.side[0], "fusion": a.layers[plan.fusion[0]]}.items():
        handles.append(layer.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out)))
    try:
        routed(**batch)
    finally:
        for h in handles:
            h.remove()
        routed.eval()
    assert seen["shallow"].grad_fn is None and seen["deep"].grad_fn is None
    assert seen["side"].grad_fn is not None and seen["fusion"].grad_fn is not None


# ---------------------------------------------------------------- the train-step FLOP model

G = flops.Geometry(num_layers=4, hidden=8, intermediate=16, heads=2, vocab=10)


def test_train_step_cost_by_hand():
    """4 layers, s=2, K=1, d_v=1 (shallow 0-1, deep 2, fusion 3, side from 2); 2 image + 3 text tokens, 2 labelled.
    Per token-layer: 2(8*8 + 8*8 + 3*8*16) + 2*2*8*8 = 1280 linear FLOPs; per (query, key) pair 4*8 = 32; head 2*8*10
    = 160 per labelled position. Backward: 2x forward for the side branch (its weights), 1x the linear part of
    frozen layers the gradient passes, 2x attention wherever the gradient passes, 1x the head."""
    f, pair, head = 1280, 32, 160
    n, i, t = 5, 2, 3
    full, img, txt = n * (n + 1) // 2, i * (i + 1) // 2, t * (t + 1) // 2  # causal pairs: 15, 3, 6

    def cost(variant):
        return flops.train_step_cost(G, make_plan(4, 2, variant), i, t, labelled=2)

    side_fwd = i * f + img * pair
    fusion_fwd = n * f + full * pair
    # LF: forward = shallow 2 layers + deep (text only) + fusion + side + head
    lf_fwd = 2 * (n * f + full * pair) + (t * f + txt * pair) + fusion_fwd + side_fwd + 2 * head
    lf_bwd = 2 * side_fwd + (n * f + 2 * full * pair) + 2 * head
    assert cost("lf").forward == lf_fwd and cost("lf").backward == lf_bwd
    # PC: deep at full length, its backward like the fusion layer's
    pc_fwd = 2 * (n * f + full * pair) + fusion_fwd + fusion_fwd + side_fwd + 2 * head
    pc_bwd = 2 * side_fwd + 2 * (n * f + 2 * full * pair) + 2 * head
    assert cost("pc").forward == pc_fwd and cost("pc").backward == pc_bwd
    # KV: the deep layer runs text in full, image tokens only project k/v (2*2*8*8 = 256 each); text queries see all
    kv = 256
    kv_deep_pairs = full - img
    kv_fwd = 2 * (n * f + full * pair) + (t * f + i * kv + kv_deep_pairs * pair) + fusion_fwd + side_fwd + 2 * head
    kv_bwd = 2 * side_fwd + (t * f + i * kv + 2 * kv_deep_pairs * pair) + (n * f + 2 * full * pair) + 2 * head
    assert cost("kv").forward == kv_fwd and cost("kv").backward == kv_bwd
    assert cost("lf").total == lf_fwd + lf_bwd
    assert flops.train_step_ratio(G, "lf", 2, i, t, labelled=2) == pytest.approx((lf_fwd + lf_bwd) / (pc_fwd + pc_bwd))
    assert flops.train_step_ratio(G, "pc", 2, i, t, labelled=2) == 1.0


def test_train_step_forward_is_the_prefill_cost_with_the_head_at_labelled_positions():
    """At a real geometry with sliding windows (Gemma 3 4B) and at LLaVA-7B, every variant."""
    from saturation.core.geometry import geometry_config

    for geo in (flops.LLAVA_15_7B, flops.Geometry.of(geometry_config("gemma-3-4b").text_config)):
        for variant in ("lf", "pc", "kv"):
            plan = make_plan(geo.num_layers, 10, variant)
            step = flops.train_step_cost(geo, plan, 576, 40, labelled=8)
            assert step.forward == pytest.approx(flops.prefill_cost(geo, plan, 576, 40, logit_positions=8).total)
            assert step.groups["shallow"][1] == 0 and step.groups["side"][1] == 2 * step.groups["side"][0]
    # 7B, s=18, 576 image + 64 text: in token-layers of linear work (attention ~1% here), LF = 19n + i + 13t forward
    # + 2i + n backward, PC = 32n + i forward + 2i + 14n backward (the rough 0.43 charged 2x for frozen layers)
    n, i, t = 640, 576, 64
    by_hand = (19 * n + i + 13 * t + 2 * i + n) / (32 * n + i + 2 * i + 14 * n)
    assert flops.train_step_ratio(flops.LLAVA_15_7B, "lf", 18, i, t, labelled=8) == pytest.approx(by_hand, abs=0.005)


def test_train_step_cost_refuses_lf_ideal():
    with pytest.raises(ValueError, match="no gradient"):
        flops.train_step_cost(G, make_plan(4, 2, "lf-ideal", fusion_layers=0), 2, 3, labelled=2)


# ---------------------------------------------------------------- routing bench --train


def test_bench_train_reports_the_flop_model_and_where_the_step_goes(tmp_path):
    from typer.testing import CliRunner

    from cli import routing_app
    from saturation.core.geometry import geometry_config

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(routing_app, ["bench", "--geometry", "tiny", "--layers", "4", "--split", "1",
                                              "--variants", "lf,kv", "--text-tokens", "6", "--batch-size", "2",
                                              "--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--train",
                                              "--json", str(out)])
    assert result.exit_code == 0, result.output
    import json

    steps = json.loads(out.read_text())["train_step"]["6"]
    assert list(steps) == ["pc", "lf", "kv"]
    g = flops.Geometry.of(geometry_config("tiny", 4).text_config)
    pc = flops.train_step_cost(g, make_plan(4, 1, "pc"), 9, 6, labelled=8)  # the last 8 positions
    for v, s in steps.items():
        cost = flops.train_step_cost(g, make_plan(4, 1, v), 9, 6, labelled=8)
        assert s["flop_ratio_vs_pc"] == pytest.approx(cost.total / pc.total)
        assert s["flop_gflops"]["backward"] == pytest.approx(cost.backward / 1e9)
        parts = s["breakdown_ms"]
        assert list(parts) == ["shallow", "side", "deep", "fusion", "head+loss", "other", "backward"]
        assert all(parts[k] > 0 for k in ("shallow", "side", "deep", "fusion", "head+loss", "backward"))
    assert steps["pc"]["ratio_vs_pc"] == 1.0 and steps["pc"]["flop_ratio_vs_pc"] == 1.0
    text = " ".join(result.output.split())
    lf = steps["lf"]
    assert (f"lf {lf['ms']:.1f} ms ({lf['ratio_vs_pc']:.3f}x PC, FLOP model {lf['flop_ratio_vs_pc']:.3f})" in text)
    assert "lf step in ms, by group (hooked rounds): shallow" in text and "pc step in ms" in text


def test_step_breakdown_leaves_no_hooks_and_adds_up():
    """The hooks exist only during the breakdown; its groups add up to the step's clock readings.

    A clock that ticks once per reading makes this exact (a wall clock made it flaky on a shared machine): each layer
    call is one tick (enter, leave), so a group's total is its number of layer calls, and the groups sum to the
    ticks between the first reading and the last."""
    import itertools

    from routing.jobs.step_profile import step_breakdown

    model, split, batch = _llava()
    routed = routing.build(model, split, "lf").train()
    ticks = itertools.count()
    try:
        parts = step_breakdown(routed, batch, lambda: float(next(ticks)))
    finally:
        routed.eval()
    readings = next(ticks)
    assert sum(parts.values()) == readings - 1
    plan = routed.plan
    assert parts["shallow"] == len(plan.shallow) and parts["deep"] == len(plan.deep)
    assert parts["fusion"] == len(plan.fusion) and parts["side"] == len(routed.side)
    assert parts["backward"] == 1 and parts["head+loss"] == 1
    layers = [*routed.adapter.layers, *routed.side]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in layers)
    assert all(p.grad is None for p in routed.side.parameters())
