"""Tiny random models of every supported family, built in code (GQA), with offline processors, as transformers'
own tests build theirs: LLaVA-1.5 (Llama LM), LLaVA-NeXT (Mistral LM, anyres tiles + image_newline) and
LLaVA-OneVision (SigLIP tower, Qwen2 LM with q/k/v biases, anyres_max_9).

Tiles are 16 px with patch 8 (4 tokens a tile) so anyres images stay a few dozen tokens: a 40x40 image is a 2x2 grid
(4 + 4 x 5 = 24 tokens on NeXT), a 40x80 one a 1x2 grid (14): two sizes in one batch give ragged image-token counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from saturation.core.adapters import adapter_for, position_ids_from_mask
from saturation.core.tiny import tiny_llava_config, tiny_processor, word_tokenizer

WORDS = ("what", "colour", "is", "the", "circle", "square", "red", "blue", "green", "how", "many", "left", "a")
TILE, PATCH = 16, 8
PINPOINTS = [[16, 32], [32, 16], [32, 32]]
LM = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
      "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES = ("llava", "llava_next", "llava_onevision")
TEXTS = ("USER: <image>\nwhat colour is the circle? ASSISTANT:",
         "USER: how many <image>\nis the square red? ASSISTANT: a",  # text before the image
         "USER: <image>\nwhat ASSISTANT:")
IMAGE_SIZES = ((40, 40), (40, 80), (48, 32))  # (H, W): NeXT/OneVision grids 2x2, 1x2, 2x1 (LLaVA-1.5: one tile)


class OfflineOnevisionProcessor(LlavaOnevisionProcessor):
    """OneVision's processor without its video processor, which needs torchvision (images only here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def _vision(kind: str):
    kw = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": TILE, "patch_size": PATCH}
    return SiglipVisionConfig(**kw) if kind == "siglip" else CLIPVisionConfig(projection_dim=32, **kw)


@dataclass
class Family:
    """One family's tiny model factory, its processor and its batches."""

    name: str
    processor: object

    def config(self, layers: int = 4, std: float | None = None):
        vocab = len(self.processor.tokenizer)
        if self.name == "llava":
            cfg = tiny_llava_config(vocab, image_size=TILE, patch_size=PATCH, layers=layers, hidden=64, heads=4,
                                    kv_heads=2, intermediate=128)
        elif self.name == "llava_next":
            cfg = LlavaNextConfig(vision_config=_vision("clip"), image_token_index=4, image_grid_pinpoints=PINPOINTS,
                                  text_config=MistralConfig(vocab_size=vocab, num_hidden_layers=layers,
                                                            sliding_window=None, **LM),
                                  vision_feature_layer=-2, vision_feature_select_strategy="default")
        else:
            cfg = LlavaOnevisionConfig(vision_config=_vision("siglip"), image_token_index=4, video_token_index=3,
                                       image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                       vision_feature_select_strategy="full",
                                       text_config=Qwen2Config(vocab_size=vocab, num_hidden_layers=layers, **LM))
        if std is not None:
            cfg.text_config.initializer_range = std
        return cfg

    def model(self, attn: str = "sdpa", seed: int = 0, layers: int = 4, std: float | None = None):
        cls = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
               "llava_onevision": LlavaOnevisionForConditionalGeneration}[self.name]
        torch.manual_seed(seed)
        model = cls(self.config(layers, std)).eval()
        with torch.no_grad():  # HF initialises biases (Qwen2's q/k/v) to 0, which would hide a dropped bias
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0.0, 0.5)
        model.set_attn_implementation(attn)
        return model

    def batch(self, rows: int = 3, padding: str = "left", images: bool = True, sizes=IMAGE_SIZES) -> dict:
        """A padded batch from the processor: input_ids, attention_mask, and the family's image inputs."""
        self.processor.tokenizer.padding_side = padding
        texts = list(TEXTS[:rows])
        if not images:
            texts = [t.replace("<image>\n", "") for t in texts]
            return dict(self.processor.tokenizer(texts, return_tensors="pt", padding=True))
        pictures = [Image.new("RGB", (w, h), c) for (h, w), c in zip(sizes[:rows], ("red", "blue", "green"))]
        return dict(self.processor(images=pictures, text=texts, return_tensors="pt", padding=True))


