"""`routing eval`: exact-match scoring per question type, and the command's outputs."""

import json

import torch
from typer.testing import CliRunner

from cli import routing_app
from routing.jobs.evaluate import evaluate
from saturation.core.data import read_records

runner = CliRunner()


class Parrot:
    """Answers "red" to every prompt (as generated token ids), so the expected accuracy is known exactly."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, processor):
        self.red = processor.tokenizer.convert_tokens_to_ids("red")

    def generate(self, input_ids, max_new_tokens, do_sample, **kw):
        answer = torch.full((input_ids.shape[0], 1), self.red)
        return torch.cat([input_ids, answer], dim=1)


def test_scores_by_question_type(dataset, processor):
    records = read_records(dataset)  # colours cycle red, blue, green
    result, table = evaluate(Parrot(processor), processor, records, batch_size=5)
    assert result == {"accuracy": 4 / 12, "by_type": {"colour": 4 / 12}, "n": 12}
    assert table["correct"].sum() == 4 and set(table["prediction"]) == {"red"}


def test_eval_command_writes_json_and_csv(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(routing_app, ["eval", "--model", str(tiny_model_dir), "--data", str(dataset), "--n", "6",
                                         "--json", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["n"] == 6 and 0 <= saved["accuracy"] <= 1 and set(saved["by_type"]) == {"colour"}
    assert len(out.with_suffix(".csv").read_text().splitlines()) == 7


def test_eval_command_bad_data_is_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    result = runner.invoke(routing_app, ["eval", "--model", str(tiny_model_dir), "--data", str(bad)])
    assert result.exit_code == 1 and "malformed JSON" in result.output


def test_generate_command_answers_each_image(tiny_model_dir, dataset):
    images = sorted((dataset.parent / "images").glob("*.png"))[:2]
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "what colour is the circle?",
            "--max-new-tokens", "2", "--device", "cpu"]
    result = runner.invoke(routing_app, [*args, *(x for p in images for x in ("--image", str(p)))],
                           env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert all(f"{p}: " in result.output for p in images)  # one answer line per image


def test_generate_command_missing_image(tiny_model_dir, tmp_path):
    result = runner.invoke(routing_app, ["generate", "--model", str(tiny_model_dir), "--prompt", "what?",
                                         "--image", str(tmp_path / "nope.png")])
    assert result.exit_code == 1 and "image file not found" in result.output
