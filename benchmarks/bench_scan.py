"""Benchmark of the fused CUDA grouped scan at GroupMamba-T/S/B stage shapes (B=128).

For each stage shape and dtype: forward and backward time (median of triton.testing.do_bench, inputs
rotated so they do not sit in L2), achieved GB/s over the bytes the op must move once (forward: read u,
write y; backward: read u and dy, write du), that as a fraction of this GPU's device-to-device copy
bandwidth measured in the same run, and the speed-up over the unfused official-style path
(groupmamba.ops.grouped_scan_naive, forward + backward; it loops over L in Python, so it is timed with
few repetitions and only for the shapes in --naive). The whole official GroupMamba layer does much more
than the scan (projections, norms, modulation), so this speed-up is for the scan part alone.

With --with-out-norm, also the scan with each group's gated out_norm in its kernels (scan_norm_fwd / _bwd)
against the same work unfused in the same run: the scan ops plus group_layer_norm's Triton forward and backward
(LayerNorm_g(y) * SiLU(z) written in u's dtype, as the model runs them), both sides as CUDA-graph replays.

Usage: python benchmarks/bench_scan.py [--models T,S,B] [--dtypes fp32,bf16,fp16] [--naive T] [--with-out-norm]
Writes the markdown table to $OUT/bench_scan.md when OUT is set.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

import groupmamba  # noqa: F401
from groupmamba import _native
from groupmamba.ops import group_layer_norm, grouped_scan_naive
from groupmamba.ops.scan import default_chunk

from benchutil import copy_bandwidth_gbs, graph_ms  # benchmarks/ is on sys.path when run as a script

STAGES = {
    "T": [(56, 64), (28, 128), (14, 348), (7, 448)],
    "S": [(56, 64), (28, 128), (14, 348), (7, 512)],
    "B": [(56, 96), (28, 192), (14, 424), (7, 512)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BATCH = 128


def do_bench(fn, warmup=25, rep=100):
    try:
        from triton.testing import do_bench as tdb
        return tdb(fn, warmup=warmup, rep=rep, return_mode="median")
    except ImportError:  # CUDA events fallback
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(30):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return sorted(times)[len(times) // 2]


def make_inputs(H, C, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    d = C // 4
    R = math.ceil(d / 16)
    u = torch.randn(BATCH, H, H, C, device="cuda", generator=g).to(dtype)
    dy = torch.randn(BATCH, H, H, C, device="cuda", generator=g).to(dtype)
    Wx = torch.randn(4, R + 2, d, device="cuda", generator=g) / d ** 0.5
    Wdt = torch.randn(4, d, R, device="cuda", generator=g) / R ** 0.5
    bias = torch.log(torch.expm1(torch.empty(4, d, device="cuda").uniform_(0.01, 0.5, generator=g)))
    A_log = torch.log(torch.empty(4, d, 1, device="cuda").uniform_(0.5, 2.0, generator=g))
    D = torch.randn(4, d, device="cuda", generator=g)
    return u, dy, (Wx, Wdt, bias, A_log, D)


def time_out_norm(sets, chunk, dtype):
    """(fused fwd, fused bwd, unfused fwd, unfused bwd) in us, each a CUDA-graph replay over all the input sets
    (divided by their number: the sets exceed L2, and the norm's autograd would be host-bound eagerly).
    Unfused: scan_fwd + group_layer_norm (Triton, with the gate), and its backward: the norm's backward then
    scan_bwd (timed as norm fwd+bwd + scan_bwd, minus the norm's forward)."""
    eps = 1e-5
    d = sets[0][0].shape[-1] // 4
    dev = sets[0][0].device
    g = torch.Generator(device=dev).manual_seed(1)
    zs = [torch.randn(u.shape, device=dev, generator=g).to(dtype) for u, _, _ in sets]
    nw = 1 + 0.1 * torch.randn(4, d, device=dev, generator=g)
    nb = 0.1 * torch.randn(4, d, device=dev, generator=g)
    fwd_op, bwd_op = torch.ops.groupmamba.scan_norm_fwd, torch.ops.groupmamba.scan_norm_bwd
    saved = [fwd_op(u, z, *p, nw, nb, eps, chunk)[1:] for (u, _, p), z in zip(sets, zs)]
    ys, states = zip(*[torch.ops.groupmamba.scan_fwd(u, *p, chunk) for u, _, p in sets])
    leaves = [(y.clone().requires_grad_(), z.clone().requires_grad_()) for y, z in zip(ys, zs)]
    nwl, nbl = nw.clone().requires_grad_(), nb.clone().requires_grad_()
    n = len(sets)

    def each(fn):
        return graph_ms(lambda: [fn(i) for i in range(n)], 20) / n * 1e3

    def fused_fwd(i):
        u, _, p = sets[i]
        return fwd_op(u, zs[i], *p, nw, nb, eps, chunk)

    def fused_bwd(i):
        u, dy, p = sets[i]
        return bwd_op(dy, u, zs[i], *p, nw, nb, eps, *saved[i], chunk)

    def unfused_fwd(i):
        u, _, p = sets[i]
        y = torch.ops.groupmamba.scan_fwd(u, *p, chunk)[0]
        return group_layer_norm(y, nw, nb, eps, gate=zs[i], out_dtype=dtype)

    def norm_fwd(i):
        y, z = leaves[i]
        return group_layer_norm(y, nwl, nbl, eps, gate=z, out_dtype=dtype)

    def norm_fwd_bwd_scan_bwd(i):
        y, z = leaves[i]
        u, dy, p = sets[i]
        gy = torch.autograd.grad(norm_fwd(i), (y, z, nwl, nbl), dy)[0]
        return torch.ops.groupmamba.scan_bwd(gy.to(dtype), u, *p, states[i], chunk)

    return each(fused_fwd), each(fused_bwd), each(unfused_fwd), each(norm_fwd_bwd_scan_bwd) - each(norm_fwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="T,S,B")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--naive", default="T", help="models whose stages also time the naive path ('' for none)")
    ap.add_argument("--chunk", type=int, default=None, help="steps per chunk (default: what grouped_scan picks per shape)")
    ap.add_argument("--with-out-norm", action="store_true",
                    help="also time the scan with the gated out_norm fused against scan + group_layer_norm")
    args = ap.parse_args()
    assert torch.cuda.is_available() and _native.cuda_kernels_available(), "needs the CUDA build"
    name = torch.cuda.get_device_name()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"GPU: {name}  (L2 {l2 / 2**20:.0f} MiB), torch {torch.__version__}, chunk {args.chunk or 'default'}", flush=True)
    bw = copy_bandwidth_gbs()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
    fwd_op, bwd_op = torch.ops.groupmamba.scan_fwd, torch.ops.groupmamba.scan_bwd
    rows, naive_cache, norm_rows = [], {}, []
    for model in args.models.split(","):
        for stage, (H, C) in enumerate(STAGES[model], 1):
            for dn in args.dtypes.split(","):
                dtype = DTYPES[dn]
                es = torch.tensor([], dtype=dtype).element_size()
                numel = BATCH * H * H * C
                nrot = max(1, math.ceil(3 * l2 / (2 * numel * es)))  # u+dy sets > 3x L2
                sets = [make_inputs(H, C, dtype, seed) for seed in range(nrot)]
                chunk = args.chunk or default_chunk("cuda", C // 4)
                states = [fwd_op(u, *p, chunk)[1] for u, _, p in sets]
                it = [0]

                def fwd():
                    i = it[0] = (it[0] + 1) % nrot
                    u, _, p = sets[i]
                    return fwd_op(u, *p, chunk)

                def bwd():
                    i = it[0] = (it[0] + 1) % nrot
                    u, dy, p = sets[i]
                    return bwd_op(dy, u, *p, states[i], chunk)

                tf, tb = do_bench(fwd), do_bench(bwd)
                if args.with_out_norm:
                    norm_rows.append((f"{model}{stage}", dn) + time_out_norm(sets, chunk, dtype))
                bf, bb = 2 * numel * es, 3 * numel * es
                gf, gb, gt = bf / tf / 1e6, bb / tb / 1e6, (bf + bb) / (tf + tb) / 1e6
                key = (H, C)
                naive_ms = None
                if model in args.naive.split(","):
                    if key not in naive_cache:
                        u, dy, p = sets[0]
                        uu = u.float().requires_grad_()
                        pp = [t.clone().requires_grad_() for t in p]

                        def naive():
                            y = grouped_scan_naive(uu, *pp)
                            y.backward(dy.float())

                        naive()
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        naive()
                        torch.cuda.synchronize()
                        naive_cache[key] = (time.perf_counter() - t0) * 1e3
                    naive_ms = naive_cache[key]
                rows.append((model, stage, f"{C}@{H}x{H}", chunk, dn, tf * 1e3, tb * 1e3, gf, gb, gt, gt / bw, naive_ms,
                             naive_ms / (tf + tb) if naive_ms else None))
                r = rows[-1]
                print(f"{model}{stage} C={C} {H}x{H} chunk {chunk} {dn}: fwd {r[5]:.1f} us, bwd {r[6]:.1f} us, "
                      f"{gt:.0f} GB/s fwd+bwd ({100 * gt / bw:.0f}% of copy)"
                      + (f", naive {naive_ms:.0f} ms" if naive_ms else ""), flush=True)
                del sets, states
                torch.cuda.empty_cache()
    hdr = ("| model | stage | C@HxW | chunk | dtype | fwd us | bwd us | fwd GB/s | bwd GB/s | fwd+bwd GB/s | of copy BW "
           "| naive fwd+bwd ms | speed-up |")
    lines = [f"GPU: {name}; B={BATCH}; copy bandwidth {bw:.0f} GB/s (read+write, same run)",
             "", hdr, "|" + "---|" * 13]
    for r in rows:
        nv = f"{r[11]:.1f}" if r[11] else "-"
        sp = f"{r[12]:.0f}x" if r[12] else "-"
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.0f} | {r[8]:.0f} | "
                     f"{r[9]:.0f} | {100 * r[10]:.0f}% | {nv} | {sp} |")
    if norm_rows:
        lines += ["", "Scan with the gated out_norm in its kernels (scan_norm_fwd/_bwd) against scan_fwd/_bwd + "
                  "group_layer_norm (Triton) forward and backward, same run, CUDA-graph replays:", "",
                  "| stage | dtype | fused fwd us | fused bwd us | unfused fwd us | unfused bwd us | fused / unfused "
                  "fwd+bwd |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | "
                  f"{(r[2] + r[3]) / (r[4] + r[5]):.3f} |" for r in norm_rows]
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_scan.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
