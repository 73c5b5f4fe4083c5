#!/usr/bin/env bash
# Build, a few GPU tests, then same-call A/B runs of the training step (ab_train_step.py), on the device:
#   AB_RUNS="base AB_INBIAS=0 AB_MIDSUM=0 base"  one run per word: "base" = as shipped, else NAME=VALUE[,NAME=VALUE]
#   AB_MODEL (default groupmamba_base), TEST_FILES / TEST_K / TESTS_TIMEOUT as in device_check.sh (no tests when
#   TEST_FILES is empty), AB_TIMEOUT per run (default 150 s; the first run compiles every kernel).
#   AB_SCRIPT=profile: profile_model.py --cuda-graph --modes train on AB_MODEL per run instead.
# Each run's output goes to $OUT/run_<i>/ (log, tables, profile); a summary line per run to stdout.
set -u -o pipefail
export OUT=${OUT:-$PWD/device_out}
SRC=$PWD
PY=${PYTHON:-python3}
RUN_STEPS=build bash benchmarks/device_check.sh || exit 1
# a failed or timed-out test run is reported, and the A/B runs still go (their numbers are what the call is for)
if [[ -n ${TEST_FILES:-} ]]; then
  RUN_STEPS=tests bash benchmarks/device_check.sh || echo "GPU TESTS: failures or timeout, see pytest_gpu.log"
fi
cd /tmp
i=0
for run in ${AB_RUNS:-base}; do
  i=$((i + 1))
  envs=(); [[ $run != base ]] && IFS=, read -ra envs <<< "$run"
  t0=$(date +%s)
  dir="$OUT/run_$i"; mkdir -p "$dir"
  if [[ ${AB_SCRIPT:-} == profile ]]; then
    args="--cuda-graph --modes train --model ${AB_MODEL:-groupmamba_base}"
  else
    args="--models ${AB_MODEL:-groupmamba_base} --cuda-graph --modes train_bf16 --no-baseline --iters 10"
  fi
  env "${envs[@]}" OUT="$dir" timeout ${AB_TIMEOUT:-150} $PY "$SRC/benchmarks/experiments/ab_train_step.py" $args \
    > "$dir/log" 2>&1
  echo "run $i [$run] ($(( $(date +%s) - t0 )) s): $(grep -E 'groupmamba_|wall time per step' "$dir/log" | tail -1)"
done
