"""lmms-eval plugin: discoverable through package metadata alone; request handling on tiny and embedded models.

These run without lmms-eval. The real lmms-eval CLI is exercised in tests/test_lmms_cli.py (its own venv).
"""

import json
from importlib.metadata import entry_points

import pytest
import torch
from conftest import make_model
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast

import routing
from routing.lmms.plugin import (
    AUTO_BATCH_SIZE,
    MODEL_ARGS,
    MODEL_ID,
    batch_size_of,
    batches_by_settings,
    generate_batch,
    generate_requests,
    llava_prompt,
    loglikelihood,
    model_args,
    truncate_at,
)
from saturation.core.answers import answers
from saturation.core.data import normalize_answer, read_records
from saturation.core.errors import ToolkitError
from saturation.core.loading import DATA_SAMPLES, load_model


@pytest.fixture(scope="module")
def embedded():
    """The embedded shapes model (the default, `tiny`). Tests compare the plugin with its own answers from the
    toolkit (`saturation.core.answers`), not with the gold answers: those depend on the weights."""
    torch.set_num_threads(1)
    return load_model("tiny")


def heldout(question_type: str | None, n: int) -> list[tuple[str, str, Image.Image]]:
    """(question, answer, image) of the first `n` held-out records of a type (None: any type)."""
    records = json.loads((DATA_SAMPLES / "shapes" / "heldout.json").read_text())
    picked = [r for r in records if question_type in (None, r["question_type"])][:n]
    return [(r["conversations"][0]["value"].removeprefix("<image>\n"), r["conversations"][1]["value"],
             Image.open(DATA_SAMPLES / "shapes" / r["image"]).convert("RGB")) for r in picked]


def toolkit_answers(model, processor, question_type: str, n: int) -> list[str]:
    """The toolkit's own greedy answers (`saturation.core.answers`, 4 new tokens) to the same records as
    ``heldout(question_type, n)``."""
    records = [r for r in read_records(DATA_SAMPLES / "shapes" / "heldout.json") if r.question_type == question_type]
    return answers(model, processor, records[:n], max_new_tokens=4)


def test_entry_point_is_registered_without_lmms_eval():
    eps = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert eps[MODEL_ID] == "routing.lmms.plugin:manifest"


def test_prompt_template_adds_missing_image_placeholders():
    assert llava_prompt("what colour?", 1) == "USER: <image>\nwhat colour? ASSISTANT:"
    assert llava_prompt("<image>\nwhat colour?", 1) == "USER: <image>\nwhat colour? ASSISTANT:"
    assert llava_prompt("what colour?", 0) == "USER: what colour? ASSISTANT:"
    assert truncate_at("red. and more", [".", "\n"]) == "red"


def test_loglikelihood_is_a_loss_the_right_choice_is_the_smallest(embedded):
    """lmms-eval's multiple_choice takes argmin over what loglikelihood returns: it must be a loss (NLL)."""
    model, processor = embedded
    greedy = toolkit_answers(model, processor, "exist", 8)  # the model's own answer is the most likely choice
    assert set(greedy) == {"yes", "no"}, greedy  # both, so a loss that always favours one choice would show
    for (question, _, image), answer in zip(heldout("exist", 8), greedy):
        nll = {c: loglikelihood(model, processor, question, " " + c, [image]) for c in ("yes", "no")}
        assert all(v > 0 for v, _ in nll.values())  # -log p of a proper probability
        assert min(nll, key=lambda c: nll[c][0]) == answer, (question, nll)
        assert nll[answer][1] and not nll[{"yes": "no", "no": "yes"}[answer]][1]  # is_greedy for the answer only


