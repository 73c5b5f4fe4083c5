"""Channel modulation of the GroupMamba layer (official semantics).

    xn  = LayerNorm(x)                                   x: (B, L, C)
    s   = sigmoid(fc2(relu(fc1(mean_L(xn)))))            (the two tiny FCs stay in torch)
    out = LayerNorm(y_all * skip_scale * xn * s[:, None, :])   same LayerNorm weights as xn

Two ops carry the bytes: layernorm_pool (xn and its token mean) and modulate_layernorm.
add_layernorm_pool(x, residual, ...) is layernorm_pool of y = x + residual [* residual_scale] and returns
y too: the previous block's second residual add done in the next block's first LayerNorm pass (forward:
one pass instead of two; backward: y's two gradients are added, and the residual's gradient scaled and
cast, in the LayerNorm's backward pass instead of two more passes).

Backends
--------
* CUDA tensors (float32 / bfloat16 / float16 activations, affine LayerNorm) with Triton importable:
  fused Triton kernels, forward and backward (triton_modulation.py), one pass over the bytes each.
  They are torch.library triton_ops with registered autograd, so torch.compile traces them.
* Otherwise (CPU, float64, weight=None, Triton missing, or GROUPMAMBA_FORCE_REFERENCE=1): the torch
  reference below (`*_reference`).

dtypes: x, y_all, xn in an activation dtype; weight/bias usually float32; s float32 or activation
dtype; skip_scale (1,) float32. All accumulation is float32. layernorm_pool returns xn and pooled in
x's dtype, and with copy_dtype also xn in that dtype (rounded from the same float32 values, as a cast of
xn would be; the mixer's in_proj input under autocast: the fused kernel writes it in the same pass and adds
its gradient in the backward kernel, instead of a cast kernel forward and a cast plus an add backward);
modulate_layernorm returns promote_types(y_all.dtype, xn.dtype) (both backends), or out_dtype
when given: the mixer passes the autocast dtype, because the result's only consumer is the proj Linear,
whose input cast rounds the same (a float32 result would be written, then read and cast by one more
kernel; the gradient would likewise be cast back to float32 by one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _native
from .residual import check_residual, residual_add, residual_add_reference, scale_as_float32

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_FUSED_C = 8192  # a whole row lives in registers; wider rows take the reference

try:  # Triton is optional (the CPU-only install may lack it)
    from . import triton_modulation as _tm
    _TRITON_ERROR = None
except Exception as e:  # noqa: BLE001  (ImportError, or a Triton/torch version mismatch)
    _tm = None
    _TRITON_ERROR = f"{type(e).__name__}: {e}"


def triton_available() -> bool:
    return _tm is not None


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def _layer_norm(x, weight, bias, eps):
    """F.layer_norm in the promoted dtype of x and the affine parameters (CUDA's kernel needs them equal;
    bf16 activations with float32 weights then normalize in float32, as under autocast)."""
    dt = x.dtype
    for p in (weight, bias):
        if p is not None:
            dt = torch.promote_types(dt, p.dtype)
    return F.layer_norm(x.to(dt), (x.shape[-1],), None if weight is None else weight.to(dt),
                        None if bias is None else bias.to(dt), eps)


def layernorm_pool_reference(x, weight, bias, eps: float):
    """Returns (xn, pooled): xn = LayerNorm(x) over the last dim, pooled = xn.mean(dim=1). x: (B, L, C)."""
    xn = _layer_norm(x, weight, bias, eps).to(x.dtype)
    return xn, xn.mean(dim=1)


def add_layernorm_pool_reference(x, residual, weight, bias, eps: float, residual_scale=None):
    """Returns (y, xn, pooled) with y = x + residual [* residual_scale[b]] and (xn, pooled) = layernorm_pool(y)."""
    y = residual_add_reference(x, residual, residual_scale)
    return (y, *layernorm_pool_reference(y, weight, bias, eps))


def _out_dtype(y_all, xn, out_dtype):
    return out_dtype or torch.promote_types(y_all.dtype, xn.dtype)


def modulate_layernorm_reference(y_all, xn, s, skip_scale, weight, bias, eps: float, out_dtype=None):
    """LayerNorm(y_all * skip_scale * xn * s[:, None, :]). y_all, xn: (B, L, C); s: (B, C); skip_scale: (1,)."""
    z = y_all * skip_scale * xn * s[:, None, :]
    out = _layer_norm(z, weight, bias, eps)
    # A float32 skip_scale of shape (1,) promotes z to float32; keep the activation dtype.
    return out.to(_out_dtype(y_all, xn, out_dtype))


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def _check_tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")


def _check_affine(op, weight, bias, C, device):
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_tensor(op, name, t)
        if tuple(t.shape) != (C,):
            raise ValueError(f"{op}: {name} must have shape ({C},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the activations are on {device}")


def _check_out_dtype(op, name, dt):
    if dt is not None and (not isinstance(dt, torch.dtype) or not dt.is_floating_point):
        raise TypeError(f"{op}: {name} must be a floating-point torch.dtype or None, got {dt!r}")


def _check_layernorm_pool(x, weight, bias, copy_dtype=None, op="layernorm_pool"):
    _check_out_dtype(op, "copy_dtype", copy_dtype)
    _check_tensor(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, L, C), got shape {tuple(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{op}: x must have L >= 1 and C >= 1, got shape {tuple(x.shape)}")
    _check_affine(op, weight, bias, x.shape[2], x.device)


def _check_modulate(y_all, xn, s, skip_scale, weight, bias, out_dtype=None):
    op = "modulate_layernorm"
    _check_out_dtype(op, "out_dtype", out_dtype)
    for name, t in (("y_all", y_all), ("xn", xn), ("s", s), ("skip_scale", skip_scale)):
        _check_tensor(op, name, t)
    if y_all.dim() != 3:
        raise ValueError(f"{op}: y_all must be (B, L, C), got shape {tuple(y_all.shape)}")
    if xn.shape != y_all.shape:
        raise ValueError(f"{op}: xn has shape {tuple(xn.shape)} but y_all has {tuple(y_all.shape)}")
    B, L, C = y_all.shape
    if L == 0 or C == 0:
        raise ValueError(f"{op}: y_all must have L >= 1 and C >= 1, got shape {tuple(y_all.shape)}")
    if tuple(s.shape) != (B, C):
        raise ValueError(f"{op}: s must have shape ({B}, {C}), got {tuple(s.shape)}")
    if skip_scale.numel() != 1:
        raise ValueError(f"{op}: skip_scale must hold one element (shape (1,)), got shape {tuple(skip_scale.shape)}")
    for name, t in (("xn", xn), ("s", s), ("skip_scale", skip_scale)):
        if t.device != y_all.device:
            raise ValueError(f"{op}: {name} is on {t.device} but y_all is on {y_all.device}")
    _check_affine(op, weight, bias, C, y_all.device)


def _use_fused(acts, params) -> bool:
    if _tm is None or _native.force_reference():
        return False
    if any(p is None for p in params):
        return False
    if not all(t.is_cuda for t in acts):
        return False
    if not all(t.dtype in _FUSED_DTYPES for t in list(acts) + list(params)):
        return False
    return all(t.numel() > 0 for t in acts) and acts[0].shape[-1] <= MAX_FUSED_C


# ------------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------------
def layernorm_pool(x, weight, bias, eps: float, copy_dtype=None):
    """Returns (xn, pooled): xn = LayerNorm(x) over the last dim, pooled = xn.mean(dim=1). x: (B, L, C).
    With copy_dtype: (xn, pooled, xn in copy_dtype) (see the module docstring)."""
    _check_layernorm_pool(x, weight, bias, copy_dtype)
    if copy_dtype == x.dtype:   # the copy is xn itself
        xn, pooled = layernorm_pool(x, weight, bias, eps)
        return xn, pooled, xn
    if _use_fused((x,), (weight, bias)) and copy_dtype in (None, *_FUSED_DTYPES):
        return _tm.layernorm_pool_triton(x.contiguous(), weight.contiguous(), bias.contiguous(), eps, copy_dtype)
    xn, pooled = layernorm_pool_reference(x, weight, bias, eps)
    return (xn, pooled) if copy_dtype is None else (xn, pooled, xn.to(copy_dtype))


def add_layernorm_pool(x, residual, weight, bias, eps: float, residual_scale=None, copy_dtype=None):
    """Returns (y, xn, pooled) with y = x + residual [* residual_scale[b]] in promote_types(x, residual) and
    (xn, pooled) = layernorm_pool(y); with copy_dtype also xn in that dtype (see layernorm_pool).
    residual: x's shape; residual_scale: None or (B,) (DropPath's per-sample factors). On CUDA one fused pass
    each way (see the module docstring); elsewhere, and under torch.compile, residual_add then layernorm_pool."""
    op = "add_layernorm_pool"
    _check_layernorm_pool(x, weight, bias, copy_dtype, op)
    check_residual(op, x, residual, residual_scale)
    y_dtype = torch.promote_types(x.dtype, residual.dtype)
    if (_use_fused((x, residual), (weight, bias)) and not torch.compiler.is_compiling() and y_dtype in _FUSED_DTYPES
            and copy_dtype in (None, *_FUSED_DTYPES) and copy_dtype != y_dtype):
        return _launch_add_pool(x, residual, weight, bias, eps, residual_scale, copy_dtype)
    y = residual_add(x, residual, residual_scale)
    return (y, *layernorm_pool(y, weight, bias, eps, copy_dtype))


def add_layernorm_pool_fused(x, residual, weight, bias, eps: float, residual_scale=None, copy_dtype=None):
    """The Triton path whatever the device (CPU tensors need TRITON_INTERPRET=1); for tests."""
    if _tm is None:
        raise RuntimeError(f"add_layernorm_pool: Triton kernels unavailable ({_TRITON_ERROR})")
    op = "add_layernorm_pool"
    _check_layernorm_pool(x, weight, bias, copy_dtype, op)
    check_residual(op, x, residual, residual_scale)
    if weight is None or bias is None:
        raise ValueError(f"{op}: the fused kernel needs weight and bias tensors")
    return _launch_add_pool(x, residual, weight, bias, eps, residual_scale, copy_dtype)


def _launch_add_pool(x, residual, weight, bias, eps, residual_scale, copy_dtype):
    """The Triton kernels on checked arguments (contiguous; the per-sample factors as float32)."""
    return _tm.add_layernorm_pool_triton(x.contiguous(), residual.contiguous(), scale_as_float32(residual_scale),
                                         weight.contiguous(), bias.contiguous(), eps, copy_dtype)


def modulate_layernorm(y_all, xn, s, skip_scale, weight, bias, eps: float, out_dtype=None):
    """LayerNorm(y_all * skip_scale * xn * s[:, None, :]). y_all, xn: (B, L, C); s: (B, C); skip_scale: (1,).
    out_dtype: the result's dtype (default promote_types(y_all.dtype, xn.dtype)); see the module docstring."""
    _check_modulate(y_all, xn, s, skip_scale, weight, bias, out_dtype)
    out_dtype = _out_dtype(y_all, xn, out_dtype)
    if _use_fused((y_all, xn), (s, skip_scale, weight, bias)) and out_dtype in _FUSED_DTYPES:
        return _tm.modulate_layernorm_triton(
            y_all.contiguous(), xn.contiguous(), s.contiguous(), skip_scale.reshape(1).contiguous(),
            weight.contiguous(), bias.contiguous(), eps, out_dtype)
    return modulate_layernorm_reference(y_all, xn, s, skip_scale, weight, bias, eps, out_dtype)


