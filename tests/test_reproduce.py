"""`routing reproduce` end to end with a very small budget (random tiny model: the numbers are not the point)."""

import json
import re
from pathlib import Path

import pandas as pd
import torch
from typer.testing import CliRunner

from cli import routing_app
from routing.jobs.reproduce import (
    Context,
    ReproduceConfig,
    answer_budget,
    evaluated,
    report,
    run_reproduce,
    sweep_splits,
)
from saturation.core.data import read_records

runner = CliRunner()


def _named_files(text: str) -> list[str]:
    """Every figure or table file a report names (in back-ticks)."""
    return re.findall(r"`([\w./-]+\.(?:png|pdf|csv|json))`", text)


def test_sweep_splits_are_clipped():
    assert sweep_splits(2, 2, 6) == [1, 2, 3, 4]
    assert sweep_splits(9, 1, 12) == [8, 9, 10]
    assert sweep_splits(3, None, 6) == [1, 2, 3, 4]


def test_reproduce_end_to_end_and_resume(tiny_model_dir, dataset, tmp_path):
    cfg = ReproduceConfig(model=str(tiny_model_dir), out=tmp_path / "rep", max_steps=2, probe_n=6, probe_data=dataset,
                          train_data=dataset, eval_data=dataset, n_eval=6, sweep_radius=1, device="cpu")
    result = runner.invoke(routing_app, ["reproduce", "--model", str(tiny_model_dir), "--out", str(cfg.out),
                                         "--max-steps", "2", "--probe-n", "6", "--n-eval", "6", "--sweep-radius", "1",
                                         "--probe-data", str(dataset), "--train-data", str(dataset), "--eval-data",
                                         str(dataset), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for figure in ("split_sweep", "fusion_sweep", "loss_curves", "probe/figure2"):
        assert (cfg.out / f"{figure}.png").is_file() and (cfg.out / f"{figure}.pdf").is_file()
    named = _named_files((cfg.out / "report.md").read_text())  # the command's report names what it drew
    assert {"split_sweep.png", "fusion_sweep.pdf", "loss_curves.png", "probe/figure2.png"} <= set(named)
    first = run_reproduce(cfg, log=lambda _: None)  # resumes: reads everything back
    table = pd.read_csv(tmp_path / "rep" / "table.csv")
    assert list(table.columns) == ["variant", "accuracy", "flops_ratio", "trainable_params", "split"]
    assert list(table["variant"]) == ["vanilla", "pc", "lf", "lf-ideal"]
    ratio = table.set_index("variant")["flops_ratio"]
    assert ratio["vanilla"] == 1.0 and ratio["lf-ideal"] < ratio["lf"] < 1.0 <= ratio["pc"]
    grads = json.loads((tmp_path / "rep" / "gradient_check.json").read_text())
    assert grads["lf-ideal"] == 0.0 and grads["lf"] > 0.0
    split = first["facts"]["split"]
    assert list(first["tables"]["split_sweep"]["split"]) == sweep_splits(split, 1, 6)
    assert list(first["tables"]["fusion_sweep"]["fusion_layers"]) == [1, 2]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "LF-ideal cannot be trained* (zero side-branch gradient): **holds**" in text

    stamp = (tmp_path / "rep" / "train" / f"lf-s{split}-k1" / "train_summary.json").stat().st_mtime
    again = run_reproduce(cfg, log=lambda _: None)  # everything is on disk: nothing is retrained
    assert (tmp_path / "rep" / "train" / f"lf-s{split}-k1" / "train_summary.json").stat().st_mtime == stamp
    assert again["tables"]["table"].equals(first["tables"]["table"])
    assert all((cfg.out / f).is_file() for f in _named_files((cfg.out / "report.md").read_text()))

    # each row of the best-split table carries its own run's trainable parameters, not the first variant's
    best = again["facts"]["best_split"]
    pc_summary = cfg.out / "train" / f"pc-s{best}-k1" / "train_summary.json"
    pc_summary.write_text(json.dumps({**json.loads(pc_summary.read_text()), "trainable_params": 123}))
    lf_params = json.loads((cfg.out / "train" / f"lf-s{best}-k1" / "train_summary.json").read_text())["trainable_params"]
    rows = run_reproduce(cfg, log=lambda _: None)["tables"]["best_split"].set_index("variant")["trainable_params"]
    assert (rows["pc"], rows["lf"]) == (123, lf_params)

    # issue 28: a rerun with other options is refused in one line naming each (it once reused results of the old
    # ones and wrote a report of work it did not do); --no-resume redoes only the parts those options change
    args = ["reproduce", "--model", str(tiny_model_dir), "--out", str(cfg.out), "--max-steps", "2", "--probe-n", "6",
            "--sweep-radius", "1", "--probe-data", str(dataset), "--train-data", str(dataset), "--eval-data",
            str(dataset), "--device", "cpu"]
    refused = runner.invoke(routing_app, [*args, "--n-eval", "4"])
    assert refused.exit_code == 1 and "--n-eval 6 (now 4)" in refused.output and "--no-resume" in refused.output
    assert (cfg.out / "report.md").is_file()  # refused: the finished run is kept
    fresh = runner.invoke(routing_app, [*args, "--n-eval", "4", "--no-resume"])
    assert fresh.exit_code == 0, fresh.output
    assert json.loads((cfg.out / "eval" / "vanilla.json").read_text())["n"] == 4
    assert "4 held-out questions" in (cfg.out / "report.md").read_text()
    assert (cfg.out / "train" / f"lf-s{split}-k1" / "train_summary.json").stat().st_mtime == stamp  # same training


def test_report_states_a_failed_claim_plainly():
    table = pd.DataFrame({"variant": ["vanilla", "pc", "lf", "lf-ideal"], "accuracy": [0.9, 0.85, 0.5, 0.3],
                          "flops_ratio": [1.0, 1.02, 0.7, 0.6], "trainable_params": [0, 5, 5, 5], "split": [6] * 4})
    facts = {"model": "m", "split": 6, "num_layers": 12, "recommendation": {"rule": "paper", "evidence": {}},
             "max_steps": 10, "n_eval": 100, "image_tokens": 9, "text_tokens": 14,
             "gradients": {"lf-ideal": 0.0, "lf": 1.0}}
    sweeps = {"split_sweep": pd.DataFrame({"split": [5, 6], "accuracy": [0.5, 0.6], "flops_ratio": [0.6, 0.7]}),
              "fusion_sweep": pd.DataFrame({"fusion_layers": [1, 2], "accuracy": [0.5, 0.7], "flops_ratio": [0.7, 0.8]})}
    sweeps["best_split"] = table[table["variant"].isin(["pc", "lf"])]
    text = report({"table": table, **sweeps}, facts)
    assert "near vanilla at lower cost* (LF ≥ vanilla − 0.05 with FLOPs ratio < 1): **does not hold**" in text
    assert "One fusion layer is enough* (K=2 gains ≤ 0.02 over K=1, at s=6): **does not hold**" in text
    assert "No split in the sweep brings LF within 0.05 of vanilla" in text
    sweeps["split_sweep"].loc[1, "accuracy"] = 0.88
    assert "cheapest split with LF ≥ vanilla − 0.05 is s=6 (accuracy 0.880 at 0.700× FLOPs)" in report(
        {"table": table, **sweeps}, facts)
    assert "matches the gradient-rich baseline PC* (within 0.02, at s=6): **does not hold**" in text


def test_library_report_names_no_figure_it_did_not_draw():
    """`routing` draws nothing (it must not import `figures`): its report names only the figures it is given."""
    table = pd.DataFrame({"variant": ["vanilla", "pc", "lf", "lf-ideal"], "accuracy": [0.9, 0.9, 0.9, 0.3],
                          "flops_ratio": [1.0, 1.02, 0.7, 0.6], "trainable_params": [0, 5, 5, 5], "split": [6] * 4})
    facts = {"model": "m", "split": 6, "num_layers": 12, "recommendation": {"rule": "paper", "evidence": {}},
             "max_steps": 10, "n_eval": 100, "image_tokens": 9, "text_tokens": 14, "max_new_tokens": 7,
             "gradients": {"lf-ideal": 0.0, "lf": 1.0}}
    tables = {"table": table, "best_split": table[table["variant"].isin(["pc", "lf"])],
              "split_sweep": pd.DataFrame({"split": [6], "accuracy": [0.9], "flops_ratio": [0.7]}),
              "fusion_sweep": pd.DataFrame({"fusion_layers": [1], "accuracy": [0.9], "flops_ratio": [0.7]})}
    bare = report(tables, facts)
    assert not [f for f in _named_files(bare) if f.endswith((".png", ".pdf"))], bare
    assert "answers of up to 7 tokens" in bare
    assert "`split_sweep.png`" in report(tables, facts, ["split_sweep.png"])


def test_answer_budget_is_the_longest_answer_and_its_eos(processor, tmp_path):
    records = read_records(_long_answer_data(tmp_path))
    assert answer_budget(records, processor.tokenizer) == 7  # "left red circle a blue square" + </s>


class _Oracle:
    """A stand-in model whose greedy answer is the record's gold answer, then </s>: only the budget can fail it."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, records, tokenizer):
        self.tokenizer = tokenizer
        text = lambda s: tokenizer.decode(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        self.answers = {text(r.turns[0][0]): tokenizer(f" {r.turns[0][1]}{tokenizer.eos_token}",
                                                       add_special_tokens=False)["input_ids"] for r in records}

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            answer = next(a for q, a in self.answers.items() if q in prompt)[:max_new_tokens]
            rows.append(answer + [self.tokenizer.pad_token_id] * (max_new_tokens - len(answer)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_answers_longer_than_four_tokens_can_be_right(processor, tmp_path):
    """The evaluation budget comes from the answers (it was a fixed 4 tokens: a 6-word answer was always wrong)."""
    records = read_records(_long_answer_data(tmp_path))
    cfg = ReproduceConfig(out=tmp_path / "rep")
    ctx = Context(cfg, None, processor, records, [], 0.0, 0.0, lambda _: None,
                  answer_budget(records, processor.tokenizer))
    result = evaluated(ctx, _Oracle(records, processor.tokenizer), "oracle")
    assert result["accuracy"] == 1.0 and result["max_new_tokens"] == 7
    assert json.loads((tmp_path / "rep" / "eval" / "oracle.json").read_text())["accuracy"] == 1.0


def _long_answer_data(folder: Path) -> Path:
    """Two records: a one-word answer and a six-word one (every word is in the tiny tokenizer's vocabulary)."""
    from conftest import write_dataset

    path = write_dataset(folder / "long", n=2)
    raw = json.loads(path.read_text())
    raw[0]["conversations"][1]["value"] = "red"
    raw[1]["conversations"][0]["value"] = "<image>\nwhat shape is there?"
    raw[1]["conversations"][1]["value"] = "left red circle a blue square"
    path.write_text(json.dumps(raw))
    return path


def test_answer_budget_option_below_one_is_one_line(tmp_path):
    result = runner.invoke(routing_app, ["reproduce", "--out", str(tmp_path / "rep"), "--max-new-tokens", "0"])
    assert result.exit_code == 1
    assert "--max-new-tokens must be at least 1" in result.output and not (tmp_path / "rep").exists()
