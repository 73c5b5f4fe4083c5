"""A/B of the sixth set of runs' training-step changes in one process each (run from the repository root):

    for v in "1 1 1 0" "1 1 0 1" "0 0 0 0" "1 1 1 1"; do set -- $v
      AB_KEEP=$1 AB_COLSUM=$2 AB_ACTBWD=$3 AB_FLAT=$4 python benchmarks/experiments/ab_train_step.py \
          --models groupmamba_tiny --cuda-graph --modes train_bf16 --no-baseline --iters 10
    done

Each switch (1 = as shipped, 0 = off) runs benchmarks/bench_models.py with one change undone:
AB_KEEP   the ConvFFN recompute keeps the conv's pre-activation (models/layers.py)
AB_COLSUM captured Linears sum their bias gradient with column_sum (ops/fast_linear.py CONFIG)
AB_ACTBWD the conv backward's fused activation derivative + bias sum (ops/triton_dwconv.py CONFIG)
AB_FLAT   AdamW over flat parameter buffers (bench_models --no-flat-params when 0)
The in_proj's shared input cast (models/mixer.py) has no switch. Results: BENCHMARKS.md, sixth set.
"""
import contextlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import groupmamba.models.layers as layers  # noqa: E402
import groupmamba.ops.fast_linear as fast_linear  # noqa: E402
import groupmamba.ops.triton_dwconv as triton_dwconv  # noqa: E402

if os.environ.get("AB_KEEP", "1") == "0":
    layers._keep_preactivation_in_recompute = lambda: (contextlib.nullcontext(), contextlib.nullcontext())
fast_linear.CONFIG["column_sum_bias"] = os.environ.get("AB_COLSUM", "1") == "1"
triton_dwconv.CONFIG["fused_act_bwd"] = os.environ.get("AB_ACTBWD", "1") == "1"
extra = [] if os.environ.get("AB_FLAT", "1") == "1" else ["--no-flat-params"]

import bench_models  # noqa: E402  (benchmarks/ is on sys.path above)

sys.exit(bench_models.main(sys.argv[1:] + extra))
