"""Grouped LayerNorm with an optional SiLU gate: the normalizations of the GroupMamba model.

    group_layer_norm(x, weight, bias, eps, gate=None, out_dtype=None)

x: (..., G*d), contiguous or not; weight, bias: (G, d), or (C,) for a plain LayerNorm (G = 1, d = C).
Each of the G consecutive slices of d channels is normalized over its d channels with its own weight
row (the four per-group out_norms of a GroupMamba layer in one call); with ``gate`` (same shape as x)
the result is multiplied by SiLU(gate). Output dtype: ``out_dtype`` if given, else the promotion of
x's and weight's dtypes (what F.layer_norm under autocast gives: float32 for bf16 activations with
float32 weights). Passing the autocast dtype when the consumer is a Linear under autocast rounds exactly
as that Linear's input cast would, and halves the bytes written.

    add_layer_norm(x, residual, weight, bias, eps, residual_scale=None, out_dtype=None) -> (s, out)

s = x + residual (each sample's residual times residual_scale[b] when given: stochastic depth), out the
LayerNorm of s (G = 1 or grouped as above, no gate): a block's residual add and the LayerNorm after it in
one pass, forward and backward (the backward also adds s's gradient from its other uses and writes the
residual's gradient in the residual's dtype). s takes promote_types(x, residual).

Backends: CUDA tensors in float32 / bfloat16 / float16 with Triton importable -> the fused kernels of
triton_norm.py (forward and backward); otherwise, or with GROUPMAMBA_FORCE_REFERENCE=1, the torch
reference below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _native
from ._util import check_float_tensors
from .residual import check_residual, residual_add_reference, scale_as_float32

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_FUSED_ROW = 8192  # G * next_pow2(d) elements of a row live in registers

try:
    from . import triton_norm as _tn
    _TRITON_ERROR = None
except Exception as e:  # noqa: BLE001  (ImportError, or a Triton/torch version mismatch)
    _tn = None
    _TRITON_ERROR = f"{type(e).__name__}: {e}"


def _check(x, weight, bias, gate, out_dtype):
    op = "group_layer_norm"
    check_float_tensors(op, x, (("x", x), ("weight", weight), ("bias", bias))
                        + ((("gate", gate),) if gate is not None else ()))
    if weight.dim() not in (1, 2) or weight.shape != bias.shape:
        raise ValueError(f"{op}: weight and bias must both be (G, d) or (C,), got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.numel():
        raise ValueError(f"{op}: the last dim of x ({x.shape[-1] if x.dim() else None}) must equal G*d = "
                         f"{weight.numel()} (weight shape {tuple(weight.shape)})")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"{op}: gate has shape {tuple(gate.shape)} but x has {tuple(x.shape)}")
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise TypeError(f"{op}: out_dtype must be a floating dtype, got {out_dtype}")


def group_layer_norm_reference(x, weight, bias, eps: float, gate=None, out_dtype=None):
    w2 = weight.reshape(-1, weight.shape[-1])
    G, d = w2.shape
    dt = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), bias.dtype)
    xs = x.to(dt).reshape(*x.shape[:-1], G, d)
    y = F.layer_norm(xs, (d,), None, None, eps) * w2.to(dt) + bias.reshape(G, d).to(dt)
    y = y.reshape(x.shape)
    if gate is not None:
        y = y * F.silu(gate.to(dt))
    return y.to(out_dtype or dt)


def add_layer_norm_reference(x, residual, weight, bias, eps: float, residual_scale=None, out_dtype=None):
    s = residual_add_reference(x, residual, residual_scale)
    return s, group_layer_norm_reference(s, weight, bias, eps, None, out_dtype)


def _check_add(x, residual, weight, bias, residual_scale, out_dtype):
    _check(x, weight, bias, None, out_dtype)
    check_residual("add_layer_norm", x, residual, residual_scale)


def add_layer_norm(x, residual, weight, bias, eps: float, residual_scale=None, out_dtype=None):
    """See the module docstring."""
    _check_add(x, residual, weight, bias, residual_scale, out_dtype)
    # (residual goes through _use_fused's dtype check in the gate's place; under torch.compile the
    # reference, which the compiler fuses itself)
    if not _use_fused(x, weight, bias, residual) or torch.compiler.is_compiling() or x.dim() < 2:
        return add_layer_norm_reference(x, residual, weight, bias, eps, residual_scale, out_dtype)
    return _launch_add_fused(x, residual, weight, bias, eps, residual_scale, out_dtype)


def add_layer_norm_fused(x, residual, weight, bias, eps: float, residual_scale=None, out_dtype=None):
    """The Triton path whatever the device (CPU tensors need TRITON_INTERPRET=1); for tests and benchmarks."""
    if _tn is None:
        raise RuntimeError(f"add_layer_norm: Triton kernels unavailable ({_TRITON_ERROR})")
    _check_add(x, residual, weight, bias, residual_scale, out_dtype)
    return _launch_add_fused(x, residual, weight, bias, eps, residual_scale, out_dtype)


def _launch_add_fused(x, residual, weight, bias, eps, residual_scale, out_dtype):
    w2 = weight.reshape(-1, weight.shape[-1]) if weight.dim() == 2 else weight.reshape(1, -1)
    dt = out_dtype or torch.promote_types(torch.promote_types(x.dtype, residual.dtype), weight.dtype)
    scale = scale_as_float32(residual_scale)
    return _tn.add_layer_norm_triton(x.contiguous(), residual.contiguous(), scale, w2.contiguous(),
                                     bias.reshape(w2.shape).contiguous(), eps, dt)


def _use_fused(x, weight, bias, gate) -> bool:
    if _tn is None or _native.force_reference() or not x.is_cuda or x.numel() == 0:
        return False
    ts = (x, weight, bias) + ((gate,) if gate is not None else ())
    if not all(t.dtype in _FUSED_DTYPES for t in ts):
        return False
    G, d = (1, weight.numel()) if weight.dim() == 1 else tuple(weight.shape)
    return G in (1, 2, 4, 8) and G * _tn.triton.next_power_of_2(d) <= MAX_FUSED_ROW


def group_layer_norm(x, weight, bias, eps: float, gate=None, out_dtype=None):
    """See the module docstring."""
    _check(x, weight, bias, gate, out_dtype)
    if not _use_fused(x, weight, bias, gate):
        return group_layer_norm_reference(x, weight, bias, eps, gate, out_dtype)
    return _launch_fused(x, weight, bias, eps, gate, out_dtype)


def group_layer_norm_fused(x, weight, bias, eps: float, gate=None, out_dtype=None):
    """The Triton path whatever the device (CPU tensors need TRITON_INTERPRET=1); for tests and benchmarks."""
    if _tn is None:
        raise RuntimeError(f"group_layer_norm: Triton kernels unavailable ({_TRITON_ERROR})")
    _check(x, weight, bias, gate, out_dtype)
    return _launch_fused(x, weight, bias, eps, gate, out_dtype)


def _launch_fused(x, weight, bias, eps, gate, out_dtype):
    """The Triton kernels on checked arguments (weight (C,) taken as one group)."""
    w2 = weight.reshape(-1, weight.shape[-1]) if weight.dim() == 2 else weight.reshape(1, -1)
    dt = out_dtype or torch.promote_types(x.dtype, weight.dtype)
    return _tn.group_layer_norm_triton(x.contiguous(), None if gate is None else gate.contiguous(),
                                       w2.contiguous(), bias.reshape(w2.shape).contiguous(), eps, dt)
