"""The mixer's in_proj backward (a dual Linear: x -> x @ w1^T, x @ w2^T): cuBLAS (two dgrad GEMMs, the second
accumulating, and two wgrad GEMMs) against triton_linear's one pass, at GroupMamba-T and -B stage shapes.
--single also times a single C -> C Linear with bias (out_proj, proj) as the captured Linear runs it (dgrad,
float32 wgrad, column_sum bias gradient: 10 bytes per element) against linear_backward (6 bytes).

    python benchmarks/bench_dual_linear.py [--batch 128] [--shapes T1,T2,B1] [--sweep] [--single]

bf16, B=128; widths as the model packs them (w1, w2 (C, C)). Device time of CUDA-graph replays, median, input
sets rotated so nothing runs from L2. Bytes: cuBLAS moves 18 per element of x for the dual Linear (g1, g2 read
twice, x twice, gx written, read and written again), the one pass 8 (x, g1, g2 read, gx written). --sweep
times each (block_m, num_warps, num_stages, programs) of SWEEP; every Triton cell is checked against float64
(relative Frobenius error of every gradient <= 1e-2: 16-bit operands), or says so.
On CPU (``--device cpu`` with TRITON_INTERPRET=1, fp16: the interpreter's bf16 dot is wrong) it runs the same
code at small sizes with host timing, as a smoke test.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from groupmamba.ops import fast_linear as FL
from groupmamba.ops import triton_linear as TL

from benchutil import copy_bandwidth_gbs, device_name, emit, graph_ms, time_ms, write_report

SHAPES = {"T1": (64, 3136), "T2": (128, 784), "B1": (96, 3136)}   # C, tokens per image
SETS_BYTES = 256 << 20
SWEEP = [(64, 4, 3, 264), (128, 4, 3, 264), (128, 8, 3, 264), (64, 4, 2, 528), (64, 8, 3, 264),
         (32, 4, 3, 528), (128, 8, 4, 132), (64, 8, 4, 264), (32, 8, 3, 264)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dual_case(x, g1, g2, w1, w2):
    """(cuBLAS backward, one-pass backward, float64 reference (a function), bytes per element of x: cuBLAS,
    one pass)."""
    def ref():
        d = [t.double() for t in (x, g1, g2, w1, w2)]
        return d[1] @ d[3] + d[2] @ d[4], d[1].t() @ d[0], d[2].t() @ d[0]
    return (lambda: ((g1 @ w1).addmm_(g2, w2), g1.t() @ x, g2.t() @ x),
            lambda: TL.dual_linear_backward(x, g1, g2, w1, w2), ref, 18, 8)


def single_case(x, g1, g2, w1, w2):
    """The same for a single Linear with bias (x, g1, w1), float32 weight and bias gradients, as
    fast_linear._PaddedLinear runs it."""
    def ref():
        d = [t.double() for t in (x, g1, w1)]
        return d[1] @ d[2], d[1].t() @ d[0], d[1].sum(0)
    return (lambda: (g1 @ w1, FL._wgrad(g1, x, torch.float32), FL._column_sum(g1)),
            lambda: TL.linear_backward(x, g1, w1, True, x.dtype, torch.float32), ref, 10, 6)


def rel(a, b):
    e = ((a.double().cpu() - b.cpu()).norm() / b.norm().cpu()).item()
    return e if e == e else float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--shapes", default="T1,T2,B1")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--single", action="store_true", help="also the single Linear with bias")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_dual_linear: needs a CUDA device (or --device cpu with TRITON_INTERPRET=1)")
        return 0
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    dt = DTYPES[args.dtype]

    def timed(fn):   # device time of CUDA-graph replays; host time on CPU
        return graph_ms(fn, args.iters) if device.type == "cuda" else time_ms(fn, device, 1, args.iters)

    copy = copy_bandwidth_gbs(device)
    lines = []
    emit(lines, f"device: {device_name(device)} | torch {torch.__version__} | B={args.batch} | {args.dtype} | "
                f"copy bandwidth {copy:.0f} GB/s (read + write)")
    configs = SWEEP if args.sweep else [None]
    saved = dict(TL.CONFIG)
    kinds = [("dual (in_proj)", dual_case)] + ([("single with bias", single_case)] if args.single else [])
    for kind, case in kinds:
        emit(lines, "")
        emit(lines, f"| {kind} | C | cuBLAS us | cuBLAS % copy | " + " | ".join(
            "one pass us" if c is None else f"{c[0]}/{c[1]}w/{c[2]}s/{c[3]}p" for c in configs) + " | best % copy |")
        emit(lines, "|---|---|---|---|" + "---|" * len(configs) + "---|")
        for name in args.shapes.split(","):
            C, L = SHAPES[name]
            M = args.batch * L
            n_sets = max(1, min(8, SETS_BYTES // (M * C * 6)))
            gen = torch.Generator(device=device).manual_seed(torch.seed())
            r = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
            sets = [case(r(M, C).to(dt), r(M, C).to(dt), r(M, C).to(dt), (r(C, C) / C ** 0.5).to(dt),
                         (r(C, C) / C ** 0.5).to(dt)) for _ in range(n_sets)]
            ref = sets[0][2]()
            bytes_cublas, bytes_one = sets[0][3:]
            t_cublas = timed(lambda: [s[0]() for s in sets]) / n_sets
            cells, best = [], float("inf")
            for conf in configs:
                try:
                    if conf is not None:
                        TL.CONFIG.update(block_m=conf[0], num_warps=conf[1], num_stages=conf[2], programs=conf[3])
                    err = max(rel(o, r_) for o, r_ in zip(sets[0][1](), ref))
                    t = timed(lambda: [s[1]() for s in sets]) / n_sets
                    best = min(best, t) if err <= 1e-2 else best
                    cells.append(f"{t * 1e3:.1f}" + ("" if err <= 1e-2 else f" (err {err:.1e})"))
                except Exception as e:  # noqa: BLE001  (a configuration that does not compile or fit)
                    cells.append(f"failed: {type(e).__name__}")
                finally:
                    TL.CONFIG.clear()
                    TL.CONFIG.update(saved)
            byte_s = M * C / (copy * 1e9)   # seconds for one byte per element at the copy bandwidth
            share = lambda nbytes, ms: f"{100 * nbytes * byte_s / (ms / 1e3):.0f}%"  # noqa: E731
            emit(lines, f"| {name} | {C} | {t_cublas * 1e3:.1f} | {share(bytes_cublas, t_cublas)} | "
                        + " | ".join(cells) + f" | {share(bytes_one, best) if best < float('inf') else '-'} |")
            del sets, ref
    write_report(os.environ.get("OUT"), "bench_dual_linear.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
