"""lmms-eval plugin: evaluate a routed (or vanilla) LLaVA on lmms-eval's benchmarks without forking lmms-eval.

lmms-eval (>= 0.7) discovers models through the ``lmms_eval.models`` entry point group; ours is declared in
``pyproject.toml`` and points at `manifest`, so ``--model dpvr_llava`` works after ``pip install -e .[eval]``::

    lmms-eval --model dpvr_llava --model_args pretrained=llava-1.5-7b,routing=runs/train/.../routing \\
        --tasks pope --batch_size 8

This module holds the request handling as plain functions (testable without lmms-eval); the `lmms` subclass
that lmms-eval instantiates lives in `routing.lmms.model` and only wraps them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch

from saturation.core.data import PromptFormat, no_image_tokens, process, question_prompt, to_model
from saturation.core.errors import ToolkitError
from saturation.core.lengths import check_prompts, max_positions

MODEL_ID = "dpvr_llava"
# What `--model_args` may set. The batch size comes from lmms-eval's own --batch_size/--max_batch_size, which
# it always passes (default 1), so a second one in `--model_args` could only conflict with it.
MODEL_ARGS = ("pretrained", "routing", "dtype", "device", "attn_implementation", "compile")
AUTO_BATCH_SIZE = 8  # what --batch_size auto means here: we do not probe memory as HF's auto batch finder does


def manifest():
    """Entry-point payload for lmms-eval's model registry (imported lazily: lmms-eval is optional)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="routing.lmms.model.DPVRLlava", aliases=("dpvr",))


def model_args(args: dict, cli: dict) -> dict:
    """`--model_args` merged with lmms-eval's own options (`cli`: batch_size, max_batch_size, device).

    lmms-eval passes both as keyword arguments of one call, so ``device=`` in `--model_args` together with
    ``--device`` would be a TypeError: the same value twice is accepted, two different ones are refused.
    Unknown keys are refused rather than ignored (a typo like ``routng=`` would silently run vanilla).
    """
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise ToolkitError(f"dpvr_llava: unknown --model_args key(s) {', '.join(unknown)}; "
                           f"accepted: {', '.join(MODEL_ARGS)} (batch size: lmms-eval's --batch_size)")
    for key in ("pretrained", "routing"):  # `routing=$RUN` with $RUN unset would silently run vanilla
        if key in args and (args[key] is None or not str(args[key]).strip()):
            leave = "leave routing= out for the vanilla model" if key == "routing" else "e.g. pretrained=llava-1.5-7b"
            raise ToolkitError(f"dpvr_llava: {key}= is empty in --model_args (an unset shell variable?): give a "
                               f"value, or {leave}")
    merged = dict(args)
    for key, value in cli.items():
        if value is None:
            continue
        if key in args and str(args[key]) != str(value):
            raise ToolkitError(f"dpvr_llava: {key} given twice ({key}={args[key]} in --model_args, --{key} {value}); "
                               "give it once")
        merged.setdefault(key, value)
    return merged


