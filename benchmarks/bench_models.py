"""End-to-end GroupMamba throughput: training step and inference, fast path vs baselines.

    python benchmarks/bench_models.py                 # CUDA: T/S/B, ~3-4 min on an H100
    python benchmarks/bench_models.py --quick         # CUDA: T only, fewer iterations
    python benchmarks/bench_models.py --device cpu --quick   # smoke test (demo model, 32x32)
    python benchmarks/bench_models.py --cuda-graph           # CUDA: whole step captured in one CUDA graph

Rows:
  fast          the model as shipped (batched layer, fused CUDA / C++ ops)
  ref-ops       the same layer with GROUPMAMBA_FORCE_REFERENCE=1 (PyTorch reference ops; scan loops over L)
  official-style  per-group SS2D branches with flip/transpose copies and the naive scan (fused=False),
                the structure of the official implementation with a PyTorch scan
The two baselines loop over L in Python, so they are timed on the first model only, for a couple of
iterations. Modes: train (forward + backward + AdamW, autocast bf16, and fp16 with GradScaler) at
--train-batch, inference (autocast bf16, inference_mode) at --infer-batch; CPU runs float32. Peak memory is
torch.cuda.max_memory_allocated for that mode. Results: a markdown table on stdout, and
bench_models.md / bench_models.json under $OUT (or --out) when set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

# benchmarks/ is on sys.path
from benchutil import (add_op_config_argument, apply_op_configs, capture_graph, device_name, train_optimizer,
                       write_report)

BASELINES = ("ref-ops", "official-style")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, warmup: int, iters: int, max_seconds: float) -> tuple[float, int]:
    """Mean seconds per call of fn over up to ``iters`` calls (stops early past max_seconds)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    n = 0
    while n < iters:
        fn()
        n += 1
        if time.perf_counter() - start > max_seconds:
            _sync(device)
            if time.perf_counter() - start > max_seconds:
                break
    _sync(device)
    return (time.perf_counter() - start) / n, n


def _set_path(model, path: str, ffn_recompute: bool):
    if path == "ref-ops":
        os.environ["GROUPMAMBA_FORCE_REFERENCE"] = "1"
    else:
        os.environ.pop("GROUPMAMBA_FORCE_REFERENCE", None)
    model.set_fused(path != "official-style")
    # the official FFN keeps its activations; --no-ffn-recompute gives the fast path's A/B
    model.set_ffn_recompute(path != "official-style" and ffn_recompute)


