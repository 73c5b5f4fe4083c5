"""linear(x, weight, bias=None): F.linear with GEMM-friendly padding for GroupMamba's awkward widths.

Same function, autograd and autocast behaviour as F.linear. While a CUDA graph is being captured,
16-bit operands (bf16 / fp16, or float32 under a 16-bit autocast) whose K or N is not a multiple of 8
(C = 348 at stage 3 of GroupMamba-T and -S) run as one GEMM with K and N zero-padded to multiples of 8:
rows of 348 bf16 values are 696 bytes, not a multiple of 16, so cuBLAS cannot use Hopper's
tensor-memory loads and falls back to sm_80 kernels. On an H200 (benchmarks/bench_gemm.py,
GroupMamba-T, B=128) the stage-3 Linears of a training step took 14.2 ms of GEMMs, 4.7 ms padded to 352.

How: x, weight and bias are cast and zero-padded with ordinary (autograd-tracked) torch ops and the first
N columns of the padded product are returned (a strided view, no copy); autograd slices and pads the
gradients itself.

Why only under graph capture: the padding is ~6 more torch ops per call, ~100 us of host time, and an
eager GroupMamba step is already bound by host time (on the H200, a T training step takes ~85 ms on the
device and ~230 ms eagerly). A first version padded in eager mode too, inside a custom autograd.Function:
eager inference fell from ~5600 to 3470 img/s while the CUDA-graph step got faster (BENCHMARKS.md).
In a captured graph host work is free, so there the device time is what counts.

Elsewhere (eager, CPU, float32 / float64 without autocast, aligned widths, under torch.compile, which
pads GEMMs itself, GROUPMAMBA_FORCE_REFERENCE=1): F.linear itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _native
from ._util import autocast_dtype

ALIGN = 8   # elements: 16 bytes of bf16 / fp16
_PADDED_DTYPES = (torch.bfloat16, torch.float16)


def _pad_to(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def linear_padded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  align: int = ALIGN) -> torch.Tensor:
    """x @ weight^T + bias in ``dtype`` with K and N zero-padded to multiples of ``align``; the result is
    the (..., N) view of the (..., Np) product."""
    N, K = weight.shape
    Kp, Np = _pad_to(K, align), _pad_to(N, align)
    xp = F.pad(x.to(dtype), (0, Kp - K))
    wp = F.pad(weight.to(dtype), (0, Kp - K, 0, Np - N))
    bp = None if bias is None else F.pad(bias.to(dtype), (0, Np - N))
    return F.linear(xp, wp, bp)[..., :N]


def padded_dtype(x: torch.Tensor, weight: torch.Tensor):
    """The 16-bit dtype in which ``x @ weight^T`` would run padded (K or N not a multiple of ALIGN), else None."""
    if weight.dim() != 2:
        return None
    dt = autocast_dtype(x) or x.dtype
    N, K = weight.shape
    if dt not in _PADDED_DTYPES or (K % ALIGN == 0 and N % ALIGN == 0) or x.shape[-1] != K:
        return None
    return dt


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring."""
    if (not x.is_cuda or torch.compiler.is_compiling() or not torch.cuda.is_current_stream_capturing()
            or _native.force_reference()):
        return F.linear(x, weight, bias)
    dt = padded_dtype(x, weight)
    return F.linear(x, weight, bias) if dt is None else linear_padded(x, weight, bias, dt)
