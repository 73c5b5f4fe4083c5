"""Tile sweep of triton_colsum.column_sum (the Linear and conv bias gradients) at GroupMamba's shapes.

    python benchmarks/experiments/colsum_sweep.py          # CUDA; about 30 s on an H200

bench_gemm (fourth set) measured column_sum at (401408, 64) at 33% of copy bandwidth with its one tile for
all widths, 32 rows x 128 columns: at 64 columns half of each tile is masked off. This times every
configuration of the grid below for each (M, N) as CUDA-graph replays, checks each result against a float64
sum, and prints the fastest per shape next to the default.
"""
from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchutil import copy_bandwidth_gbs, graph_ms  # noqa: E402

from groupmamba.ops import triton_colsum as TC  # noqa: E402

# (M, N): the bias gradients of GroupMamba-T/B's Linears and depthwise convs at B=128 (tokens x channels)
SHAPES = [(401408, 64), (401408, 96), (100352, 128), (100352, 192), (25088, 348), (401408, 256), (401408, 512),
          (100352, 1024), (25088, 1392)]
GRID = dict(block_m=(32, 64, 128), block_n=(64, 128, 256), num_warps=(4, 8), programs=(1024, 2048))


def main():
    assert torch.cuda.is_available(), "needs a GPU"
    print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
    bw = copy_bandwidth_gbs()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
    default = dict(TC.CONFIG)
    print("| M | N | default us (% copy) | fastest us (% copy) | fastest config |\n|---|---|---|---|---|")
    for M, N in SHAPES:
        g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        ref = g.double().sum(0)
        results = []
        for bm, bn, nw, pr in itertools.product(*GRID.values()):
            if bm * bn > 16384 or bn > 2 * max(N, 64):
                continue
            TC.CONFIG.update(block_m=bm, block_n=bn, num_warps=nw, programs=pr)
            out = TC.column_sum(g)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            if not err < 1e-5:
                raise AssertionError(f"column_sum wrong at {(M, N)} with {TC.CONFIG}: rel err {err}")
            results.append((graph_ms(lambda: TC.column_sum(g), 50), dict(TC.CONFIG)))
        TC.CONFIG.update(default)
        t0 = graph_ms(lambda: TC.column_sum(g), 50)
        t, cfg = min(results, key=lambda r: r[0])
        gbs = lambda ms: g.numel() * g.element_size() / ms / 1e6  # noqa: E731
        print(f"| {M} | {N} | {t0 * 1e3:.1f} ({gbs(t0) / bw:.0%}) | {t * 1e3:.1f} ({gbs(t) / bw:.0%}) | "
              f"{cfg['block_m']}x{cfg['block_n']}, {cfg['num_warps']} warps, {cfg['programs']} programs |", flush=True)


if __name__ == "__main__":
    main()
