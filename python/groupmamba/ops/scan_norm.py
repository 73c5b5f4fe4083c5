"""The grouped scan followed by each group's gated out_norm, in one op.

    grouped_scan_norm(u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias, eps,
                      chunk=None)
      == group_layer_norm(grouped_scan(u, ...), norm_weight, norm_bias, eps, gate=z, out_dtype=u.dtype)

z: the gate, u's shape and dtype; norm_weight, norm_bias: (4, d) in the scan parameters' dtype. The result has
u's dtype. A GroupMamba mixer's scan and out_norm * SiLU(z) (see models/mixer.py).

On CUDA, where the scan's fast kernels apply (N = 1, d <= 128, chunk a multiple of 4), the forward writes the
normalized, gated output instead of y and the backward recomputes y and takes the norm's backward in the same
pass: y never reaches memory, and the separate norm kernels' reads and writes of it are gone. Otherwise (CPU,
other shapes) the op composes the scan op and the norm; without the extension, or with
GROUPMAMBA_FORCE_REFERENCE=1, the PyTorch references compose. The norm runs in float32 on y before any rounding
(float64 for float64 inputs), so under bfloat16 it differs from the unfused path, which rounds y first, by about
one bfloat16 step.
"""
from __future__ import annotations

import torch

from .norm import group_layer_norm_reference
from .reference import GROUPS, grouped_scan_reference
from .scan import _native_supports, check_scan_inputs, default_chunk, fake_states


def check_scan_norm_inputs(u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias,
                           eps) -> None:
    """Raises ValueError/TypeError naming the problem (mirrors csrc/scan_norm.cpp)."""
    check_scan_inputs(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D)
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"grouped_scan_norm: z must be a tensor, got {type(z).__name__}")
    if z.shape != u.shape or z.dtype != u.dtype or z.device != u.device:
        raise ValueError(f"grouped_scan_norm: the gate z must match u in shape, dtype and device (z "
                         f"{tuple(z.shape)} {z.dtype} on {z.device}, u {tuple(u.shape)} {u.dtype} on {u.device})")
    d = u.shape[-1] // GROUPS
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grouped_scan_norm: {name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != (GROUPS, d):
            raise ValueError(f"grouped_scan_norm: {name} must be (4, d={d}), got {tuple(t.shape)}")
        if t.dtype != x_proj_weight.dtype or t.device != u.device:
            raise TypeError(f"grouped_scan_norm: {name} must be {x_proj_weight.dtype} on {u.device} like the "
                            f"scan's parameters, got {t.dtype} on {t.device}")
    if not eps > 0:
        raise ValueError(f"grouped_scan_norm: eps must be > 0, got {eps}")


def grouped_scan_norm_reference(u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias,
                                eps: float):
    y = grouped_scan_reference(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D)
    return group_layer_norm_reference(y, norm_weight, norm_bias, eps, gate=z, out_dtype=u.dtype)


def grouped_scan_norm(u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias, eps: float,
                      chunk: int | None = None):
    """See the module docstring. Differentiable in every tensor argument."""
    check_scan_norm_inputs(u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias, eps)
    if not _native_supports(u):
        return grouped_scan_norm_reference(u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight,
                                           norm_bias, eps)
    if chunk is None:
        chunk = default_chunk(u.device.type, u.shape[-1] // GROUPS)
    out, _, _ = torch.ops.groupmamba.scan_norm_fwd(
        u.contiguous(), z.contiguous(), x_proj_weight.contiguous(), dt_proj_weight.contiguous(),
        dt_bias.contiguous(), A_log.contiguous(), D.contiguous(), norm_weight.contiguous(), norm_bias.contiguous(),
        float(eps), chunk)
    return out


# ---- fake (meta) kernels and autograd for the native ops -------------------------------------

def register() -> None:
    @torch.library.register_fake("groupmamba::scan_norm_fwd")
    def _fwd_fake(u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias, eps, chunk):
        B, H, W, _ = u.shape
        stats = u.new_empty((B, GROUPS, H * W, 2), dtype=A_log.dtype)
        return torch.empty_like(u), fake_states(u, A_log, chunk), stats

    @torch.library.register_fake("groupmamba::scan_norm_bwd")
    def _bwd_fake(grad_out, u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias, eps,
                  states, stats, chunk):
        return (torch.empty_like(u), torch.empty_like(z), torch.empty_like(x_proj_weight),
                torch.empty_like(dt_proj_weight), torch.empty_like(dt_bias), torch.empty_like(A_log),
                torch.empty_like(D), torch.empty_like(norm_weight), torch.empty_like(norm_bias))

    def _setup_context(ctx, inputs, output):
        *tensors, eps, chunk = inputs
        _, states, stats = output
        ctx.save_for_backward(*tensors, states, stats)
        ctx.eps, ctx.chunk = eps, chunk
        ctx.mark_non_differentiable(states, stats)

    def _backward(ctx, grad_out, _grad_states, _grad_stats):
        *tensors, states, stats = ctx.saved_tensors
        grads = torch.ops.groupmamba.scan_norm_bwd(grad_out.contiguous(), *tensors, ctx.eps, states, stats,
                                                   ctx.chunk)
        return (*grads, None, None)

    torch.library.register_autograd("groupmamba::scan_norm_fwd", _backward, setup_context=_setup_context)
