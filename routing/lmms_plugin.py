"""lmms-eval plugin: evaluate a routed (or vanilla) LLaVA on lmms-eval's benchmarks without forking lmms-eval.

lmms-eval (>= 0.7) discovers models through the ``lmms_eval.models`` entry point group; ours is declared in
``pyproject.toml`` and points at `manifest`, so ``--model dpvr_llava`` works after ``pip install -e .[eval]``::

    lmms-eval --model dpvr_llava --model_args pretrained=llava-1.5-7b,routing=runs/train/.../routing \\
        --tasks pope --batch_size 8

This module holds the request handling as plain functions (testable without lmms-eval); the `lmms` subclass
that lmms-eval instantiates lives in `routing.lmms_model` and only wraps them.
"""

from __future__ import annotations

import torch

from saturation.data import IMAGE_PLACEHOLDER

MODEL_ID = "dpvr_llava"


def manifest():
    """Entry-point payload for lmms-eval's model registry (imported lazily: lmms-eval is optional)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="routing.lmms_model.DPVRLlava", aliases=("dpvr",))


def llava_prompt(context: str, n_images: int) -> str:
    """LLaVA-1.5 template. Benchmarks that leave ``<image>`` out of the context get one per image in front."""
    if n_images and IMAGE_PLACEHOLDER not in context:
        context = " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + context
    return f"USER: {context} ASSISTANT:"


def encode(processor, prompts: list[str], images: list) -> dict:
    """Left-padded batch for generation; `images` is the flat list of every prompt's images, in order."""
    processor.tokenizer.padding_side = "left"
    return processor(images=images or None, text=prompts, return_tensors="pt", padding=True)


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
    prompts = [llava_prompt(c, len(v)) for c, v in zip(contexts, visuals)]
    batch = encode(processor, prompts, [im.convert("RGB") for v in visuals for im in v])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
    extra = {"temperature": temperature, "top_p": gen_kwargs.get("top_p") or 1.0} if sample else {}
    out = model.generate(**batch, max_new_tokens=int(gen_kwargs.get("max_new_tokens", 128)), do_sample=sample,
                         num_beams=int(gen_kwargs.get("num_beams", 1) or 1), **extra)
    texts = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return [truncate_at(t, until).strip() for t in texts]


@torch.no_grad()
def loglikelihood(model, processor, context: str, continuation: str, images: list) -> tuple[float, bool]:
    """(sum of log-probabilities of `continuation` after `context`, whether greedy decoding would produce it)."""
    prompt = llava_prompt(context, len(images))
    full = encode(processor, [prompt + " " + continuation], [im.convert("RGB") for im in images])
    n_prompt = encode(processor, [prompt], [im.convert("RGB") for im in images])["input_ids"].shape[1]
    full = {k: v.to(model.device) for k, v in full.items()}
    if "pixel_values" in full:
        full["pixel_values"] = full["pixel_values"].to(model.dtype)
    logits = model(**full).logits[0, n_prompt - 1:-1].float()
    target = full["input_ids"][0, n_prompt:]
    logp = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum()
    return float(logp), bool((logits.argmax(-1) == target).all())
