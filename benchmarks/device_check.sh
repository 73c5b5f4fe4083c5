#!/usr/bin/env bash
# The whole product on a GPU machine, in one script: build, every GPU test, model throughput, a short
# training run (1 GPU, then 2-GPU DDP when two GPUs are visible). Logs go to $OUT (default ./device_out).
#   tests:   pytest -m gpu over TEST_FILES (default "tests"; paths relative to the repository), -k TEST_K if set.
#            The whole GPU suite does not fit one 600 s device call next to a build; durations seen on an H200
#            (tenth set): scan + dwconv + fast_linear 118 s, scan + norm + batchnorm 81 s, norm + modulation +
#            models (torch.compile tests included) about 250 s, then test_train's graphed step. Split the files
#            over calls (TESTS_TIMEOUT, default 240 s, kills the rest).
#   RUN_STEPS="build tests models train layer profile dwconv gemm norm scan sanitize ncu"   which steps to run (default: all but
#            norm and ncu, in this order)
#   layer:   benchmarks/bench_layer.py (one GroupMambaLayer fwd/bwd at every stage shape vs the official-style
#            path; LAYER_BENCH_ARGS, LAYER_TIMEOUT=200), profile: benchmarks/profile_model.py (torch.profiler of
#            a T training and inference step; PROFILE_ARGS, PROFILE_TIMEOUT=120; trace_train.json.gz in $OUT)
#   dwconv:  benchmarks/bench_dwconv.py --sweep --backward (forward tile configurations, backward methods, vs cuDNN;
#            DWCONV_ARGS to change the flags, DWCONV_TIMEOUT=240)
#   gemm:    benchmarks/bench_gemm.py (T's Linear GEMMs as cuBLAS runs them and padded; bias column sums;
#            GEMM_TIMEOUT=120)
#   norm:    benchmarks/bench_norm.py (the grouped LayerNorm forward/backward at every T and B stage, % of copy
#            bandwidth; NORM_BENCH_ARGS, e.g. "--elems 1024,2048,8192" for a backward tile sweep; NORM_TIMEOUT=100)
#   scan:    benchmarks/bench_scan.py at grouped_scan's default chunk per shape, or once per chunk length in
#            SCAN_CHUNKS (a sweep); SCAN_BENCH_ARGS, default "--models T,B --dtypes bf16 --naive ''";
#            SCAN_TIMEOUT=60 per run)
#   sanitize: compute-sanitizer memcheck + racecheck over benchmarks/sanitize_scan.py (SANITIZE_TIMEOUT=150 each)
#   ncu:     Nsight Compute of the scan kernels at NCU_SHAPES (default "T1 T3"): speed of light, occupancy,
#            warp stall reasons, memory workload, instructions executed, DRAM bytes (NCU_TIMEOUT=150; full
#            report $OUT/ncu.log; benchmarks/device_ncu.sh runs build + this step)
# Kernel-level benchmarks have their own scripts: device_scan.sh, device_modulation.sh.
set -u -o pipefail
export OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
PY=${PYTHON:-python3}
SRC=$PWD
RUN_STEPS=${RUN_STEPS:-"build tests models train layer profile dwconv gemm scan sanitize"}
status=0
has() { [[ " $RUN_STEPS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.log"
$PY -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)" 2>&1 | tee -a "$OUT/env.log"

if has build; then
  t0=$(date +%s)
  if ! $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
fi

cd /tmp  # import the installed package, not the source tree
if has tests; then
  files=(); for f in ${TEST_FILES:-tests}; do files+=("$SRC/$f"); done
  timeout ${TESTS_TIMEOUT:-240} $PY -m pytest -m gpu -q -p no:cacheprovider --rootdir "$SRC" "${files[@]}" \
    ${TEST_K:+-k "$TEST_K"} 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -25 || status=1
fi
if has models; then
  timeout ${MODELS_TIMEOUT:-240} $PY "$SRC/benchmarks/bench_models.py" ${MODEL_BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_models.log" | tail -40 || status=1
fi
if has train; then
  (cd "$SRC" && OUT="$OUT" timeout ${TRAIN_TIMEOUT:-300} bash benchmarks/device_train.sh) || status=1
fi
if has layer; then
  OUT="$OUT" timeout ${LAYER_TIMEOUT:-200} $PY "$SRC/benchmarks/bench_layer.py" ${LAYER_BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_layer.log" | tail -40 || status=1
fi
if has profile; then
  OUT="$OUT" timeout ${PROFILE_TIMEOUT:-120} $PY "$SRC/benchmarks/profile_model.py" ${PROFILE_ARGS:-} 2>&1 \
    | tee "$OUT/profile.log" | tail -70 || status=1
fi
if has dwconv; then
  OUT="$OUT" timeout ${DWCONV_TIMEOUT:-240} $PY "$SRC/benchmarks/bench_dwconv.py" ${DWCONV_ARGS:---sweep --backward} 2>&1 \
    | tee "$OUT/bench_dwconv.log" | tail -30 || status=1
fi
if has gemm; then
  OUT="$OUT" timeout ${GEMM_TIMEOUT:-120} $PY "$SRC/benchmarks/bench_gemm.py" 2>&1 \
    | tee "$OUT/bench_gemm.log" | tail -35 || status=1
fi
if has norm; then
  OUT="$OUT" timeout ${NORM_TIMEOUT:-100} $PY "$SRC/benchmarks/bench_norm.py" ${NORM_BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_norm.log" | tail -20 || status=1
fi
if has scan; then
  for ch in ${SCAN_CHUNKS:-default}; do
    chunk_arg=(); [ "$ch" = default ] || chunk_arg=(--chunk "$ch")
    timeout ${SCAN_TIMEOUT:-60} $PY "$SRC/benchmarks/bench_scan.py" ${SCAN_BENCH_ARGS:---models T,B --dtypes bf16 --naive ''} \
      "${chunk_arg[@]}" 2>&1 | tee "$OUT/bench_scan_chunk$ch.log" | tail -12 || status=1
  done
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    timeout ${SANITIZE_TIMEOUT:-150} compute-sanitizer --tool $tool --target-processes all $PY "$SRC/benchmarks/sanitize_scan.py" \
      > "$OUT/sanitizer_$tool.log" 2>&1 || status=1
    echo "sanitizer $tool: $(tail -1 "$OUT/sanitizer_$tool.log")"
  done
fi
if has ncu; then
  timeout ${NCU_TIMEOUT:-150} ncu --clock-control none --kernel-name regex:fast_kernel \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis \
    --metrics 'smsp__inst_executed.sum,dram__bytes_read.sum,dram__bytes_write.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    $PY "$SRC/benchmarks/ncu_scan.py" ${NCU_SHAPES:-T1 T3} > "$OUT/ncu.log" 2>&1 || status=1
  grep -E "fast_kernel|Duration|inst_executed|Registers Per|Achieved Occ|Theoretical Occ|Warp Cycles Per Issued|Compute \(SM\)|DRAM Through|dram__bytes|Block Limit|stalled" "$OUT/ncu.log" | head -160
fi
exit $status
