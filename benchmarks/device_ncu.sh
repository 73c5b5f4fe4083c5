#!/usr/bin/env bash
# Nsight Compute view of the fused scan kernels (forward and backward), B=128, bf16: build, then the "ncu" step
# of device_check.sh (speed of light, occupancy, launch stats, warp stall reasons, memory workload, instructions
# executed, DRAM bytes). Full report: $OUT/ncu.log.
#   SHAPES="T1 T3" (any of T1..T4)
set -u -o pipefail
RUN_STEPS="build ncu" NCU_SHAPES="${SHAPES:-T1 T3}" exec bash "$(dirname "$0")/device_check.sh"
