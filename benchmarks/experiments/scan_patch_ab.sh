#!/usr/bin/env bash
# Same-call A/B of scan-kernel patches on the device. Variants: "base" (the code as it is) and each patch of
# PATCHES applied alone. All variants are built at once, each from its own copy of the sources into its own
# install directory (the build is two long nvcc compiles, scan_cuda.cu and scan_norm_cuda.cu, so N builds on 16
# cores take about the time of one); then tests/test_scan_cuda.py runs on every variant (about 25 s each on an H200; one at a
# time: side by side, their float64 references on the CPU did not finish in 200 s); then bench_scan.py runs
# one variant at a time: base, each patch, base again (the two base runs show the run-to-run spread).
#   PATCHES="benchmarks/experiments/bwd_three_blocks.patch ..."   (required; may be empty quotes: base only)
#   SCAN_BENCH_ARGS (default "--models T,B --dtypes bf16 --naive ''"), SCAN_TIMEOUT (default 90 s per run),
#   TESTS=0 skips the GPU tests (TESTS_TIMEOUT, default 120 s per variant).
# Logs: build_<v>.log, pytest_<v>.log, bench_<i>_<v>.log in $OUT/ab_logs.tgz (the device returns only a few
# files per call). Run from the repository root.
# Patches are checked with the CPU emulation first (tests/test_scan_emulated.py), so a failure here is news.
set -u -o pipefail
export OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
SRC=$PWD
WORK=${AB_WORK:-/tmp/scan_ab}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$PY -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

variants=(base)
declare -A patch_of=([base]="")
for p in ${PATCHES?set PATCHES to the patch files to compare}; do
  v=$(basename "$p" .patch); variants+=("$v"); patch_of[$v]=$p
done

build() {  # $1 = variant; copies the sources, applies its patch, installs into $WORK/$1/site
  local v=$1 dir=$WORK/$1
  rm -rf "$dir"; mkdir -p "$dir/src"
  (cd "$SRC" && tar cf - CMakeLists.txt pyproject.toml README.md csrc python models train tests) | tar -C "$dir/src" -xf -
  if [[ -n ${patch_of[$v]} ]] && ! (cd "$dir/src" && patch -p1 --quiet --batch < "$SRC/${patch_of[$v]}"); then
    echo "does not apply" > "$OUT/build_$v.log"; return 1
  fi
  CMAKE_BUILD_PARALLEL_LEVEL=4 $PY -m pip install --no-build-isolation --no-deps --target "$dir/site" -v "$dir/src" \
    > "$OUT/build_$v.log" 2>&1
}
t0=$(date +%s)
for v in "${variants[@]}"; do build "$v" & done
wait
ok=()
for v in "${variants[@]}"; do
  if [[ -f $WORK/$v/site/groupmamba/__init__.py ]]; then ok+=("$v"); else echo "== $v: BUILD FAILED"; tail -20 "$OUT/build_$v.log"; fi
done
echo "builds: $(( $(date +%s) - t0 )) s for ${#variants[@]} variants"

cd /tmp  # import the installed variant, not the source tree
if [[ ${TESTS:-1} != 0 ]]; then
  t0=$(date +%s)
  for v in "${ok[@]}"; do
    PYTHONPATH=$WORK/$v/site timeout ${TESTS_TIMEOUT:-120} $PY -m pytest -m gpu -q -p no:cacheprovider \
      --rootdir "$SRC" "$SRC/tests/test_scan_cuda.py" > "$OUT/pytest_$v.log" 2>&1
    echo "tests $v: $(tail -1 "$OUT/pytest_$v.log")"
  done
  echo "tests: $(( $(date +%s) - t0 )) s"
fi

i=0
bench() {  # $1 = variant
  i=$((i + 1))
  local log=$OUT/bench_${i}_$1.log
  echo "== $i $1"
  PYTHONPATH=$WORK/$1/site OUT= timeout ${SCAN_TIMEOUT:-90} \
    bash -c "$PY $SRC/benchmarks/bench_scan.py ${SCAN_BENCH_ARGS:---models T,B --dtypes bf16 --naive ''}" > "$log" 2>&1
  grep -E '^(device-to-device|[TSB][1-4] C=)' "$log" || tail -5 "$log"
}
for v in "${ok[@]}"; do bench "$v"; done
[[ ${#ok[@]} -gt 1 && ${ok[0]} == base ]] && bench base
(cd "$OUT" && tar czf ab_logs.tgz --remove-files ./*.log)
