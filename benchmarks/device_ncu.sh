#!/usr/bin/env bash
# Nsight Compute view of the fused scan kernels (forward and backward) at GroupMamba-T stages 1 and 3,
# B=128, bf16: build, then ncu with the sections BENCHMARKS.md quotes. Full report: $OUT/ncu.log.
#   SHAPES="T1 T3" (any of T1..T4)
set -u -o pipefail
export OUT=${OUT:-$PWD/device_out}
SRC=$PWD
RUN_STEPS="build" bash benchmarks/device_check.sh || exit 1
cd /tmp  # the installed package, not the source tree
timeout ${NCU_TIMEOUT:-180} ncu --clock-control none --kernel-name regex:fast_kernel --launch-count 4 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section MemoryWorkloadAnalysis --metrics dram__bytes_read.sum,dram__bytes_write.sum \
  python3 "$SRC/benchmarks/ncu_scan.py" ${SHAPES:-T1 T3} > "$OUT/ncu.log" 2>&1
status=$?
grep -E "fast_kernel|Duration|DRAM Through|dram__bytes|Registers Per|Achieved Occ|Theoretical Occ|Block Limit|Warp Cycles Per Issued|Compute \(SM\)" "$OUT/ncu.log" | head -80
exit $status
