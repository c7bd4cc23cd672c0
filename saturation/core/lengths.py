"""Prompts against the model's positions: a sequence longer than the model's ``max_position_embeddings``.

Every family here uses rotary positions, so a longer sequence runs without an error and silently reads positions
the model was never trained on (issue 28: a 2,223-token prompt on the 512-position embedded model). What each
command does about it, decided once here:

- answers (`routing eval`, `routing generate`, lmms-eval's plugin) and the probe refuse, naming the record: an
  answer to a cut question, or a probe number on a cut prompt, would not be the record's;
- training (`routing train`) cuts the example at the limit from the right, as LLaVA's own training truncates at
  ``model_max_length``, and says how many tokens went; an example whose image or every answer token would be
  cut is refused (nothing left to learn from, or a broken image block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saturation.core.errors import ToolkitError


def max_positions(model) -> int | None:
    """The positions the text model was trained for (``max_position_embeddings``), None where the config has none.
    `model`: a model, a routed model or a config."""
    config = getattr(model, "config", model)
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_prompts(lengths: Sequence[int], names: Sequence[str], limit: int | None, new_tokens: int = 0,
                  what: str = "record") -> None:
    """Refuse the first prompt whose tokens (image tokens included) plus `new_tokens` to generate exceed `limit`."""
    if limit is None:
        return
    for n, name in zip(lengths, names):
        if n + new_tokens > limit:
            more = f" + {new_tokens} new" if new_tokens else ""
            raise ToolkitError(f"{what} {name}: its prompt is {n:,} tokens (image tokens included){more}, more than "
                               f"the model's {limit:,} positions: shorten it"
                               + (" or lower --max-new-tokens" if new_tokens and n <= limit else ""))


def fit_example(example: dict[str, torch.Tensor], limit: int | None, name: str, image_token_id: int | None,
                sequence_keys: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], int]:
    """A training example (`encode_record`'s ids, labels and per-token `sequence_keys`) cut at `limit` tokens from
    the right, and how many tokens were cut (0: it fits). Refused when the cut would reach an image token or leave
    no answer token."""
    ids = example["input_ids"]
    if limit is None or len(ids) <= limit:
        return example, 0
    cut = len(ids) - limit
    if image_token_id is not None and bool((ids[limit:] == image_token_id).any()):
        raise ToolkitError(f"record {name}: {len(ids):,} tokens, more than the model's {limit:,} positions, and its "
                           "image tokens reach past them: shorten the record")
    labels = example.get("labels")
    if labels is not None and not bool((labels[:limit] != -100).any()):
        raise ToolkitError(f"record {name}: {len(ids):,} tokens, more than the model's {limit:,} positions, and "
                           f"cutting the last {cut:,} leaves no answer token to learn from: shorten the record")
    fitted = dict(example)
    for key in ("input_ids", "labels", *sequence_keys):
        if key in fitted and fitted[key].shape[-1] == len(ids):
            fitted[key] = fitted[key][..., :limit]
    return fitted, cut
