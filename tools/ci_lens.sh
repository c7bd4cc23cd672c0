#!/usr/bin/env bash
# CI for the optional `lens` extra (transformer-lens): the TransformerLens probe backend test must RUN somewhere.
# Everywhere else it is skipped by `pytest.importorskip("transformer_lens")`, so here a skip is a failure.
#   1. a venv of its own (.venv-lens), CPU torch first, then the package with the `lens` and `dev` extras;
#   2. installing the extra must not replace that torch, nor bring torchvision (transformer-lens' bridge pip-installs
#      torchvision at run time when it cannot load a processor; the default path never reaches it);
#   3. the tests that need transformer_lens, with any skip treated as a failure; torchvision still absent after.
# Run from anywhere: bash tools/ci_lens.sh  (set LENS_VENV to reuse another folder).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LENS_VENV:-.venv-lens}
TESTS=(tests/test_probe.py::test_transformer_lens_backend_agrees)  # every test that importorskips transformer_lens

torch_build() { python -c "import torch; print(torch.__version__, torch.version.cuda)"; }
no_torchvision() {
  if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
    echo "error: torchvision is installed in $VENV ($1)" >&2
    exit 1
  fi
}

python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q torch==2.13.0
before=$(torch_build)
pip install -q -e ".[lens,dev]"
after=$(torch_build)
if [[ "$before" != "$after" ]]; then
  echo "error: installing the lens extra replaced torch ($before -> $after)" >&2
  exit 1
fi
no_torchvision "after installing the lens extra"
python -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('transformer-lens', 'transformers', 'torch')))"

log=$(mktemp)
status=0
pytest -q -rs -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$log" || status=$?
if grep -qiE "skipped|no tests ran|deselected" "$log"; then
  echo "error: a transformer_lens test did not run (skipped or not collected)" >&2
  exit 1
fi
no_torchvision "after the tests: the bridge installed it at run time"
exit "$status"
