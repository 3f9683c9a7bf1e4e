#!/usr/bin/env bash
# GPU check in one command: NCCL collectives, --sync-bn, timed checkpoints and sharded
# prediction, each verified and printed. Run on a machine with 1+ CUDA GPUs:
#
#     bash benchmarks/gpu_check.sh            # NPROC=N to use N GPUs (default: all visible)
#
# It makes a small synthetic dataset, trains under `torchrun --nproc_per_node=N` with the
# NCCL backend (a world of one still sends every collective through NCCL) and --sync-bn,
# resumes from the timed last.pt, then predicts the test tiles once in one process and
# once sharded over N ranks (each on its LOCAL_RANK GPU) and compares the CSVs byte for
# byte. The expected output (every line starts with "ok") is in benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import buildseg" 2>/dev/null; then
  "$PY" -m pip install --quiet -e . || { echo "FAIL cannot install buildseg with $PY"; exit 1; }
fi
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu rehearses the same steps with gloo (no --sync-bn) on a machine without a GPU
if [ "$DEVICE" = cpu ]; then
  NPROC=${NPROC:-2}; SYNC_BN=(); BACKEND=gloo
else
  NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
  [ "$NPROC" -ge 1 ] || { echo "FAIL no CUDA GPU visible"; exit 1; }
  SYNC_BN=(--sync-bn); BACKEND=NCCL
fi
WORK=${WORK:-$(mktemp -d)}
echo "== gpu_check: $NPROC process(es) on $DEVICE, work in $WORK"
"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    print("   no CUDA: rehearsal on CPU with gloo")
for i in range(torch.cuda.device_count()):
    print(f"   cuda:{i} {torch.cuda.get_device_name(i)}")
if torch.cuda.is_available():
    print(f"   torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PY
"$PY" -m buildseg synth --out "$WORK/data" --n-train 8 --train-size 512 --n-test 64 --test-size 224 >/dev/null 2>&1

RUN="$WORK/run"
TRAIN=(-m buildseg train --data "$WORK/data/train.csv" --out "$RUN" --device "$DEVICE" "${SYNC_BN[@]}"
       --encoder efficientnet_lite0 --weights none --epochs 2 --batch-size 8 --crop-size 224
       --save-every 0.05 --no-progress --no-tensorboard)
start=$(date +%s)
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "${TRAIN[@]}" >"$WORK/train.log" 2>&1 \
  || { tail -30 "$WORK/train.log"; echo "FAIL training under torchrun/NCCL"; exit 1; }
echo "ok   trained 2 epochs under torchrun ($BACKEND${SYNC_BN:+, --sync-bn}) in $(( $(date +%s) - start )) s"

"$PY" - "$RUN" "$NPROC" "$BACKEND" <<'PY'
import json, sys, torch
from pathlib import Path
run, nproc, backend = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
events = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
checks = [e for e in events if e["kind"] == "ddp_check"]
assert checks and len(checks[0]["weight_checksums"]) == nproc, checks
sums = checks[0]["weight_checksums"]
assert max(sums) == min(sums), sums
print(f"ok   all {nproc} rank(s) hold identical weights after all-gather over {backend} (checksum {sums[0]:.6f})")
epochs = [e for e in events if e["kind"] == "epoch"]
print(f"ok   validation counts all-reduced over {backend}: val Dice {epochs[-1]['val_dice']:.4f}")
print(f"ok   training step rate {epochs[-1]['train_img_s']:.0f} img/s (all ranks) with the decoded-image store, "
      f"{100 * epochs[-1].get('data_wait', float('nan')):.0f}% of the time waiting for data")
payload = torch.load(run / "last.pt", weights_only=True)
keys = [k for k in payload["model"] if k.endswith("running_mean")]
assert keys, "no batch-norm statistics in last.pt"
print(f"ok   the checkpoint holds a plain model state ({len(keys)} batch-norm layers, epoch {payload['epoch']})")
PY

"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "${TRAIN[@]}" \
  --resume "$RUN" --epochs 3 >"$WORK/resume.log" 2>&1 || { tail -30 "$WORK/resume.log"; echo "FAIL resume"; exit 1; }
"$PY" -c "import torch,sys; p=torch.load(sys.argv[1]+'/last.pt',weights_only=True); assert p['epoch']==3, p['epoch']; print('ok   --resume continued the run to epoch', p['epoch'])" "$RUN"

PRED=(-m buildseg predict --checkpoint "$RUN/best.pt" --data "$WORK/data/test.csv" --device "$DEVICE" --no-progress --num-workers 2)
"$PY" "${PRED[@]}" --out "$WORK/one.csv" >/dev/null 2>"$WORK/one.log" || { cat "$WORK/one.log"; echo "FAIL predict"; exit 1; }
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "${PRED[@]}" --out "$WORK/sharded.csv" \
  >"$WORK/sharded.log" 2>&1 || { tail -30 "$WORK/sharded.log"; echo "FAIL sharded predict"; exit 1; }
cmp -s "$WORK/one.csv" "$WORK/sharded.csv" || { echo "FAIL sharded CSV differs from the single-process CSV"; exit 1; }
echo "ok   sharded prediction over $NPROC rank(s) (one $DEVICE device each) equals single-process prediction ($(($(wc -l <"$WORK/one.csv") - 1)) tiles)"
if grep -q "No backend type associated with device type cpu" "$WORK"/*.log; then
  echo "FAIL a collective ran on a CPU tensor"; exit 1
fi
echo "ok   no collective on a CPU tensor"
echo "== gpu_check passed"
