"""One whole GroupMambaLayer, forward and forward+backward, at every GroupMamba-T/S/B stage shape.

    python benchmarks/bench_layer.py                          # CUDA, B=128, baseline on the T shapes
    python benchmarks/bench_layer.py --breakdown              # + the fast path split into its ops (timed as
                                                              #   CUDA-graph replays with --graph)
    python benchmarks/bench_layer.py --graph                  # + fwd+bwd as CUDA-graph replays (device time)
    python benchmarks/bench_layer.py --baseline-shapes all    # baseline on every shape (slow)
    python benchmarks/bench_layer.py --scan-with-out-norm ab  # + the layer with the scan and out_norm * SiLU(z)
                                                              #   as one op, timed in the same run
    python benchmarks/bench_layer.py --device cpu --quick     # smoke test (tiny shapes, < 60 s)

The layer (models/mixer.py) is in/out projections, depthwise conv, the four-direction scan and the
channel modulation. Two paths on the same weights: ``fast`` (fused=True, batched, native ops) and the
official-style baseline (fused=False: per-group branches, Python loop over L in the scan). dtypes:
``fp32``; ``bf16`` = float32 input and parameters under bf16 autocast (as in training, where the
residual stream stays float32); ``bf16-pure`` = layer and input cast to bfloat16, no autocast.
Forward is timed with autograd on (as in training); fwd+bwd includes the parameter gradients.
CUDA times are CUDA-event medians (warm-up first); the baseline takes seconds at 56x56, so it runs
--baseline-iters times (default 1) and only on --baseline-shapes. Shapes shared by T and S run once.
Target (the issue): fast fwd+bwd < 1.5 ms and >= 10x faster than the baseline.
Writes the report to $OUT/bench_layer.md (or --out) when set.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import groupmamba  # noqa: F401  (loads the native ops)
from groupmamba import _native
from groupmamba.models.mixer import GroupMambaLayer
from groupmamba.ops import layernorm_pool, modulate_layernorm
from groupmamba.ops._util import autocast_dtype

from benchutil import (add_op_config_argument, apply_op_configs, copy_bandwidth_gbs, device_name, graph_ms, time_ms,
                       write_report)

STAGES = {  # (H=W, dim) per stage
    "T": [(56, 64), (28, 128), (14, 348), (7, 448)],
    "S": [(56, 64), (28, 128), (14, 348), (7, 512)],
    "B": [(56, 96), (28, 192), (14, 424), (7, 512)],
}
QUICK_STAGES = {"Q": [(8, 32), (4, 64)]}
DTYPES = ("fp32", "bf16", "bf16-pure")
TARGET_MS, TARGET_SPEEDUP = 1.5, 10.0


# ---- setup ----------------------------------------------------------------------------------------

def make_case(dim: int, hw: int, batch: int, dtype: str, device):
    """(layer, x, context factory) for one shape and dtype mode."""
    torch.manual_seed(0)
    layer = GroupMambaLayer(dim).to(device)
    x = torch.randn(batch, hw * hw, dim, device=device)
    if dtype == "bf16-pure":
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    x.requires_grad_(True)
    amp = dtype == "bf16"

    def ctx():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    return layer, x, ctx


def fwd_bwd_fns(fn, inputs, params, ctx):
    """(forward, forward+backward) closures for fn(*inputs) -> tensor or tuple of tensors."""
    with ctx():
        outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]

    def fwd():
        with ctx():
            return fn(*inputs)

    def fwd_bwd():
        for t in list(inputs) + list(params):
            t.grad = None
        out = fwd()
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)
    return fwd, fwd_bwd


# ---- the fast path, op by op (mirrors GroupMambaLayer.forward / _mix_fused) -------------------------

def layer_norm_pool(layer: GroupMambaLayer, x):
    """The layer's first step: (xn, pooled[, xn in the autocast dtype, which feeds in_proj])."""
    norm = layer.norm
    return layernorm_pool(x, norm.weight, norm.bias, norm.eps, copy_dtype=autocast_dtype(x))


