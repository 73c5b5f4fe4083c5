"""The residual add of a block, x + residual (times a per-sample factor under stochastic depth):

    residual_add(x, residual, residual_scale=None) -> x + residual [* residual_scale[b]]

x and residual have the same shape (B, ...); residual_scale is None or a (B,) float tensor (DropPath's
per-sample factors). The sum takes promote_types(x, residual): under bf16 autocast the fp32 residual
stream plus a bf16 branch output gives fp32, as torch's add does.

Why an op for an add: torch runs a float32 + bfloat16 add as its unvectorized dynamic-cast kernel (the
block's second residual add, 1.75 ms in 34 calls of a GroupMamba-B training step, about 60% of copy
bandwidth; H200 profile, eleventh set). The Triton kernel below loads both operands in 16-byte vectors.
The backward is the add's: the stream's gradient unchanged, the branch's scaled and cast to its dtype.
In the model most of these adds now happen inside the next block's first LayerNorm pass
(modulation.add_layernorm_pool); this op finishes a stage's last block (and GroupMambaBlock.forward).

CUDA tensors in float32 / bfloat16 / float16 with Triton importable, eagerly: the Triton kernel.
Otherwise (CPU, under torch.compile, GROUPMAMBA_FORCE_REFERENCE=1): the torch reference.
"""
from __future__ import annotations

import torch

from .. import _native
from ._util import check_float_tensors

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 4096   # elements per program

try:
    import triton
    import triton.language as tl
    _TRITON_ERROR = None
except Exception as e:  # noqa: BLE001
    triton = tl = None
    _TRITON_ERROR = f"{type(e).__name__}: {e}"


def _scale_view(scale, like):
    return scale.view(-1, *([1] * (like.dim() - 1)))


def scale_as_float32(residual_scale):
    """The per-sample factors as the kernels read them (contiguous float32), or None."""
    return None if residual_scale is None else residual_scale.float().contiguous()


def residual_add_reference(x, residual, residual_scale=None):
    r = residual if residual_scale is None else residual * _scale_view(residual_scale, residual)
    return x + r


def check_residual(op, x, residual, residual_scale):
    """The residual and its per-sample factors against x (shared with norm.add_layer_norm)."""
    check_float_tensors(op, x, (("residual", residual),))
    if residual.shape != x.shape:
        raise ValueError(f"{op}: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    if residual_scale is not None:
        check_float_tensors(op, x, (("residual_scale", residual_scale),))
        if x.dim() == 0 or residual_scale.shape != (x.shape[0],):
            raise ValueError(f"{op}: residual_scale must be ({x.shape[0] if x.dim() else '?'},) (one factor per "
                             f"sample), got {tuple(residual_scale.shape)}")


def residual_add(x, residual, residual_scale=None):
    """See the module docstring."""
    check_residual("residual_add", x, residual, residual_scale)
    if (triton is None or _native.force_reference() or not x.is_cuda or x.numel() == 0
            or torch.compiler.is_compiling() or x.dtype not in _FUSED_DTYPES or residual.dtype not in _FUSED_DTYPES):
        return residual_add_reference(x, residual, residual_scale)
    return _ResidualAdd.apply(x, residual, residual_scale)


def residual_add_fused(x, residual, residual_scale=None):
    """The Triton path whatever the device (CPU tensors need TRITON_INTERPRET=1); for tests."""
    if triton is None:
        raise RuntimeError(f"residual_add: Triton unavailable ({_TRITON_ERROR})")
    check_residual("residual_add", x, residual, residual_scale)
    return _ResidualAdd.apply(x, residual, residual_scale)


if triton is not None:
    @triton.jit(do_not_specialize=["PER_SAMPLE"])
    def _residual_add_kernel(X, R, SCALE, OUT, N, PER_SAMPLE, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        """OUT = X + R [* SCALE[i // PER_SAMPLE]] in float32, stored in OUT's dtype. N is left to Triton's
        divisibility specialization, so the masks of a multiple-of-16 N allow 16-byte accesses."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        r = tl.load(R + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            r = r * tl.load(SCALE + offs // PER_SAMPLE, mask=m, other=0.0)
        tl.store(OUT + offs, (x + r).to(OUT.dtype.element_ty), mask=m)


class _ResidualAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, scale):
        x, residual = x.contiguous(), residual.contiguous()
        out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, residual.dtype))
        scale = scale_as_float32(scale)
        n = x.numel()
        if n:
            _residual_add_kernel[(triton.cdiv(n, BLOCK),)](
                x, residual, out if scale is None else scale, out, n, n // x.shape[0] if x.dim() else 1,
                HAS_SCALE=scale is not None, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(scale)
        ctx.dtypes = (x.dtype, residual.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        x_dtype, r_dtype = ctx.dtypes
        gr = grad if scale is None else grad * _scale_view(scale, grad)
        return grad.to(x_dtype), gr.to(r_dtype), None
