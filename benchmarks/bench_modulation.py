"""Channel modulation: fused Triton kernels vs the unfused torch reference, forward and forward+backward.

    python benchmarks/bench_modulation.py [--batch 128] [--dtypes fp32,bf16,fp16] [--stages T|B] [--sweep] [--sweep-bwd]
        [--sweep-warps]

Per GroupMamba-T stage (L, C) and dtype, the chain timed is the layer's:
    xn, pooled = layernorm_pool(x); s = sigmoid(pooled); out = modulate_layernorm(y, xn, s, skip)
    fwd+bwd: torch.autograd.grad(out, (x, y, weight, bias, skip), g)
Times are medians of triton.testing.do_bench (eager; Python and launch overhead included) and of
do_bench_cudagraph (replays of a captured graph: device time only). GB/s counts the bytes the fused
kernels must move at least (each (B, L, C) tensor once per read or write: 5 passes forward, 8 backward,
plus fp32 mean/rstd per row), over the fused time, and is compared with the measured device-to-device
copy bandwidth (bytes read + written). Input sets rotate so that no stage runs from L2.
The markdown table is printed and, if $OUT is set, written to $OUT/bench_modulation.md.
"""
from __future__ import annotations

import argparse
import itertools
import os

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from groupmamba.ops import modulation as M  # noqa: E402  (installed, or PYTHONPATH: see device_modulation.sh)

from benchutil import copy_bandwidth_gbs  # benchmarks/ is on sys.path when run as a script

STAGES = [(3136, 64), (784, 128), (196, 348), (49, 448)]               # GroupMamba-T (and -S)
STAGES_B = [(3136, 96), (784, 192), (196, 424), (49, 512)]             # GroupMamba-B
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = 1e-5


def make_sets(B, L, C, dt, n_sets):
    sets = []
    for _ in range(n_sets):
        x = (torch.randn(B, L, C, device="cuda") * 2 + 0.5).to(dt).requires_grad_()
        y = torch.randn(B, L, C, device="cuda").to(dt).requires_grad_()
        g = torch.randn(B, L, C, device="cuda").to(dt)
        sets.append((x, y, g))
    w = (1 + 0.3 * torch.randn(C, device="cuda")).requires_grad_()
    b = (0.2 * torch.randn(C, device="cuda")).requires_grad_()
    skip = torch.ones(1, device="cuda", requires_grad=True)
    return sets, w, b, skip


def chain(lp, ml, x, y, w, b, skip):
    xn, pooled = lp(x, w, b, EPS)
    s = torch.sigmoid(pooled.float())
    return ml(y, xn, s, skip, w, b, EPS)


