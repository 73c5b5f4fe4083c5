"""Depthwise 3x3 convolution + bias + activation on channels-last tokens (the GroupMamba mixer's
conv + SiLU and the ConvFFN's dwconv + GELU).

    dwconv_act(x, weight, bias, act, x_bias=None)
        x: (B, H, W, C); weight: (C, 1, 3, 3); bias: (C,); act: "silu", "gelu" (exact, erf) or "none";
        x_bias: None or (C,), a bias already added into x without a gradient (the producing Linear's,
        passed to it detached); this op then returns its gradient, the sum of x's gradient over (B, H, W)

Same function as act(F.conv2d(x in NCHW, weight, bias, padding=1, groups=C)) returned as (B, H, W, C).
x_bias is for ConvFFN's fc1: the fused backward's dx pass adds up that sum as it writes dx, instead of fc1's
bias column sum, a pass over its whole hidden-width output gradient.
CUDA tensors (float32 / bfloat16 / float16) with Triton importable, eagerly: the fused Triton kernel of
triton_dwconv.py (one pass instead of conv, bias add and activation). Otherwise (CPU, float64, under
torch.compile, which fuses the bias and activation itself, or GROUPMAMBA_FORCE_REFERENCE=1): the torch
reference. Output dtype: x's (under autocast the reference's conv runs in the autocast dtype too).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import _native
from ._util import autocast_dtype, check_float_tensors

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTS = ("none", "silu", "gelu")

try:
    from . import triton_dwconv as _td
    _TRITON_ERROR = None
except Exception as e:  # noqa: BLE001
    _td = None
    _TRITON_ERROR = f"{type(e).__name__}: {e}"


def _check(x, weight, bias, act, x_bias=None):
    op = "dwconv_act"
    if act not in ACTS:
        raise ValueError(f"{op}: act must be one of {ACTS}, got {act!r}")
    named = (("x", x), ("weight", weight), ("bias", bias)) + ((("x_bias", x_bias),) if x_bias is not None else ())
    check_float_tensors(op, x, named)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be (B, H, W, C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"{op}: weight must have shape ({C}, 1, 3, 3), got {tuple(weight.shape)}")
    if tuple(bias.shape) != (C,):
        raise ValueError(f"{op}: bias must have shape ({C},), got {tuple(bias.shape)}")
    if x_bias is not None and tuple(x_bias.shape) != (C,):
        raise ValueError(f"{op}: x_bias must have shape ({C},), got {tuple(x_bias.shape)}")


def dwconv_act_reference(x, weight, bias, act: str, x_bias=None):
    if x_bias is not None:   # adds zero to x (in x's dtype), and routes x's gradient summed over (B, H, W) to x_bias
        x = x + (x_bias - x_bias.detach()).to(x.dtype)
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=1, groups=x.shape[-1])
    if act == "silu":
        y = F.silu(y)
    elif act == "gelu":
        y = F.gelu(y)
    return y.permute(0, 2, 3, 1)


def keep_preactivation():
    """Context manager: fused dwconv_act calls inside it keep the pre-activation for their backward
    (see triton_dwconv.keep_preactivation); a no-op without the Triton kernels."""
    return contextlib.nullcontext() if _td is None else _td.keep_preactivation()


def _use_fused(x, weight, bias) -> bool:
    if _td is None or _native.force_reference() or not x.is_cuda or torch.compiler.is_compiling():
        return False
    return all(t.dtype in _FUSED_DTYPES for t in (x, weight, bias))


def dwconv_act(x, weight, bias, act: str = "none", x_bias=None):
    """See the module docstring."""
    _check(x, weight, bias, act, x_bias)
    if not _use_fused(x, weight, bias):
        return dwconv_act_reference(x, weight, bias, act, x_bias)
    return _launch_fused(x, weight, bias, act, x_bias)


def dwconv_act_fused(x, weight, bias, act: str = "none", x_bias=None):
    """The Triton path whatever the device (CPU tensors need TRITON_INTERPRET=1); for tests."""
    if _td is None:
        raise RuntimeError(f"dwconv_act: Triton kernels unavailable ({_TRITON_ERROR})")
    _check(x, weight, bias, act, x_bias)
    return _launch_fused(x, weight, bias, act, x_bias)


def _launch_fused(x, weight, bias, act, x_bias=None):
    """The Triton kernel on checked arguments: x made contiguous, in the autocast dtype when autocast
    is on (as F.conv2d would cast it)."""
    dt = autocast_dtype(x)
    if dt is not None and x.dtype == torch.float32:
        x = x.to(dt)
    if x_bias is None:
        return _td.DWConvAct.apply(x.contiguous(), weight.contiguous(), bias.contiguous(), act)
    return _td.DWConvAct.apply(x.contiguous(), weight.contiguous(), bias.contiguous(), act, x_bias)
