"""The probe's three views as small pure functions over tensors (and over per-layer curves).

Every function here reduces as early as it can: a [batch, seq, d_model] residual stream or a
[batch, heads, query, key] attention pattern goes in, a few numbers per sample come out. The probe's hooks
call these, so nothing of that size outlives the layer that produced it.

Token groups (all [batch, seq] bool masks, pads always False) are built once per batch by `token_groups`:

- ``image``: the image-token positions;
- ``text``: every other real token except the first one of each sequence;
- ``bos``: the first real token (BOS when the tokenizer adds one; the attention sink either way);
- ``query``: text tokens after the image block, the queries of the text→image attention view.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor

DOT_BLOCK = 4096  # vocabulary entries per block of the logit lens's dot product


def token_groups(attention_mask: Tensor, image_mask: Tensor) -> dict[str, Tensor]:
    """The four token groups of a batch. [batch, seq] x2 -> {name: [batch, seq] bool}.

    Works with left or right padding: "first" means the first real token of each row, and "after the image
    block" means after that row's last image token (all text tokens if a row has none).
    """
    real = attention_mask.bool()
    image = image_mask.bool() & real
    pos = torch.arange(real.shape[1], device=real.device).expand_as(real)
    first = torch.where(real, pos, real.shape[1]).min(dim=1, keepdim=True).values
    bos = real & (pos == first)
    last_image = torch.where(image, pos, -1).max(dim=1, keepdim=True).values
    text = real & ~image & ~bos
    return {"image": image, "text": text, "bos": bos, "query": text & (pos > last_image)}


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the positions where `mask` is True, per row. [batch, seq] -> [batch] (fp32).

    A row with no selected position gives NaN, never a silent 0.
    """
    m = mask.to(torch.float32)
    total = (values.to(torch.float32) * m).sum(-1)
    return total / m.sum(-1)  # 0/0 = NaN on purpose


def token_cosine(h_in: Tensor, h_out: Tensor) -> Tensor:
    """Cosine similarity per token between two residual streams, in fp32. [b, s, d] x2 -> [b, s]."""
    return torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-12)


def adjacent_cosine(h_in: Tensor, h_out: Tensor, groups: dict[str, Tensor]) -> dict[str, Tensor]:
    """cos(h_ℓ, h_ℓ+1) averaged over each token group: {name: [batch]} for the groups given.

    `h_in` is the layer's input (h_0 = the input embeddings), `h_out` its output, both [batch, seq, d_model].
    1.0 means the layer left the direction of that group's tokens untouched.
    """
    cos = token_cosine(h_in, h_out)
    return {name: masked_mean(cos, mask) for name, mask in groups.items()}


