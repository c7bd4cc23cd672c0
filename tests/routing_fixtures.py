"""Tiny routed-model fixtures: random LLaVAs built in code, ragged batches, and a naive routing reference.

The naive reference (`naive_logits`) is the slow, obviously-right version of every variant: explicit per-layer
loops over the FULL sequence, where routing is nothing but a mask and a reset of image positions.
"""

from __future__ import annotations

from unittest import mock

import torch
from transformers import LlavaForConditionalGeneration

from saturation.core.adapters import adapter_for, position_ids_from_mask
from saturation.core.tiny import tiny_llava_config

VOCAB = 48
IMAGE = 4  # image token id (tiny_llava_config default)
IMAGE_SIZE, PATCH = 32, 8  # 16 image tokens per image
N_IMAGE = (IMAGE_SIZE // PATCH) ** 2


# Language-model init std under which greedy decoding is informative: at HF's 0.02 the logits span ~0.4, so rows
# repeat one or two tokens and a wrong decode position rarely flips an argmax; at 0.2 they span ~4.
SHARP_STD = 0.2


def tiny_llava(attn: str = "sdpa", seed: int = 0, layers: int = 6, std: float | None = None,
               **kw) -> LlavaForConditionalGeneration:
    """A random tiny LLaVA in eval mode, grouped-query attention (4 heads, 2 KV heads) unless overridden.

    `std`: the language model's init std (HF's own init, through ``initializer_range``; default 0.02).
    """
    kw = {"hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128} | kw
    cfg = tiny_llava_config(VOCAB, image_size=IMAGE_SIZE, patch_size=PATCH, layers=layers, **kw)
    if std is not None:
        cfg.text_config.initializer_range = std
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    return model


# (text before the image, number of images, text after): images may sit anywhere, rows differ in length
ROWS = {
    "plain": [([1, 5, 6], 1, [7, 8, 9, 10, 11]), ([1], 1, [12, 13, 22]), ([1, 14, 15, 16, 17, 18], 1, [19, 20, 21, 22])],
    "mixed": [([1, 5], 2, [7, 8, 9]), ([1, 14, 15, 16, 17, 18, 19], 0, [20, 21]), ([1], 1, [12, 13, 22, 23, 24])],
    "uniform": [([1, 5, 6], 1, [7, 8, 9]), ([1, 10, 11], 1, [12, 13, 14]), ([1, 15, 16], 1, [17, 18, 19])],
    "text": [([1, 5, 6, 7], 0, [8, 9]), ([1, 10], 0, [11]), ([1, 12, 13, 14, 15, 16], 0, [17])],
}


def make_batch(kind: str = "plain", padding: str = "left", seed: int = 0) -> dict:
    """input_ids, attention_mask, pixel_values (None without images) and labels (the last 2 real tokens).

    As in LLaVA's prompts, no label is predicted from an image position (text always follows an image).
    """
    g = torch.Generator().manual_seed(seed)
    seqs, n_images = [], 0
    for before, images, after in ROWS[kind]:
        ids = list(before)
        for k in range(images):  # two images in a row are separated by a text token
            ids += [IMAGE] * N_IMAGE + ([25 + k] if k < images - 1 else [])
        seqs.append(ids + list(after))
        n_images += images
    n = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), n, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), n, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100)
    for b, s in enumerate(seqs):
        sl = slice(n - len(s), n) if padding == "left" else slice(0, len(s))
        input_ids[b, sl] = torch.tensor(s)
        attention_mask[b, sl] = 1
        last = sl.stop
        labels[b, last - 2:last] = input_ids[b, last - 2:last]
    pixel_values = torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) if n_images else None
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "labels": labels}


