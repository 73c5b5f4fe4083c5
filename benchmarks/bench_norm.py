"""The fused LayerNorms (triton_norm): achieved bandwidth at every GroupMamba-T and -B stage shape.

    python benchmarks/bench_norm.py [--batch 128] [--models T,B]

Two uses per block, as the model runs them under bf16 autocast (B=128, 224x224):
  gate:  the mixer's per-group out_norm times SiLU(z): G=4 groups of d=C/4, x and z bf16, out bf16
         bytes: forward reads x, z and writes out (6 per element); backward reads g, x, z and writes dx, dz (10)
  norm2: the block's LayerNorm before the FFN: G=1, x the fp32 residual stream, out bf16
         bytes: forward 4 + 2 per element; backward reads g (bf16) and x (fp32) and writes dx (fp32): 10
(plus the fp32 mean / rstd per row and group). Device time of CUDA-graph replays, median; "bwd" is the
kernel plus the weight / bias partial sums, as the training step runs it; "kernel" the backward kernel
alone (at triton_norm.bwd_elems' tile size) and "sums" the partial sums alone (triton_colsum.column_sum);
--elems also times the backward kernel at other tile sizes (elements per program); --sweep-warps times the
forward alone and the backward alone (kernel + sums) at (elements, warps) per program pairs, each direction set
on its own (triton_norm.CONFIG elems / num_warps, bwd_elems / bwd_num_warps). --add times norm2 with
the residual add before it (ops.add_layer_norm, forward + backward through autograd) against the separate
add and norm2 it replaces, per stage. GB/s over the measured
device-to-device copy bandwidth (read + write) of the same run. Input sets rotate so nothing runs from L2.
The markdown table is printed and, if $OUT is set, written to $OUT/bench_norm.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from groupmamba.ops import triton_norm as tn
from groupmamba.ops._util import identity
from groupmamba.ops.triton_colsum import column_sum

from benchutil import copy_bandwidth_gbs, device_name, emit, graph_ms, write_report

MODELS = {"T": (64, 128, 348, 448), "S": (64, 128, 348, 448), "B": (96, 192, 424, 512)}
TOKENS = (3136, 784, 196, 49)
SETS_BYTES = 256 << 20   # rotate over enough input sets to exceed the 50 MB L2 several times


def cases(batch, C, L):
    M = batch * L
    gate = dict(G=4, d=C // 4, M=M, x=torch.bfloat16, z=True, fwd_bytes=6, bwd_bytes=10)
    norm2 = dict(G=1, d=C, M=M, x=torch.float32, z=False, fwd_bytes=6, bwd_bytes=10)
    return (("gate", gate), ("norm2", norm2))


def make_set(cfg):
    G, d, M = cfg["G"], cfg["d"], cfg["M"]
    x = torch.randn(M, G * d, device="cuda").to(cfg["x"])
    z = torch.randn(M, G * d, device="cuda", dtype=torch.bfloat16) if cfg["z"] else None
    w = 1 + 0.1 * torch.randn(G, d, device="cuda")
    b = 0.1 * torch.randn(G, d, device="cuda")
    g = torch.randn(M, G * d, device="cuda", dtype=torch.bfloat16)
    _, stats = tn._fwd_impl(x, z, w, b, 1e-5, torch.bfloat16, True, identity)
    return x, z, w, b, g, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--models", default="T,B")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--elems", default="", help="comma list of tile sizes for the backward kernel sweep")
    ap.add_argument("--add", action="store_true", help="also time the fused residual add + norm2")
    ap.add_argument("--sweep-warps", action="store_true",
                    help="also sweep elements x warps per program, forward and backward in separate tables")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_norm: needs a CUDA device")
        return 1
    copy = copy_bandwidth_gbs()
    lines = []
    emit(lines, f"device: {device_name('cuda')} | torch {torch.__version__} | B={args.batch} | copy bandwidth "
                f"{copy:.0f} GB/s (read + write)")
    emit(lines, "")
    sweep = [int(e) for e in args.elems.split(",") if e]
    emit(lines, "| model | stage | C | use | G x d | fwd us | fwd GB/s | fwd % copy | bwd us | bwd GB/s | bwd % copy | "
                "kernel us | sums us |" + "".join(f" kernel {e} |" for e in sweep))
    emit(lines, "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(sweep))
    for model in args.models.split(","):
        for stage, (C, L) in enumerate(zip(MODELS[model], TOKENS), 1):
            for use, cfg in cases(args.batch, C, L):
                elems = cfg["M"] * C
                n_sets = max(1, min(8, SETS_BYTES // (elems * 10)))
                sets = [make_set(cfg) for _ in range(n_sets)]
                state = {"i": 0}

                def fwd():
                    x, z, w, b, _, _ = sets[state["i"] % n_sets]
                    state["i"] += 1
                    tn._fwd_impl(x, z, w, b, 1e-5, torch.bfloat16, True, identity)

                def bwd():
                    x, z, w, b, g, stats = sets[state["i"] % n_sets]
                    state["i"] += 1
                    tn._bwd_impl(g, x, z, w, b, stats, identity)

                def kernel(elems=None):
                    x, z, w, b, g, stats = sets[state["i"] % n_sets]
                    state["i"] += 1
                    return tn._bwd_kernel(g, x, z, w, b, stats, identity, elems)[2]

                parts = [kernel() for _ in range(n_sets)]

                def sums():
                    part = parts[state["i"] % n_sets]
                    state["i"] += 1
                    column_sum(part)

                # one graph replays every set once per call: time per call / n_sets
                ms = lambda fn: graph_ms(lambda: [fn() for _ in range(n_sets)], args.iters) / n_sets  # noqa: E731
                tf, tb, tk, ts = ms(fwd), ms(bwd), ms(kernel), ms(sums)
                tsweep = [ms(lambda e=e: kernel(e)) for e in sweep]
                gbf = cfg["fwd_bytes"] * elems / tf / 1e6
                gbb = cfg["bwd_bytes"] * elems / tb / 1e6
                emit(lines, f"| {model} | {stage} | {C} | {use} | {cfg['G']} x {cfg['d']} | {tf * 1e3:.1f} | {gbf:.0f} | "
                            f"{100 * gbf / copy:.0f}% | {tb * 1e3:.1f} | {gbb:.0f} | {100 * gbb / copy:.0f}% | "
                            f"{tk * 1e3:.1f} | {ts * 1e3:.1f} |" + "".join(f" {t * 1e3:.1f} |" for t in tsweep))
                del sets, parts
    if args.add:
        add_norm_table(lines, args)
    if args.sweep_warps:
        warps_table(lines, args)
    write_report(os.environ.get("OUT"), "bench_norm.md", "\n".join(lines) + "\n")
    return 0


SWEEP = [(1024, 1), (1024, 2), (2048, 1), (2048, 2), (2048, 4), (4096, 2), (4096, 4), (4096, 8), (8192, 4),
         (8192, 8), (16384, 8)]


def close(a, b, tol):
    """||a - b|| <= tol * ||b|| in fp32 (NaN fails). tol holds for fp32 tensors; bf16 ones get at least 1e-4: a
    changed reduction order moves a row's fp32 result by ~1e-7 relative, which flips the bf16 rounding of ~1e-5
    of the elements by one ulp, ~1e-5 relative Frobenius error (CPU model of the gate / norm2 shapes)."""
    tol = tol if a.dtype == torch.float32 else max(tol, 1e-4)
    a, b = a.float(), b.float()
    return bool((a - b).norm() <= tol * b.norm())


def warps_table(lines, args):
    """Forward alone, then backward alone (kernel and sums, from the default forward's statistics), us per
    (elements, warps) per program against the defaults; a cell whose results leave the default's (close: the
    forward's output and fp32 statistics within 1e-6, the backward's input gradients within 1e-5) says so."""
    for fwd in (True, False):
        keys, tol = (("elems", "num_warps"), 1e-6) if fwd else (("bwd_elems", "bwd_num_warps"), 1e-5)
        emit(lines, "")
        emit(lines, f"Elements x warps per program, {'forward' if fwd else 'backward (kernel + sums)'} alone, us, "
                    f"CUDA-graph replays")
        emit(lines, "")
        emit(lines, "| model | stage | C | use | default |" + "".join(f" {e}/{w} |" for e, w in SWEEP))
        emit(lines, "|---|---|---|---|---|" + "---|" * len(SWEEP))
        for model in args.models.split(","):
            for stage, (C, L) in enumerate(zip(MODELS[model], TOKENS), 1):
                for use, cfg in cases(args.batch, C, L):
                    n_sets = max(1, min(8, SETS_BYTES // (cfg["M"] * C * 10)))
                    sets = [make_set(cfg) for _ in range(n_sets)]   # stats: the default forward's

                    def step(i):   # the results compared: (out, stats) forward, (dx, dz) backward
                        x, z, w, b, g, stats = sets[i]
                        if fwd:
                            return tn._fwd_impl(x, z, w, b, 1e-5, torch.bfloat16, True, identity)
                        return tn._bwd_impl(g, x, z, w, b, stats, identity)[:2]

                    def run(conf):
                        saved = dict(tn.CONFIG)
                        tn.CONFIG.update(conf)
                        try:
                            t = graph_ms(lambda: [step(i) for i in range(n_sets)], args.iters) / n_sets
                            return t, step(0)
                        finally:
                            tn.CONFIG.update(saved)

                    t0, ref = run({})
                    cells = []
                    for e, nw in SWEEP:
                        t, res = run(dict(zip(keys, (e, nw))))
                        same = all(a is None or close(a, b, tol) for a, b in zip(res, ref))
                        cells.append(f"{t * 1e3:.1f}" + ("" if same else " (differs)"))
                    emit(lines, f"| {model} | {stage} | {C} | {use} | {t0 * 1e3:.1f} |"
                                + "".join(f" {c} |" for c in cells))
                    del sets


def add_norm_table(lines, args):
    """Fused residual add + norm2 vs x + r then norm2, forward + backward (fp32 x, bf16 residual and output,
    cotangents for the sum and the output), device time of graph replays."""
    from groupmamba.ops import norm as N
    emit(lines, "")
    emit(lines, "| model | stage | C | add + norm2 fused us | x + r, norm2 us | speed-up |")
    emit(lines, "|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for stage, (C, L) in enumerate(zip(MODELS[model], TOKENS), 1):
            shape = (args.batch, L, C)
            x = torch.randn(shape, device="cuda", requires_grad=True)
            r = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = (1 + 0.1 * torch.randn(C, device="cuda")).requires_grad_()
            b = (0.1 * torch.randn(C, device="cuda")).requires_grad_()
            gs = torch.randn(shape, device="cuda")
            go = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

            def fused():
                s, out = N.add_layer_norm(x, r, w, b, 1e-6, out_dtype=torch.bfloat16)
                torch.autograd.grad((s, out), (x, r, w, b), (gs, go))

            def separate():
                s = x + r
                out = N.group_layer_norm(s, w, b, 1e-6, out_dtype=torch.bfloat16)
                torch.autograd.grad((s, out), (x, r, w, b), (gs, go))
            tf, ts = graph_ms(fused, args.iters), graph_ms(separate, args.iters)
            emit(lines, f"| {model} | {stage} | {C} | {tf * 1e3:.1f} | {ts * 1e3:.1f} | {ts / tf:.2f}x |")
            del x, r, w, b, gs, go


if __name__ == "__main__":
    sys.exit(main())
