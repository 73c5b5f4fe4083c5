"""The mixer's in_proj backward (a dual Linear: x -> x @ w1^T, x @ w2^T): cuBLAS (two dgrad GEMMs, the second
accumulating, and two wgrad GEMMs) against triton_linear's one pass, at GroupMamba-T and -B stage shapes.

    python benchmarks/bench_dual_linear.py [--batch 128] [--shapes T1,T2,B1] [--sweep]

bf16, B=128; widths as the model packs them (w1, w2 (C, C), block-diagonal). Device time of CUDA-graph
replays, median, input sets rotated so nothing runs from L2. Bytes: cuBLAS moves 18 per element of x
(g1, g2 read twice, x twice, gx written, read and written again), the one pass 8 (x, g1, g2 read, gx
written). --sweep times each (block_m, num_warps, num_stages, programs) of SWEEP; every Triton cell is
checked against float64 (relative Frobenius error of gx, gw1, gw2 <= 1e-2: bf16 operands), or says so.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from groupmamba.ops import triton_linear as TL

from benchutil import copy_bandwidth_gbs, device_name, emit, graph_ms, write_report

SHAPES = {"T1": (64, 3136), "T2": (128, 784), "B1": (96, 3136)}   # C, tokens per image
SETS_BYTES = 256 << 20
SWEEP = [(64, 4, 3, 264), (128, 4, 3, 264), (128, 8, 3, 264), (64, 4, 2, 528), (64, 8, 3, 264),
         (32, 4, 3, 528), (128, 8, 4, 132), (64, 8, 4, 264), (32, 8, 3, 264)]


def cublas_bwd(x, g1, g2, w1, w2):
    return (g1 @ w1).addmm_(g2, w2), g1.t() @ x, g2.t() @ x


def rel(a, b):
    e = ((a.double() - b).norm() / b.norm()).item()
    return e if e == e else float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--shapes", default="T1,T2,B1")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_dual_linear: needs a CUDA device")
        return 0
    copy = copy_bandwidth_gbs()
    lines = []
    emit(lines, f"device: {device_name('cuda')} | torch {torch.__version__} | B={args.batch} | bf16 | "
                f"copy bandwidth {copy:.0f} GB/s (read + write)")
    configs = SWEEP if args.sweep else [None]
    emit(lines, "")
    emit(lines, "| shape | C | cuBLAS us | cuBLAS % copy | " + " | ".join(
        "one pass us" if c is None else f"{c[0]}/{c[1]}w/{c[2]}s/{c[3]}p" for c in configs) + " | best % copy |")
    emit(lines, "|---|---|---|---|" + "---|" * len(configs) + "---|")
    saved = dict(TL.CONFIG)
    for name in args.shapes.split(","):
        C, L = SHAPES[name]
        M = args.batch * L
        n_sets = max(1, min(8, SETS_BYTES // (M * C * 6)))
        gen = torch.Generator(device="cuda").manual_seed(torch.seed())
        r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
        sets = [(r(M, C).bfloat16(), r(M, C).bfloat16(), r(M, C).bfloat16(), (r(C, C) / C ** 0.5).bfloat16(),
                 (r(C, C) / C ** 0.5).bfloat16()) for _ in range(n_sets)]
        x, g1, g2, w1, w2 = (t.double() for t in sets[0])
        ref = (g1 @ w1 + g2 @ w2, g1.t() @ x, g2.t() @ x)
        del x, g1, g2, w1, w2
        t_cublas = graph_ms(lambda: [cublas_bwd(*s) for s in sets], args.iters) / n_sets
        cells, best = [], float("inf")
        for conf in configs:
            try:
                if conf is not None:
                    TL.CONFIG.update(block_m=conf[0], num_warps=conf[1], num_stages=conf[2], programs=conf[3])
                out = TL.dual_linear_backward(*sets[0])
                err = max(rel(o, r_) for o, r_ in zip(out, ref))
                t = graph_ms(lambda: [TL.dual_linear_backward(*s) for s in sets], args.iters) / n_sets
                best = min(best, t) if err <= 1e-2 else best
                cells.append(f"{t * 1e3:.1f}" + ("" if err <= 1e-2 else f" (err {err:.1e})"))
            except Exception as e:  # noqa: BLE001  (a configuration that does not compile or fit)
                cells.append(f"failed: {type(e).__name__}")
            finally:
                TL.CONFIG.clear()
                TL.CONFIG.update(saved)
        floor = M * C * 2 / (copy * 1e9)
        emit(lines, f"| {name} | {C} | {t_cublas * 1e3:.1f} | {100 * 9 * floor / (t_cublas / 1e3):.0f}% | "
                    + " | ".join(cells) + f" | {100 * 4 * floor / (best / 1e3):.0f}% |")
        del sets
    write_report(os.environ.get("OUT"), "bench_dual_linear.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
