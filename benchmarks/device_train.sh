#!/usr/bin/env bash
# Training throughput on the GPU machine (package already built/installed by the lead's script).
#   1. synthetic ImageNet-layout folder of random 224px JPEGs on local disk
#   2. a randomly initialised regnety_160 teacher saved to a local file
#   3. one-GPU run: groupmamba_tiny, batch 128, bf16, hard distillation, 8 workers, --max-steps; then the same
#      run with --cuda-graph (GRAPH_RUN=0 skips it)
#   4. two-GPU DDP run via torchrun (if 2 GPUs are visible)
# Logs are tee'd to $OUT (default ./device_out). Knobs: STEPS (default 300), CLASSES (100), PER_CLASS (40),
# BATCH (128), WORKERS (8), MODEL (groupmamba_tiny), WORK (scratch dir, default /tmp/gm_train).
set -u -o pipefail
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=${STEPS:-300}
CLASSES=${CLASSES:-100}
PER_CLASS=${PER_CLASS:-40}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-8}
MODEL=${MODEL:-groupmamba_tiny}
WORK=${WORK:-/tmp/gm_train}
status=0
cd /tmp  # import the installed package, not the source tree

echo "== env" | tee "$OUT/train_env.log"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee -a "$OUT/train_env.log"
$PY -c "import torch, timm, groupmamba; print('torch', torch.__version__, 'timm', timm.__version__, 'gpus', torch.cuda.device_count())" 2>&1 | tee -a "$OUT/train_env.log"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")

echo "== synthetic data + teacher"
mkdir -p "$WORK"
$PY - "$WORK" "$CLASSES" "$PER_CLASS" <<'PYEOF' 2>&1 | tee "$OUT/train_data.log"
import os, sys, time
import numpy as np
import torch, timm
from PIL import Image
from concurrent.futures import ProcessPoolExecutor

work, classes, per_class = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
root = os.path.join(work, "data")

def make_class(args):
    split, c, n = args
    rng = np.random.default_rng(hash((split, c)) % 2**32)
    d = os.path.join(root, split, f"n{c:08d}")
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        h, w = rng.integers(200, 400, size=2)
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i}.JPEG"), quality=85)

t = time.time()
if not os.path.isdir(os.path.join(root, "val")):
    jobs = [("train", c, per_class) for c in range(classes)] + [("val", c, 5) for c in range(classes)]
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as ex:
        list(ex.map(make_class, jobs))
print(f"data: {classes} classes x {per_class} train + 5 val JPEGs in {root} ({time.time() - t:.0f}s)")
tp = os.path.join(work, "regnety_160_random.pth")
if not os.path.exists(tp):
    torch.manual_seed(0)
    torch.save({"model": timm.create_model("regnety_160", pretrained=False, num_classes=classes).state_dict()}, tp)
print("teacher:", tp)
PYEOF
[ -d "$WORK/data/val" ] || { echo "data generation failed"; exit 1; }

COMMON=(--data "$WORK/data" --model "$MODEL" --batch-size "$BATCH" --workers "$WORKERS" --amp bf16
        --distillation hard --teacher-path "$WORK/regnety_160_random.pth" --max-steps "$STEPS"
        --warmup-epochs 0 --log-interval 20 --no-auto-resume)

# With few images per class one epoch may be shorter than STEPS; epochs is raised so max-steps decides.
EPOCHS1=$(( (STEPS * BATCH) / (CLASSES * PER_CLASS) + 1 ))
run_1gpu() {  # name, extra flags...
  local name=$1; shift
  echo "== 1 GPU ($name): $MODEL, batch $BATCH, bf16, hard distillation (regnety_160), $STEPS steps $*"
  rm -rf "$WORK/$name"
  $PY -m groupmamba.train "${COMMON[@]}" --epochs "$EPOCHS1" --output "$WORK/$name" "$@" 2>&1 \
    | tr '\r' '\n' | tee "$OUT/train_$name.log" | tail -12 || status=1
  cp "$WORK/$name/log.jsonl" "$OUT/train_$name.jsonl" 2>/dev/null
  $PY - "$WORK/$name/log.jsonl" "$name" <<'PYEOF' 2>&1 | tee -a "$OUT/train_$name.log"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ips = [r["img_per_s"] for r in recs if r.get("type") == "step"][2:]  # skip warm-up windows
if ips:
    print(f"1-GPU ({sys.argv[2]}) steady-state throughput: {sum(ips) / len(ips):.1f} images/s (mean of {len(ips)} log windows)")
PYEOF
}
run_1gpu run1
# The same run with the whole step replayed from one CUDA graph (--cuda-graph); GRAPH_RUN=0 skips it.
[ "${GRAPH_RUN:-1}" = 1 ] && run_1gpu run1_graph --cuda-graph

if [ "$NGPU" -ge 2 ]; then
  echo "== 2 GPUs (DDP via torchrun): same settings, per-GPU batch $BATCH"
  EPOCHS2=$(( (STEPS * BATCH * 2) / (CLASSES * PER_CLASS) + 1 ))
  rm -rf "$WORK/run2"
  $PY -m torch.distributed.run --nproc_per_node 2 --master_port 29533 -m groupmamba.train "${COMMON[@]}" \
    --epochs "$EPOCHS2" --output "$WORK/run2" 2>&1 \
    | tr '\r' '\n' | tee "$OUT/train_2gpu.log" | tail -25 || status=1
  cp "$WORK/run2/log.jsonl" "$OUT/train_2gpu.jsonl" 2>/dev/null
  $PY - "$WORK/run2/log.jsonl" <<'PYEOF' 2>&1 | tee -a "$OUT/train_2gpu.log"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ips = [r["img_per_s"] for r in recs if r.get("type") == "step"][2:]
if ips:
    print(f"2-GPU DDP steady-state throughput: {sum(ips) / len(ips):.1f} images/s (global, mean of {len(ips)} windows)")
PYEOF
else
  echo "== only $NGPU GPU visible: skipping the DDP run" | tee "$OUT/train_2gpu.log"
fi
exit $status
