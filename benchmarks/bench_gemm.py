"""The Linear layers of a GroupMamba model at training shapes: GEMM time as cuBLAS runs them, the same
GEMMs with K and N padded to multiples of 8 (16-byte rows in bf16; what ops.fast_linear does under CUDA
graph capture), and a bias-gradient reduction at the same widths (torch's grad.sum(0) vs
triton_colsum.column_sum, which the depthwise conv's backward uses).

    python benchmarks/bench_gemm.py [--model groupmamba_tiny] [--batch 128] [--dtype bf16]

Why: a GroupMamba-T training step spent ~14 ms of its ~23 ms of GEMMs in sm_80-generation cuBLAS kernels
named "align2", and C = 348 at stage 3 gives rows of 696 bytes, not a multiple of 16 (which Hopper's
tensor-memory loads need). This measured what padding would buy before it was built. Per Linear
(M tokens, K in, N out): forward x @ W^T, dgrad g @ W, wgrad g^T @ x, each with fresh random operands,
CUDA-graph replays, median. "per step" multiplies by the stage's depth (every block has these Linears:
in_proj x and z, out_proj, proj (bias), FFN fc1 and fc2 (bias); in/out projections block-diagonal, C x C).
A third table times each unaligned Linear whole, forward + backward under autocast as the model's
CUDA-graph step runs it: cuBLAS on the unaligned tensors (F.linear) and fast_linear.linear (cuBLAS on
zero-padded copies, the copies included).
The markdown tables are printed and, if $OUT is set, written to $OUT/bench_gemm.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from benchutil import copy_bandwidth_gbs, device_name, emit, graph_ms, write_report
from groupmamba.models.registry import MODEL_CONFIGS
from groupmamba.ops import fast_linear
from groupmamba.ops.fast_linear import _pad_to
from groupmamba.ops.triton_colsum import column_sum

STRIDES = (4, 8, 16, 32)


def linears(cfg, batch, img):
    """(stage, name, M, K, N, bias, count per step) for every Linear of the blocks."""
    out = []
    for i, (C, r, depth) in enumerate(zip(cfg["embed_dims"], cfg["mlp_ratios"], cfg["depths"])):
        M = batch * (img // STRIDES[i]) ** 2
        hid = int(C * r)
        for name, K, N, bias, n in (("in_proj x+z", C, C, False, 2), ("out_proj", C, C, False, 1),
                                    ("proj", C, C, True, 1), ("fc1", C, hid, True, 1), ("fc2", hid, C, True, 1)):
            out.append((i + 1, name, M, K, N, bias, n * depth))
    return out


def gemm_ms(M, K, N, dtype, iters):
    """(fwd, dgrad, wgrad) ms for x (M, K), W (N, K), g (M, N)."""
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype)
    g = torch.randn(M, N, device="cuda", dtype=dtype)
    return graph_ms(lambda: F.linear(x, w), iters), graph_ms(lambda: g @ w, iters), graph_ms(lambda: g.t() @ x, iters)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="groupmamba_tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemm: needs a CUDA device", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bw = copy_bandwidth_gbs("cuda")
    head = (f"device: {device_name('cuda')} | torch {torch.__version__} | {args.model} B={args.batch} | {args.dtype} "
            f"| device-to-device copy {bw:.0f} GB/s | CUDA-graph replays, median of {args.iters}")
    print(head, flush=True)
    lines = [head, "", "| stage | Linear | M | K | N | fwd us | dgrad us | wgrad us | TFLOP/s | padded K,N | "
             "padded fwd/dgrad/wgrad us | padded TFLOP/s | per step ms | padded per step ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cache, tot, tot_pad = {}, 0.0, 0.0
    rows = linears(MODEL_CONFIGS[args.model], args.batch, args.img)
    for stage, name, M, K, N, bias, count in rows:
        Kp, Np = _pad_to(K), _pad_to(N)
        for key in ((M, K, N), (M, Kp, Np)):
            if key not in cache:
                cache[key] = gemm_ms(*key, dtype, args.iters)
        t, tp = cache[(M, K, N)], cache[(M, Kp, Np)]
        step, step_pad = count * sum(t), count * sum(tp)
        tot, tot_pad = tot + step, tot_pad + step_pad
        emit(lines, f"| {stage} | {name} | {M} | {K} | {N} | " + " | ".join(f"{v * 1e3:.0f}" for v in t)
             + f" | {3 * 2 * M * K * N / sum(t) / 1e9:.0f} | {Kp},{Np} | "
             + "/".join(f"{v * 1e3:.0f}" for v in tp)
             + f" | {3 * 2 * M * Kp * Np / sum(tp) / 1e9:.0f} | {step:.2f} | {step_pad:.2f} |")
    lines += [f"| all | | | | | | | | | | | | **{tot:.2f}** | **{tot_pad:.2f}** |", "",
              "(per step: forward + dgrad + wgrad once per Linear and block; a training step also re-runs the FFN's "
              "fc2 forward under recompute)", "",
              "| M | N | torch grad.sum(0) us | column_sum us | speed-up | column_sum GB/s (% copy) |",
              "|---|---|---|---|---|---|"]
    seen = set()
    for stage, name, M, K, N, bias, count in rows:
        if not bias or (M, N) in seen:
            continue
        seen.add((M, N))
        g = torch.randn(M, N, device="cuda", dtype=dtype)
        tt, tc = graph_ms(lambda: g.sum(0), args.iters), graph_ms(lambda: column_sum(g), args.iters)
        gbs = g.numel() * g.element_size() / tc / 1e6
        emit(lines, f"| {M} | {N} | {tt * 1e3:.0f} | {tc * 1e3:.0f} | {tt / tc:.2f}x | {gbs:.0f} ({gbs / bw:.0%}) |")
    unaligned = [r for r in rows if r[3] % 8 or r[4] % 8]
    if unaligned:
        whole_linears(lines, unaligned, dtype, args.iters)
    write_report(args.out, "bench_gemm.md", "\n".join(lines))
    return 0


def whole_linears(lines, rows, dtype, iters):
    """Each unaligned Linear forward + backward under autocast, captured, two ways (see the docstring)."""
    emit(lines, "")
    emit(lines, "| stage | Linear | M | K | N | cuBLAS unaligned us | fast_linear (padded) us |")
    emit(lines, "|---|---|---|---|---|---|---|")
    tot = {"cublas": 0.0, "pad": 0.0}
    for stage, name, M, K, N, bias, count in rows:
        x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(N, K, device="cuda", requires_grad=True)
        b = torch.randn(N, device="cuda", requires_grad=True) if bias else None
        g = torch.randn(M, N, device="cuda", dtype=dtype)
        res = {}
        for how in tot:
            def step():
                with torch.autocast("cuda", dtype=dtype):
                    y = F.linear(x, w, b) if how == "cublas" else fast_linear.linear(x, w, b)
                y.backward(g)
            res[how] = graph_ms(step, iters)
            tot[how] += count * res[how]
        emit(lines, f"| {stage} | {name} | {M} | {K} | {N} | " + " | ".join(f"{res[h] * 1e3:.0f}" for h in tot) + " |")
    emit(lines, "| all, per step | | | | | " + " | ".join(f"{tot[h]:.2f} ms" for h in tot) + " |")


if __name__ == "__main__":
    sys.exit(main())
