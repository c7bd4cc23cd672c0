"""VTW at its own layer: the KL search of Visual Tokens Withdrawal (lzhxmu/VTW) that picks the layer K from which on
every image token is gone (layers 0..K-1 see them; ``vtw@auto`` resolves to the plan ``vtw@K``).

What VTW's code does (its ``VTW.py`` run with ``--findk``, the table reduced in its lmms-eval ``__main__.py``):

- Data: the evaluation task's first samples (README: ``scienceqa_img --limit 20``), batch size 1, prefill only.
- Per sample, for every candidate layer ``k`` in ``range(5, 32)`` (upward from 5 to the last layer, LLaVA-1.5-7B's
  32 layers), the prompt runs again with the image span cut from the hidden states and the position ids before
  layer ``k`` runs (layers 0..k-1 see every token, k..L-1 the text only, original positions kept): the toolkit's
  ``vtw@k``. The final-normed hidden state of the LAST prompt token goes through the LM head.
- KL: ``nn.KLDivLoss(reduction="batchmean")(log_softmax(vanilla), softmax(withdrawn))``, i.e.
  ``KL(P_withdrawn || P_vanilla) = sum_v p_w (log p_w - log p_v)`` of the last token's next-token distributions,
  one number per sample (batch 1) and layer.
- The mean over samples per layer; K = the FIRST layer (lowest index) whose mean KL is <= eta (0.003 at 7B and as
  its default, 0.0005 at 13B, 0.0001 for LLaVA-NeXT-vicuna-7B). Not a monotone search: a later layer above eta does
  not matter once an earlier one qualifies.
- No layer <= eta: its code indexes an empty tensor and crashes. Here the documented fallback is the layer of
  least mean KL (the first of ties): the layer the same rule picks at the smallest eta any layer meets;
  ``VtwSearch.fallback`` says so.

Here: the start layer scales with depth, ``round_half_up(5 L / 32)``, and is at least the first split a VTW plan
allows (``min_split``: after DeepStack's injections); candidates run up to L-1 as VTW's. The samples are a seeded
draw of `n` records; prompts run in left-padded batches under no_grad through the routed model itself
(``routing.build(model, vtw@k)``) against the adapter's own walk (the same positions), so every family works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from saturation.core.adapters import adapter_for
from saturation.core.data import PromptFormat, Record, generation_batch, load_images, sample_records, to_model
from saturation.core.errors import ToolkitError
from saturation.recommend import split_range

from .model import build
from .plan import VTW_AUTO_DEFAULTS, RoutingPlan, geometry, parse_vtw_auto, plan_for

VTW_START, VTW_DEPTH = 5, 32  # VTW searches from layer 5 of LLaVA-1.5-7B's 32


def start_layer(num_layers: int, first_allowed: int = 1) -> int:
    """VTW's start layer 5 (of 32) scaled to `num_layers`, rounded half up, at least `first_allowed`."""
    return max(math.floor(VTW_START * num_layers / VTW_DEPTH + 0.5), first_allowed)


def candidate_layers(num_layers: int, min_split: int = 1) -> range:
    """The layers the search tries: from `start_layer` up to the last split a VTW plan allows (L-1)."""
    valid = split_range(num_layers, 0, 1, min_split)  # VTW's splits are LF-ideal's (`make_plan`)
    return range(max(start_layer(num_layers, valid.start), valid.start), valid.stop)


def last_token_kl(withdrawn: Tensor, vanilla: Tensor) -> Tensor:
    """Per row, ``KL(P_withdrawn || P_vanilla)`` of two logit rows [B, V] (VTW's KLDivLoss(log_softmax(vanilla),
    softmax(withdrawn)) per sample), in float32. Zero-probability terms of P_withdrawn add 0 (a -inf logit,
    e.g. a suppressed token), as KLDivLoss's xlogy does."""
    log_w = torch.log_softmax(withdrawn.float(), dim=-1)
    log_v = torch.log_softmax(vanilla.float(), dim=-1)
    p_w = log_w.exp()
    return torch.where(p_w > 0, p_w * (log_w - log_v), 0.0).sum(-1)


def choose_layer(layers: Sequence[int], mean_kl: Sequence[float], eta: float) -> tuple[int, bool]:
    """``(K, fallback)``: the first of `layers` whose mean KL is <= `eta` (VTW's rule); when none is, the layer of
    least mean KL (the first of ties) with ``fallback`` True."""
    if len(layers) != len(mean_kl) or not layers:
        raise ToolkitError(f"choose_layer needs one KL per layer (got {len(layers)} layers, {len(mean_kl)} values)")
    for layer, kl in zip(layers, mean_kl):
        if kl <= eta:
            return layer, False
    best = min(range(len(layers)), key=lambda i: (mean_kl[i], i))
    return layers[best], True


