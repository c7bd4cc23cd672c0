"""routing/model.py, the routed model: exactness of its forward (untouched shallow stack, vanilla without images, naive
references per variant), its gradients and trainable parameters, and the training step's forward (issue 18 §2: the LM
head only at labelled positions, no graph and no checkpoint recompute where nothing reaches the side branch).
The same contract on every family: tests/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from family_fixtures import family
from routing_fixtures import make_batch, naive_logits, perturb_side, tiny_llava, without_labels

import routing
from saturation.core.adapters import adapter_for, position_ids_from_mask
from saturation.core.errors import ToolkitError

pytestmark = pytest.mark.hf_seam  # CI runs these again on the oldest transformers (.ci/run)

SPLIT = 2
PADDINGS = ("left", "right")
ATTENTION = ("sdpa", "eager")


@pytest.fixture(scope="module", params=ATTENTION)
def model(request):
    return tiny_llava(request.param)


def _perturb(routed, seed=1):
    """Move the side branch away from its initial copy, so that it matters which layer reads it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routed.side.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return routed


def _record(layers, indices):
    """Forward hooks that keep the outputs of `layers[i]` for i in `indices`; returns (store, handles)."""
    store, handles = {}, []
    for i in indices:
        handles.append(layers[i].register_forward_hook(lambda m, args, out, i=i: store.__setitem__(i, out)))
    return store, handles


@pytest.mark.parametrize("padding", PADDINGS)
def test_shallow_stack_is_bit_identical(model, padding):
    batch = without_labels(make_batch("plain", padding))
    layers = adapter_for(model).layers
    store, handles = _record(layers, range(SPLIT))
    adapter_for(model).forward(**batch)
    vanilla = dict(store)
    for variant in ("lf", "pc", "kv"):
        store.clear()
        with torch.no_grad():
            routing.build(model, SPLIT, variant)(**batch)
        assert all(torch.equal(store[i], vanilla[i]) for i in range(SPLIT)), variant
    for hd in handles:
        hd.remove()


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("variant", routing.VARIANTS)
def test_no_image_tokens_equals_vanilla(model, padding, variant):
    batch = without_labels(make_batch("text", padding))
    routed = _perturb(routing.build(model, SPLIT, variant))
    with torch.no_grad():
        assert torch.equal(routed(**batch).logits, adapter_for(model).forward(**batch))


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("kv_heads", (2, 4))  # grouped-query and plain multi-head attention
def test_no_image_routing_equals_hf_forward_bit_for_bit_in_bf16(attn, kv_heads):
    """HF's own forward, given generate's positions, with and without its default DynamicCache: bit-identical in
    bf16 on CPU (the CUDA twin in tests/test_cuda.py says why HF's cached call is held to a tolerance there)."""
    model = tiny_llava(attn, kv_heads=kv_heads).to(torch.bfloat16)
    batch = without_labels(make_batch("text", "left"))
    batch.pop("pixel_values")
    positions = position_ids_from_mask(batch["attention_mask"])
    with torch.no_grad():
        ours = _perturb(routing.build(model, SPLIT, "lf"))(**batch).logits
        for use_cache in (False, True):
            assert torch.equal(ours, model(**batch, position_ids=positions, use_cache=use_cache).logits), use_cache
        # HF's default positions (arange despite left padding) are not generate's: this must differ, or the
        # comparison above would not be testing the positions at all
        assert not torch.equal(ours, model(**batch).logits)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize(("variant", "fusion_layers"), [("lf", 1), ("lf-ideal", 0), ("pc", 0), ("pc", 1),
                                                        ("kv", 0), ("kv", 1)])