def layernorm_pool_fused(x, weight, bias, eps: float, copy_dtype=None):
    """The Triton path whatever the device (CPU tensors need TRITON_INTERPRET=1); for tests and benchmarks."""
    if _tm is None:
        raise RuntimeError(f"layernorm_pool: Triton kernels unavailable ({_TRITON_ERROR})")
    _check_layernorm_pool(x, weight, bias, copy_dtype)
    if weight is None or bias is None:
        raise ValueError("layernorm_pool: the fused kernel needs weight and bias tensors")
    if x.shape[-1] > MAX_FUSED_C:
        raise ValueError(f"layernorm_pool: the fused kernel takes C <= {MAX_FUSED_C}")
    return _tm.layernorm_pool_triton(x.contiguous(), weight.contiguous(), bias.contiguous(), eps, copy_dtype)


def modulate_layernorm_fused(y_all, xn, s, skip_scale, weight, bias, eps: float, out_dtype=None):
    """The Triton path whatever the device (CPU tensors need TRITON_INTERPRET=1); for tests and benchmarks."""
    if _tm is None:
        raise RuntimeError(f"modulate_layernorm: Triton kernels unavailable ({_TRITON_ERROR})")
    _check_modulate(y_all, xn, s, skip_scale, weight, bias, out_dtype)
    if weight is None or bias is None:
        raise ValueError("modulate_layernorm: the fused kernel needs weight and bias tensors")
    if y_all.shape[-1] > MAX_FUSED_C:
        raise ValueError(f"modulate_layernorm: the fused kernel takes C <= {MAX_FUSED_C}")
    return _tm.modulate_layernorm_triton(
        y_all.contiguous(), xn.contiguous(), s.contiguous(), skip_scale.reshape(1).contiguous(),
        weight.contiguous(), bias.contiguous(), eps, _out_dtype(y_all, xn, out_dtype))
