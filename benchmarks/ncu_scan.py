"""Runs the fused scan forward and backward once per shape, for Nsight Compute (benchmarks/device_ncu.sh).

    ncu --kernel-name regex:fast_kernel python benchmarks/ncu_scan.py T1 T3 T1n

Shapes are GroupMamba-T stages at B=128, bf16 (T1 64@56x56, T2 128@28x28, T3 348@14x14, T4 448@7x7); a name
ending in "n" (T1n) runs the scan with the gated out_norm (grouped_scan_norm) instead.
"""
import torch

import groupmamba  # noqa: F401
from groupmamba.ops import grouped_scan, grouped_scan_norm

from benchutil import run_shapes_main  # benchmarks/ is on sys.path as a script

SHAPES = {"T1": (56, 64), "T2": (28, 128), "T3": (14, 348), "T4": (7, 448)}


def run(name: str, batch: int = 128, dtype=torch.bfloat16):
    norm = name.endswith("n")
    side, C = SHAPES[name.removesuffix("n")]
    d = C // 4
    R = -(-d // 16)
    u = torch.randn(batch, side, side, C, device="cuda", dtype=dtype, requires_grad=True)
    params = [torch.randn(4, R + 2, d) / d ** 0.5, torch.randn(4, d, R) / R ** 0.5, torch.full((4, d), -2.0),
              torch.zeros(4, d, 1), torch.ones(4, d)]
    params = [p.cuda().requires_grad_() for p in params]
    if norm:
        z = torch.randn_like(u).requires_grad_()
        nw, nb = [t.cuda().requires_grad_() for t in (1 + 0.1 * torch.randn(4, d), 0.1 * torch.randn(4, d))]
        y = grouped_scan_norm(u, z, *params, nw, nb, 1e-5)
    else:
        y = grouped_scan(u, *params)
    y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


if __name__ == "__main__":
    run_shapes_main(run, "T1")