@pytest.mark.parametrize("kind", ["plain", "mixed", "uniform"])
def test_variants_equal_naive_reference(model, padding, variant, fusion_layers, kind):
    """Each variant against the full-sequence layer loops; `mixed` has 2, 0 and 1 images per row; `uniform` (no
    padding, one image each) goes through `dense_prefill` (test_dense_prompts_take_the_one_call_path)."""
    batch = without_labels(make_batch(kind, padding))
    routed = _perturb(routing.build(model, SPLIT, variant, fusion_layers=fusion_layers))
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        got = routed(**batch).logits[valid]
    torch.testing.assert_close(got, naive_logits(routed, **batch)[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("padding", PADDINGS)
def test_two_fusion_layers_and_deeper_side_branch(model, padding):
    batch = without_labels(make_batch("mixed", padding))
    valid = batch["attention_mask"].bool()
    for variant in ("lf", "kv", "pc"):
        routed = _perturb(routing.build(model, 1, variant, fusion_layers=2, side_depth=2))
        with torch.no_grad():
            got = routed(**batch).logits[valid]
        torch.testing.assert_close(got, naive_logits(routed, **batch)[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("padding", PADDINGS)
def test_text_only_deep_stack_equals_the_text_subset_by_hand(model, padding):
    """LF's deep layers on the compact text subset == those layers run per row on that row's text alone."""
    batch = without_labels(make_batch("mixed", padding))
    routed = routing.build(model, SPLIT, "lf")
    a = adapter_for(model)
    store, handles = _record(a.layers, [SPLIT - 1, routed.plan.deep[-1]])
    with torch.no_grad():
        routed(**batch)
    for hd in handles:
        hd.remove()
    shallow, deep = store[SPLIT - 1], store[routed.plan.deep[-1]]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = position_ids_from_mask(mask)
    for b in range(ids.shape[0]):
        is_text = ids[b] != a.image_token_id
        keep = mask[b].bool() & is_text  # this row's real text, in order
        t = shallow[b:b + 1, keep]
        t_pos = pos[b:b + 1, keep]  # ORIGINAL positions: gaps where the image was
        rope = a.rotary_emb(t, t_pos)
        causal = a.causal_mask(t, torch.ones_like(t_pos), t_pos)
        with torch.no_grad():
            for i in routed.plan.deep:
                t = a.layers[i](t, attention_mask=causal, position_ids=t_pos, position_embeddings=rope)
        compact = mask[b, is_text].bool()  # the compact subset holds every non-image position, pads included
        torch.testing.assert_close(deep[b, : int(is_text.sum())][compact], t[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("fusion_layers", [0, 1])
def test_pc_and_kv_agree_at_text_positions(model, padding, fusion_layers):
    """Both let text queries read K/V projected from the side output; they differ only in wasted compute."""
    batch = without_labels(make_batch("mixed", padding))
    pc = _perturb(routing.build(model, SPLIT, "pc", fusion_layers=fusion_layers))
    kv = routing.build(model, SPLIT, "kv", fusion_layers=fusion_layers)
    kv.side.load_state_dict(pc.side.state_dict())
    text = batch["attention_mask"].bool() & (batch["input_ids"] != 4)
    with torch.no_grad():
        torch.testing.assert_close(pc(**batch).logits[text], kv(**batch).logits[text], atol=2e-5, rtol=1e-4)


def test_loss_is_the_hf_causal_lm_loss(model):
    """Labels -100 everywhere but assistant tokens, shifted as HF does: without images equal to the base's loss."""
    batch = make_batch("text", "left")
    routed = routing.build(model, SPLIT, "lf")
    pos = position_ids_from_mask(batch["attention_mask"])
    with torch.no_grad():
        ours = routed(**batch).loss
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                       labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_gradients_reach_only_the_side_branch(model):
    routed = routing.build(model, SPLIT, "lf").train()
    a = adapter_for(model)
    store, handles = _record(a.layers, [routed.plan.deep[-1], routed.plan.fusion[0]])
    loss = routed(**make_batch("plain", "right")).loss
    for hd in handles:
        hd.remove()
    assert not store[routed.plan.deep[-1]].requires_grad  # LF: no graph through the text-only deep stack
    assert store[routed.plan.fusion[0]].requires_grad
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in routed.side.parameters())
    assert sum(p.grad.abs().sum() for p in routed.side.parameters()) > 0
    routed.eval()


@pytest.mark.parametrize("variant", ["lf", "pc", "kv"])
def test_side_branch_gradient_is_nonzero(model, variant):
    routed = routing.build(model, SPLIT, variant)
    assert routed.side_gradient_norm(**make_batch("plain", "left")) > 0


def test_lf_ideal_gradient_is_exactly_zero_and_training_it_is_refused(model):
    """Appendix A: with no fusion layer, the loss never reads the side branch."""
    routed = routing.build(model, SPLIT, "lf-ideal")
    batch = make_batch("plain", "left")
    assert routed.side_gradient_norm(**batch) == 0.0
    routed.train()
    with pytest.raises(ToolkitError, match="lf-ideal"):
        routed(**batch)
    with torch.no_grad():  # evaluating it is fine
        assert routed(**batch).loss.isfinite()
    routed.eval()


def test_trainable_parameters_are_the_side_branch(model):
    routed = routing.build(model, SPLIT, "lf", side_depth=2)
    report = routed.trainable_parameters()
    layer = sum(p.numel() for p in adapter_for(model).layers[0].parameters())
    assert report.trainable == 2 * layer
    assert report.total == sum(p.numel() for p in model.parameters()) + 2 * layer
    assert 0 < report.share < 1 and "trainable of" in str(report)
    assert not any(p.requires_grad for p in model.parameters())


def test_side_branch_has_its_own_cache_slots(model):
    routed = routing.build(model, SPLIT, "lf", side_depth=2)
    L = adapter_for(model).num_layers
    assert [layer.self_attn.layer_idx for layer in routed.side] == [L, L + 1]
    assert all(layer.self_attn.config is adapter_for(model).text_config for layer in routed.side)


def test_hook_points_name_the_side_branch(model):
    routed = routing.build(model, SPLIT, "lf", side_depth=2)
    points = routed.hook_points()
    assert points["side.1.hook_resid_post"] is routed.side[1]
    assert points["blocks.0.hook_resid_post"] is adapter_for(model).layers[0]


def test_bad_plans_are_refused_with_one_line():
    model = tiny_llava()
    for kwargs in ({"split": 0}, {"split": 5}, {"split": 2, "variant": "xx"}, {"split": 2, "fusion_layers": 0},
                   {"split": 4, "side_depth": 3}):
        with pytest.raises(ToolkitError):
            routing.build(model, **kwargs)
    assert routing.build(model, 5, "lf-ideal").plan.fusion_layers == 0


def test_bfloat16_runs():
    model = tiny_llava().to(torch.bfloat16)
    routed = routing.build(model, SPLIT, "lf")
    batch = make_batch("mixed", "left")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        out = routed(**batch)
    assert out.logits.dtype == torch.bfloat16 and out.loss.isfinite()
    assert next(routed.side.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["lf", "lf-ideal", "pc", "kv"])
def test_dense_prompts_take_the_one_call_path(monkeypatch, variant):
    """An unpadded batch with one image count per row goes through `dense_prefill` (route and positions inside
    it); a padded one, or eager attention (masks needed), through `Route.of` and `routed_prefill`."""
    model = tiny_llava("sdpa")
    routed = routing.build(model, SPLIT, variant)
    calls = []
    for name in ("dense_prefill", "routed_prefill"):
        real = getattr(routed, name)
        monkeypatch.setattr(routed, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    with torch.no_grad():
        routed(**without_labels(make_batch("uniform")))
        assert calls == ["dense_prefill"]
        routed(**without_labels(make_batch("plain")))
        assert calls[1:] == ["routed_prefill"]
        model.set_attn_implementation("eager")
        try:
            routed(**without_labels(make_batch("uniform")))
        finally:
            model.set_attn_implementation("sdpa")
        assert calls[2:] == ["routed_prefill"]


# ---------------------------------------------------------------- the training step's forward

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
