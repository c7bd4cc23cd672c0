"""The benchmark runs end to end on a toy shape (speed itself is measured by `python -m routing.benchmark`)."""

from __future__ import annotations

from routing.benchmark import BenchConfig, format_report, main, run_benchmark


def test_benchmark_runs_on_a_toy_shape(capsys):
    cfg = BenchConfig(hidden=32, layers=4, heads=2, intermediate=64, vocab=64, image_tokens=4, text_tokens=6,
                      split=1, batch=2, new_tokens=3, repeats=1, warmup=0)
    result = run_benchmark(cfg)
    assert set(result["ratio"]) == {"lm", "e2e", "generate", "decode_step", "train_step"}
    assert result["samples"]["generate"] == 2 and result["samples"]["decode_step"] == 3
    assert 0 < result["flop_ratio"]["prefill"] < 1
    assert "prefill LM" in format_report(result)
    main(["--hidden", "32", "--layers", "4", "--heads", "2", "--intermediate", "64", "--vocab", "64",
          "--image-tokens", "4", "--text-tokens", "6", "--split", "1", "--batch", "2", "--new-tokens", "3",
          "--repeats", "1", "--warmup", "0", "--json"])
    assert '"decode_step"' in capsys.readouterr().out
