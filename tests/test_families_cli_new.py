"""Every command on Qwen2.5-VL, Qwen3-VL and Gemma 3: tiny random checkpoints saved with save_pretrained (model +
processor), loaded offline by ``load_llava`` and by the CLI from disk like a user's ``--model DIR``; images of
different sizes, so Qwen batches are ragged (different M-RoPE grids)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from backbone_fixtures import write_images_dataset
from PIL import Image

from saturation.anatomy import anatomy, position_ids_from_mask

NEW = ("qwen2_5_vl", "qwen3_vl", "gemma3")


def save(name: str, folder, chat: bool = False, video_config: bool = False):
    """A checkpoint of family `name` in `folder`; `chat`: with the family's chat template."""
    if name == "gemma3":
        import gemma3_fixtures as g

        return g.save_checkpoint(folder, chat_template=g.GEMMA_CHAT_TEMPLATE if chat else None)
    import qwen_fixtures as q

    return q.save_checkpoint(name, folder, chat_template=q.QWEN_VL_CHAT_TEMPLATE if chat else None,
                             video_config=video_config)


@pytest.mark.parametrize("name", NEW)
def test_checkpoint_loads_offline_and_walks_as_hf(name, tmp_path):
    """A saved checkpoint + processor (Qwen3-VL with the video processor config a release ships) loads through
    load_llava without torchvision; the processor batches two image sizes; the anatomy walk equals HF's forward."""
    from saturation.loading import load_llava

    assert importlib.util.find_spec("torchvision") is None  # the toolkit's environment
    folder = save(name, tmp_path / name, chat=True, video_config=name == "qwen3_vl")
    model, proc = load_llava(folder)
    assert proc.chat_template and type(proc).__name__.lower().replace("_", "").startswith(
        ("imageonly", "gemma3"))
    a = anatomy(model)
    texts = [a.template.question(q, True) for q in ("what colour is the circle ?", "how many")]
    proc.tokenizer.padding_side = "left"
    pictures = [Image.new("RGB", (40, 40), "red"), Image.new("RGB", (80, 40), "blue")]
    nested = [[p] for p in pictures] if name == "gemma3" else pictures  # Gemma's processor takes images per row
    batch = dict(proc(images=nested, text=texts, return_tensors="pt", padding=True))
    counts = (batch["input_ids"] == a.image_token_id).sum(1).tolist()
    assert all(counts) and (name == "gemma3" or counts[0] != counts[1])
    with torch.no_grad():
        hf = model(**batch, position_ids=None if name != "gemma3" else position_ids_from_mask(
            batch["attention_mask"])).logits
        walk = a.forward(batch["input_ids"], batch["attention_mask"], **{
            k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")})
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(walk[valid], hf[valid], rtol=0, atol=0)
