"""torch.profiler view of one GroupMamba training step and one inference step (fast path).

    python benchmarks/profile_model.py                        # CUDA: groupmamba_tiny, train B=128, infer B=256
    python benchmarks/profile_model.py --device cpu --quick   # smoke test (groupmamba_demo, 32x32)
    python benchmarks/profile_model.py --cuda-graph           # replays of the whole step in one CUDA graph

Train: forward + backward + fused AdamW under bf16 autocast; inference: bf16 autocast, inference_mode.
After --warmup steps, each mode is timed without the profiler (--wall-iters steps, synchronized) and then
profiled for --steps steps. Reported per step:
  (a) the top 25 CUDA kernels by total device time (on CPU: the top 25 ops by self CPU time);
  (b) device busy time (union of kernel/memcpy/memset intervals) and the sum of kernel times, against
      wall time: busy/wall near 1 means device-bound, well below 1 means the GPU waits on the host;
  (c) kernel launches (device kernels; and launch API calls on the host);
  (d) CPU-side op count (all aten:: ops, and top-level ones, i.e. not nested in another aten op);
  (e) on CUDA, device time by part of the model (kernel names grouped by CATEGORIES) and the top 20 aten
      ops by the device time of the kernels they launch.
Writes $OUT/profile.md (or --out), $OUT/kernels_<mode>.tsv (every kernel name with its part, calls and
ms per step: where the many small kernels come from) and, for the train step, $OUT/trace_train.json.gz
when under 16 MB.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from benchutil import capture_graph, device_name, train_optimizer  # benchmarks/ is on sys.path as a script

MAX_TRACE_BYTES = 16 << 20
# Kernel name patterns -> the part of the model they belong to (first match wins), so one profile says
# where a step's device time goes without reading 25 mangled names.
CATEGORIES = (
    ("scan forward", ("fwd_fast_kernel", "fwd_generic_kernel")),
    ("scan backward", ("bwd_fast_kernel", "bwd_generic_kernel", "reduce_level")),
    ("dwconv (Triton fwd / cuDNN bwd)", ("_dwconv_fwd", "conv_depthwise", "depthwise", "dgrad", "wgrad")),
    ("group LayerNorm + gate (Triton)", ("_gln_",)),
    ("modulation + LayerNorm (Triton)", ("_ln_pool", "_mod_ln")),
    ("bias column sums, conv activation backward (Triton)", ("_colsum",)),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
    ("other convolution (stem, downsample)", ("conv", "implicit", "winograd", "cudnn")),
    ("optimizer", ("multi_tensor", "adam", "Adam")),
    ("normalization (torch)", ("layer_norm", "LayerNorm", "batch_norm")),
    ("reductions (torch)", ("reduce_kernel", "Reduce")),
    ("copies, casts, padding", ("copy", "Memcpy", "Memset", "cat", "pad", "transpose", "fill")),
    ("elementwise (torch)", ("elementwise", "Elementwise")),
)


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other"


LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
               "cudaGraphLaunch", "cudaLaunchCooperativeKernel")


def make_step(model, mode: str, batch: int, img: int, amp, device, graphed: bool = False):
    """One training (forward, backward, fused AdamW) or inference step; graphed: the whole step captured
    in one CUDA graph as bench_models.py --cuda-graph runs it (flat AdamW buffers, capturable AdamW), so
    the profile shows the kernels of the measured configuration (no per-op CPU rows then)."""
    x = torch.randn(batch, 3, img, img, device=device)
    ctx = lambda: torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)  # noqa: E731
    if mode == "train":
        model.train()
        y = torch.randint(0, 1000, (batch,), device=device)
        zero_grad, opt_step = train_optimizer(model, device, graphed, flat=graphed)

        def body():
            with ctx():
                out, dist = model(x)
                loss = 0.5 * F.cross_entropy(out, y) + 0.5 * F.cross_entropy(dist, y)
            loss.backward()
            opt_step()

        if graphed:
            return capture_graph(body, zero_grad)

        def step():
            body()
            zero_grad()
    else:
        model.eval()

        def step():
            with torch.inference_mode(), ctx():
                model(x)
        if graphed:
            return capture_graph(step, lambda: None)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(step, device, iters: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


def busy_us(intervals) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total, end = total + (e - s), e
        elif e > end:
            total, end = total + (e - end), e
    return total


def is_aten_nested(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return True
        p = p.cpu_parent
    return False


def analyze(prof, steps: int, mode: str, wall: float, wall_prof: float, cuda: bool) -> tuple[list, dict]:
    events = prof.events()
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    # record_function ranges ("train_step", "Optimizer.step#...") also appear as device-side events
    # spanning their kernels; only real kernels and copies count
    dev = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    kernels = [e for e in dev if not e.name.startswith(("Memcpy", "Memset"))]
    aten = [e for e in cpu if e.name.startswith("aten::")]
    top_level = [e for e in aten if not is_aten_nested(e)]
    launches = sum(e.name in LAUNCH_APIS for e in cpu)

    agg = collections.defaultdict(lambda: [0, 0.0])
    if cuda:
        for e in dev:
            agg[e.name][0] += 1
            agg[e.name][1] += e.time_range.elapsed_us()
        title = "top 25 CUDA kernels by total device time"
    else:
        for e in aten:
            agg[e.name][0] += 1
            agg[e.name][1] += e.self_cpu_time_total
        title = "top 25 aten ops by self CPU time (CPU run: no kernels)"
    total = sum(v[1] for v in agg.values()) or 1.0
    busy = busy_us((e.time_range.start, e.time_range.end) for e in dev) / 1e3 / steps
    ksum = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps

    lines = [f"## {mode} step", "",
             f"- wall time per step: {wall:.2f} ms unprofiled, {wall_prof:.2f} ms under the profiler "
             f"({steps} profiled steps)"]
    if cuda:
        ratio = busy / wall
        verdict = "device-bound" if ratio >= 0.9 else "host-bound / device idle part of the step"
        lines += [f"- device busy time per step: {busy:.2f} ms (sum of kernel times {ksum:.2f} ms); "
                  f"busy / unprofiled wall = {ratio:.2f} -> {verdict}",
                  f"- kernel launches per step: {len(kernels) / steps:.0f} device kernels "
                  f"(+ {(len(dev) - len(kernels)) / steps:.0f} memcpy/memset), "
                  f"{launches / steps:.0f} launch API calls on the host"]
    else:
        lines += ["- device time / kernel launches: n/a on CPU"]
    if cuda:
        cats = collections.defaultdict(lambda: [0, 0.0])
        for name, (n, us) in agg.items():
            cats[category(name)][0] += n
            cats[category(name)][1] += us
        lines += ["", "### device time by part (per step)", "", "| part | kernels | ms | share |", "|---|---|---|---|"]
        for label, (n, us) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| {label} | {n / steps:.0f} | {us / 1e3 / steps:.3f} | {100 * us / total:.1f}% |")
        lines.append("")
    if cuda:
        # which torch ops launch the device time: kernels charged to the op that launched them
        ops = [a for a in prof.key_averages() if a.self_device_time_total > 0 and a.key.startswith("aten::")]
        ops.sort(key=lambda a: -a.self_device_time_total)
        lines += ["### top 20 aten ops by the device time of the kernels they launch (per step)", "",
                  "| op | calls | ms | share |", "|---|---|---|---|"]
        for a in ops[:20]:
            lines.append(f"| `{a.key}` | {a.count / steps:.0f} | {a.self_device_time_total / 1e3 / steps:.3f} | "
                         f"{100 * a.self_device_time_total / total:.1f}% |")
        lines.append("")
    lines += [f"- CPU-side ops per step: {len(aten) / steps:.0f} aten ops, {len(top_level) / steps:.0f} top-level "
              f"(not nested in another aten op)", "", f"### {title} (per step)", "",
              "| # | name | calls | total ms | share |", "|---|---|---|---|---|"]
    top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]
    for i, (name, (n, us)) in enumerate(top, 1):
        short = name if len(name) <= 100 else name[:97] + "..."
        lines.append(f"| {i} | `{short.replace('|', '/')}` | {n / steps:.0f} | {us / 1e3 / steps:.3f} | "
                     f"{100 * us / total:.1f}% |")
    return lines, agg


def write_kernel_table(path: str, agg: dict, steps: int) -> None:
    """Every kernel (or, on CPU, aten op) with its part, calls and ms per step, longest total first."""
    with open(path, "w") as f:
        f.write("part\tcalls\tms\tname\n")
        for name, (n, us) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
            f.write(f"{category(name)}\t{n / steps:g}\t{us / 1e3 / steps:.4f}\t{name}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="on CPU: groupmamba_demo at 32x32, small batches")
    ap.add_argument("--model", default=None, help="default groupmamba_tiny (groupmamba_demo on CPU --quick)")
    ap.add_argument("--img", type=int, default=None)
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--infer-batch", type=int, default=None)
    ap.add_argument("--amp", default=None, choices=("bf16", "fp32"), help="default bf16 (fp32 on CPU)")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--wall-iters", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (numbers are per step)")
    ap.add_argument("--cuda-graph", action="store_true", help="profile replays of the whole step captured in "
                    "one CUDA graph (bench_models.py --cuda-graph's configuration)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tiny = not cuda and args.quick
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    model_name = args.model or ("groupmamba_demo" if tiny else "groupmamba_tiny")
    img = args.img or (32 if tiny else 224)
    batches = dict(train=args.train_batch or (8 if tiny else 128), infer=args.infer_batch or (16 if tiny else 256))
    amp = {"bf16": torch.bfloat16, "fp32": None}[args.amp or ("bf16" if cuda else "fp32")]
    warmup = args.warmup if args.warmup is not None else (2 if not cuda else 5)
    wall_iters = args.wall_iters or (3 if not cuda else 10)

    from groupmamba import _native
    from groupmamba.models import create_model

    name = device_name(device)
    header = (f"device: {name} | torch {torch.__version__} | native ops: {_native.native_available()} | "
              f"{model_name} {img}x{img} | {'bf16 autocast' if amp else 'fp32, no autocast'} | "
              f"train B={batches['train']} (AdamW{' fused' if cuda else ''}), infer B={batches['infer']}")
    print(header, flush=True)
    lines = [header, ""]
    out = args.out
    if out:
        os.makedirs(out, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for mode in [m for m in args.modes.split(",") if m]:
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=1000).to(device)
        step = make_step(model, mode, batches[mode], img, amp, device, args.cuda_graph and cuda)
        for _ in range(warmup):
            step()
        wall = wall_ms(step, device, wall_iters)
        sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                with record_function(f"{mode}_step"):
                    step()
            sync(device)
            wall_prof = (time.perf_counter() - t0) * 1e3 / args.steps
        section, agg = analyze(prof, args.steps, mode, wall, wall_prof, cuda)
        if out:
            write_kernel_table(os.path.join(out, f"kernels_{mode}.tsv"), agg, args.steps)
        if out and mode == "train":
            path = os.path.join(out, "trace_train.json.gz")
            prof.export_chrome_trace(path)
            size = os.path.getsize(path)
            if size >= MAX_TRACE_BYTES:
                os.remove(path)
                section.insert(2, f"- chrome trace: {size / 2**20:.1f} MB >= 16 MB, not kept")
            else:
                section.insert(2, f"- chrome trace: {path} ({size / 2**20:.1f} MB)")
        print("\n" + "\n".join(section), flush=True)
        lines += section + [""]
        del model, step, prof
        if cuda:
            torch.cuda.empty_cache()
    if out:
        with open(os.path.join(out, "profile.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
