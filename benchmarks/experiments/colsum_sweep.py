"""Tile sweep of triton_colsum.column_sum (the Linear and conv bias gradients) at GroupMamba's shapes.

    python benchmarks/experiments/colsum_sweep.py          # CUDA; about 60 s on an H200

bench_gemm (fourth set) measured column_sum at (401408, 64) at 33% of copy bandwidth with its one tile for
all widths, 32 rows x 128 columns: at 64 columns half of each tile is masked off. This times every
configuration of the grid below for each (M, N) as CUDA-graph replays, checks each result against a float64
sum, and prints the old single tile, the width rule now in triton_colsum.tile() and the fastest per shape;
then column_sum_act_grad's tile (32 x 128) against 64-column tiles at the FFN and mixer conv widths.
"""
from __future__ import annotations

import contextlib
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


OLD = dict(block_m=32, block_n=128, num_warps=4)   # the single tile before the eighteenth set
# the FFN convs' widths (GELU) and the mixer convs' (SiLU) at B=128
ACT_SHAPES = [(401408, 256, "gelu"), (100352, 512, "gelu"), (25088, 1392, "gelu"), (401408, 512, "gelu"),
              (401408, 64, "silu"), (100352, 128, "silu"), (25088, 348, "silu")]


@contextlib.contextmanager
def configured(cfg):
    """triton_colsum.CONFIG set to cfg (None values: the width rule) inside the block."""
    saved = dict(TC.CONFIG)
    TC.CONFIG.update(cfg)
    try:
        yield
    finally:
        TC.CONFIG.update(saved)


def timed(fn, cfg):
    """fn's CUDA-graph time (ms) under configured(cfg)."""
    with configured(cfg):
        return graph_ms(fn, 50)


def main():
    assert torch.cuda.is_available(), "needs a GPU"
    print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
    bw = copy_bandwidth_gbs()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
    rule = dict(block_m=None, block_n=None, num_warps=None)
    print("| M | N | old 32x128/4 us (% copy) | rule us (% copy), tile | fastest us (% copy) | fastest config |")
    print("|---|---|---|---|---|---|")
    for M, N in SHAPES:
        g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        ref = g.double().sum(0)
        results = []
        for bm, bn, nw, pr in itertools.product(*GRID.values()):
            if bm * bn > 16384 or bn > 2 * max(N, 64):
                continue
            cfg = dict(block_m=bm, block_n=bn, num_warps=nw, programs=pr)
            with configured(cfg):
                out = TC.column_sum(g)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            if not err < 1e-5:
                raise AssertionError(f"column_sum wrong at {(M, N)} with {cfg}: rel err {err}")
            results.append((timed(lambda: TC.column_sum(g), cfg), cfg))
        t_old = timed(lambda: TC.column_sum(g), OLD)
        t_rule = timed(lambda: TC.column_sum(g), rule)
        t, cfg = min(results, key=lambda r: r[0])
        pct = lambda ms: g.numel() * g.element_size() / ms / 1e6 / bw  # noqa: E731
        bm, bn, nw = TC.tile(N)
        print(f"| {M} | {N} | {t_old * 1e3:.1f} ({pct(t_old):.0%}) | {t_rule * 1e3:.1f} ({pct(t_rule):.0%}), "
              f"{bm}x{bn}/{nw} | {t * 1e3:.1f} ({pct(t):.0%}) | {cfg['block_m']}x{cfg['block_n']}, "
              f"{cfg['num_warps']} warps, {cfg['programs']} programs |", flush=True)
    # The activation-derivative pass keeps 32 x 128 tiles (64-column ones were 13-20% slower at the FFN widths,
    # eighteenth set); at 64-128 columns (the mixer conv, if it ever keeps its pre-activation) half of such a
    # tile is masked off, so 64-column tiles are timed there too.
    print("\ncolumn_sum_act_grad (reads g and pre, writes g * act'(pre)), us:")
    tiles = [(32, 128, 4), (64, 64, 4), (32, 64, 8), (32, 64, 4)]
    print("| M | N | act | " + " | ".join(f"{m}x{n}/{w}" for m, n, w in tiles) + " |")
    print("|---|---|---|" + "---|" * len(tiles))
    for M, N, act in ACT_SHAPES:
        g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        pre = torch.randn_like(g)
        ts = [timed(lambda: TC.column_sum_act_grad(g, pre, act), dict(block_m=m, block_n=n, num_warps=w))
              for m, n, w in tiles]
        print(f"| {M} | {N} | {act} | " + " | ".join(f"{t * 1e3:.1f}" for t in ts) + " |", flush=True)

if __name__ == "__main__":
    main()
