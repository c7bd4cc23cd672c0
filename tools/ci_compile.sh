#!/usr/bin/env bash
# CI for --compile with real kernels: tests/test_compile.py under inductor (AOT autograd and the generated C++
# kernels, so a C++ compiler must be present). The main suite runs the same tests with the eager backend (dynamo's
# graph capture, guards and recompiles only), because inductor takes about 4 minutes on 2 CPU cores.
# Run from anywhere: bash tools/ci_compile.sh  (in the project's venv).
set -euo pipefail
cd "$(dirname "$0")/.."
pytest -q -p no:cacheprovider tests/test_compile.py --compile-backend inductor
# routing bench --compile end to end under inductor (about a minute): compiled vanilla and LF, the JSON says so
out=$(mktemp -d)
routing bench --geometry tiny --layers 3 --text-tokens 8 --variants lf --repeats 2 --warmup 0 --new-tokens 3 \
  --compile --json "$out/bench.json"
python -c "import json, sys; r = json.load(open(sys.argv[1])); assert r['compiled'] and r['compile_s'], r" "$out/bench.json"
rm -rf "$out"