def sentencepiece_processor() -> LlavaProcessor:
    """A LLaVA processor whose tokenizer works like SentencePiece (Unigram + Metaspace): a space is '▁'."""
    pieces = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "▁", "▁USER", ":", "▁ASSISTANT", "\n", "is", "▁there",
              "▁a", "▁red", "▁circle", "?", "▁yes", "▁no"]
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert fast.convert_tokens_to_ids("<image>") == 4  # tiny_llava_config's image_token_id
    from saturation.core.tiny import tiny_processor

    return LlavaProcessor(image_processor=tiny_processor([]).image_processor, tokenizer=fast, patch_size=16,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_loglikelihood_scores_the_continuation_as_given_no_extra_space_token():
    """The continuation carries lmms-eval's target_delimiter (' yes'): with SentencePiece, adding another
    space would score two tokens ('▁', '▁yes') instead of '▁yes'."""
    processor = sentencepiece_processor()
    model = make_model(processor, layers=2)
    seen = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"][0]), with_kwargs=True)
    image = [Image.new("RGB", (32, 32), "red")]
    nll, _ = loglikelihood(model, processor, "is there a red circle?", " yes", image)
    prompt_len = len(processor(images=image, text=[llava_prompt("is there a red circle?", 1)])["input_ids"][0])
    scored = seen[-1][prompt_len:].tolist()
    assert processor.tokenizer.convert_ids_to_tokens(scored) == ["▁yes"]
    with torch.no_grad():  # and the value is -log p('▁yes' | prompt) from that same sequence
        logits = model(**processor(images=image, text=[llava_prompt("is there a red circle?", 1) + " yes"],
                                   return_tensors="pt")).logits[0, prompt_len - 1]
    assert nll == pytest.approx(-torch.log_softmax(logits.float(), -1)[scored[0]].item(), rel=1e-5)


def test_batches_group_by_settings_in_order_of_appearance():
    a, b = {"max_new_tokens": 8}, {"max_new_tokens": 1, "until": ["\n"]}
    assert batches_by_settings([a, b, a, a, b], 2) == [[0, 2], [3], [1, 4]]
    assert batches_by_settings([a, dict(a)], 4) == [[0, 1]]  # equal settings share a batch


def test_generate_requests_keeps_request_order_with_mixed_settings(embedded):
    """lmms-eval pairs answers with requests by position: a batch mixing settings must not reorder them."""
    model, processor = embedded
    picked = heldout("colour", 2) + heldout("exist", 2) + heldout("count", 2)
    contexts, images = [q for q, _, _ in picked], [[im] for _, _, im in picked]
    settings = [{"max_new_tokens": 4}, {"max_new_tokens": 4, "until": ["\n"]}] * 3
    got = generate_requests(model, processor, contexts, settings, lambda i: images[i], batch_size=6)
    alone = [generate_batch(model, processor, [c], [im], s)[0] for c, im, s in zip(contexts, images, settings)]
    assert got == alone
    own = [a for t in ("colour", "exist", "count") for a in toolkit_answers(model, processor, t, 2)]
    assert [normalize_answer(a) for a in got] == own  # the toolkit's answers to the same records, in order
    assert len(set(got)) > 2  # three kinds of answers (colour, yes/no, count), so order errors would show


def test_unknown_model_args_are_refused_with_the_accepted_keys():
    with pytest.raises(ToolkitError) as err:
        model_args({"pretrained": "tiny", "routng": "runs/x"}, {})
    message = str(err.value)
    assert "\n" not in message and "routng" in message
    assert all(key in message for key in MODEL_ARGS)
    with pytest.raises(ToolkitError, match="--batch_size"):  # lmms-eval always passes its own batch size too
        model_args({"pretrained": "tiny", "batch_size": 4}, {"batch_size": 1})


def test_device_given_in_model_args_and_on_the_command_line():
    # lmms-eval passes both as keywords of one call: merged once, the same value twice is fine
    assert model_args({"pretrained": "tiny", "device": "cpu"}, {"device": "cpu", "batch_size": "4"}) == {
        "pretrained": "tiny", "device": "cpu", "batch_size": "4"}
    assert model_args({"pretrained": "tiny"}, {"device": "cpu", "max_batch_size": None}) == {
        "pretrained": "tiny", "device": "cpu"}
    with pytest.raises(ToolkitError, match="device given twice"):
        model_args({"device": "cuda"}, {"device": "cpu"})


def test_batch_size_auto_and_bad_values():
    assert batch_size_of("4") == 4 and batch_size_of(1) == 1
    assert batch_size_of("auto") == AUTO_BATCH_SIZE and batch_size_of("auto:4") == AUTO_BATCH_SIZE
    assert batch_size_of("auto", max_batch_size=2) == 2
    for bad in ("0", "big", "-3"):
        with pytest.raises(ToolkitError, match="batch_size"):
            batch_size_of(bad)


def test_generate_and_loglikelihood_agree_on_the_greedy_answer(tiny_model, processor):
    routed = routing.build(tiny_model, 2).eval()
    images = [[Image.new("RGB", (32, 32), c)] for c in ("red", "blue", "green")]
    contexts = ["what colour is the circle?", "is the square blue?", "how many are there?"]
    answers = generate_batch(routed, processor, contexts, images, {"max_new_tokens": 3, "until": ["</s>"]})
    assert len(answers) == 3
    single = generate_batch(routed, processor, contexts[1:2], images[1:2], {"max_new_tokens": 3})
    assert single[0] == answers[1]  # batching and left padding change nothing
    k = next(i for i, a in enumerate(answers) if a)  # random weights: some answer is a non-empty word string
    nll, greedy = loglikelihood(routed, processor, contexts[k], " " + answers[k], images[k])
    assert greedy and nll > 0


def test_lmms_model_class_with_lmms_eval(tiny_model, tiny_model_dir, tmp_path):
    """Only where lmms-eval is installed (its own venv: tools/ci_eval.sh); the CLI itself: test_lmms_cli.py."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    cls = get_model(MODEL_ID)  # resolved through our entry point
    assert issubclass(cls, lmms) and cls.is_simple
    routing.build(tiny_model, 2).save_routing(tmp_path / "routing")
    torch.set_num_threads(2)  # as lmms-eval leaves it: torch's default, every core
    try:
        model = cls.create_from_arg_string(f"pretrained={tiny_model_dir},routing={tmp_path / 'routing'},device=cpu",
                                           {"batch_size": "2", "device": "cpu", "max_batch_size": None})
        assert torch.get_num_threads() == 1  # a tiny model on CPU: one thread, as our CLI (threads spin-wait)
    finally:
        torch.set_num_threads(1)
    assert model.batch_size == 2
    docs = [{"image": Image.new("RGB", (32, 32), c), "q": "what colour is the circle?"} for c in ("red", "blue", "green")]
    model.task_dict = {"shapes": {"test": docs}}

    def visual(doc):
        return [doc["image"]]

    gen = [Instance("generate_until", ("what colour is the circle?", {"max_new_tokens": 3, "until": ["</s>"]}, visual,
                                       i, "shapes", "test"), idx=i, metadata={"task": "shapes", "doc_id": i, "repeats": 1}) for i in range(3)]
    answers = model.generate_until(gen)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    mixed = [Instance("generate_until", (r.args[0], {"max_new_tokens": 1 + i % 2}, *r.args[2:]), idx=i,
                      metadata=r.metadata) for i, r in enumerate(gen)]
    assert model.generate_until(mixed) == [model.generate_until([r])[0] for r in mixed]  # request order
    ll = [Instance("loglikelihood", ("what colour is the circle?", " red", visual, i, "shapes", "test"), idx=i,
                   metadata={"task": "shapes", "doc_id": i, "repeats": 1})
          for i in range(3)]
    scores = model.loglikelihood(ll)
    assert len(scores) == 3 and all(nll > 0 for nll, _ in scores)
    with pytest.raises(ToolkitError, match="accepted: pretrained"):
        cls.create_from_arg_string("pretrained=tiny,routng=x", {"batch_size": 1})


# --- issue 28: refusals in lmms-eval's terms, loud in its log; the multiple-choice work-around in the package ---


@pytest.mark.parametrize("key", ["routing", "pretrained"])
@pytest.mark.parametrize("value", ["", "  ", None])
def test_an_empty_routing_or_pretrained_is_refused(key, value):
    """`routing=$RUN` with $RUN unset ran the vanilla model, silently."""
    with pytest.raises(ToolkitError, match=f"{key}= is empty in --model_args") as err:
        model_args({"pretrained": "tiny", key: value}, {"batch_size": 1})
    assert "\n" not in str(err.value)
    assert model_args({"pretrained": "tiny"}, {})["pretrained"] == "tiny"  # leaving routing= out is vanilla


def test_messages_speak_lmms_evals_language():
    from routing.lmms.plugin import in_lmms_terms
    from saturation.core.loading import _offline_message

    said = in_lmms_terms(_offline_message("no/such-model"))
    assert said.startswith("dpvr_llava: ") and "pretrained=PATH" in said and "--model" not in said
    assert in_lmms_terms("device 'cuda': CUDA is not available on this machine; use --device cpu").endswith(
        "use device=cpu")
    assert "--device-map" in in_lmms_terms("--device-map places every layer")  # not device=-map
    assert in_lmms_terms("dpvr_llava: batch_size must be at least 1") == "dpvr_llava: batch_size must be at least 1"


def test_our_errors_stand_out_in_the_log_and_are_raised_once():
    """lmms-eval prints its own traceback after our error and exits 0: a banner through its logger, logged once
    however many of our entry points the error passes through."""
    from routing.lmms.plugin import loudly

    logged: list[str] = []
    loud = loudly(logged.append)

    @loud
    def inner():
        raise ToolkitError("cannot load 'x': pass that directory with --model PATH")

    @loud
    def outer():
        inner()

    with pytest.raises(ToolkitError) as err:
        outer()
    assert str(err.value) == "dpvr_llava: cannot load 'x': pass that directory with pretrained=PATH"
    assert sum("ERROR" in line for line in logged) == 2 and len(logged) == 4  # one banner: the message, the advice
    assert logged[0] == logged[-1] == "=" * 78 and "results file" in logged[2]
    assert logged[1] == "dpvr_llava ERROR: cannot load 'x': pass that directory with pretrained=PATH"


def test_a_bad_pretrained_through_the_model_class_is_in_lmms_terms(tmp_path):
    """The model class's own path, without lmms-eval: the message that `DPVRLlava.__init__` raises."""
    from routing.lmms.plugin import loudly
    from saturation.core.loading import load_model as load

    logged: list[str] = []
    with pytest.raises(ToolkitError) as err:
        loudly(logged.append)(load)(str(tmp_path / "missing"))
    assert str(err.value).startswith("dpvr_llava: cannot load") and str(err.value).endswith("with pretrained=PATH")
    assert len(logged) == 4 and "--model" not in " ".join(logged)


def test_the_log_names_the_base_and_the_plan(embedded, tmp_path):
    from routing.lmms.plugin import loaded_line

    base, _ = embedded
    assert loaded_line(base, None) == f"dpvr_llava: base {base.name_or_path}, no routing (vanilla)"
    routed = routing.build(base, routing.parse_plan("lf@4+pool:50%", base))
    line = loaded_line(routed, str(tmp_path / "routing"))
    assert line == f"dpvr_llava: base {base.name_or_path}, routing plan lf@4+pool:50% (lf+pool) from {tmp_path}/routing"


def test_a_request_longer_than_the_models_positions_is_refused(embedded):
    model, processor = embedded
    image = heldout(None, 1)[0][2]
    long = " ".join(["what colour is the circle"] * 120)
    with pytest.raises(ToolkitError, match="more than the model's 512 positions"):
        generate_batch(model, processor, [long], [[image]], {"max_new_tokens": 3})
    with pytest.raises(ToolkitError, match="more than the model's 512 positions"):
        loglikelihood(model, processor, long, " red", [image])


def _lmms_0_7_3(name: str = "instance"):
    """A stand-in for lmms-eval 0.7.3's `lmms_eval.api.instance` (its `unwrap_generation_output` rule: a string,
    a (text, meta) pair, anything else through str()) and an evaluator that imported the function by name."""
    import types

    instance = types.ModuleType(name)

    def unwrap_generation_output(output):
        if isinstance(output, str):
            return output, None
        if isinstance(output, tuple | list) and len(output) == 2 and isinstance(output[0], str):
            return output[0], output[1]
        return str(output), None

    instance.unwrap_generation_output = unwrap_generation_output
    evaluator = types.ModuleType("evaluator")
    evaluator.unwrap_generation_output = unwrap_generation_output
    return instance, evaluator


def test_the_multiple_choice_work_around_applies_only_where_lmms_eval_stringifies_pairs():
    from routing.lmms.compat import patch_pair_unwrapping

    instance, evaluator = _lmms_0_7_3()
    assert instance.unwrap_generation_output((1.5, True)) == ("(1.5, True)", None)  # the bug
    assert patch_pair_unwrapping(instance, [evaluator])
    for module in (instance, evaluator):  # the evaluator's by-name import too
        assert module.unwrap_generation_output((1.5, True)) == ((1.5, True), None)
        assert module.unwrap_generation_output("red") == ("red", None)  # generation results as before
        assert module.unwrap_generation_output(("red", {"n": 1})) == ("red", {"n": 1})
    assert not patch_pair_unwrapping(instance, [evaluator])  # once

    fixed, _ = _lmms_0_7_3("fixed")
    original = fixed.unwrap_generation_output
    fixed.unwrap_generation_output = lambda out: (out, None) if not isinstance(out, str) else original(out)
    before = fixed.unwrap_generation_output
    assert not patch_pair_unwrapping(fixed, [])  # a version without the bug is left alone
    assert fixed.unwrap_generation_output is before


def test_the_work_around_ships_in_the_package_not_on_pythonpath():
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    assert not list((repo / "tests").rglob("sitecustomize.py"))
    assert "patch_pair_unwrapping(lmms_eval.api.instance)" in (repo / "routing" / "lmms" / "model.py").read_text()


def test_the_model_class_wiring_without_lmms_eval(monkeypatch, tmp_path):
    """`routing.lmms.model` on stand-ins for lmms-eval 0.7.3 and loguru: importing it patches the buggy unwrap
    (in the evaluator's by-name copy too), a refusal is one banner in the log and a ToolkitError in lmms-eval's
    terms, and a load logs the one line that names the base and the plan."""
    import importlib
    import sys
    import types

    instance, evaluator = _lmms_0_7_3("lmms_eval.api.instance")
    instance.Instance = object
    logged: list[tuple[str, str]] = []
    stubs = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
             "lmms_eval.api.instance": instance, "lmms_eval.api.model": types.ModuleType("lmms_eval.api.model"),
             "lmms_eval.utils": types.ModuleType("lmms_eval.utils"), "lmms_eval.evaluator": evaluator,
             "loguru": types.ModuleType("loguru")}
    stubs["lmms_eval"].api = stubs["lmms_eval.api"]
    stubs["lmms_eval.api"].instance = instance
    stubs["lmms_eval.api.model"].lmms = type("lmms", (), {"__init__": lambda self: None})
    stubs["lmms_eval.utils"].simple_parse_args_string = lambda text: dict(kv.split("=", 1) for kv in text.split(","))
    stubs["loguru"].logger = types.SimpleNamespace(info=lambda m: logged.append(("info", m)),
                                                   error=lambda m: logged.append(("error", m)))
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "routing.lmms.model", raising=False)
    model = importlib.import_module("routing.lmms.model")
    try:
        assert evaluator.unwrap_generation_output((2.0, False)) == ((2.0, False), None)  # patched on import
        assert any("passing them through" in m for _, m in logged)

        logged.clear()
        with pytest.raises(ToolkitError, match="^dpvr_llava: routing= is empty"):
            model.DPVRLlava.create_from_arg_string("pretrained=tiny,routing=", {"batch_size": 1})
        assert [level for level, _ in logged] == ["error"] * 4  # one banner, though two entry points were passed

        logged.clear()
        with pytest.raises(ToolkitError, match="pretrained=PATH"):
            model.DPVRLlava.create_from_arg_string(f"pretrained={tmp_path / 'missing'}", {"batch_size": 1})
        assert len(logged) == 4 and "--model" not in " ".join(m for _, m in logged)

        routing.build(load_model("tiny")[0], 4).save_routing(tmp_path / "routing")
        logged.clear()
        loaded = model.DPVRLlava.create_from_arg_string(f"pretrained=tiny,routing={tmp_path / 'routing'}",
                                                        {"batch_size": 2})
        assert loaded.batch_size == 2
        assert [m for level, m in logged if "dpvr_llava: base " in m] == [
            f"dpvr_llava: base {DATA_SAMPLES / 'tiny-llava'}, routing plan lf@4 (lf) from {tmp_path / 'routing'}"]
    finally:
        sys.modules.pop("routing.lmms.model", None)  # the stand-ins' version must not outlive the test
        vars(sys.modules["routing.lmms"]).pop("model", None)
        torch.set_num_threads(1)
