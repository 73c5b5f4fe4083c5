"""Helpers every benchmark shares, so their figures are measured one way: device name, median timing,
and the device-to-device copy bandwidth that kernels are judged against."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from groupmamba.atomic import atomic_write
from groupmamba.train.flat_params import FlatParams, clear_grads
from groupmamba.train.graph_step import capture


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def write_report(out_dir, name: str, text: str) -> None:
    """Writes ``text`` to ``out_dir/name`` atomically (nothing when out_dir is empty or None)."""
    if not out_dir:
        return

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
    atomic_write(os.path.join(out_dir, name), write)


def time_ms(fn, device, warmup: int, iters: int) -> float:
    """Median milliseconds per call (CUDA events on CUDA, perf_counter on CPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    events = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def graph_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median device milliseconds of fn as CUDA-graph replays (launch gaps drop out)."""
    return time_ms(capture_graph(fn, lambda: None), "cuda", warmup, iters)


def emit(lines: list, row: str) -> None:
    """Prints a table row as it is measured and keeps it for the report."""
    print(row, flush=True)
    lines.append(row)


def copy_bandwidth_gbs(device="cuda") -> float:
    """Device-to-device copy bandwidth, (bytes read + bytes written) / time: 1 GiB of fp32 on CUDA,
    64 MiB on CPU."""
    device = torch.device(device)
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * n * 4 / ms / 1e6


def train_optimizer(model, device, graphed: bool, flat: bool):
    """The benchmarks' optimizer, set up as the training script does: AdamW (fused on CUDA, capturable
    when the step is graphed) over the model's parameters, flattened into one buffer when ``flat``
    (train --flat-params). Returns (zero_grad(), step(step_fn)); step gathers the flat gradients,
    then runs step_fn(optimizer) (optimizer.step or a GradScaler's step)."""
    fl = FlatParams([{"params": list(model.parameters())}]) if flat else None
    opt = torch.optim.AdamW(fl.param_groups if fl else model.parameters(), lr=1e-4, weight_decay=0.05,
                            **({"fused": True, "capturable": graphed} if device.type == "cuda" else {}))

    def zero_grad():
        clear_grads(opt, fl)

    def step(step_fn=lambda o: o.step()):
        if fl:
            fl.gather_grads()
        step_fn(opt)
    return zero_grad, step


def capture_graph(body, before_each, warmup: int = 3):
    """Whole-step CUDA graph (groupmamba.train.graph_step.capture, the PyTorch recipe); returns its replay.
    Replays launch every kernel of the step with one host call, so host overhead drops out of the timing."""
    graph, _ = capture(body, before_each, warmup)
    return graph.replay


def add_op_config_argument(ap) -> None:
    """The --config option that apply_op_configs reads (repeatable)."""
    ap.add_argument("--config", action="append", metavar="MODULE.KEY=VALUE",
                    help="set groupmamba.ops.MODULE.CONFIG[KEY] first (A/B runs), e.g. triton_linear.enabled=False")


def apply_op_configs(settings) -> str:
    """Applies "module.key=value" settings to groupmamba.ops.<module>.CONFIG (value parsed as a Python
    literal: 0, 2048, None, False), for A/B runs of one switch; returns them as one string for headers."""
    import ast
    import importlib
    for item in settings or ():
        name, _, value = item.partition("=")
        module, _, key = name.partition(".")
        config = importlib.import_module(f"groupmamba.ops.{module}").CONFIG
        if key not in config:
            raise SystemExit(f"--config {item}: {module}.CONFIG has no key {key!r} (keys: {sorted(config)})")
        try:
            config[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--config {item}: {value!r} is not a Python literal (True, 2048, None)") from None
    return " ".join(settings or ())


def run_shapes_main(run, default: str) -> None:
    """The command line of the Nsight Compute driver scripts (ncu_scan.py, ncu_dwconv.py): the GPU's name,
    then run(name) for every shape named in sys.argv (default: one), then "done"."""
    import sys
    print("GPU:", torch.cuda.get_device_name())
    for shape in sys.argv[1:] or [default]:
        run(shape)
    print("done")