def bench_case(B, L, C, dt, impl, graph: bool, eager: bool = True, library_ops: bool = False):
    lp, ml = impl
    elem = torch.tensor([], dtype=dt).element_size()
    n_sets = max(1, min(4, -(-(256 << 20) // (B * L * C * elem * 8))))
    sets, w, b, skip = make_sets(B, L, C, dt, n_sets)
    it = itertools.cycle(sets)

    def fwd():
        x, y, _ = next(it)
        with torch.no_grad():
            return chain(lp, ml, x, y, w, b, skip)

    def fwdbwd():
        x, y, g = next(it)
        out = chain(lp, ml, x, y, w, b, skip)
        return torch.autograd.grad(out, (x, y, w, b, skip), g)

    res = {}
    if eager:
        res["fwd"] = do_bench(fwd, warmup=10, rep=60, return_mode="median")
        res["fwdbwd"] = do_bench(fwdbwd, warmup=10, rep=60, return_mode="median")
    if library_ops:  # the torch.library triton_ops (torch.compile's path), run eagerly
        M._tm.CONFIG["eager_library_ops"] = True
        try:
            res["fwdbwd_lib"] = do_bench(fwdbwd, warmup=10, rep=60, return_mode="median")
        finally:
            M._tm.CONFIG["eager_library_ops"] = False
    if graph:
        try:
            fwdbwd()
            torch.cuda.synchronize()
            res["fwdbwd_graph"] = do_bench_cudagraph(fwdbwd, rep=25, return_mode="median")
        except Exception as e:  # noqa: BLE001
            print(f"  graph capture failed ({type(e).__name__}: {str(e)[:120]})")
            res["fwdbwd_graph"] = float("nan")
    del sets, it
    return res


def tile_sweep(B, stages, fused, configs, title):
    """Table rows: fwd+bwd graph time (bf16) per stage for each (column label, CONFIG overrides) of
    ``configs``."""
    lines = ["", title, "", "| L | C | " + " | ".join(label for label, _ in configs) + " |",
             "|---|---|" + "---|" * len(configs)]
    saved = dict(M._tm.CONFIG)
    for L, C in stages:
        ts = []
        for _, over in configs:
            M._tm.CONFIG.update(over)
            ts.append(bench_case(B, L, C, torch.bfloat16, fused, graph=True, eager=False)["fwdbwd_graph"] * 1e3)
            M._tm.CONFIG.update(saved)
        lines.append(f"| {L} | {C} | " + " | ".join(f"{t:.0f}" for t in ts) + " |")
        print(lines[-1], flush=True)
    return lines


def min_bytes(B, L, C, dt, bwd: bool):
    elem = torch.tensor([], dtype=dt).element_size()
    passes = 13 if bwd else 5
    rows = B * L
    return passes * rows * C * elem + (32 if bwd else 16) * rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--sweep", action="store_true", help="also sweep the tile size (elements per program), bf16")
    ap.add_argument("--sweep-bwd", action="store_true", help="also sweep the backward's tile size alone, bf16")
    ap.add_argument("--sweep-warps", action="store_true",
                    help="also sweep tile size x warps per program (forward and backward alike), bf16")
    ap.add_argument("--stages", default="T", choices=("T", "B"), help="GroupMamba-T/S or -B stage shapes")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    assert M.triton_available(), f"Triton kernels unavailable: {M._TRITON_ERROR}"
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbs()
    head = (f"GPU: {name}; torch {torch.__version__}, triton {triton.__version__}; "
            f"device-to-device copy {copy_bw:.0f} GB/s (read+write); B={args.batch}; "
            f"tile config {M._tm.CONFIG}")
    print(head, flush=True)
    fused = (M.layernorm_pool_fused, M.modulate_layernorm_fused)
    ref = (M.layernorm_pool_reference, M.modulate_layernorm_reference)
    B = args.batch
    stages = STAGES if args.stages == "T" else STAGES_B
    rows = []
    for dname in args.dtypes.split(","):
        dt = DTYPES[dname]
        for L, C in stages:
            f = bench_case(B, L, C, dt, fused, graph=True, library_ops=True)
            r = bench_case(B, L, C, dt, ref, graph=True)
            gbs = min_bytes(B, L, C, dt, True) / (f["fwdbwd_graph"] * 1e-3) / 1e9
            gbs_e = min_bytes(B, L, C, dt, True) / (f["fwdbwd"] * 1e-3) / 1e9
            gbs_f = min_bytes(B, L, C, dt, False) / (f["fwd"] * 1e-3) / 1e9
            row = (f"| {dname} | {L} | {C} | {r['fwd']*1e3:.0f} | {f['fwd']*1e3:.0f} | {r['fwd']/f['fwd']:.2f}x "
                   f"| {gbs_f:.0f} | {r['fwdbwd']*1e3:.0f} | {f['fwdbwd']*1e3:.0f} | {r['fwdbwd']/f['fwdbwd']:.2f}x "
                   f"| {gbs_e:.0f} | {f['fwdbwd_lib']*1e3:.0f} | {r['fwdbwd_graph']*1e3:.0f} | {f['fwdbwd_graph']*1e3:.0f} "
                   f"| {r['fwdbwd_graph']/f['fwdbwd_graph']:.2f}x | {gbs:.0f} ({100*gbs/copy_bw:.0f}%) |")
            print(row, flush=True)
            rows.append(row)
    table = [
        "",
        head,
        "",
        "Times in us (medians). fwd/fwd+bwd eager: triton.testing.do_bench; graph: do_bench_cudagraph. "
        "GB/s: minimum bytes of the fused kernels (5 passes fwd, 13 fwd+bwd) / fused time; % of copy bandwidth. "
        "'library ops': the torch.library triton_op path (what torch.compile traces) run eagerly.",
        "",
        "| dtype | L | C | fwd torch | fwd fused | speedup | fwd GB/s | fwd+bwd torch | fwd+bwd fused | speedup "
        "| GB/s | fwd+bwd fused, library ops | graph torch | graph fused | speedup | graph GB/s (% copy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if args.sweep:
        table += tile_sweep(B, stages, fused, [(str(e), {"fwd_elems": e, "bwd_elems": e}) for e in (2048, 4096, 8192)],
                            "Tile sweep (bf16, fwd+bwd graph replay, us): elements per program (fwd = bwd)")
    if args.sweep_bwd:
        table += tile_sweep(B, stages, fused, [(str(e), {"bwd_elems": e}) for e in (1024, 2048, 4096, 8192)],
                            "Backward tile sweep (bf16, fwd+bwd graph replay, us; forward at its default tiles): "
                            "elements per program of the backward kernels")
    if args.sweep_warps:
        configs = [("default", {})] + [(f"{e}/{w}", {"fwd_elems": e, "bwd_elems": e, "num_warps": w})
                                       for e in (2048, 8192, 16384) for w in (2, 4, 8, 16) if 256 * w <= e <= 2048 * w]
        table += tile_sweep(B, stages, fused, configs, "Tile x warps sweep (bf16, fwd+bwd graph replay, us): "
                            "elements per program / warps per program (forward and backward alike)")
    text = "\n".join(table) + "\n"
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_modulation.md"), "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
