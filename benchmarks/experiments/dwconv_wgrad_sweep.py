"""Tile sweep of the depthwise conv's weight-gradient pass (triton_dwconv._dwconv_wgrad via _conv_grads).

    python benchmarks/experiments/dwconv_wgrad_sweep.py      # CUDA; about 2-3 minutes on an H200

At GroupMamba-T stage 1 the mixer conv's backward took 0.167 ms of the layer's 1.684 (eighteenth set,
bench_layer --breakdown), against about 0.06 ms for its bytes (read x and grad_out, write g and dx); the
fused wgrad pass ran at about 15% of copy bandwidth in an earlier profile. This times _conv_grads (the pass
plus the column sum of its partials) over rows x channels per program, warps and program counts as CUDA-graph
replays, for the mixer convs (SiLU, fused: the pre-activation recomputed) and the FFN convs (ACT none: the
split path's pass over a given g), checks each result against the default configuration's (g bitwise, the
taps' and bias gradients to 1e-5 relative: fp32 sums in another order), and prints the default and the fastest.
"""
from __future__ import annotations

import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchutil import copy_bandwidth_gbs, graph_ms  # noqa: E402

from groupmamba.ops import triton_dwconv as td  # noqa: E402

B = 128
# (H=W, C, act): GroupMamba-T's mixer convs (SiLU, fused pass), then its FFN convs (the split pass, ACT none)
SHAPES = [(56, 64, "silu"), (28, 128, "silu"), (14, 348, "silu"), (7, 448, "silu"),
          (56, 512, "none"), (28, 1024, "none"), (14, 1392, "none"), (7, 1792, "none")]
TILES = [(bh, bc, nw) for bh, bc, nw in itertools.product((1, 2, 4, 8), (32, 64, 128), (1, 2, 4, 8))
         if 32 * nw <= bh * bc <= 1024]
PROGRAMS = (1024, 2048, 4096)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    assert torch.cuda.is_available(), "needs a GPU"
    print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
          flush=True)
    bw = copy_bandwidth_gbs()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
    saved = dict(td.CONFIG)
    print("| H=W | C | act | default us (% copy) | fastest us (% copy) | fastest: rows x channels / warps, programs | "
          "runner-up |\n|---|---|---|---|---|---|---|")
    for hw, C, act in SHAPES:
        x = torch.randn(B, hw, hw, C, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(x)
        taps = td._taps(0.3 * torch.randn(C, 1, 3, 3, device="cuda"))
        bias = 0.1 * torch.randn(C, device="cuda")
        run = lambda: td._conv_grads(x, g, taps, bias, act)  # noqa: E731
        td.CONFIG.update(saved)
        ref = run()
        t_def = graph_ms(run, 20)
        # bytes: read x and grad_out, write g (fused activation only)
        nbytes = x.numel() * x.element_size() * (3 if act != "none" else 2)
        results = []
        for tile, progs in itertools.product(TILES, PROGRAMS):
            td.CONFIG.update(saved, wgrad_tile=tile, wgrad_programs=progs)
            try:
                out = run()
            except Exception as e:  # noqa: BLE001  (a tile Triton cannot compile: out of resources)
                print(f"  skip {tile} {progs}: {type(e).__name__}", flush=True)
                continue
            if not (torch.equal(out[0], ref[0]) and rel(out[1], ref[1]) < 1e-5 and rel(out[2], ref[2]) < 1e-5):
                raise AssertionError(f"{(hw, C, act)} {tile} {progs}: results differ from the default's")
            results.append((graph_ms(run, 20), tile, progs))
        td.CONFIG.update(saved)
        results.sort(key=lambda r: r[0])
        pct = lambda ms: nbytes / ms / 1e6 / bw  # noqa: E731
        (t, tile, progs), (t2, tile2, progs2) = results[0], results[1]
        print(f"| {hw} | {C} | {act} | {t_def * 1e3:.1f} ({pct(t_def):.0%}) | {t * 1e3:.1f} ({pct(t):.0%}) | "
              f"{tile[0]}x{tile[1]}/{tile[2]}, {progs} | {t2 * 1e3:.1f}: {tile2[0]}x{tile2[1]}/{tile2[2]}, {progs2} |",
              flush=True)


if __name__ == "__main__":
    main()