def without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def layer_mask(allowed: torch.Tensor, model, dtype=torch.float32) -> torch.Tensor:
    """[batch, q, k] bool -> the 4D mask the model's attention implementation expects."""
    allowed = allowed[:, None]
    if model.config.text_config._attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def run_plan_naively(routed, h, img, layer, full, image_only, text_only, shallow=None) -> torch.Tensor:
    """The routing plan as full-sequence layer loops over embedded `h`: routing is a mask plus a reset of the image
    positions. `layer(module, x, masks)` runs one decoder layer under one of the three mask sets (whatever a
    family's masks are); `shallow` wraps the shallow stack (Qwen3-VL's DeepStack injection)."""
    from contextlib import nullcontext

    plan, a = routed.plan, routed.adapter
    with shallow if shallow is not None else nullcontext():
        for i in plan.shallow:
            h = layer(a.layers[i], h, full)
    side = h
    for module in routed.side:
        side = layer(module, side, image_only)
    keep = img[..., None]
    for i in plan.deep:
        if plan.deep_mode == "text_only":  # LF: text queries cannot see image keys
            h = layer(a.layers[i], h, text_only)
        elif plan.deep_mode == "reset":  # PC: image positions reset to the side output, full compute
            h = layer(a.layers[i], torch.where(keep, side, h), full)
        else:  # KV: image positions only lend K/V from the side output, their own update is dropped
            h = torch.where(keep, side, layer(a.layers[i], torch.where(keep, side, h), full))
    h = torch.where(keep, side, h)
    for i in plan.fusion:
        h = layer(a.layers[i], h, full)
    return a.unembed(h)


@torch.no_grad()
def naive_logits(routed, input_ids, attention_mask, pixel_values=None, **image_kwargs) -> torch.Tensor:
    """Every variant as full-sequence layer loops: routing is a mask plus a reset of the image positions."""
    model = routed.base
    a = adapter_for(model)
    h, img = a.embed(input_ids, pixel_values, **image_kwargs)
    pos = position_ids_from_mask(attention_mask)
    rope = a.rotary_emb(h, pos)
    valid = attention_mask.bool()
    n = h.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None]
    eye = torch.eye(n, dtype=torch.bool)[None]  # keeps rows that see nothing finite; never changes a real row
    full = causal & valid[:, None, :]
    image_only = full & img[:, :, None] & img[:, None, :]  # image queries see image keys
    text_only = full & ~img[:, :, None] & ~img[:, None, :]  # text queries see text keys

    def layer(module, x, allowed):
        return module(x, attention_mask=layer_mask(allowed | eye, model), position_ids=pos, position_embeddings=rope)

    return run_plan_naively(routed, h, img, layer, full, image_only, text_only)


@torch.no_grad()
def decode_step_logits(routed, batch: dict, new: int, suppress=(IMAGE,)) -> tuple[torch.Tensor, list, list]:
    """Cached greedy ``generate``'s raw logits at every decode step, and the same steps recomputed with no cache.

    Returns (the new ids [batch, new], cached step logits, recomputed step logits), each step [batch, vocab]. The
    reference feeds the prompt plus the first t generated ids through the routed forward from scratch and takes the
    last position, so both sides score the same tokens and a near tie cannot hide a difference. The batch's image
    inputs go with it; per-token ones (Qwen's ``mm_token_type_ids``, Gemma's ``token_type_ids``) are extended with
    text zeros. `suppress` (the family's image tokens): after the prompt the routed model takes text only.
    """
    out = routed.generate(**batch, max_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, suppress_tokens=list(suppress))
    n = batch["input_ids"].shape[1]
    ids = out.sequences
    zeros = torch.zeros_like(ids[:, n:])
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    per_token = {k: torch.cat([v, zeros], dim=1) for k, v in extra.items() if v.shape == batch["input_ids"].shape}
    mask = torch.cat([batch["attention_mask"], 1 + zeros], dim=1)
    recomputed = [routed(input_ids=ids[:, : n + t], attention_mask=mask[:, : n + t],
                         **(extra | {k: v[:, : n + t] for k, v in per_token.items()})).logits[:, -1]
                  for t in range(new)]
    return ids[:, n:], list(out.logits), recomputed


def assert_informative(new: torch.Tensor) -> None:
    """Greedy continuations [batch, new] that change across steps and rows: a model that repeats one token scores
    every decode position alike, so a wrong position (an off-by-one) would pass unseen."""
    rows = [tuple(row.tolist()) for row in new.cpu()]
    assert all(len(set(row)) >= 2 for row in rows), rows
    assert len(set(rows)) == len(rows), rows


