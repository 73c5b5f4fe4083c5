#!/usr/bin/env bash
# Same-call A/B of scan-kernel patches on the device: the code as it is, then each patch of PATCHES applied
# alone (rebuilt, GPU scan tests, benchmark), then the code as it is again (drift check). One line per run.
#   PATCHES="benchmarks/experiments/scan_walk_positions.patch ..."   (required)
#   SCAN_BENCH_ARGS (default "--models T,B --dtypes bf16 --naive ''"), SCAN_TIMEOUT (default 60 s per benchmark),
#   TESTS=0 skips tests/test_scan_cuda.py on the patched builds (default: run it, TESTS_TIMEOUT 150 s).
# Logs: $OUT/<i>_<name>/{build.log,pytest_gpu.log,bench_scan_chunkdefault.log}. Run from the repository root.
# Patches are checked with the CPU emulation first (tests/test_scan_emulated.py), so a failure here is news.
set -u -o pipefail
export OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
ROOT_OUT=$OUT
i=0
run() {  # $1 = name; builds and measures the working tree as it is
  i=$((i + 1))
  local dir="$ROOT_OUT/${i}_$1" steps="build scan"
  mkdir -p "$dir"
  [[ $1 != base* && ${TESTS:-1} != 0 ]] && steps="build tests scan"
  touch csrc/cuda/scan_cuda.cu  # a warm machine's build tree may be newer than a reverted file
  OUT="$dir" RUN_STEPS="$steps" TEST_FILES=tests/test_scan_cuda.py TESTS_TIMEOUT=${TESTS_TIMEOUT:-150} \
    bash benchmarks/device_check.sh > "$dir/log" 2>&1
  echo "== $i $1: $(grep -E '^build:|passed|failed|BUILD FAILED' "$dir/log" | tr '\n' ' ')"
  grep -E '^(GPU:|device-to-device|[TSB][1-4] C=)' "$dir/bench_scan_chunkdefault.log" 2>/dev/null || tail -5 "$dir/log"
}
run base
for p in ${PATCHES:?set PATCHES to the patch files to compare}; do
  name=$(basename "$p" .patch)
  if ! git apply "$p"; then echo "== $name: does not apply"; continue; fi
  run "$name"
  git apply -R "$p"
done
run base_again
