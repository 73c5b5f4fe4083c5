#!/usr/bin/env bash
# Channel modulation kernels on the GPU machine: GPU name, the GPU tests, the benchmark.
#   set -o pipefail; bash benchmarks/device_modulation.sh 2>&1 | tee $OUT/log
# Needs torch + triton + pytest there; no build (PYTHONPATH=python; groupmamba._C may be missing: fine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out_modulation}
mkdir -p "$OUT"
# A shim package holding only groupmamba.ops (+ _native): the real groupmamba/__init__.py also imports
# groupmamba.models, which only the installed package maps in.
SHIM=$(mktemp -d)/pkg
mkdir -p "$SHIM/groupmamba"
echo '__version__ = "0.1.0"' > "$SHIM/groupmamba/__init__.py"
ln -s "$PWD/python/groupmamba/ops" "$SHIM/groupmamba/ops"
ln -s "$PWD/python/groupmamba/_native.py" "$SHIM/groupmamba/_native.py"
export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"
rc=0
# -p no:cacheprovider: the tree may be read-only-ish; keep it clean
$PY -m pytest -q -p no:cacheprovider -m gpu --durations=5 tests/test_modulation.py 2>&1 | tee "$OUT/test_gpu.log" || rc=1
if [ "${RUN_INTERPRETER:-0}" = 1 ]; then  # CPU-only; runs in CI anyway
  $PY -m pytest -q -p no:cacheprovider -k interpreter tests/test_modulation.py 2>&1 | tee "$OUT/test_interp.log" || rc=1
fi
$PY benchmarks/bench_modulation.py ${BENCH_ARGS:---sweep} 2>&1 | tee "$OUT/bench.log" || rc=1
exit $rc