@dataclass(frozen=True)
class VtwSearch:
    """The KL table of a search and its choice: ``kl[i]`` is the mean over `n` samples at ``layers[i]``."""

    layers: tuple[int, ...]
    kl: tuple[float, ...]
    layer: int  # K: the plan is vtw@K
    fallback: bool  # no layer's KL was <= eta: K is the layer of least KL
    eta: float
    n: int
    seed: int
    start: int  # the scaled start layer (VTW: 5 of 32)

    @property
    def kl_at_choice(self) -> float:
        return self.kl[self.layers.index(self.layer)]

    def to_dict(self) -> dict:
        """What an artifact's ``routing.json`` (``calibration``) and compare's ``calibration.json`` hold."""
        return {"method": "vtw-kl-search",
                "measure": "KL(P_withdrawn || P_vanilla) of the last prompt token, mean over n samples",
                **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}

    def describe(self) -> str:
        """The params cell of `routing compare`, e.g. ``s=7 (auto, eta=0.003, KL 0.0021)``."""
        rule = "no layer <= eta: least KL" if self.fallback else f"eta={self.eta:g}"
        return f"s={self.layer} (auto, {rule}, KL {self.kl_at_choice:.2g})"

    def table_line(self) -> str:
        """The per-layer mean KL on one line (``layer:KL``), e.g. ``... 2:1.33 3:1.49 ... 9:0.000153``."""
        return "vtw@auto: mean KL by layer " + " ".join(f"{k}:{v:.3g}" for k, v in zip(self.layers, self.kl))

    def summary(self) -> str:
        """One progress line: the choice and why."""
        head = f"vtw@auto -> vtw@{self.layer}: mean KL {self.kl_at_choice:.3g}"
        if self.fallback:
            return f"{head}, the least of layers {self.layers[0]}..{self.layers[-1]} (none <= eta {self.eta:g})"
        return f"{head} <= eta {self.eta:g}, the first of layers {self.layers[0]}..{self.layers[-1]}"


@torch.no_grad()
def layer_kl(model, processor, records: list[Record], layers: Sequence[int], batch_size: int = 8) -> Tensor:
    """[len(layers), len(records)]: each record's last-prompt-token KL between ``vtw@k`` and vanilla."""
    a = adapter_for(model)
    fmt = PromptFormat.of(model)
    routed = [build(model, plan_for(model, k, "vtw")).eval() for k in layers]  # no side branch: the base, shared
    out = torch.empty(len(layers), len(records))
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        batch = to_model(generation_batch(chunk, processor, [load_images(r) for r in chunk], fmt), model.device,
                         model.dtype)
        vanilla = a.forward(**batch, logits_to_keep=1)[:, -1]  # left-padded: each row's last prompt token is last
        for j, net in enumerate(routed):
            out[j, i : i + len(chunk)] = last_token_kl(net(**batch, logits_to_keep=1).logits[:, -1], vanilla).cpu()
    return out


def search_vtw_layer(model, processor, records: list[Record], *, eta: float = VTW_AUTO_DEFAULTS["eta"],
                     n: int = VTW_AUTO_DEFAULTS["n"], seed: int = VTW_AUTO_DEFAULTS["seed"], batch_size: int = 8,
                     log: Callable[[str], None] | None = None) -> VtwSearch:
    """VTW's KL search on a seeded sample of `n` of `records` (see the module's docstring)."""
    num_layers, min_split = geometry(model)
    layers = tuple(candidate_layers(num_layers, min_split))
    # Text-only records have nothing to withdraw (their KL is 0 at every layer) and would pull the mean down.
    with_images = [r for r in records if r.images]
    if not with_images:
        raise ToolkitError("vtw@auto: no record with an image to search the withdrawal layer on")
    sample = sample_records(with_images, n, seed)
    if log is not None:
        log(f"vtw@auto: KL search over layers {layers[0]}..{layers[-1]} on {n} records (eta={eta:g}, seed {seed})")
    mean = layer_kl(model, processor, sample, layers, batch_size).mean(dim=1).tolist()
    layer, fallback = choose_layer(layers, mean, eta)
    found = VtwSearch(layers, tuple(mean), layer, fallback, float(eta), n, seed, layers[0])
    if log is not None:
        log(found.table_line())
        log(found.summary())
    return found


def resolve_auto(spec: str, model, processor, records: list[Record], *, batch_size: int = 8,
                 log: Callable[[str], None] | None = None) -> tuple[RoutingPlan, VtwSearch]:
    """The plan ``vtw@K`` of a ``vtw@auto[:eta=..,n=..,seed=..]`` spec, searched on `records`, and the search."""
    params = parse_vtw_auto(spec)
    if params is None:
        raise ToolkitError(f"plan '{spec}' is not vtw@auto[:eta=..,n=..,seed=..]")
    found = search_vtw_layer(model, processor, records, batch_size=batch_size, log=log, **params)
    return plan_for(model, found.layer, "vtw"), found
