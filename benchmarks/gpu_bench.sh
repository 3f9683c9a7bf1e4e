#!/usr/bin/env bash
# GPU training and prediction throughput in one bounded run (at most ~8 minutes on one GPU):
#
#     bash benchmarks/gpu_bench.sh                 # CUDA GPU 0
#     DEVICE=cpu bash benchmarks/gpu_bench.sh      # rehearsal on CPU: every step, tiny sizes (~3 minutes)
#
# Prints three markdown tables (train, loader, predict; format in benchmarks/README.md, "GPU
# benchmark") and ends with "gpu_bench done". Rows past the time budget print "skipped: budget".
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import buildseg" 2>/dev/null; then
  "$PY" -m pip install --quiet -e . || { echo "FAIL cannot install buildseg with $PY"; exit 1; }
fi
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  ARGS=(--device cpu --models efficientnet_lite0 --batches 4 --size 64 --steps 2 --loop-minutes 0.2
        --n-test 64 --test-size 64 --predict-batch 16 --budget "${BUDGET:-300}")
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "FAIL no CUDA GPU visible"; exit 1; }
  ARGS=(--device "$DEVICE" --budget "${BUDGET:-420}")
fi
exec timeout --signal=INT 480 "$PY" benchmarks/gpu_bench.py "${ARGS[@]}" "$@"
