#!/usr/bin/env bash
# CI job for the lmms-eval plugin, in its own venv (.venv-eval): lmms-eval pulls packages (torchvision, wandb,
# opencv, ...) that the main venv does not want. Runs the real lmms-eval CLI on the local shapes tasks
# (tests/test_lmms_cli.py), the plugin tests that need lmms-eval (tests/test_lmms_plugin.py) and --data lmms:TASK.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-eval
. .venv-eval/bin/activate
# The CPU torch first, and named again beside the extra: otherwise lmms-eval's unpinned torchvision makes pip
# replace it with a CUDA build of a newer torch. So pinned, pip picks torchvision 0.28 (made for torch 2.13) ...
pip install -q torch==2.13.0
pip install -q -e ".[eval,dev]" torch==2.13.0
# ... a CUDA build that cannot load its operators beside the CPU torch ('torchvision::nms does not exist'),
# which breaks transformers' AutoProcessor. Nothing on our path needs it, so it goes.
pip uninstall -y -q torchvision
python -c "import lmms_eval.evaluator, routing.lmms.model"  # a broken install fails here, not as skipped tests
pytest -q -p no:cacheprovider tests/test_lmms_cli.py tests/test_lmms_plugin.py \
  tests/test_sources.py::test_lmms_task_gives_the_llava_json_records  # --data lmms:TASK through a real task