def flag_of(value: bool | str | None, name: str) -> bool:
    """A boolean ``--model_args`` value (``compile=true``): lmms-eval passes ``true``/``false`` as bools or text."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ToolkitError(f"dpvr_llava: {name} must be true or false, got {value!r}")


def batch_size_of(batch_size: int | str, max_batch_size: int | str | None = None) -> int:
    """An int batch size from lmms-eval's ``N`` | ``auto`` | ``auto:N`` (auto: `AUTO_BATCH_SIZE`, capped at
    `max_batch_size`)."""
    text = str(batch_size).strip().lower()
    if text.startswith("auto"):
        cap = int(max_batch_size) if max_batch_size else AUTO_BATCH_SIZE
        return max(1, min(AUTO_BATCH_SIZE, cap))
    try:
        size = int(text)
    except ValueError:
        raise ToolkitError(f"dpvr_llava: batch_size must be an integer or auto, got {batch_size!r}") from None
    if size < 1:
        raise ToolkitError(f"dpvr_llava: batch_size must be at least 1, got {size}")
    return size


# The toolkit's CLI options and the `--model_args` keys that say the same (its messages name the CLI's).
LMMS_TERMS = {"--model PATH": "pretrained=PATH", "--model": "pretrained=", "--routing": "routing=",
              "--dtype": "dtype=", "--device cpu": "device=cpu", "--device": "device=", "--compile": "compile=true",
              "--max-new-tokens": "the task's max_new_tokens"}


def in_lmms_terms(message: str) -> str:
    """A toolkit message as lmms-eval's user reads it: ``--model PATH`` -> ``pretrained=PATH``, ``--routing`` ->
    ``routing=``, ... (options of lmms-eval's own CLI, such as ``--batch_size``, are left alone)."""
    pattern = "|".join(re.escape(k) for k in sorted(LMMS_TERMS, key=len, reverse=True))
    text = re.sub(rf"(?<![\w-])(?:{pattern})(?![\w-])", lambda m: LMMS_TERMS[m[0]], message)
    return text if text.startswith(f"{MODEL_ID}:") else f"{MODEL_ID}: {text}"


def banner(message: str) -> list[str]:
    """The lines that stand out in lmms-eval's log for one of our errors: lmms-eval prints its own traceback
    after them and, in 0.7.3, still exits 0, so the message must be seen, and its results file checked."""
    rule = "=" * 78
    return [rule, f"{MODEL_ID} ERROR: {message.removeprefix(f'{MODEL_ID}: ')}",
            f"{MODEL_ID} ERROR: nothing was evaluated; lmms-eval may still exit 0 (check for its results file)", rule]


def loudly(log: Callable[[str], None]):
    """A decorator for the entry points lmms-eval calls: our `ToolkitError` is logged through `log` as a
    `banner`, in lmms-eval's terms (`in_lmms_terms`), and raised again with that message."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ToolkitError as err:
                if getattr(err, "reported", False):  # an inner entry point logged it already
                    raise
                message = in_lmms_terms(" ".join(str(err).split()))
                for line in banner(message):
                    log(line)
                loud = ToolkitError(message)
                loud.reported = True
                raise loud from None

        return inner

    return wrap


def loaded_line(model, routing: str | None) -> str:
    """The one log line that names what was loaded: the base checkpoint and the routing plan (or vanilla)."""
    plan = getattr(model, "plan", None)
    base = getattr(getattr(model, "base", model), "name_or_path", "?")
    if plan is None:
        return f"{MODEL_ID}: base {base}, no routing (vanilla)"
    return f"{MODEL_ID}: base {base}, routing plan {plan.spec} ({plan.name}) from {routing}"


def llava_prompt(context: str, n_images: int, processor=None, fmt: PromptFormat | None = None) -> str:
    """The family's prompt for one request (`saturation.core.data.question_prompt`): the checkpoint's chat template, or
    the adapter's (LLaVA-1.5: ``USER: {context} ASSISTANT:``). Benchmarks that leave ``<image>`` out of the context
    get one per image in front."""
    return question_prompt(context, processor, fmt or PromptFormat(), n_images)


def encode(processor, prompts: list[str], images: list, fmt: PromptFormat | None = None) -> dict:
    """Left-padded batch for generation; `images` is one list of images per prompt (or one flat list, in order).
    Keeps the family's image kwargs (``image_sizes``, ``batch_num_images``, ...) with the pixels."""
    processor.tokenizer.padding_side = "left"
    return process(processor, prompts, images, fmt or PromptFormat(), padding=True)


def _to_model(batch: dict, model) -> dict:
    return to_model(batch, model.device, model.dtype)


def truncate_at(text: str, until: list[str]) -> str:
    """Cut `text` at the first stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@torch.no_grad()
def generate_batch(model, processor, contexts: list[str], visuals: list[list], gen_kwargs: dict) -> list[str]:
    """Answers for one batch of requests sharing `gen_kwargs` (lmms-eval's keys: max_new_tokens, temperature,
    do_sample, num_beams, top_p, until)."""
    fmt = PromptFormat.of(model)
    prompts = [llava_prompt(c, len(v), processor, fmt) for c, v in zip(contexts, visuals)]
    rgb = [[im.convert("RGB") for im in v] for v in visuals]
    # one list per prompt, as processors batch them (Gemma 3 counts images per prompt); flat if some have none
    images = rgb if all(rgb) else [im for v in rgb for im in v]
    batch = encode(processor, prompts, images, fmt)
    new_tokens = int(gen_kwargs.get("max_new_tokens", 128))
    check_prompts(batch["attention_mask"].sum(1).tolist(), [repr(c[:40]) for c in contexts], max_positions(model),
                  new_tokens, what="request")
    batch = _to_model(batch, model)
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
    extra = {"temperature": temperature, "top_p": gen_kwargs.get("top_p") or 1.0} if sample else {}
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=sample,
                         num_beams=int(gen_kwargs.get("num_beams", 1) or 1), **extra, **no_image_tokens(model))
    texts = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return [truncate_at(t, until).strip() for t in texts]


def batches_by_settings(settings: list[dict], batch_size: int) -> list[list[int]]:
    """Request indices grouped by identical generation settings (one ``generate`` call needs one setting),
    in order of first appearance, cut into batches of at most `batch_size`."""
    groups: dict[str, list[int]] = {}
    for i, kwargs in enumerate(settings):
        groups.setdefault(repr(sorted(kwargs.items())), []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def generate_requests(model, processor, contexts: list[str], settings: list[dict],
                      visuals: Callable[[int], list], batch_size: int,
                      progress: Callable[[int], None] | None = None) -> list[str]:
    """Answers to many requests, in request order (lmms-eval pairs answers with requests by position).

    `visuals(i)` gives request i's images (loaded only when its batch runs); `progress(n)` is told the size of
    each finished batch.
    """
    answers: list[str] = [""] * len(contexts)
    for idx in batches_by_settings(settings, batch_size):
        texts = generate_batch(model, processor, [contexts[i] for i in idx], [visuals(i) for i in idx],
                               dict(settings[idx[0]]))
        for i, text in zip(idx, texts):
            answers[i] = text
        if progress is not None:
            progress(len(idx))
    return answers


@torch.no_grad()
def loglikelihood(model, processor, context: str, continuation: str, images: list) -> tuple[float, bool]:
    """(negative log-likelihood of `continuation` after `context`, summed over its tokens; whether greedy
    decoding would produce it), from ONE forward pass over prompt + continuation.

    lmms-eval's ``multiple_choice`` picks the ``argmin`` of the first value, i.e. it expects a loss (its own
    llava model returns the per-token mean loss; ours is the sum, the exact log-probability of the choice).
    `continuation` already carries lmms-eval's ``target_delimiter`` (a leading space), so nothing is inserted
    between the two: the whole string is tokenized once and the prompt's tokens are cut off, as lm-eval does,
    so a SentencePiece tokenizer sees the same text it would in generation.
    """
    fmt = PromptFormat.of(model)
    prompt = llava_prompt(context, len(images), processor, fmt)
    rgb = [[im.convert("RGB") for im in images]] if images else []
    full = encode(processor, [prompt + continuation], rgb, fmt)
    check_prompts([full["input_ids"].shape[1]], [repr(context[:40])], max_positions(model), what="request")
    full = _to_model(full, model)
    n_prompt = encode(processor, [prompt], rgb, fmt)["input_ids"].shape[1]
    logits = model(**full).logits[0, n_prompt - 1:-1].float()
    target = full["input_ids"][0, n_prompt:]
    if target.numel() == 0:
        raise ToolkitError(f"dpvr_llava: continuation {continuation!r} adds no token to the prompt")
    nll = -torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum()
    return float(nll), bool((logits.argmax(-1) == target).all())
