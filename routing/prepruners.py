"""The pre-LLM prunings that current papers compare against, as pure tensor functions (the routed model calls them
from ``RoutedModel._prune_pre``; the vision tower's internals come from the adapter).

- DivPrune (vbdi/divprune): on the projected image tokens (what enters the LLM), distance = 1 - cosine; the first
  pick is the token farthest from its nearest neighbour, then repeatedly the token whose minimum distance to the
  chosen set is largest (max-min diversity); the chosen indices sorted.
- VisionZip (dvlab-research/VisionZip): at the tower layer the projector reads, dominant tokens = [CLS] plus the
  top (dominant - 1) patches by the [CLS] row of the attention summed over heads, in their original order;
  contextual tokens: of the remaining patches, targets at a uniform stride, every other one assigned to its most
  similar target by the cosine of the head-averaged keys, each target's hidden state plus the mean of its
  assigned ones. Output: dominant, then contextual (then the projector, in the caller).

Read from the authors' code (facts only): vbdi/divprune ``LLaVA/llava/model/llava_arch.py`` (``DivPrune``: the
first pick is ``argmax`` of the second-smallest entry of each distance column, then ``argmax`` of the column-wise
minimum over the chosen rows; ``int(round(ratio * N))`` tokens, N = all of an image's features, NeXT's crops and
newlines included; kept indices sorted, the shorter prompt's positions renumbered). Where this differs: distances
in float32 (theirs in the model's dtype), any number of images and rows (theirs: row 0, one image at a fixed
offset), and a chosen token is never chosen twice (theirs could repeat one when every distance left is 0).
dvlab-research/VisionZip ``visionzip/clip_encoder.py`` and ``utils.py`` (``attentions[-2]``, ``hidden_states[-2]``,
the keys of ``layers[-2]`` averaged over heads; ``dominant - 1`` patches plus [CLS]; stride ``max(1, r // c)``,
first ``c`` targets; ``argmax`` assignment; target + sum / max(count, 1)); ``visionzip/llava_arch.py`` feeds all
dominant + contextual tokens, [CLS] included, to the projector.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from saturation.core.errors import ToolkitError


def image_runs(image_mask: Tensor) -> list[Tensor]:
    """The flat positions (over [B * T]) of each image, in placeholder order: every run of consecutive image tokens
    in a row is one image, as the toolkit counts images (`Adapter.images_per_row`)."""
    batch, n = image_mask.shape
    starts = image_mask & ~F.pad(image_mask[:, :-1], (1, 0))
    flat = image_mask.reshape(-1).nonzero().squeeze(1)
    run = starts.reshape(-1).long().cumsum(0)[flat] - 1  # the run each image position belongs to
    counts = torch.bincount(run, minlength=int(starts.sum())).tolist()
    return list(flat.split(counts))


def divprune_select(features: Tensor, k: int) -> Tensor:
    """DivPrune's kept indices, sorted: `features` [n, D] (one image) -> [k], or [N, n, D] (N images of n tokens)
    -> [N, k]. Greedy max-min diversity under the cosine distance, in float32, on the device (no host read: one
    loop of k steps for all N images). Ties go to the lowest index (``argmax``'s first); k distinct tokens always."""
    single = features.dim() == 2
    x = F.normalize(features.float(), dim=-1)
    x = x[None] if single else x
    images, n, _ = x.shape
    if k >= n:
        index = torch.arange(n, device=x.device).expand(images, n)
        return index[0] if single else index
    dist = 1.0 - x @ x.transpose(1, 2)  # [N, n, n]; row = a chosen token, column = a candidate (as the authors)
    # each candidate's nearest OTHER token (the authors take the second-smallest of its column, self being 0)
    nearest = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf")).amin(1)
    rows = torch.arange(images, device=x.device)
    chosen = torch.empty(images, k, dtype=torch.long, device=x.device)
    closest = torch.full((images, n), float("inf"), device=x.device)  # each candidate's distance to the chosen set
    pick = nearest.argmax(1)
    for i in range(k):
        chosen[:, i] = pick
        closest = torch.minimum(closest, dist[rows, pick])
        # a chosen token is never picked again: the authors' loop relies on its self-distance being 0, which float
        # rounding does not always give, and on a one-colour image every distance is 0
        closest[rows, pick] = -float("inf")
        pick = closest.argmax(1)
    index = chosen.sort(1).values
    return index[0] if single else index


def visionzip_merge(attn: Tensor, hidden: Tensor, keys: Tensor, dominant: int, contextual: int
                    ) -> tuple[Tensor, Tensor]:
    """VisionZip's tokens per image, before the projector: `attn` [N, heads, S, S], `hidden` [N, S, Dv] and `keys`
    [N, S, d] of the tower layer the projector reads, [CLS] at index 0. Returns ``(tokens [N, dominant +
    contextual, Dv], sources [N, dominant + contextual])``: the dominant tokens ([CLS] first, then the chosen
    patches in order), then the contextual ones; `sources` is the patch index each token stands for (0-based over
    the patches: a dominant patch its own, a contextual token its target's), -1 for [CLS]."""
    images, s, _ = hidden.shape
    if dominant + contextual > s:
        raise ToolkitError(f"visionzip: dominant={dominant} and contextual={contextual} need at least "
                           f"{dominant + contextual - 1} patches per image; the tower has {s - 1}")
    score = attn[:, :, 0, 1:].float().sum(1)  # [N, S-1]: the [CLS] row, summed over heads
    top = score.topk(dominant - 1, dim=1).indices + 1
    picked = torch.zeros(images, s, dtype=torch.bool, device=hidden.device)
    picked[:, 0] = True
    picked.scatter_(1, top, True)
    order = torch.argsort(picked.to(torch.uint8), dim=1, descending=True, stable=True)  # picked first, in order
    dom, rest = order[:, :dominant], order[:, dominant:]  # [N, dominant], [N, r] (original order each)
    r = s - dominant
    step = max(1, r // contextual)
    targets = torch.arange(0, r, step, device=hidden.device)[:contextual]
    others = torch.ones(r, dtype=torch.bool, device=hidden.device)
    others[targets] = False
    take = lambda x, idx: x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    metric = F.normalize(take(keys, rest), dim=-1)
    rest_hidden = take(hidden, rest)
    similarity = metric[:, others] @ metric[:, targets].transpose(1, 2)  # [N, r - c, c]
    assign = F.one_hot(similarity.argmax(-1), contextual).to(hidden.dtype)  # [N, r - c, c]
    counts = assign.sum(1).clamp(min=1)[..., None]
    merged = rest_hidden[:, targets] + assign.transpose(1, 2) @ rest_hidden[:, others] / counts
    tokens = torch.cat([take(hidden, dom), merged], dim=1)
    sources = torch.cat([dom, rest[:, targets]], dim=1) - 1
    return tokens, sources
