"""Helpers every benchmark shares, so their figures are measured one way: device name, median timing,
and the device-to-device copy bandwidth that kernels are judged against."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


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


def copy_bandwidth_gbs(device="cuda") -> float:
    """Device-to-device copy bandwidth, (bytes read + bytes written) / time: 1 GiB of fp32 on CUDA,
    64 MiB on CPU."""
    device = torch.device(device)
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * n * 4 / ms / 1e6
