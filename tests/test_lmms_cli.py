"""The real lmms-eval CLI on our plugin, as users run it: local shapes tasks (tests/lmms_tasks/), the embedded
model, vanilla and routed, scored against ``routing eval`` on the same records.

Runs only where lmms-eval is installed (its own venv: tools/ci_eval.sh). lmms-eval runs from a folder of its own,
with no PYTHONPATH: the plugin itself works around lmms-eval 0.7.3 turning every loglikelihood result into a
string (routing.lmms.compat; without it every multiple-choice task fails, for every model). lmms-eval 0.7.3 exits
0 even when the evaluation failed, so every check reads the results JSON, never just the exit code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saturation.core.loading import DATA_SAMPLES

pytest.importorskip("lmms_eval")

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "lmms_tasks"
_spec = importlib.util.spec_from_file_location("lmms_shapes_tasks", TASKS / "utils.py")
_tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tasks)
N_DOCS = _tasks.N_DOCS  # the tasks' own hooks: the same record selection

BIN = Path(sys.executable).parent


def env(tmp_path: Path) -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {  # the installed package, nothing else
        "HF_HOME": str(tmp_path / "hf"),  # datasets' cache of the local JSON stays out of ~/.cache
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }


def lmms_eval(tmp_path: Path, model_args: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "lmms-eval"), "--model", "dpvr_llava", "--model_args", model_args,
           "--tasks", "shapes_gen,shapes_mc", "--include_path", str(TASKS), "--batch_size", "16",
           "--log_samples", "--output_path", str(out), *extra]
    elsewhere = tmp_path / "elsewhere"  # not the repository: nothing of tests/ is found by a relative path; only
    if not elsewhere.exists():  # the tasks' data (their data_files is relative) is linked in
        elsewhere.mkdir()
        (elsewhere / "data_samples").symlink_to(REPO / "data_samples")
    return subprocess.run(cmd, cwd=elsewhere, env=env(tmp_path), capture_output=True, text=True, timeout=300)


def results(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    """(results JSON's scores per task, per-sample rows per task) of one lmms-eval run."""
    files = sorted(out.rglob("*_results.json"))
    assert len(files) == 1, f"lmms-eval wrote no results JSON under {out}"
    samples = {task: [json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
               for task in ("shapes_gen", "shapes_mc")}
    return json.loads(files[0].read_text())["results"], samples


def records(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """A LLaVA JSON for ``routing eval``: the generation task's records first (so that its batches of 16 are
    the same as lmms-eval's), then the multiple-choice task's existence records not already among them."""
    raw = json.loads((DATA_SAMPLES / "shapes" / "heldout.json").read_text())
    gen = raw[:N_DOCS]
    mc = [r for r in raw if r["question_type"] == "exist"][:N_DOCS]
    chosen = gen + [r for r in mc if r not in gen]
    (tmp_path / "data" / "images").mkdir(parents=True)
    for r in chosen:
        shutil.copy(DATA_SAMPLES / "shapes" / r["image"], tmp_path / "data" / r["image"])
    path = tmp_path / "data" / "records.json"
    path.write_text(json.dumps(chosen))
    return path, [r["id"] for r in gen], [r["id"] for r in mc]


def routing_eval(tmp_path: Path, data: Path, name: str, *routing: str) -> dict[str, dict]:
    """Per-record rows of ``routing eval``'s per-sample CSV, by record id."""
    import pandas as pd

    out = tmp_path / f"{name}.json"
    done = subprocess.run([str(BIN / "routing"), "eval", "--model", "tiny", *routing, "--data", str(data),
                           "--batch-size", "16", "--json", str(out)], cwd=REPO, env=env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {row["id"]: row for row in pd.read_csv(out.with_suffix(".csv"), keep_default_na=False).to_dict("records")}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """An untrained LF routing at s=1 of the embedded model (image tokens leave after layer 0): much weaker than
    vanilla, so the scores compared below differ from vanilla's."""
    import routing
    from saturation.core.loading import load_model

    model, _ = load_model("tiny")
    out = tmp_path_factory.mktemp("routing") / "routing"
    routing.build(model, 1).save_routing(out)
    return out


@pytest.mark.parametrize("routed", [False, True], ids=["vanilla", "routed"])
def test_lmms_eval_cli_matches_routing_eval(tmp_path, artifact, routed):
    model_args = "pretrained=tiny" + (f",routing={artifact}" if routed else "")
    done = lmms_eval(tmp_path, model_args, tmp_path / "lmms")
    scores, samples = results(tmp_path / "lmms")
    said = done.stdout + done.stderr
    loaded = {line[line.index("dpvr_llava: base "):] for line in said.splitlines() if "dpvr_llava: base " in line}
    assert len(loaded) == 1, said[-3000:]  # one line names what was loaded (the same line on every log sink)
    assert (f"routing plan lf@1 (lf) from {artifact}" if routed else "no routing (vanilla)") in loaded.pop()
    data, gen_ids, mc_ids = records(tmp_path)
    ours = routing_eval(tmp_path, data, "eval", *(["--routing", str(artifact)] if routed else []))

    # generation: the same answers, record by record, hence the same score
    assert [s["doc_id"] for s in samples["shapes_gen"]] == list(range(N_DOCS)), done.stdout[-2000:]
    predicted = [ours[i]["prediction"] for i in gen_ids]
    assert [s["filtered_resps"].strip().lower() for s in samples["shapes_gen"]] == predicted
    expected = sum(ours[i]["correct"] for i in gen_ids) / N_DOCS
    assert scores["shapes_gen"]["shapes_exact_match,none"] == pytest.approx(expected)

    # multiple choice by loglikelihood (argmin of the NLL): a yes/no answer that greedy generation gets right
    # is the most likely first token, so it is also the smaller loss; inverted scores would fall far below.
    # No accuracy constant: the model is compared with its own answers, so retrained weights change nothing here.
    mc = scores["shapes_mc"]["acc,none"]
    by_generation = sum(ours[i]["correct"] for i in mc_ids) / N_DOCS
    assert mc >= by_generation
    if not routed:
        assert by_generation > 0.5  # better than chance at yes/no, so inverted scores (about 1 - this) fall below
    else:  # the untrained routing really changed the model: some answer differs from vanilla's (`routing eval`'s
        # settings)
        from saturation.core.answers import answers
        from saturation.core.data import read_records
        from saturation.core.loading import load_model

        by_id = {r.id: r for r in read_records(data)}
        vanilla = answers(*load_model("tiny"), [by_id[i] for i in gen_ids], batch_size=16, max_new_tokens=8)
        assert predicted != vanilla, predicted


REFUSED = {  # --model_args -> what the one banner says, in lmms-eval's terms
    "unknown key": ("pretrained=tiny,routng=runs/x", "unknown --model_args key(s) routng; accepted: pretrained, routing"),
    "empty routing": ("pretrained=tiny,routing=", "routing= is empty in --model_args"),  # ran vanilla before
    "bad pretrained": ("pretrained=no-such/checkpoint-dir", "pretrained=PATH"),  # said --model PATH before
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_lmms_eval_cli_refusals_stand_out_and_leave_no_results(tmp_path, case):
    args, needle = REFUSED[case]
    done = lmms_eval(tmp_path, args, tmp_path / "lmms")
    said = done.stdout + done.stderr
    ours = [line for line in said.splitlines() if "dpvr_llava ERROR: " in line]
    assert ours and needle in ours[0] and "results file" in ours[1], said[-3000:]  # the banner, before the
    assert len(ours) == 2 * said.count("nothing was evaluated")  # traceback: once per log sink, not per entry point
    assert "--model PATH" not in said
    assert not list((tmp_path / "lmms").rglob("*_results.json"))  # no scores of an unintended run
