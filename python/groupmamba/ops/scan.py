"""The four-direction grouped selective scan: public entry point, fake kernels and autograd.

Contract (every backend computes exactly this; the reference is reference.py)
-----------------------------------------------------------------------------
u (B, H, W, C), C = 4*d. Group g in 0..3 owns channels [g*d, (g+1)*d) and visits the L = H*W
positions in its own order p_g(t) (see reference.scan_order): row-major, column-major, reversed
row-major, reversed column-major. Per group g, with parameters

    x_proj_weight[g]  (R+2N, d)     dt_proj_weight[g] (d, R)     dt_bias[g] (d)
    A_log[g]          (d, N)        D[g]              (d)

and A = -exp(A_log[g]), each step t at position p = p_g(t) computes

    [dt_r, B_t, C_t] = x_proj_weight[g] @ u[b, p, group g]          sizes (R, N, N)
    delta            = softplus(dt_proj_weight[g] @ dt_r + dt_bias[g])   (d)
    h_t              = exp(delta * A) * h_{t-1} + delta * B_t * u       (d, N), h_{-1} = 0
    y[b, p, group g] = h_t @ C_t + D[g] * u

y has u's shape and dtype. u may be float32, bfloat16, float16 or float64; parameters are float32
(float64 with float64 u); the state and all accumulation are float32 (float64 for float64 inputs).
GroupMamba uses N = 1 and R = ceil(d / 16); any N >= 1, R >= 1 work.
"""
from __future__ import annotations

import torch

from .. import _native
from .reference import GROUPS, grouped_scan_reference

# Steps per chunk whose entering state the forward keeps for the backward (which recomputes
# inside each chunk). Larger saves memory, smaller saves recompute; both backends accept any value.
DEFAULT_CHUNK = {"cpu": 64, "cuda": 64}
# On CUDA a chunk also sets the backward's block size (a backward block starts from a saved state):
# at d > 64 channels per group a 64-step chunk needs 512-thread blocks, and with 32-step chunks (256
# threads, twice the blocks) the backward ran 7-25% faster at GroupMamba's 14x14 and 7x7 stages
# (BENCHMARKS.md, "Scan kernels"). The saved states stay tiny.
WIDE_D, WIDE_CHUNK_CUDA = 64, 32


def default_chunk(device_type: str, d: int) -> int:
    """The chunk grouped_scan uses when none is given, for d = C/4 channels per group."""
    if device_type == "cuda" and d > WIDE_D:
        return WIDE_CHUNK_CUDA
    return DEFAULT_CHUNK.get(device_type, 64)


def check_scan_inputs(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D) -> None:
    """Raises ValueError/TypeError naming the problem (mirrors csrc/scan_common.h)."""
    tensors = dict(u=u, x_proj_weight=x_proj_weight, dt_proj_weight=dt_proj_weight, dt_bias=dt_bias,
                   A_log=A_log, D=D)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grouped_scan: {name} must be a tensor, got {type(t).__name__}")
    if u.dim() != 4:
        raise ValueError(f"grouped_scan: u must be (B, H, W, C), got shape {tuple(u.shape)}")
    if not u.is_floating_point():
        raise TypeError(f"grouped_scan: u must be floating point, got {u.dtype}")
    C = u.shape[-1]
    if C % GROUPS:
        raise ValueError(f"grouped_scan: channel count C={C} is not divisible by 4")
    d = C // GROUPS
    if A_log.dim() != 3 or A_log.shape[:2] != (GROUPS, d):
        raise ValueError(f"grouped_scan: A_log must be (4, d={d}, N), got {tuple(A_log.shape)}")
    N = A_log.shape[2]
    if N < 1:
        raise ValueError("grouped_scan: d_state N must be >= 1")
    if x_proj_weight.dim() != 3 or x_proj_weight.shape[0] != GROUPS or x_proj_weight.shape[2] != d:
        raise ValueError(f"grouped_scan: x_proj_weight must be (4, R+2N, d={d}), got {tuple(x_proj_weight.shape)}")
    R = x_proj_weight.shape[1] - 2 * N
    if R < 1:
        raise ValueError(f"grouped_scan: x_proj_weight has {x_proj_weight.shape[1]} rows; needs R+2N with R>=1 (N={N})")
    expected = dict(dt_proj_weight=(GROUPS, d, R), dt_bias=(GROUPS, d), D=(GROUPS, d))
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"grouped_scan: {name} must have shape {shape}, got {tuple(tensors[name].shape)}")
    for name, t in tensors.items():
        if t.device != u.device:
            raise ValueError(f"grouped_scan: {name} is on {t.device} but u is on {u.device}")
        if name != "u" and t.dtype != x_proj_weight.dtype:
            raise TypeError(f"grouped_scan: {name} is {t.dtype} but x_proj_weight is {x_proj_weight.dtype}; "
                            "all parameters must share one dtype")
    if x_proj_weight.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"grouped_scan: parameters must be float32 or float64, got {x_proj_weight.dtype}")
    if (u.dtype == torch.float64) != (x_proj_weight.dtype == torch.float64):
        raise TypeError(f"grouped_scan: float64 u needs float64 parameters and vice versa "
                        f"(u {u.dtype}, parameters {x_proj_weight.dtype})")


