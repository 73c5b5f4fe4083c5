"""Depthwise 3x3 conv + bias + activation: the fused Triton kernels vs torch (cuDNN), forward and fwd+bwd.

    python benchmarks/bench_dwconv.py [--batch 128] [--dtype bf16] [--sweep] [--backward]

Shapes: every dwconv of GroupMamba-T at B=128 (the mixer conv, C = 4*d, SiLU; the FFN conv, C = hidden,
GELU), and GroupMamba-B's stage-1 and stage-3 FFN convs. Device time: CUDA-graph replays
(benchutil.capture_graph), median. Bytes counted: the forward reads x and writes y (2 passes); forward +
backward adds the backward's minimum (read x and grad_y, write grad_x: 3 passes), against the device-to-device copy bandwidth measured in the same run. torch =
F.conv2d (channels_last, cuDNN) + activation, autograd for the backward, with the weights cast to x's
dtype as autocast does. The fused backward recomputes the forward with the Triton kernel and then runs
cuDNN's depthwise dgrad/wgrad. --sweep times the forward's tile configurations (triton_dwconv.CONFIG:
rows x channels per program / warps) and marks the best.
The markdown table is printed and, if $OUT is set, written to $OUT/bench_dwconv.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

from groupmamba.ops import dwconv as D
from groupmamba.ops import triton_dwconv as td

from benchutil import copy_bandwidth_gbs, device_name, emit, graph_ms, write_report

# (H=W, C, act): GroupMamba-T stages, mixer conv then FFN conv; then GroupMamba-B's FFN convs at stages 1 and 3
SHAPES = [(56, 64, "silu"), (56, 512, "gelu"), (28, 128, "silu"), (28, 1024, "gelu"),
          (14, 348, "silu"), (14, 1392, "gelu"), (7, 448, "silu"), (7, 1792, "gelu"),
          (56, 768, "gelu"), (14, 1696, "gelu")]
FWD_CONFIGS = [(4, 128, 4), (2, 128, 4), (8, 64, 4), (2, 64, 2), (4, 256, 8), (4, 128, 8), (2, 128, 2)]
# (block_h, block_c, num_warps)
# backward variants: (name, triton_dwconv.CONFIG overrides, forward under keep_preactivation, as ConvFFN's
# checkpoint recompute runs it); the shipped settings first for each of the two cases
BACKWARDS = [("fused", {}, False), ("fused, 2-row tiles", {"block_h": 2, "wgrad_tile": (2, 128, 4)}, False),
             ("split", {"wgrad": "split"}, False),
             ("cuDNN wgrad", {"wgrad": "cudnn"}, False),
             ("cuDNN wgrad + dgrad", {"wgrad": "cudnn", "triton_dgrad": False}, False),
             ("kept: split", {}, True), ("kept: cuDNN wgrad", {"wgrad_kept": "cudnn"}, True)]

def cases(B, hw, C, act, dtype, device):
    x = torch.randn(B, hw, hw, C, device=device, dtype=dtype)
    w = 0.3 * torch.randn(C, 1, 3, 3, device=device)
    b = 0.1 * torch.randn(C, device=device)
    g = torch.randn_like(x)
    return x, w, b, g


def torch_path(x, w, b, act):
    return D.dwconv_act_reference(x, w.to(x.dtype), b.to(x.dtype), act)


def fwd_fn(fn, x, w, b, act):
    return lambda: fn(x, w, b, act)


def fb_fn(fn, x, w, b, g, act, keep=False):
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))

    def run():
        with D.keep_preactivation() if keep else contextlib.nullcontext():
            out = fn(xs, ws, bs, act)
        torch.autograd.grad(out, (xs, ws, bs), g)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_dwconv: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bw = copy_bandwidth_gbs(device)
    head = (f"device: {device_name(device)} | torch {torch.__version__} | B={args.batch} | {args.dtype} | "
            f"device-to-device copy {bw:.0f} GB/s | CUDA-graph replays, median of {args.iters}")
    print(head, flush=True)
    lines = [head, ""]
    defaults = dict(td.CONFIG)
    if args.sweep:
        lines += ["| H=W | C | act | " + " | ".join(f"{h}x{c}/{w}" for h, c, w in FWD_CONFIGS) + " |",
                  "|---|---|---|" + "---|" * len(FWD_CONFIGS)]
        for hw, C, act in SHAPES:
            x, w, b, g = cases(args.batch, hw, C, act, dtype, device)
            fw = []
            for bh, bc, nw in FWD_CONFIGS:
                td.CONFIG.update(defaults, block_h=bh, block_c=bc, num_warps=nw)
                fw.append(graph_ms(fwd_fn(D.dwconv_act, x, w, b, act), args.iters))
            mark = lambda v, vs: f"**{v * 1e3:.0f}**" if v == min(vs) else f"{v * 1e3:.0f}"  # noqa: E731
            emit(lines, f"| {hw} | {C} | {act} | " + " | ".join(mark(v, fw) for v in fw) + " |")
        td.CONFIG.update(defaults)
        lines += ["", "(forward us; rows x channels per program / num_warps)", ""]

    if args.backward:
        lines += ["| H=W | C | act | " + " | ".join(n for n, _, _ in BACKWARDS) + " |",
                  "|---|---|---|" + "---|" * len(BACKWARDS)]
        for hw, C, act in SHAPES:
            x, w, b, g = cases(args.batch, hw, C, act, dtype, device)
            ms = []
            for _, over, keep in BACKWARDS:
                td.CONFIG.update(defaults, **over)
                ms.append(graph_ms(fb_fn(D.dwconv_act, x, w, b, g, act, keep), args.iters))
            n = sum(not keep for _, _, keep in BACKWARDS)   # best marked among the plain, then the kept
            mark = lambda v, vs: f"**{v * 1e3:.0f}**" if v == min(vs) else f"{v * 1e3:.0f}"  # noqa: E731
            emit(lines, f"| {hw} | {C} | {act} | " + " | ".join([mark(v, ms[:n]) for v in ms[:n]] +
                                                                 [mark(v, ms[n:]) for v in ms[n:]]) + " |")
        td.CONFIG.update(defaults)
        lines += ["", "(forward + backward us per backward variant; kept: the forward also stores the "
                  "pre-activation, as ConvFFN's checkpoint recompute does)", ""]

    lines += ["| H=W | C | act | fwd torch us | fwd fused us | speed-up | fwd GB/s (% copy) | fwd+bwd torch us | "
              "fwd+bwd fused us | speed-up | fwd+bwd GB/s (% copy) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for hw, C, act in SHAPES:
        x, w, b, g = cases(args.batch, hw, C, act, dtype, device)
        nbytes = x.numel() * x.element_size()
        r = {}
        for name, fn in (("torch", torch_path), ("fused", D.dwconv_act)):
            r[name] = (graph_ms(fwd_fn(fn, x, w, b, act), args.iters),
                       graph_ms(fb_fn(fn, x, w, b, g, act), args.iters))
        (tf, tfb), (ff, ffb) = r["torch"], r["fused"]
        gf, gfb = 2 * nbytes / ff / 1e6, 5 * nbytes / ffb / 1e6
        emit(lines, f"| {hw} | {C} | {act} | {tf * 1e3:.0f} | {ff * 1e3:.0f} | {tf / ff:.2f}x | "
                    f"{gf:.0f} ({gf / bw:.0%}) | {tfb * 1e3:.0f} | {ffb * 1e3:.0f} | {tfb / ffb:.2f}x | "
                    f"{gfb:.0f} ({gfb / bw:.0%}) |")
    write_report(args.out, "bench_dwconv.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