def fast_parts(layer: GroupMambaLayer, H: int, W: int, w):
    """[(name, fn, inputs, outputs)] whose chain x -> ... -> out is the fused layer, step for step as
    GroupMambaLayer._forward runs it: the same dtypes between steps (under autocast layernorm_pool's xn copy
    feeds in_proj and modulate_layernorm writes the autocast dtype, so no part times a cast the layer does not
    make) and the group weights ``w`` packed once, as the layer packs them once per call."""
    norm, C = layer.norm, layer.dim

    def pack(xnc):   # the packing's outputs that exist (the bmm projections have no block-diagonal weights)
        return tuple(t for t in layer.group_weights(xnc.view(xnc.shape[0], H, W, C)) if t is not None)

    def in_proj(xnc):
        return layer.grouped_in_proj(xnc.view(xnc.shape[0], H, W, C), w)

    def out_proj(y):
        return layer.grouped_out_proj(y, w).reshape(y.shape[0], H * W, C)

    def modulate(ym, xn, s):
        return modulate_layernorm(ym, xn, s, layer.skip_scale, norm.weight, norm.bias, norm.eps,
                                  out_dtype=autocast_dtype(ym))

    if layer.scan_with_out_norm is True:  # the breakdown times training steps: "inference" does not join there
        mix = [("grouped_scan+out_norm*gate", lambda u, z: layer.scan_out_norm_gate(u, z, w), ["u", "z"], ["yg"])]
    else:
        mix = [("grouped_scan", lambda u: layer.grouped_scan(u, w), ["u"], ["y"]),
               ("out_norm*gate", lambda y, z: layer.out_norm_gate(y, z, w), ["y", "z"], ["yg"])]
    return [
        ("layernorm_pool", lambda x: layer_norm_pool(layer, x), ["x"], ["xn", "pooled", "xnc"]),
        ("channel_attn (fc1/fc2)", layer.channel_attention, ["pooled"], ["s"]),
        ("group weights (packing)", pack, ["xnc"], []),
        ("in_proj", in_proj, ["xnc"], ["xp", "z"]),
        ("conv+silu", lambda xp: layer.conv_silu(xp, w), ["xp"], ["u"]),
        *mix,
        ("out_proj", out_proj, ["yg"], ["ym"]),
        ("modulate_layernorm", modulate, ["ym", "xn", "s"], ["m"]),
        ("proj", layer.proj, ["m"], ["out"]),
    ]


def breakdown(layer, x, H, W, ctx, device, warmup, iters, graph=False):
    """[(part, fwd ms, fwd+bwd ms)] of the fast path, each op timed alone on detached inputs; with ``graph``
    as CUDA-graph replays (device time: eager, the parts of a layer are host-bound on an H200). The parts
    after the packing take the packed group weights as leaves that need gradients, so their backwards do the
    weight-gradient work they do in the layer; the packing's own forward and backward is a part of its own."""
    params = list(layer.parameters())
    vals = {"x": x.detach()}
    B, L, C = x.shape
    with torch.no_grad(), ctx():
        xn, _, *copy = layer_norm_pool(layer, x)
        packed = layer.group_weights((copy[0] if copy else xn).view(B, H, W, C))
    w = type(packed)(*(None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in packed))
    leaves = [t for t in w if t is not None]
    rows = []

    def timed(fn):
        return graph_ms(fn, iters, warmup) if graph else time_ms(fn, device, warmup, iters)
    for name, fn, ins, outs in fast_parts(layer, H, W, w):
        inputs = [vals[k].detach().requires_grad_(vals[k].is_floating_point()) for k in ins]
        fwd, fb = fwd_bwd_fns(fn, inputs, params + leaves, ctx)
        rows.append((name, timed(fwd), timed(fb)))
        with torch.no_grad(), ctx():
            res = fn(*inputs)
        vals.update(zip(outs, res if isinstance(res, tuple) else (res,)))
        vals.setdefault("xnc", vals.get("xn"))   # without autocast layernorm_pool makes no copy: xn feeds in_proj
    with torch.no_grad(), ctx():
        ref = layer(x, H, W)
    err = (vals["out"].float() - ref.float()).abs().max().item()
    return rows, err


# ---- main -----------------------------------------------------------------------------------------

