"""lmms-eval plugin: discoverable through package metadata alone; request handling on a tiny routed model."""

from importlib.metadata import entry_points

import pytest
from PIL import Image

import routing
from routing.lmms_plugin import MODEL_ID, generate_batch, llava_prompt, loglikelihood, truncate_at


def test_entry_point_is_registered_without_lmms_eval():
    eps = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert eps[MODEL_ID] == "routing.lmms_plugin:manifest"


def test_prompt_template_adds_missing_image_placeholders():
    assert llava_prompt("what colour?", 1) == "USER: <image>\nwhat colour? ASSISTANT:"
    assert llava_prompt("<image>\nwhat colour?", 1) == "USER: <image>\nwhat colour? ASSISTANT:"
    assert llava_prompt("what colour?", 0) == "USER: what colour? ASSISTANT:"
    assert truncate_at("red. and more", [".", "\n"]) == "red"


def test_generate_and_loglikelihood_agree_on_the_greedy_answer(tiny_model, processor):
    routed = routing.build(tiny_model, 2).eval()
    images = [[Image.new("RGB", (32, 32), c)] for c in ("red", "blue", "green")]
    contexts = ["what colour is the circle?", "is the square blue?", "how many are there?"]
    answers = generate_batch(routed, processor, contexts, images, {"max_new_tokens": 3, "until": ["</s>"]})
    assert len(answers) == 3
    single = generate_batch(routed, processor, contexts[1:2], images[1:2], {"max_new_tokens": 3})
    assert single[0] == answers[1]  # batching and left padding change nothing
    k = next(i for i, a in enumerate(answers) if a)  # random weights: some answer is a non-empty word string
    logp, greedy = loglikelihood(routed, processor, contexts[k], answers[k], images[k])
    assert greedy and logp < 0


def test_lmms_model_class_with_lmms_eval(tiny_model, tiny_model_dir, tmp_path):
    """Only where lmms-eval is installed (a separate venv: it pulls torchvision); see README."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    cls = get_model(MODEL_ID)  # resolved through our entry point
    assert issubclass(cls, lmms) and cls.is_simple
    routing.build(tiny_model, 2).save_routing(tmp_path / "routing")
    model = cls(pretrained=str(tiny_model_dir), routing=str(tmp_path / "routing"), device="cpu", batch_size=2)
    docs = [{"image": Image.new("RGB", (32, 32), c), "q": "what colour is the circle?"} for c in ("red", "blue", "green")]
    model.task_dict = {"shapes": {"test": docs}}

    def visual(doc):
        return [doc["image"]]

    gen = [Instance("generate_until", ("what colour is the circle?", {"max_new_tokens": 3, "until": ["</s>"]}, visual,
                                       i, "shapes", "test"), idx=i, metadata={"task": "shapes", "doc_id": i, "repeats": 1}) for i in range(3)]
    answers = model.generate_until(gen)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    ll = [Instance("loglikelihood", ("what colour is the circle?", "red", visual, i, "shapes", "test"), idx=i,
                   metadata={"task": "shapes", "doc_id": i, "repeats": 1})
          for i in range(3)]
    scores = model.loglikelihood(ll)
    assert len(scores) == 3 and all(logp < 0 for logp, _ in scores)