def _processor(name: str):
    if name == "llava":
        return tiny_processor(WORDS, image_size=TILE, patch_size=PATCH)
    tokenizer = word_tokenizer(WORDS)
    if name == "llava_next":
        images = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                            image_grid_pinpoints=PINPOINTS)
        return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    images = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    return OfflineOnevisionProcessor(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                     num_image_tokens=(TILE // PATCH) ** 2, vision_feature_select_strategy="full")


_FAMILIES: dict[str, Family] = {}


def family(name: str) -> Family:
    """The family's fixtures (processors are built once per session)."""
    if name not in _FAMILIES:
        _FAMILIES[name] = Family(name, _processor(name))
    return _FAMILIES[name]


def image_kwargs(batch: dict) -> dict:
    """Everything of a batch besides ids and mask: pixel_values and the family's image kwargs."""
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}


@torch.no_grad()
def hf_logits(model, batch: dict) -> torch.Tensor:
    """HF's own forward with generate's position convention (``cumsum(mask) - 1``)."""
    return model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"])).logits


def image_counts(model, batch: dict) -> list[int]:
    return (batch["input_ids"] == adapter_for(model).image_token_id).sum(1).tolist()


# ---------------------------------------------------------------- checkpoints on disk (the CLI's --model DIR)

CHAT_WORDS = ("user", "assistant", "yes", "no")
# A Qwen-style chat template (llava-onevision's form: images as content entries, <|im_start|>/<|im_end|> turns)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
COLOURS = ("red", "blue", "green")


def checkpoint_processor(name: str, chat_template: str | None = None):
    """A fresh processor of family `name` that can be saved (OneVision's without its video processor, as
    `load_model` builds it), knowing the chat words too; with `chat_template`, its turn tokens become specials."""
    from saturation.core.loading import ImageOnlyOnevisionProcessor

    if name == "llava":
        proc = tiny_processor(WORDS + CHAT_WORDS, image_size=TILE, patch_size=PATCH)
        tokenizer, images = proc.tokenizer, proc.image_processor
    else:
        tokenizer, images = word_tokenizer(WORDS + CHAT_WORDS), _processor(name).image_processor
    if chat_template is not None or name == "llava_onevision":  # Qwen's turn tokens (OneVision's own template too)
        tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    if name == "llava_next":
        return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=chat_template)
    if name == "llava_onevision":
        return ImageOnlyOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                           num_image_tokens=(TILE // PATCH) ** 2,
                                           vision_feature_select_strategy="full", chat_template=chat_template)
    proc.chat_template = chat_template
    return proc


