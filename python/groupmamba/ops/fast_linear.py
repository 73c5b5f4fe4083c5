"""linear(x, weight, bias=None): F.linear with GEMM-friendly padding for GroupMamba's awkward widths.

Same function, autograd and autocast behaviour as F.linear. While a CUDA graph is being captured,
16-bit operands (bf16 / fp16, or float32 under a 16-bit autocast) whose K or N is not a multiple of 8
(C = 348 at stage 3 of GroupMamba-T and -S) run as one GEMM with K and N zero-padded to multiples of 8:
rows of 348 bf16 values are 696 bytes, not a multiple of 16, so cuBLAS cannot use Hopper's
tensor-memory loads and falls back to sm_80 kernels. On an H200 (benchmarks/bench_gemm.py,
GroupMamba-T, B=128) the stage-3 Linears of a training step took 14.2 ms of GEMMs, 4.7 ms padded to 352.

How: an autograd.Function (_PaddedLinear) casts and zero-pads x, weight and bias (one copy each), returns
the first N columns of the padded product (a strided view, no copy), and in the backward pads the
incoming gradient once and returns the K columns of the padded dgrad as a view. A Triton GEMM reading the
unpadded rows directly (no copies at all) was tried and was slower than cuBLAS on the padded copies
(BENCHMARKS.md, eighth set).

Also under capture only: a Linear whose bias needs a gradient runs as the same Function (nothing to pad
when the widths are aligned), whose backward sums that gradient with triton_colsum.column_sum instead of
torch's reduction (``CONFIG["column_sum_bias"]``); and with ``triton_linear.CONFIG["single"]`` (off by
default until measured) a 16-bit Linear of widths <= 128 whose weight needs a gradient, its backward then one
Triton pass (gx, the weight gradient and the bias gradient from one read of x and the incoming gradient).

Why only under graph capture: the padding is several more torch ops per call, ~100 us of host time, and an
eager GroupMamba step is already bound by host time (on the H200, a T training step takes ~85 ms on the
device and ~230 ms eagerly). A first version padded in eager mode too, inside a custom autograd.Function:
eager inference fell from ~5600 to 3470 img/s while the CUDA-graph step got faster (BENCHMARKS.md).
In a captured graph host work is free, so there the device time is what counts.

``outputs_unused()``: inside it the padded Function skips its GEMM and returns an uninitialised result,
keeping only what its backward saves. For an activation-checkpoint recompute whose Linear output is
thrown away (ConvFFN's fc2: the recompute is there to rebuild fc2's saved input, not its output).

Elsewhere (eager, CPU, float32 / float64 without autocast, aligned widths, under torch.compile, which
pads GEMMs itself, GROUPMAMBA_FORCE_REFERENCE=1): F.linear itself.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import _native
from ._util import ThreadFlag, autocast_dtype

try:  # Triton is optional: without it, captured Linears keep torch's bias-gradient reduction and dual
    from .triton_colsum import column_sum  # Linears their cuBLAS backward
    from . import triton_linear
except Exception:  # noqa: BLE001
    column_sum = triton_linear = None

ALIGN = 8   # elements: 16 bytes of bf16 / fp16
_PADDED_DTYPES = (torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # column_sum then runs on CPU tensors (tests)


def _pad_to(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def _pad_2d(t: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """t (R, C) in ``dtype``, zero-padded to (rows, cols) and contiguous: one copy kernel (plus a small fill
    of the padding), or t itself when it already is all that."""
    R, C = t.shape
    if (R, C) == (rows, cols):
        return t.to(dtype, memory_format=torch.contiguous_format)
    out = t.new_empty(rows, cols, dtype=dtype)
    if cols > C:
        out[:, C:].zero_()
    if rows > R:
        out[R:, :C].zero_()
    out[:R, :C].copy_(t)
    return out


def _column_sum(g: torch.Tensor) -> torch.Tensor:
    if CONFIG["column_sum_bias"] and column_sum is not None and (g.is_cuda or _INTERPRET):
        return column_sum(g)
    return g.sum(0, dtype=torch.float32 if g.dtype in _PADDED_DTYPES else g.dtype)


_UNUSED = ThreadFlag()


def outputs_unused():
    """Context manager: inside it a captured Linear that runs as _PaddedLinear saves its padded inputs for
    the backward but does not compute its result (returned uninitialised). Only for a checkpoint recompute
    whose Linear outputs nobody reads; the saved tensors are the same as in the original forward."""
    return _UNUSED.on()


class _PaddedLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) computed in ``dtype`` with K and N zero-padded to multiples of ``align``.

    Forward: x, weight and bias are cast and padded (one copy each), the padded product runs in cuBLAS, and
    the (..., N) view of its (..., Np) result is returned (no copy). Backward: the incoming gradient is
    padded (one copy), dgrad and wgrad run padded, the bias gradient is a column sum of the padded
    gradient (triton_colsum), and the x gradient is the (..., K) view of the padded dgrad. Gradients come
    back in the inputs' dtypes, as autocast's casts would return them.

    The plain autograd-tracked ops this replaced (F.pad, slicing) move more bytes and launch more kernels:
    F.pad writes its whole output twice (fill, then copy), the slice's backward likewise, and every cast
    and pad of the weight and bias is a kernel of its own, forward and backward. T's stage-3 Linears per
    training step (H200, bench_gemm): 11.40 ms with those ops, 10.23 ms with this (BENCHMARKS.md, eighth
    set)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, align):
        N, K = weight.shape
        Kp, Np = _pad_to(K, align), _pad_to(N, align)
        x2 = x.reshape(-1, K)
        xp = _pad_2d(x2, x2.shape[0], Kp, dtype)
        wp = _pad_2d(weight, Np, Kp, dtype)
        if _UNUSED:   # a recompute that only needs the saved xp, wp
            yp = xp.new_empty(xp.shape[0], Np)
        else:
            bp = None if bias is None else _pad_2d(bias[None], 1, Np, dtype)[0]
            yp = F.linear(xp, wp, bp)
        ctx.save_for_backward(xp, wp)
        ctx.meta = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return yp[:, :N].view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, g):
        xp, wp = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        Np, Kp = wp.shape
        K = x_shape[-1]
        g2 = g.reshape(-1, g.shape[-1])
        N = g2.shape[1]
        gp = _pad_2d(g2, g2.shape[0], Np, wp.dtype)
        if need_x and need_w and (Np, Kp) == (N, K) and _one_pass_backward(xp, wp, wp.dtype):
            gx, gw, gb = triton_linear.linear_backward(xp, gp, wp, need_b and b_dtype is not None, x_dtype, w_dtype)
            return gx.view(x_shape), gw, None if gb is None else gb.to(b_dtype), None, None
        gx = (gp @ wp)[:, :K].view(x_shape).to(x_dtype) if need_x else None
        gw = _wgrad(gp, xp, w_dtype)[:N, :K] if need_w else None
        gb = _column_sum(gp)[:N].to(b_dtype) if need_b and b_dtype is not None else None
        return gx, gw, gb, None, None


# torch.mm(..., out_dtype=float32) on 16-bit CUDA operands (torch >= 2.8): cuBLAS writes the float32 weight
# gradient directly, instead of a 16-bit product and a cast kernel (one kernel fewer per Linear and step,
# and the gradient is not rounded to 16 bits first).
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _wgrad(gp: torch.Tensor, xp: torch.Tensor, w_dtype: torch.dtype) -> torch.Tensor:
    """gp^T @ xp in ``w_dtype`` (the weight's dtype)."""
    if _MM_OUT_DTYPE and gp.is_cuda and w_dtype == torch.float32 and gp.dtype in _PADDED_DTYPES:
        return torch.mm(gp.t(), xp, out_dtype=torch.float32)
    return (gp.t() @ xp).to(w_dtype)


def linear_padded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  align: int = ALIGN) -> torch.Tensor:
    """x @ weight^T + bias in ``dtype`` with K and N zero-padded to multiples of ``align``; the result is
    the (..., N) view of the (..., Np) product (see _PaddedLinear)."""
    return _PaddedLinear.apply(x, weight, bias, dtype, align)


