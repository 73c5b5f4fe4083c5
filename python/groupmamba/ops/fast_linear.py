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

Also under capture only: a Linear whose bias needs a gradient runs as a small autograd.Function whose
backward sums that gradient with triton_colsum.column_sum instead of torch's reduction
(``CONFIG["column_sum_bias"]``).

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

try:  # Triton is optional: without it, captured Linears keep torch's bias-gradient reduction
    from .triton_colsum import column_sum
except Exception:  # noqa: BLE001
    column_sum = None

ALIGN = 8   # elements: 16 bytes of bf16 / fp16
_PADDED_DTYPES = (torch.bfloat16, torch.float16)


def _pad_to(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def linear_padded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  align: int = ALIGN, fn=F.linear) -> torch.Tensor:
    """x @ weight^T + bias in ``dtype`` with K and N zero-padded to multiples of ``align``; the result is
    the (..., N) view of the (..., Np) product. ``fn`` runs the padded product (F.linear's signature)."""
    N, K = weight.shape
    Kp, Np = _pad_to(K, align), _pad_to(N, align)
    pad = lambda t, p: t if not any(p) else F.pad(t, p)  # noqa: E731  (no copy when nothing to pad)
    xp = pad(x.to(dtype), (0, Kp - K))
    wp = pad(weight.to(dtype), (0, Kp - K, 0, Np - N))
    bp = None if bias is None else pad(bias.to(dtype), (0, Np - N))
    out = fn(xp, wp, bp)
    return out if Np == N else out[..., :N]


def padded_dtype(x: torch.Tensor, weight: torch.Tensor):
    """The 16-bit dtype in which ``x @ weight^T`` would run padded (K or N not a multiple of ALIGN), else None."""
    if weight.dim() != 2:
        return None
    dt = autocast_dtype(x) or x.dtype
    N, K = weight.shape
    if dt not in _PADDED_DTYPES or (K % ALIGN == 0 and N % ALIGN == 0) or x.shape[-1] != K:
        return None
    return dt


class _LinearColumnSumBias(torch.autograd.Function):
    """F.linear on operands already in the compute dtype, whose backward sums the bias gradient with
    triton_colsum.column_sum instead of torch's reduction (1.0-3.3x faster at GroupMamba's widths on an
    H200, BENCHMARKS.md "Linear layers"). The weight and input gradients are the same two GEMMs autograd
    runs for F.linear."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = (g2 @ weight).view(*g.shape[:-1], weight.shape[1]) if need_x else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        gb = column_sum(g2).to(g.dtype) if need_b else None
        return gx, gw, gb


# The column-sum bias gradient applies inside CUDA graph captures only, like the padding: as a
# custom Function it costs host time per call that an eager step cannot spare (BENCHMARKS.md).
CONFIG = {"column_sum_bias": True}


def _captured_linear(x, weight, bias):
    pad_dt = padded_dtype(x, weight)
    dt = pad_dt or autocast_dtype(x) or x.dtype
    if (CONFIG["column_sum_bias"] and column_sum is not None and bias is not None and bias.requires_grad
            and torch.is_grad_enabled() and weight.dim() == 2 and dt in _PADDED_DTYPES):
        return linear_padded(x, weight, bias, dt, ALIGN if pad_dt else 1, _LinearColumnSumBias.apply)
    return F.linear(x, weight, bias) if pad_dt is None else linear_padded(x, weight, bias, pad_dt)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring."""
    if (not x.is_cuda or torch.compiler.is_compiling() or not torch.cuda.is_current_stream_capturing()
            or _native.force_reference()):
        return F.linear(x, weight, bias)
    return _captured_linear(x, weight, bias)
