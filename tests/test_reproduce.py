"""`routing reproduce` end to end with a very small budget (random tiny model: the numbers are not the point)."""

import json

import pandas as pd
from typer.testing import CliRunner

from cli import routing_app
from routing.reproduce import ReproduceConfig, report, run_reproduce, sweep_splits

runner = CliRunner()


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