def padded_dtype(x: torch.Tensor, weight: torch.Tensor):
    """The 16-bit dtype in which ``x @ weight^T`` would run padded (K or N not a multiple of ALIGN), else None."""
    if weight.dim() != 2:
        return None
    dt = autocast_dtype(x) or x.dtype
    N, K = weight.shape
    if dt not in _PADDED_DTYPES or (K % ALIGN == 0 and N % ALIGN == 0) or x.shape[-1] != K:
        return None
    return dt


# The column-sum bias gradient applies inside CUDA graph captures only, like the padding: as a
# custom Function it costs host time per call that an eager step cannot spare (BENCHMARKS.md).
CONFIG = {"column_sum_bias": True}


def _one_pass_backward(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether _PaddedLinear's backward runs as triton_linear's one pass (its CONFIG "single"; CUDA, a
    16-bit dtype, narrow widths)."""
    return (triton_linear is not None and triton_linear.CONFIG["single"] and x.is_cuda
            and triton_linear.serves(dtype, weight.shape[1], weight.shape[0]))


def _captured_linear(x, weight, bias):
    pad_dt = padded_dtype(x, weight)
    dt = pad_dt or autocast_dtype(x) or x.dtype
    trains = torch.is_grad_enabled() and weight.dim() == 2 and dt in _PADDED_DTYPES
    if pad_dt is not None or (trains and (
            (CONFIG["column_sum_bias"] and column_sum is not None and bias is not None and bias.requires_grad)
            or (weight.requires_grad and _one_pass_backward(x, weight, dt)))):
        return linear_padded(x, weight, bias, dt, ALIGN if pad_dt else 1)
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring."""
    if (not x.is_cuda or torch.compiler.is_compiling() or not torch.cuda.is_current_stream_capturing()
            or _native.force_reference()):
        return F.linear(x, weight, bias)
    return _captured_linear(x, weight, bias)


class _DualLinear(torch.autograd.Function):
    """(x @ w1^T, x @ w2^T) for one x (the mixer's in_proj halves). The backward, on CUDA for 16-bit widths up
    to triton_linear's limit: one Triton pass for all three gradients (triton_linear); else cuBLAS, x's
    gradient accumulated in the second dgrad GEMM (addmm_, beta = 1) instead of two products and autograd's
    add of them."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        ctx.save_for_backward(x, w1, w2)
        return F.linear(x, w1), F.linear(x, w2)

    @staticmethod
    def backward(ctx, g1, g2):
        # both gradients are tensors: autograd materializes an unused output's as zeros
        x, w1, w2 = ctx.saved_tensors
        g1, g2 = (g.reshape(-1, g.shape[-1]) for g in (g1, g2))
        need_x, need_w1, need_w2 = ctx.needs_input_grad
        if (need_x and need_w1 and need_w2 and x.is_cuda and triton_linear is not None
                and triton_linear.supports(x, g1, g2, w1, w2)):
            gx, gw1, gw2 = triton_linear.dual_linear_backward(x.reshape(-1, x.shape[-1]), g1, g2, w1, w2)
            return gx.view(x.shape), gw1, gw2
        gx = (g1 @ w1).addmm_(g2, w2).view(x.shape) if need_x else None
        x2 = x.reshape(-1, x.shape[-1])
        return gx, g1.t() @ x2 if need_w1 else None, g2.t() @ x2 if need_w2 else None


def dual_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """(linear(x, w1), linear(x, w2)) for weights of x's dtype; on CUDA as _DualLinear (one GEMM pass fewer in
    the backward), except where ``linear`` pads (16-bit widths not a multiple of 8 under graph capture), under
    torch.compile and with GROUPMAMBA_FORCE_REFERENCE=1."""
    if (not x.is_cuda or torch.compiler.is_compiling() or _native.force_reference() or w1.dtype != x.dtype
            or w2.dtype != x.dtype or (torch.cuda.is_current_stream_capturing()
                                       and (padded_dtype(x, w1) or padded_dtype(x, w2)))):
        return linear(x, w1), linear(x, w2)
    return _DualLinear.apply(x, w1, w2)