def bench_one(name: str, path: str, mode: str, args, device) -> dict:
    from groupmamba.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=1000, proj_impl=args.proj_impl).to(device)
    _set_path(model, path, not args.no_ffn_recompute)
    baseline = path in BASELINES
    warmup = args.baseline_warmup if baseline else args.warmup
    iters = args.baseline_iters if baseline else args.iters
    img = args.img
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[mode.split("_")[1]]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # CUDA-graph trees reuse output memory across replays: each iteration must say a new step begins
    cudagraphs = args.compile and not baseline and args.compile_mode == "reduce-overhead"
    mark_step = torch.compiler.cudagraph_mark_step_begin if cudagraphs else (lambda: None)
    graphed = args.cuda_graph and not baseline and device.type == "cuda"
    if graphed and mode == "train_fp16":
        return dict(model=name, path=path, mode=mode, error="skipped: GradScaler's step syncs with the host "
                    "(not capturable); use bf16 with --cuda-graph")
    if mode.startswith("train"):
        B = args.train_batch
        model.train()
        compiled = args.compile and not baseline and not graphed  # the graph captures the eager model
        run = torch.compile(model, mode=args.compile_mode) if compiled else model
        # the training script's optimizer set-up: each group's parameters in one buffer (--flat-params)
        zero_grad, opt_step = train_optimizer(model, device, graphed, not args.no_flat_params and not compiled)
        scaler = torch.amp.GradScaler(device.type, enabled=(mode == "train_fp16"))
        x = torch.randn(B, 3, img, img, device=device)
        y = torch.randint(0, 1000, (B,), device=device)

        def forward_loss():
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                out, dist = run(x)
                return 0.5 * F.cross_entropy(out, y) + 0.5 * F.cross_entropy(dist, y)

        if graphed:  # forward + backward + AdamW captured; the gradients live in the graph's memory
            def body():
                forward_loss().backward()
                opt_step()

            step = capture_graph(body, zero_grad)
        else:
            def step():
                mark_step()
                scaler.scale(forward_loss()).backward()
                opt_step(scaler.step)
                scaler.update()
                zero_grad()
    else:
        B = args.infer_batch
        model.eval()
        run = torch.compile(model, mode=args.compile_mode) if args.compile and not baseline else model
        x = torch.randn(B, 3, img, img, device=device)

        def step():
            mark_step()
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                                        enabled=amp_dtype is not None):
                run(x)

        if graphed:
            step = capture_graph(step, lambda: None)

    sec, n = _timed(step, device, warmup, iters, args.baseline_seconds if baseline else args.max_seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    os.environ.pop("GROUPMAMBA_FORCE_REFERENCE", None)
    return dict(model=name, path=path, mode=mode, batch=B, img=img, iters=n, ms_per_iter=sec * 1e3,
                images_per_s=B / sec, peak_mem_gib=peak)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default=None, help="comma list (default: T,S,B on CUDA; demo on CPU --quick)")
    ap.add_argument("--quick", action="store_true", help="first model only, fewer iterations")
    ap.add_argument("--img", type=int, default=None)
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--infer-batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=10.0, help="cap per fast-path measurement")
    ap.add_argument("--baseline-iters", type=int, default=2)
    ap.add_argument("--baseline-seconds", type=float, default=20.0, help="cap per baseline measurement")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--baselines", default=",".join(BASELINES), help=f"comma list of {BASELINES}")
    ap.add_argument("--baseline-warmup", type=int, default=1)
    ap.add_argument("--modes", default=None,
                    help="comma list of train_{bf16,fp16,fp32}, infer_{bf16,fp16,fp32} "
                         "(default CUDA: train_bf16,train_fp16,infer_bf16; CPU: train_fp32,infer_fp32)")
    ap.add_argument("--proj-impl", default="auto", choices=("auto", "blockdiag", "bmm"))
    ap.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="capture the fast path's whole step (forward, backward, AdamW) in one CUDA graph and time "
                         "its replays: the step's device time without per-kernel host launches")
    ap.add_argument("--no-flat-params", action="store_true",
                    help="AdamW over the model's parameter tensors instead of one flat buffer (the training script's "
                         "--no-flat-params)")
    ap.add_argument("--no-ffn-recompute", action="store_true",
                    help="keep every ConvFFN activation (ffn_recompute=False): memory/speed A/B of the default")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode (e.g. reduce-overhead: CUDA graphs, no per-kernel host launches)")
    ap.add_argument("--scan-with-out-norm", choices=("off", "on", "inference"), default="inference",
                    help="GroupMambaLayer.scan_with_out_norm (the scan kernels apply each group's out_norm * SiLU(z)): "
                         "never, always, or where autograd records nothing (the default)")
    add_op_config_argument(ap)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    default_models = "groupmamba_demo" if cpu else "groupmamba_tiny,groupmamba_small,groupmamba_base"
    models = [m for m in (args.models or default_models).split(",") if m]
    if args.quick:
        models = models[:1]
    small = cpu and models == ["groupmamba_demo"]
    args.img = args.img or (32 if small else 224)
    args.train_batch = args.train_batch or (8 if cpu else (64 if args.quick else 128))
    args.infer_batch = args.infer_batch or (16 if cpu else (128 if args.quick else 256))
    args.iters = args.iters or (3 if cpu or args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    # CPU bf16 depthwise convolutions take PyTorch's slow path, so CPU defaults to float32
    modes = (args.modes or ("train_fp32,infer_fp32" if cpu else "train_bf16,train_fp16,infer_bf16")).split(",")

    import groupmamba
    from groupmamba import _native
    from groupmamba.models.mixer import GroupMambaLayer
    GroupMambaLayer.scan_with_out_norm = {"off": False, "on": True}.get(args.scan_with_out_norm, "inference")
    configs = apply_op_configs(args.config)

    gpu = device_name(device)
    header = (f"device: {gpu} | torch {torch.__version__} | groupmamba {groupmamba.__version__} | "
              f"native ops: {_native.native_available()} | img {args.img} | proj_impl {args.proj_impl}"
              f"{(' | compiled, mode ' + str(args.compile_mode)) if args.compile else ''}"
              f"{' | ffn_recompute off' if args.no_ffn_recompute else ''}"
              f"{' | whole-step CUDA graph' if args.cuda_graph else ''}"
              f" | scan_with_out_norm {args.scan_with_out_norm}" + (f" | config {configs}" if configs else ""))
    print(header, flush=True)

    rows = []
    t0 = time.perf_counter()
    for i, name in enumerate(models):
        baselines = [b for b in args.baselines.split(",") if b]
        unknown = set(baselines) - set(BASELINES)
        if unknown:
            ap.error(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
        paths = ["fast"] + ([] if args.no_baseline or i > 0 else baselines)
        for path in paths:
            for mode in modes:
                if path in BASELINES and mode == "train_fp16":
                    continue
                try:
                    r = bench_one(name, path, mode, args, device)
                except torch.OutOfMemoryError:
                    r = dict(model=name, path=path, mode=mode, error="OOM")
                    torch.cuda.empty_cache()
                rows.append(r)
                if "error" in r:
                    print(f"  {name} {path} {mode}: {r['error']}", flush=True)
                else:
                    print(f"  {name:18s} {path:15s} {mode:10s} B={r['batch']:<4d} {r['images_per_s']:9.1f} img/s "
                          f"{r['ms_per_iter']:9.1f} ms/it  peak {r['peak_mem_gib']:.2f} GiB  ({r['iters']} it)",
                          flush=True)

    table = ["| model | path | mode | batch | images/s | ms/iter | peak mem (GiB) | speedup vs fast? |",
             "|---|---|---|---|---|---|---|---|"]
    fast = {(r["model"], r["mode"]): r for r in rows if r.get("path") == "fast" and "error" not in r}
    for r in rows:
        if "error" in r:
            table.append(f"| {r['model']} | {r['path']} | {r['mode']} | - | {r['error']} | - | - | - |")
            continue
        ref = fast.get((r["model"], r["mode"]))
        ratio = f"fast is {ref['images_per_s'] / r['images_per_s']:.1f}x" if ref and r["path"] != "fast" else ""
        table.append(f"| {r['model']} | {r['path']} | {r['mode']} | {r['batch']} | {r['images_per_s']:.1f} "
                     f"| {r['ms_per_iter']:.1f} | {r['peak_mem_gib']:.2f} | {ratio} |")
    text = "\n".join([header, "", *table, "", f"total wall time {time.perf_counter() - t0:.0f}s"])
    print("\n" + text)
    write_report(args.out, "bench_models.md", text)
    write_report(args.out, "bench_models.json", json.dumps(dict(header=header, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
