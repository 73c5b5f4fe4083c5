#!/usr/bin/env bash
# One device call: is triton_linear's one-pass backward for single Linears (out_proj, proj; CONFIG "single",
# off by default) worth switching on? Build, the GPU tests of test_fast_linear.py, the kernel table
# (bench_dual_linear.py --single, --sweep with SWEEP=1), then same-call A/Bs: the layer (on / off / on) and
# GroupMamba-T training (on / off). Outputs in $OUT. About 6-7 minutes on an H200 from a cold machine.
set -u -o pipefail
S=$PWD
export OUT=${OUT:-$PWD/device_out}
RUN_STEPS="build" bash benchmarks/device_check.sh || exit 1
cd /tmp
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider --rootdir "$S" "$S/tests/test_fast_linear.py" 2>&1 \
  | tee "$OUT/pytest_linear.log" | tail -4
timeout 90 python3 "$S/benchmarks/bench_dual_linear.py" --single ${SWEEP:+--sweep} 2>&1 | tee "$OUT/dual_linear.log" | tail -12
for on in True False True; do
  timeout 100 python3 "$S/benchmarks/bench_layer.py" --models T,B --dtypes bf16 --graph --baseline-shapes none \
    --config triton_linear.single=$on 2>&1 | grep -E "^\| (T|B) " | sed "s/^/single=$on /" | tee -a "$OUT/layer_ab.log"
done
for on in True False; do
  timeout 120 python3 "$S/benchmarks/bench_models.py" --models groupmamba_tiny --cuda-graph --modes train_bf16 \
    --no-baseline --iters 10 --config triton_linear.single=$on 2>&1 | grep -E "^\| groupmamba" | sed "s/^/single=$on /"
done