def perturb_side(routed, seed: int = 3, scale: float = 0.05):
    """Move the side branch away from its initial copy of layer s, so that it matters which layer reads it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routed.side.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return routed


def pinned_fastv(routed):
    """Recomputation with the kept sets chosen on the prompt, as cached decoding keeps them (a recomputation over
    prompt + generated tokens would otherwise rank with the new text queries too): one per drop stage (FastV one,
    PDrop one per stage), each extended by the generated tokens at the end of its frame."""
    original, first, calls = routed._rank_keep, [], [0]
    stages = len(routed.plan.stages)

    def pinned(h, r, rope, attention_mask, *rest):
        keep = original(h, r, rope, attention_mask, *rest)
        stage = calls[0] % stages
        calls[0] += 1
        if len(first) <= stage:
            first.append(keep)
        return torch.cat([first[stage], attention_mask[:, first[stage].shape[1]:].bool()], 1)
    return mock.patch.object(routed, "_rank_keep", pinned)


def fastv_kept(routed, batch: dict) -> torch.Tensor:
    """The kept set [B, N] bool FastV chose on `batch` (its one call of ``_rank_keep``)."""
    seen = []
    original = routed._rank_keep
    with mock.patch.object(routed, "_rank_keep", lambda *a: seen.append(original(*a)) or seen[-1]):
        with torch.no_grad():
            routed(**batch)
    return seen[0]


def fastv_reference_scores(probs: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor,
                           rank: str) -> torch.Tensor:
    """FastV's rules, written from their sources, on an eager model's head-mean attention of layer K-1 [B, N, N]
    (``output_attentions=True``, then ``.mean(1)``): the score [B, N] each position gets as a key.

    ``last``: FastV's code, the last valid query row (`last_layer_attention_avg[-1]`); ``all``: the paper's
    "attention a token receives from all other tokens", summed over every other valid query row; ``text``: the mean
    over the valid text rows."""
    valid, n = attention_mask.bool(), probs.shape[-1]
    scores = []
    for b in range(len(probs)):
        p = probs[b].float()
        if rank == "last":
            scores.append(p[int(valid[b].nonzero().max())])
        elif rank == "all":
            scores.append((p * ~torch.eye(n, dtype=torch.bool))[valid[b]].sum(0))
        else:
            scores.append(p[valid[b] & ~image[b]].mean(0))
    return torch.stack(scores)


def fastv_budget(n: int, drop: float) -> int:
    """FastV's kept count: round(n (1 - R)) (its scripts: (1 - R) * 576), halves up, at least one."""
    return max(1, int(n * (1 - drop) + 0.5 + 1e-9))


def assert_keeps_the_top(kept: list[torch.Tensor], scores: torch.Tensor, image: torch.Tensor, drop: float,
                         tol: float = 1e-6) -> None:
    """Each row keeps the top `fastv_budget` of its image positions by `scores`, as a set; ties aside (a position
    in one set and not the other must score within `tol` of the boundary)."""
    for b in range(len(image)):
        columns = image[b].nonzero().squeeze(1)
        top = scores[b][columns].topk(fastv_budget(len(columns), drop))
        expected, got = set(columns[top.indices].tolist()), set(kept[b].tolist())
        assert kept[b].tolist() == sorted(got) and len(got) == len(expected)
        differ = sorted(got ^ expected)
        assert all(abs(float(scores[b][i] - top.values[-1])) <= tol for i in differ), (b, differ)


# ---------------------------------------------------------------- LLaVA-1.5's 576 image tokens, random tiny widths
def llava_576(attn: str) -> LlavaForConditionalGeneration:
    cfg = tiny_llava_config(VOCAB, image_size=336, patch_size=14, layers=6, hidden=64, heads=4, kv_heads=2)
    cfg.text_config.initializer_range = 0.2  # sharp attention: no near-ties at the budget's boundary
    torch.manual_seed(5)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def batch_576(seed: int = 0) -> dict:
    """Three prompts around one 24x24 image each, rows of different lengths, left-padded."""
    rows = [([1, 5, 6], [7, 8, 9, 10, 11]), ([1], [12, 13, 22]), ([1, 14, 15, 16, 17, 18], [19, 20, 21, 22])]
    seqs = [before + [IMAGE] * 576 + after for before, after in rows]
    n = max(map(len, seqs))
    ids, mask = torch.zeros(len(seqs), n, dtype=torch.long), torch.zeros(len(seqs), n, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, n - len(s):], mask[b, n - len(s):] = torch.tensor(s), 1
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(len(seqs), 3, 336, 336, generator=g)}