def parse_baseline_shapes(spec: str, stages: dict) -> set:
    """'T' / 'T,S' / 'all' / 'none' / 'B@56' -> set of (hw, dim)."""
    spec = spec.strip()
    if spec in ("", "none"):
        return set()
    if spec == "all":
        return {s for v in stages.values() for s in v}
    out = set()
    for tok in spec.split(","):
        model, _, hw = tok.partition("@")
        if model not in stages:
            raise SystemExit(f"--baseline-shapes: unknown model {model!r} (have {sorted(stages)})")
        out |= {s for s in stages[model] if not hw or s[0] == int(hw)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer iterations; on CPU tiny shapes, B=2")
    ap.add_argument("--models", default=None, help="comma list of T,S,B (default all; Q with --device cpu --quick)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {DTYPES}")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (2 on CPU --quick)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--baseline-shapes", default=None,
                    help="where to time the official-style path: T | T,S | B@56 | all | none (default T)")
    ap.add_argument("--baseline-iters", type=int, default=1)
    ap.add_argument("--baseline-warmup", type=int, default=0)
    ap.add_argument("--breakdown", action="store_true", help="time each op of the fast path separately")
    ap.add_argument("--graph", action="store_true",
                    help="also time the fast fwd+bwd as CUDA-graph replays (device time, no host launch overhead); "
                         "the target is then judged on that time")
    ap.add_argument("--scan-with-out-norm", choices=("off", "on", "ab"), default="off",
                    help="GroupMambaLayer.scan_with_out_norm for the fast path: off, on, or ab (both, same run: "
                         "the table is the off path, the A/B table after it)")
    add_op_config_argument(ap)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    configs = apply_op_configs(args.config)

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if not cpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tiny = cpu and args.quick
    if tiny:
        torch.set_num_threads(1)  # tiny ops: spinning OpenMP threads only add noise on a small CPU box
    stages = QUICK_STAGES if tiny else STAGES
    models = (args.models or ",".join(stages)).split(",")
    batch = args.batch or (2 if tiny else 128)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else (3 if args.quick else 10))
    iters = args.iters or (3 if cpu else (10 if args.quick else 30))
    dtypes = [d for d in args.dtypes.split(",") if d]
    if set(dtypes) - set(DTYPES):
        ap.error(f"unknown dtypes {sorted(set(dtypes) - set(DTYPES))}; choose from {DTYPES}")
    baseline = parse_baseline_shapes(args.baseline_shapes or ("Q" if tiny else "T"), stages)

    shapes = {}  # (hw, dim) -> models using it, in first-seen order
    for m in models:
        for s in stages[m]:
            shapes.setdefault(s, []).append(m)

    name = device_name(device)
    bw = copy_bandwidth_gbs(device)
    header = (f"device: {name} | torch {torch.__version__} | native ops: {_native.native_available()} | "
              f"B={batch} | warmup {warmup}, median of {iters} (baseline: {args.baseline_iters} it) | "
              f"device-to-device copy {bw:.0f} GB/s" + (f" | config {configs}" if configs else ""))
    print(header, flush=True)

    rows, parts = [], []
    t_start = time.perf_counter()
    for (hw, dim), used_by in shapes.items():
        shape = f"{'/'.join(used_by)} {dim}@{hw}x{hw}"
        for dt in dtypes:
            r = dict(shape=shape, dtype=dt)
            try:
                layer, x, ctx = make_case(dim, hw, batch, dt, device)
                params = list(layer.parameters())
                fn = lambda inp: layer(inp, hw, hw)  # noqa: E731
                layer.fused = True
                layer.scan_with_out_norm = args.scan_with_out_norm == "on"
                fwd, fb = fwd_bwd_fns(fn, [x], params, ctx)
                r["fwd"] = time_ms(fwd, device, warmup, iters)
                r["fb"] = time_ms(fb, device, warmup, iters)
                if args.graph and not cpu:
                    r["fb_graph"] = graph_ms(fb, iters, warmup)
                if args.scan_with_out_norm == "ab":  # the same layer and input with the joined op, then without
                    r["ab"] = [r["fwd"], r["fb"], r.get("fb_graph")]
                    for flag in (True, False):
                        layer.scan_with_out_norm = flag
                        fwd2, fb2 = fwd_bwd_fns(fn, [x], params, ctx)
                        r["ab"] += [time_ms(fwd2, device, warmup, iters), time_ms(fb2, device, warmup, iters),
                                    graph_ms(fb2, iters, warmup) if args.graph and not cpu else None]
                    with torch.no_grad(), ctx():  # the flag is False after the loop
                        separate = fn(x)
                        layer.scan_with_out_norm = True
                        r["ab_diff"] = (fn(x).float() - separate.float()).abs().max().item()
                        layer.scan_with_out_norm = False
                if args.breakdown:
                    prow, err = breakdown(layer, x, hw, hw, ctx, device, warmup, iters, graph=args.graph and not cpu)
                    parts.append((shape, dt, r.get("fb_graph", r["fb"]), prow, err))
                if (hw, dim) in baseline:
                    layer.fused = False
                    _, fb_ref = fwd_bwd_fns(fn, [x], params, ctx)
                    r["base"] = time_ms(fb_ref, device, args.baseline_warmup, args.baseline_iters)
            except torch.OutOfMemoryError:
                r["error"] = "OOM"
            except Exception as e:  # noqa: BLE001  (e.g. a dtype a backend rejects: report and go on)
                r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            layer = x = fwd = fb = None
            if not cpu:
                torch.cuda.empty_cache()
            rows.append(r)
            print(f"  {shape:16s} {dt:9s} " + (r["error"] if "error" in r else
                  f"fwd {r['fwd']:8.3f} ms  fwd+bwd {r['fb']:8.3f} ms"
                  + (f"  graph fwd+bwd {r['fb_graph']:8.3f} ms" if "fb_graph" in r else "")
                  + (f"  baseline {r['base']:9.1f} ms" if "base" in r else "")), flush=True)

    graph = any("fb_graph" in r for r in rows)
    table = ["| shape (models dim@HxW) | dtype | fast fwd ms | fast fwd+bwd ms | "
             + ("fast fwd+bwd ms, CUDA graph | " if graph else "")
             + "baseline fwd+bwd ms | speed-up | target met |", "|---|---|---|---|---|---|---|" + ("---|" if graph else "")]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['shape']} | {r['dtype']} | {r['error']} | | | | |" + (" |" if graph else ""))
            continue
        fb = r.get("fb_graph", r["fb"])  # judged on device time when the graph replay was measured
        t_ok = fb < TARGET_MS
        if "base" in r:
            sp = r["base"] / fb
            met = "yes" if t_ok and sp >= TARGET_SPEEDUP else \
                f"no ({', '.join(w for w, ok in (('time', t_ok), ('speed-up', sp >= TARGET_SPEEDUP)) if not ok)})"
            base, spd = f"{r['base']:.1f}", f"{sp:.1f}x"
        else:
            base, spd = "-", "-"
            met = ("yes" if t_ok else "no") + " (time only; no baseline)"
        gcol = (f" {r['fb_graph']:.3f} |" if "fb_graph" in r else " - |") if graph else ""
        table.append(f"| {r['shape']} | {r['dtype']} | {r['fwd']:.3f} | {r['fb']:.3f} |{gcol} {base} | {spd} | {met} |")
    lines = [header, "", f"Target: fast fwd+bwd < {TARGET_MS} ms and >= {TARGET_SPEEDUP:.0f}x the official-style "
             "path (fused=False)" + (", judged on the CUDA-graph time where measured." if graph else "."), "", *table]
    for shape, dt, whole, prow, err in parts:
        total = sum(p[2] for p in prow)
        lines += ["", f"### fast path by op{' (CUDA-graph replays)' if graph else ''}: {shape}, {dt} (whole layer fwd+bwd {whole:.3f} ms; "
                  f"sum of parts {total:.3f} ms; chain vs layer max |diff| {err:.2e})", "",
                  "| op | fwd ms | fwd+bwd ms | share of sum |", "|---|---|---|---|"]
        lines += [f"| {n} | {f:.3f} | {fb:.3f} | {100 * fb / total:.0f}% |" for n, f, fb in prow]
    if any("ab" in r for r in rows):
        def ms(v):
            return "-" if v is None else f"{v:.3f}"
        lines += ["", "### scan_with_out_norm A/B (same layer and input; order: off, on, off again)", "",
                  "| shape | dtype | off fwd / fwd+bwd / graph ms | on fwd / fwd+bwd / graph ms | "
                  "off again | on vs mean(off), fwd+bwd (graph where timed) | max abs diff of outputs |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "ab" not in r:
                continue
            a = r["ab"]
            off, on, off2 = a[0:3], a[3:6], a[6:9]
            k = 2 if off[2] is not None else 1
            ratio = on[k] / ((off[k] + off2[k]) / 2)
            lines.append(f"| {r['shape']} | {r['dtype']} | {' / '.join(map(ms, off))} | {' / '.join(map(ms, on))} | "
                         f"{' / '.join(map(ms, off2))} | {ratio:.3f} | {r['ab_diff']:.2e} |")
    lines += ["", f"total wall time {time.perf_counter() - t_start:.0f} s"]
    text = "\n".join(lines)
    print("\n" + text)
    write_report(args.out, "bench_layer.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