def attention_mass(pattern: Tensor, query: Tensor, keys: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Attention probability that `query` positions put on each key group, summed over that group's keys.

    `pattern` [batch, heads, q, k] are softmax weights (rows sum to 1 over real keys); `query` [batch, q] bool
    selects the queries; `keys` maps a group name to a [batch, k] bool mask. Returns two dicts of [batch]
    tensors: the mass averaged over heads and selected queries (breadth), and the largest per-head mass,
    each head first averaged over the selected queries (a specialist head).
    """
    names = list(keys)
    key_sets = torch.stack([keys[n] for n in names], dim=-1).to(torch.float32)  # [b, k, g]
    per_query = pattern.float() @ key_sets[:, None]  # [b, h, q, g]: one pass over the pattern
    w = query.to(torch.float32)[:, None, :, None]  # [b, 1, q, 1]
    per_head = (per_query * w).sum(2) / w.sum(2)  # [b, h, g]; NaN when a row has no query
    mean = per_head.mean(1)
    top = per_head.max(1).values
    return ({n: mean[:, i] for i, n in enumerate(names)}, {n: top[:, i] for i, n in enumerate(names)})


def uniform_mass(query: Tensor, key_set: Tensor, attention_mask: Tensor) -> Tensor:
    """The mass `attention_mass` would report if every query attended uniformly to the keys it can see.

    A reference line: text→image mass near this value means no preference for (or against) image keys.
    [batch, seq] bool x3 -> [batch].
    """
    real = attention_mask.to(torch.float32)
    visible = real.cumsum(-1)  # causal: keys at or before the query (pads excluded)
    inside = (key_set.to(torch.float32) * real).cumsum(-1)
    return masked_mean(inside / visible.clamp(min=1), query)


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) in nats per row, ``sum p (log p − log q)``, from log-probabilities. [n, vocab] x2 -> [n] (fp32)."""
    log_p, log_q = log_p.float(), log_q.float()
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_from_logits(final_logits: Tensor, lens_logits: Tensor) -> Tensor:
    """KL(p_final ‖ p_ℓ) in nats per row from raw logits. [n, vocab] x2 -> [n] (fp32).

    0 means the lens at layer ℓ already predicts the model's final next-token distribution. The tuned-lens
    convention: the final distribution is the reference.
    """
    return kl_from_log_probs(torch.log_softmax(final_logits.float(), -1), torch.log_softmax(lens_logits.float(), -1))


def final_distribution(final_logits: Tensor) -> tuple[Tensor, Tensor]:
    """p_final and its ``Σ p log p`` in fp32, the reference side of the logit lens. [n, vocab] -> ([n, vocab], [n])."""
    return final_distribution_(final_logits.clone())


def final_distribution_(final_logits: Tensor) -> tuple[Tensor, Tensor]:
    """`final_distribution` that overwrites fp32 `final_logits` (its own temporary): two [n, vocab] buffers at most."""
    log_p = final_logits.float()
    log_p.sub_(log_p.amax(-1, keepdim=True))  # a log-softmax in place: torch.logsumexp would add two temporaries
    p = log_p.exp()
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    log_p.sub_(total.log_())
    return p, log_p.mul_(p).sum(-1)  # Σ p log p: torch's cascade sum (a BLAS dot drifts ~1e-4 over 32k same-sign terms)


def kl_against_logits(p: Tensor, neg_entropy: Tensor, logits: Tensor) -> Tensor:
    """KL(p ‖ softmax(logits)) per row without forming log-softmax: ``Σp log p − p·z + logsumexp(z)``.

    `p` [n, vocab] and its ``Σ p log p`` [n] come from `final_distribution`; `logits` z is the lens at one layer
    ([n, vocab]) or at k layers ([n, k, vocab], -> [n, k]), in any float dtype. `logits` is left untouched;
    `kl_against_logits_` is the same without the copy.
    """
    return kl_against_logits_(p, neg_entropy, logits.clone())


def kl_against_logits_(p: Tensor, neg_entropy: Tensor, logits: Tensor) -> Tensor:
    """`kl_against_logits` that overwrites `logits` (its own temporary), so a lens chunk needs no second buffer.

    The log-softmax of z is streamed, never formed: the dot ``Σ p z`` in vocabulary blocks, then
    ``max + log Σ exp(z − max)`` with z − max and its exp taken in place. z stays in the compute dtype (bf16/fp16
    on a GPU); the reductions accumulate in fp32, and the dot reads z before the shift, whose half-precision
    rounding would cost up to 2^-8 |z − max| exactly where p_final is large and the lens is wrong.
    """
    vector = logits.dim() == 2
    z = logits.unsqueeze(1) if vector else logits  # [n, k, vocab]
    dot = torch.zeros(z.shape[:-1], dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[-1], DOT_BLOCK):  # fp32 products of one block at a time: a small temporary
        block = slice(start, start + DOT_BLOCK)
        dot += (z[..., block] * p[:, None, block]).sum(-1, dtype=torch.float32)
    shift = z.amax(-1, keepdim=True)  # exact in any dtype
    lse = z.sub_(shift).exp_().sum(-1, dtype=torch.float32).log_() + shift.squeeze(-1).float()
    kl = neg_entropy.float().unsqueeze(-1) - dot.float() + lse
    return kl.squeeze(1) if vector else kl


def lens_sample(image: Tensor, text: Tensor, n: int, seeds: Sequence[int]) -> Tensor:
    """At most `n` of each row's image and text positions, drawn with that row's seed. [batch, seq] bool x2 -> same.

    Stratified with an equal share per modality, not a proportional one: the probe reports a mean per modality,
    and in LLaVA-1.5 (576 image, ~20-60 text tokens) a proportional 64 would leave 2-6 text positions. Text gets
    ``n // 2`` and image the rest; a modality with fewer positions than its share passes what it cannot use to the
    other, so a row with at most `n` positions keeps all of them. Each row's draw depends only on its seed and its
    own two counts (never on padding or the rest of the batch).
    """
    keep = torch.zeros_like(image, dtype=torch.bool)
    for row, seed in enumerate(seeds):
        img, txt = image[row].nonzero().flatten(), text[row].nonzero().flatten()
        n_text = min(len(txt), max(n - len(img), n // 2))
        n_image = min(len(img), n - n_text)
        g = torch.Generator().manual_seed(int(seed))
        for where, count in ((img, n_image), (txt, n_text)):
            keep[row, where[torch.randperm(len(where), generator=g)[:count].to(where.device)]] = True
    return keep


def segment_mean(values: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """Mean of `values` [n] per segment id in ``segment`` [n] (0..num_segments-1); NaN for empty segments.

    Accumulates in fp32 (no float64, which some accelerators lack); a segment is one sample's tokens.
    """
    total = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    count = torch.zeros_like(total)
    total.index_add_(0, segment, values.to(torch.float32))
    count.index_add_(0, segment, torch.ones_like(values, dtype=torch.float32))
    return total / count


# --- per-layer curves (plain floats, no torch needed) ---


def transition_layer(curve: Sequence[float], fraction: float = 0.5) -> int:
    """The layer at which a falling curve has completed `fraction` of its drop, and stays there.

    The drop runs from the curve's peak to its last value (for logit-lens KL the last layer is 0 by
    definition). Returns the first layer at or after the peak from which every value is at or below
    ``last + (1 - fraction) * (peak - last)``. A non-monotone wiggle above that level after an early
    crossing moves the answer later, not earlier. A flat curve gives its last layer. NaNs are ignored.
    """
    values = [float(v) for v in curve]
    finite = [(i, v) for i, v in enumerate(values) if not math.isnan(v)]
    if not finite:
        raise ValueError("transition_layer: the curve has no finite value")
    peak_at, peak = max(finite, key=lambda iv: iv[1])
    last_at, last = finite[-1]
    if peak <= last:
        return last_at
    level = last + (1.0 - fraction) * (peak - last)
    answer = last_at
    for i, v in reversed(finite):
        if i < peak_at or v > level:
            break
        answer = i
    return answer


def plateau_layer(curve: Sequence[float], tolerance: float = 0.1, tail: float = 0.25, floor: float = 0.0) -> int:
    """The first layer from which a curve stays within `tolerance` of its range around its final level.

    The final level is the median of the last `tail` share of layers (at least 2 of them); the band is
    ``max(tolerance * (max - min), floor)`` either side of it, so a curve that is flat up to noise smaller
    than `floor` (in the curve's own units) plateaus at its first layer. For text→image attention mass this is the layer by which
    text has settled on how much it reads image tokens. NaNs are ignored.
    """
    finite = [(i, float(v)) for i, v in enumerate(curve) if not math.isnan(float(v))]
    if not finite:
        raise ValueError("plateau_layer: the curve has no finite value")
    values = [v for _, v in finite]
    final = final_level(values, tail)
    band = max(tolerance * (max(values) - min(values)), floor)
    answer = finite[-1][0]
    for i, v in reversed(finite):
        if abs(v - final) > band:
            break
        answer = i
    return answer


def final_level(curve: Sequence[float], tail: float = 0.25) -> float:
    """The level a curve settles at: the median of its last `tail` share of layers (at least 2). NaNs are ignored.

    A median, not the last value, so one odd layer at the end (the last layer often is) does not move it.
    """
    values = [float(v) for v in curve if not math.isnan(float(v))]
    if not values:
        raise ValueError("final_level: the curve has no finite value")
    k = max(2, math.ceil(tail * len(values)))
    return statistics.median(values[-k:])
