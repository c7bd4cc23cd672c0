#!/usr/bin/env bash
# The GPU checks, as one short script for a lent CUDA machine (CI has no GPU; see docs/RESULTS.md, "On a GPU").
#   1. tests/test_cuda.py: device/dtype flow, bf16 training with fp32 master weights, probe CPU == GPU, bench.
#   2. routing bench on random llava-1.5-7b weights in bf16 (no download): prefill/decode ratios, peak memory,
#      one training step LF vs PC.
#   3. the probe's cost on the same geometry: probe/forward and peak CUDA memory at n=16 and n=64.
#   4. the CLI end to end on CUDA with the embedded model: train (bf16) -> eval -> analyze -> generate.
#   5. --compile (issue 18): routing bench on the same 7B geometry, compiled vanilla vs compiled LF at batch 1;
#      the targets: prefill LF <= FLOP ratio + 0.05, decode ms/token <= 0.5x eager vanilla's (from part 2).
# Run from the repository root; results go to $OUT (default runs/gpu-check). Where the machine's transformers is
# older than ours, put a wheel in .whl/ (`pip download --no-deps -d .whl transformers==X`): it goes to /tmp/site first.
# Knobs: PARTS (default "tests bench probe cli compile"; each part fits one 10-minute call alone), BATCH (1), TEXT_TOKENS (64,256,1024), REPEATS (11), OUT.
set -uo pipefail
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
routing() { python3 -c "import sys; from cli import routing_app; sys.argv[0] = 'routing'; routing_app()" "$@"; }

PARTS=${PARTS:-tests bench probe cli compile}
if [[ $PARTS == *tests* ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device_map.py 2>&1 | tee "$OUT/test_cuda.log"
  echo "tests exit ${PIPESTATUS[0]}" | tee -a "$OUT/test_cuda.log"
fi
if [[ $PARTS == *bench* ]]; then
  routing bench --geometry llava-1.5-7b --split 18 --dtype bfloat16 --variants lf,pc,kv \
    --text-tokens ${TEXT_TOKENS:-64,256,1024} --batch-size ${BATCH:-1} --repeats ${REPEATS:-11} --train \
    --json "$OUT/bench-7b.json" 2>&1 | tee "$OUT/bench-7b.log"
fi
if [[ $PARTS == *probe* ]]; then
  python3 -m saturation.benchmark --geometry llava-1.5-7b --dtype bfloat16 --device cuda --n 32 --batch-size 8 \
    --repeats 3 --memory-n 16,64 --lens-positions 64 2>&1 | tee "$OUT/probe-7b.log"
fi
if [[ $PARTS == *cli* ]]; then
  W=runs/gpu-cli
  rm -rf "$W"
  {
    routing train --model tiny --split 4 --max-steps 40 --n-train 64 --save-steps 100 --lr 3e-4 --out "$W/train" --device cuda \
    && routing eval --n 128 --device cuda --json "$OUT/eval-vanilla.json" \
    && routing eval --routing "$W/train/routing" --n 128 --device cuda --json "$OUT/eval-lf.json" \
    && routing analyze --routing "$W/train/routing" --n 32 --out "$W/analysis" --device cuda \
    && routing generate --routing "$W/train/routing" --image data_samples/shapes/images/heldout_00000.png \
         --image data_samples/shapes/images/heldout_00001.png --prompt "what colour is the circle?" --device cuda
  } 2>&1 | tee "$OUT/cli.log"
  echo "cli exit ${PIPESTATUS[0]}" | tee -a "$OUT/cli.log"
fi
if [[ $PARTS == *compile* ]]; then
  routing bench --geometry llava-1.5-7b --split 18 --dtype bfloat16 --variants lf --text-tokens 64,1024 \
    --batch-size 1 --repeats ${REPEATS:-11} --compile --json "$OUT/bench-7b-compiled.json" 2>&1 | tee "$OUT/bench-7b-compiled.log"
fi
