#!/usr/bin/env bash
# One run on the GPU machine: build, GPU tests, compute-sanitizer (memcheck + racecheck), benchmark.
# Everything is tee'd to $OUT/*.log (OUT defaults to ./device_out).
set -u -o pipefail
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
PY=${PYTHON:-python3}
status=0

echo "== nvidia-smi" | tee "$OUT/env.log"
nvidia-smi 2>&1 | tee -a "$OUT/env.log"
$PY -c "import torch; print('GPU:', torch.cuda.get_device_name(), 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/env.log"

echo "== build"
t0=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
  tail -80 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "groupmamba: (building|CUDA)|spill|error" "$OUT/build.log" | head -20
echo "build took $(( $(date +%s) - t0 )) s"
cd /tmp  # import the installed package, not the source tree
SRC=$OLDPWD

echo "== pytest"
$PY -m pytest -m gpu -q --timeout=600 -p no:cacheprovider --rootdir "$SRC" "$SRC/tests/test_scan_cuda.py" 2>&1 | tee "$OUT/pytest.log" | tail -40 || status=1

echo "== compute-sanitizer"
(cd "$SRC" && OUT="$OUT" RUN_STEPS=sanitize bash benchmarks/device_check.sh) || status=1

echo "== benchmark"
$PY "$SRC/benchmarks/bench_scan.py" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
