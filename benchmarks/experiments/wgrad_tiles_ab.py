"""Same-run A/B of the depthwise conv's weight-gradient tiles on whole layers: bench_layer (GroupMamba-T's four
stage shapes, bf16 autocast, CUDA-graph fwd+bwd, B=128) with the tiles before the eighteenth set (4 x 128 for
H >= 28, else 2 x 128; 4 warps; 2048 programs), with triton_dwconv.WGRAD_TILES, then the earlier ones again.

    python benchmarks/experiments/wgrad_tiles_ab.py      # CUDA; about 1.5 minutes on an H200
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_layer  # noqa: E402

from groupmamba.ops import triton_dwconv as td  # noqa: E402

EARLIER = ((28, (4, 128, 4, 2048)), (0, (2, 128, 4, 2048)))
ARGS = ["--models", "T", "--dtypes", "bf16", "--graph", "--quick", "--baseline-shapes", "none"]


def main():
    table = dict(td.WGRAD_TILES)
    for name, tiles in (("earlier tiles", {True: EARLIER, False: EARLIER}), ("WGRAD_TILES", table),
                        ("earlier tiles again", {True: EARLIER, False: EARLIER})):
        print(f"== {name}", flush=True)
        td.WGRAD_TILES.update(tiles)
        bench_layer.main(ARGS)
    td.WGRAD_TILES.update(table)


if __name__ == "__main__":
    main()