def _native_supports(u: torch.Tensor) -> bool:
    if _native.force_reference() or not _native.native_available():
        return False
    if u.device.type == "cpu":
        return True
    return u.device.type == "cuda" and _native.cuda_kernels_available()


def grouped_scan(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, chunk: int | None = None):
    """Four-direction grouped selective scan (see the module docstring for the exact contract).

    Runs the fused CUDA kernel on CUDA tensors, the C++ kernel on CPU tensors, and the PyTorch
    reference when the extension is missing or GROUPMAMBA_FORCE_REFERENCE=1. Differentiable in u
    and every parameter. Non-contiguous inputs are accepted.
    """
    check_scan_inputs(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D)
    if not _native_supports(u):
        return grouped_scan_reference(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D)
    if chunk is None:
        chunk = default_chunk(u.device.type, u.shape[-1] // GROUPS)
    y, _ = torch.ops.groupmamba.scan_fwd(
        u.contiguous(), x_proj_weight.contiguous(), dt_proj_weight.contiguous(), dt_bias.contiguous(),
        A_log.contiguous(), D.contiguous(), chunk)
    return y


# ---- fake (meta) kernels and autograd for the native ops -------------------------------------

def fake_states(u: torch.Tensor, A_log: torch.Tensor, chunk: int) -> torch.Tensor:
    """The forward ops' saved chunk states, (B, 4, ceil(L / chunk), d, N), for their fake kernels."""
    B, H, W, C = u.shape
    return u.new_empty((B, GROUPS, (H * W + chunk - 1) // chunk, C // GROUPS, A_log.shape[-1]), dtype=A_log.dtype)


def _register() -> None:
    @torch.library.register_fake("groupmamba::scan_fwd")
    def _scan_fwd_fake(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, chunk):
        return torch.empty_like(u), fake_states(u, A_log, chunk)

    @torch.library.register_fake("groupmamba::scan_bwd")
    def _scan_bwd_fake(grad_y, u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, states, chunk):
        return (torch.empty_like(u), torch.empty_like(x_proj_weight), torch.empty_like(dt_proj_weight),
                torch.empty_like(dt_bias), torch.empty_like(A_log), torch.empty_like(D))

    def _setup_context(ctx, inputs, output):
        u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, chunk = inputs
        _, states = output
        ctx.save_for_backward(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, states)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(states)

    def _backward(ctx, grad_y, _grad_states):
        u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, states = ctx.saved_tensors
        grads = torch.ops.groupmamba.scan_bwd(
            grad_y.contiguous(), u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, states, ctx.chunk)
        return (*grads, None)

    torch.library.register_autograd("groupmamba::scan_fwd", _backward, setup_context=_setup_context)


_registered = False


def register_native_ops() -> None:
    """Registers fake kernels and autograd once the extension has been loaded."""
    global _registered
    if not _registered and _native.native_available():
        from . import scan_norm  # imports this module
        _register()
        scan_norm.register()
        _registered = True