def save_checkpoint(name: str, folder, layers: int = 4, chat_template: str | None = None, seed: int = 0):
    """A tiny random checkpoint of family `name` saved with save_pretrained (model + processor), as a user's
    ``--model DIR``; weights scaled up (std 0.2) so that greedy answers depend on the input."""
    from pathlib import Path

    folder = Path(folder)
    proc = checkpoint_processor(name, chat_template)
    fam = Family(name, proc)
    model = fam.model(seed=seed, layers=layers, std=0.2)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def write_images_dataset(folder, sizes=IMAGE_SIZES, n: int = 6, turns: int = 2):
    """``data.json`` with `n` LLaVA records about solid-colour images of the given (H, W) sizes, cycled (so anyres
    batches are ragged), `turns` question/answer turns each, in the fixtures' word vocabulary."""
    import json
    from pathlib import Path

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        (h, w), colour = sizes[i % len(sizes)], COLOURS[i % len(COLOURS)]
        Image.new("RGB", (w, h), colour).save(folder / "images" / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": colour}]
        conv += [{"from": "human", "value": "is the square red?"}, {"from": "gpt", "value": "yes" if i % 2 else "no"}] \
            * (turns - 1)
        records.append({"id": f"s{i}", "image": f"images/{i}.png", "conversations": conv, "question_type": "colour"})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------- every command, as a user runs them
def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def run_every_command(model, data, tmp_path, layers: int, first: int = 1) -> None:
    """Every command on the checkpoint `model` (a `--model DIR`) as a user runs them, run from `tmp_path`: probe
    (three views, medians in range, Figure 2, a recommendation at the model's own depth, no split before `first`)
    -> train at --split auto -> eval -> generate (two image sizes in one batch = each alone) -> bench -> analyze."""
    import pandas as pd
    from typer.testing import CliRunner

    from cli import routing_app, saturation_app

    runner = CliRunner()
    probe = tmp_path / "probe"
    _ok(runner.invoke(saturation_app, ["probe", "--model", str(model), "--data", str(data), "--n", "6",
                                       "--batch-size", "3", "--out", str(probe)]))
    rec = json.loads((probe / "recommendation.json").read_text())
    assert rec["num_layers"] == layers and first <= rec["split"] <= layers - 2
    assert rec["evidence"]["clip"] == [first, layers - 2] and min(rec["alternatives"].values()) >= first
    assert (probe / "figure2.png").stat().st_size > 0 and (probe / "figure2.pdf").is_file()
    summary = pd.read_csv(probe / "summary.csv")
    med = {m: summary[summary.metric == m]["median"] for m in ("cosine", "attention_mass", "logit_lens_kl")}
    assert set(summary.layer) == set(range(layers)) and not any(v.isna().any() for v in med.values())
    assert med["cosine"].between(-1, 1).all() and med["attention_mass"].between(0, 1).all()
    assert (med["logit_lens_kl"] >= 0).all()

    run = tmp_path / "run"
    _ok(runner.invoke(routing_app, ["train", "--model", str(model), "--split", "auto", "--probe", str(probe),
                                    "--data", str(data), "--out", str(run), "--max-steps", "2", "--batch-size", "3",
                                    "--save-steps", "2"]))
    assert json.loads((run / "train_summary.json").read_text())["split"] == rec["split"]

    _ok(runner.invoke(routing_app, ["eval", "--model", str(model), "--routing", str(run), "--data", str(data),
                                    "--json", str(tmp_path / "eval.json"), "--max-new-tokens", "2"]))
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 6

    images = [tmp_path / "square.png", tmp_path / "wide.png"]
    Image.new("RGB", (40, 40), "red").save(images[0])
    Image.new("RGB", (80, 40), "blue").save(images[1])  # (W, H): a 1x2 grid on anyres families, 2x2 and 2x5 on Qwen
    ask = ["generate", "--model", str(model), "--routing", str(run), "--prompt", "what colour is the circle?",
           "--max-new-tokens", "3"]
    both = runner.invoke(routing_app, [*ask, "--image", str(images[0]), "--image", str(images[1])])
    alone = [runner.invoke(routing_app, [*ask, "--image", str(p)]) for p in images]
    _ok(both), [_ok(a) for a in alone]
    answers = [line.strip() for line in both.stdout.strip().splitlines()]
    assert len(answers) == 2 and answers[0].startswith(f"{images[0]}:")
    assert answers == [a.stdout.strip() for a in alone]  # a left-padded ragged batch answers as each alone
    assert any(len(line) > len(f"{images[0]}:") for line in answers)  # something was generated

    _ok(runner.invoke(routing_app, ["bench", "--model", str(model), "--routing", str(run), "--text-tokens", "8",
                                    "--repeats", "1", "--warmup", "0", "--new-tokens", "1",
                                    "--json", str(tmp_path / "bench.json")]))
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["images"] == "real" and bench["layers"] == layers and bench["split"] == rec["split"]

    _ok(runner.invoke(routing_app, ["analyze", "--routing", str(run), "--model", str(model), "--data", str(data),
                                    "--n", "4", "--out", str(tmp_path / "analysis")]))
    mech = json.loads((tmp_path / "analysis" / "mechanism.json").read_text())
    assert mech["shallow_drift_min_cosine"] > 0.9999  # the shallow stack is shared, ragged padding or not


def check_plugin_requests(routed, proc, pictures: list[list]) -> None:
    """The lmms-eval plugin's requests on `routed` (no lmms-eval needed): two prompts with the two images of
    `pictures` answer in one batch as each alone, and loglikelihood is a finite loss."""
    import math

    from routing.lmms.plugin import generate_requests, loglikelihood

    contexts, settings = ["what colour is the circle?"] * 2, [{"max_new_tokens": 3}] * 2
    both = generate_requests(routed, proc, contexts, settings, lambda i: pictures[i], batch_size=2)
    alone = [generate_requests(routed, proc, contexts[:1], settings[:1], lambda _, i=i: pictures[i], batch_size=1)[0]
             for i in range(2)]
    assert both == alone
    nll, _ = loglikelihood(routed, proc, "what colour is the circle?", " red", pictures[1])
    assert math.isfinite(nll) and nll > 0
