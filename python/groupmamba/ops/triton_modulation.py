"""Fused Triton kernels for the GroupMamba channel modulation (see modulation.py for the semantics).

Layout: x, y_all, xn are (B, L, C) made contiguous, viewed as B*L rows of C. Every kernel runs one
program per (b, tile of BLOCK_L rows of batch b) and holds the whole row (BLOCK_C >= C) in registers,
so each tensor is read once and written once:

    _ln_pool_fwd   x [+ residual * scale[b] -> y] -> xn [, xn in a second dtype], mean, rstd (fp32 per row),
                   per-tile column sums of xn -> pooled
    _ln_pool_bwd   x (y), dxn [, the second copy's gradient], dpooled [, dy] -> dx [, dresidual], per-tile
                   partials of dweight / dbias
    _mod_ln_fwd    y, xn, s, skip -> out, mean, rstd of z = y*skip*xn*s
    _mod_ln_bwd    dout, y, xn, s, skip -> dy, dxn, per-tile partials of ds (and dskip), dweight, dbias

z and the normalized values are recomputed in the backward from the saved mean/rstd. Per-tile partial
sums (fp32, one row of C per program) are reduced afterwards in a fixed order (eagerly by triton_colsum's
sum_middle / column_sum, under torch.compile by torch sums): deterministic, no atomics.
All arithmetic is fp32 whatever the input dtype; outputs take the activation dtype.

Under torch.compile the ops are `torch.library.triton_op`s with `register_autograd` (traceable); in
eager mode plain autograd.Functions launch the same kernels with less host overhead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._util import channel_split, identity as _identity, tile_warps, use_library_ops
from .triton_colsum import column_sum, sum_middle

NAMESPACE = "groupmamba_triton"

# Elements (BLOCK_L * BLOCK_C) per program; None: DEFAULT_ELEMS. num_warps: None: _util.tile_warps. The
# benchmark sweeps these (bench_modulation.py --sweep, --sweep-bwd, --sweep-warps).
# eager_library_ops: use the torch.library ops outside torch.compile too (slower host path; for tests).
CONFIG = {"fwd_elems": None, "bwd_elems": None, "num_warps": None, "eager_library_ops": False}

# Tile size of both directions, from sweeps on an H200 (BENCHMARKS.md, bf16 B=128, the layer's layernorm_pool +
# modulate_layernorm forward and backward): 2048 elements, whose programs run on 2 warps (tile_warps), at every
# GroupMamba width. Twentieth set, us, against the former choice (8192 elements on 8 warps for C <= 128, and for
# the backward at C = 192): C = 64 254 vs 318, 96 470 vs 710, 128 167 vs 233, 192 343 vs 509 (sweeps that kept
# 8 warps had favoured 8192 there); 2048 beat 4096 by 23-33% at C = 348, 448.
DEFAULT_ELEMS = 2048


def _tiles(L: int, C: int, elems: int | None):
    block_c = max(16, triton.next_power_of_2(C))
    elems = elems or DEFAULT_ELEMS
    block_l = max(1, min(triton.next_power_of_2(L), elems // block_c))
    n_tiles = triton.cdiv(L, block_l)
    return block_l, block_c, n_tiles, CONFIG["num_warps"] or tile_warps(block_l * block_c)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_tile(pid, L, C, T, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program pid's tile: batch b, its BLOCK_L rows (tile pid % T of batch b) x BLOCK_C columns, the
    row/column/tile masks, the global row index and the element offsets of the (rows, C) view."""
    b = pid // T
    rl = (pid % T) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_C)
    rmask = rl < L
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    row = b.to(tl.int64) * L + rl
    offs = row[:, None] * C + cols[None, :]
    return b, cols, rmask, cmask, mask, row, offs


@triton.jit
def _layer_norm_rows(v, mask, cols, cmask, W, Bias, C, eps):
    """LayerNorm of every row of the tile v over its C valid columns, then the affine weight and bias.
    Returns (the result, mean, rstd); the result's padding entries are not zeroed."""
    mean = tl.sum(v, axis=1) / C
    vc = tl.where(mask, v - mean[:, None], 0.0)
    var = tl.sum(vc * vc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    bb = tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)
    return vc * rstd[:, None] * w[None, :] + bb[None, :], mean, rstd


@triton.jit
def _layer_norm_rows_bwd(dhat, hat, rstd, C):
    """Gradient of the normalized rows hat = (v - mean) * rstd, given dhat = d loss / d hat."""
    c1 = tl.sum(dhat * hat, axis=1) / C
    c2 = tl.sum(dhat, axis=1) / C
    return (dhat - hat * c1[:, None] - c2[:, None]) * rstd[:, None]


@triton.jit(do_not_specialize=["L", "CV", "T"])
def _ln_pool_fwd(X, RES, SCALE, Y, W, Bias, XN, XN2, MEAN, RSTD, PART, L, CV, T, eps,
                 BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, COPY: tl.constexpr,
                 HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr):
    """xn = LayerNorm(x) stored to XN and, with COPY, also to XN2 in XN2's dtype (both rounded from the
    same float32 value); the per-row statistics; this tile's column sums of xn (for the pooled mean).
    HAS_RES: first y = x + RES [* SCALE[b]] (float32 sum, stored to Y in Y's dtype), and xn = LayerNorm(y
    as stored), which is what the backward, reading Y, recomputes from."""
    C = CV * VEC  # C // VEC passed at run time: tells the compiler C is a multiple of VEC
    pid = tl.program_id(0)
    b, cols, rmask, cmask, mask, row, offs = _row_tile(pid, L, C, T, BLOCK_L, BLOCK_C)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            r = r * tl.load(SCALE + b)
        y = (x + r).to(Y.dtype.element_ty)
        tl.store(Y + offs, y, mask=mask)
        x = y.to(tl.float32)
    xn, mean, rstd = _layer_norm_rows(x, mask, cols, cmask, W, Bias, C, eps)
    xn = tl.where(mask, xn, 0.0)
    tl.store(XN + offs, xn.to(XN.dtype.element_ty), mask=mask)
    if COPY:
        tl.store(XN2 + offs, xn.to(XN2.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean, mask=rmask)
    tl.store(RSTD + row, rstd, mask=rmask)
    tl.store(PART + pid.to(tl.int64) * C + cols, tl.sum(xn, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["L", "CV", "T"])
def _ln_pool_bwd(X, W, MEAN, RSTD, GXN, GXN2, GP, GY, SCALE, DX, DRES, DWP, DBP, L, CV, T, inv_L,
                 BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, COPY: tl.constexpr,
                 ADD_GY: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr):
    """dx from the gradients of xn, of the pooled mean and, with COPY, of the copy of xn (GXN2: added to
    GXN's in float32 first, as autograd would have summed the two). X is the LayerNorm's input (y under
    the forward's HAS_RES). ADD_GY: dx also gets GY, the gradient of y from its other consumers (the
    block's residual stream). HAS_RES: DRES = dx [* SCALE[b]] in DRES's dtype, the residual's gradient."""
    C = CV * VEC  # C // VEC passed at run time: tells the compiler C is a multiple of VEC
    pid = tl.program_id(0)
    b, cols, rmask, cmask, mask, row, offs = _row_tile(pid, L, C, T, BLOCK_L, BLOCK_C)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + row, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + row, mask=rmask, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    gp = tl.load(GP + b.to(tl.int64) * C + cols, mask=cmask, other=0.0).to(tl.float32) * inv_L
    g = tl.load(GXN + offs, mask=mask, other=0.0).to(tl.float32)
    if COPY:
        g = g + tl.load(GXN2 + offs, mask=mask, other=0.0).to(tl.float32)
    g = g + gp[None, :]
    g = tl.where(mask, g, 0.0)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dxhat = g * w[None, :]
    dx = _layer_norm_rows_bwd(dxhat, xhat, rstd, C)
    if ADD_GY:
        dx = dx + tl.load(GY + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_RES:
        if HAS_SCALE:
            dx = dx * tl.load(SCALE + b)
        tl.store(DRES + offs, dx.to(DRES.dtype.element_ty), mask=mask)
    poffs = pid.to(tl.int64) * (2 * C) + cols     # DWP / DBP: the halves of one (programs, 2C) buffer
    tl.store(DWP + poffs, tl.sum(g * xhat, axis=0), mask=cmask)
    tl.store(DBP + poffs, tl.sum(g, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["L", "CV", "T"])
def _mod_ln_fwd(Y, XN, S, SKIP, W, Bias, OUT, MEAN, RSTD, L, CV, T, eps,
                BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    C = CV * VEC  # C // VEC passed at run time: tells the compiler C is a multiple of VEC
    pid = tl.program_id(0)
    b, cols, rmask, cmask, mask, row, offs = _row_tile(pid, L, C, T, BLOCK_L, BLOCK_C)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32)
    skip = tl.load(SKIP).to(tl.float32)
    a = tl.load(S + b.to(tl.int64) * C + cols, mask=cmask, other=0.0).to(tl.float32) * skip
    out, mean, rstd = _layer_norm_rows(y * xn * a[None, :], mask, cols, cmask, W, Bias, C, eps)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean, mask=rmask)
    tl.store(RSTD + row, rstd, mask=rmask)


@triton.jit(do_not_specialize=["L", "CV", "T"])
def _mod_ln_bwd(G, Y, XN, S, SKIP, W, MEAN, RSTD, DY, DXN, QP, DWP, DBP, L, CV, T,
                BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    C = CV * VEC  # C // VEC passed at run time: tells the compiler C is a multiple of VEC
    pid = tl.program_id(0)
    b, cols, rmask, cmask, mask, row, offs = _row_tile(pid, L, C, T, BLOCK_L, BLOCK_C)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    skip = tl.load(SKIP).to(tl.float32)
    a = tl.load(S + b.to(tl.int64) * C + cols, mask=cmask, other=0.0).to(tl.float32) * skip
    mean = tl.load(MEAN + row, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + row, mask=rmask, other=0.0)
    yx = y * xn
    zhat = tl.where(mask, (yx * a[None, :] - mean[:, None]) * rstd[:, None], 0.0)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dzhat = g * w[None, :]
    dz = tl.where(mask, _layer_norm_rows_bwd(dzhat, zhat, rstd, C), 0.0)
    dza = dz * a[None, :]
    tl.store(DY + offs, (dza * xn).to(DY.dtype.element_ty), mask=mask)
    tl.store(DXN + offs, (dza * y).to(DXN.dtype.element_ty), mask=mask)
    tl.store(QP + pid.to(tl.int64) * C + cols, tl.sum(dz * yx, axis=0), mask=cmask)
    poffs = pid.to(tl.int64) * (2 * C) + cols     # DWP / DBP: the halves of one (programs, 2C) buffer
    tl.store(DWP + poffs, tl.sum(g * zhat, axis=0), mask=cmask)
    tl.store(DBP + poffs, tl.sum(g, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------
# launch + reduce (inputs already validated and contiguous; see modulation.py). `wrap` is
# torch.library.wrap_triton inside the triton_ops (traceable) and the identity in the eager path.
# ----------------------------------------------------------------------------------------------
def _ln_pool_fwd_impl(x, weight, bias, eps, wrap, copy_dtype=None, residual=None, scale=None):
    """(xn, pooled, stats), and xn in copy_dtype from the same pass when copy_dtype is given. With a residual
    (and its per-sample scale): (y = x + residual [* scale], xn, pooled, stats[, copy]), xn = LayerNorm(y)."""
    B, L, C = x.shape
    bl, bc, T, nw = _tiles(L, C, CONFIG["fwd_elems"])
    y = x if residual is None else torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    xn = torch.empty_like(y)
    xn2 = xn if copy_dtype is None else torch.empty_like(y, dtype=copy_dtype)
    stats = torch.empty((2, B, L), device=x.device, dtype=torch.float32)   # mean, rstd
    part = torch.empty((B, T, C), device=x.device, dtype=torch.float32)
    cv, vec = channel_split(C)
    # the pointers a variant does not read are placeholders (every argument is passed: torch.compile's
    # wrapper for Triton kernels does not fill in defaults)
    wrap(_ln_pool_fwd)[(B * T,)](
        x, x if residual is None else residual, stats if scale is None else scale, y, weight, bias, xn, xn2,
        stats[0], stats[1], part, L, cv, T, eps, BLOCK_L=bl, BLOCK_C=bc, VEC=vec, COPY=copy_dtype is not None,
        HAS_RES=residual is not None, HAS_SCALE=scale is not None, num_warps=nw)
    pooled = _sum_tiles(part, wrap).mul_(1.0 / L).to(y.dtype)
    out = (xn, pooled, stats) if copy_dtype is None else (xn, pooled, stats, xn2)
    return out if residual is None else (y,) + out


def _ln_pool_bwd_impl(grad_xn, grad_pooled, x, weight, stats, wrap, grad_copy=None, grad_y=None, scale=None,
                      dx_dtype=None, res_dtype=None):
    """(dx, (2, C) dweight / dbias) of the LayerNorm of x (y with a residual); grad_y: y's gradient from its
    other consumers, added to dx; res_dtype (the forward had a residual): (dx, dresidual, dweight / dbias)
    with dresidual = dx [* scale] in res_dtype; dx_dtype: dx's dtype (default x's)."""
    B, L, C = x.shape
    bl, bc, T, nw = _tiles(L, C, CONFIG["bwd_elems"])
    dx = torch.empty_like(x, dtype=dx_dtype or x.dtype)
    dres = dx if res_dtype is None else torch.empty_like(x, dtype=res_dtype)
    wpart = torch.empty((B * T, 2 * C), device=x.device, dtype=torch.float32)   # [dweight | dbias] partials
    cv, vec = channel_split(C)
    wrap(_ln_pool_bwd)[(B * T,)](
        x, weight, stats[0], stats[1], grad_xn, grad_xn if grad_copy is None else grad_copy, grad_pooled,
        grad_xn if grad_y is None else grad_y, stats if scale is None else scale, dx, dres, wpart, wpart[:, C:],
        L, cv, T, 1.0 / L, BLOCK_L=bl, BLOCK_C=bc, VEC=vec, COPY=grad_copy is not None, ADD_GY=grad_y is not None,
        HAS_RES=res_dtype is not None, HAS_SCALE=scale is not None, num_warps=nw)
    dwb = _sum_partials(wpart, wrap).to(weight.dtype)          # (2, C): dweight, dbias
    return (dx, dwb) if res_dtype is None else (dx, dres, dwb)


def _mod_ln_fwd_impl(y_all, xn, s, skip_scale, weight, bias, eps, out_dtype, wrap):
    B, L, C = y_all.shape
    bl, bc, T, nw = _tiles(L, C, CONFIG["fwd_elems"])
    out = torch.empty((B, L, C), device=y_all.device, dtype=out_dtype)
    stats = torch.empty((2, B, L), device=y_all.device, dtype=torch.float32)
    cv, vec = channel_split(C)
    wrap(_mod_ln_fwd)[(B * T,)](
        y_all, xn, s, skip_scale, weight, bias, out, stats[0], stats[1], L, cv, T, eps,
        BLOCK_L=bl, BLOCK_C=bc, VEC=vec, num_warps=nw)
    return out, stats


def _mod_ln_bwd_impl(grad_out, y_all, xn, s, skip_scale, weight, stats, wrap):
    B, L, C = y_all.shape
    bl, bc, T, nw = _tiles(L, C, CONFIG["bwd_elems"])
    dy = torch.empty_like(y_all)
    dxn = torch.empty_like(xn)
    qp = torch.empty((B, T, C), device=y_all.device, dtype=torch.float32)
    wpart = torch.empty((B * T, 2 * C), device=y_all.device, dtype=torch.float32)
    cv, vec = channel_split(C)
    wrap(_mod_ln_bwd)[(B * T,)](
        grad_out, y_all, xn, s, skip_scale, weight, stats[0], stats[1], dy, dxn, qp, wpart, wpart[:, C:],
        L, cv, T, BLOCK_L=bl, BLOCK_C=bc, VEC=vec, num_warps=nw)
    q = _sum_tiles(qp, wrap)                            # (B, C): sum_L dz * y * xn
    # d skip = sum_bc s * q (tiny: LayerNorm is scale-invariant, only eps makes it nonzero); d s = skip * q
    dskip = torch.vdot(q.view(-1), s.reshape(-1).float()).reshape(skip_scale.shape).to(skip_scale.dtype)
    ds = q.mul_(skip_scale.float()).to(s.dtype)
    return dy, dxn, ds, dskip, _sum_partials(wpart, wrap).to(weight.dtype)   # last: (2, C) dweight, dbias


def _sum_tiles(part, wrap):
    """(B, T, C) per-tile partial sums -> (B, C): eagerly triton_colsum.sum_middle (torch's sum over the
    middle dimension took 10-12 us per call at GroupMamba-B stage 3); under torch.compile a torch sum."""
    return sum_middle(part) if wrap is _identity else part.sum(dim=1)


def _sum_partials(wpart, wrap):
    """(programs, 2C) partial rows [dweight | dbias] -> (2, C). Eagerly the Triton column sum (torch's sum
    over the programs of the old (2, programs, C) layout took 21 us per call at GroupMamba-B stage 3, H200
    profile, eleventh set); under torch.compile (wrap_triton) a torch sum the compiler can trace."""
    sums = column_sum(wpart) if wrap is _identity else wpart.sum(0)
    return sums.view(2, -1)


# ----------------------------------------------------------------------------------------------
# torch.library ops (used under torch.compile; also usable eagerly)
# ----------------------------------------------------------------------------------------------
@triton_op(f"{NAMESPACE}::ln_pool_fwd", mutates_args={})
def ln_pool_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ln_pool_fwd_impl(x, weight, bias, eps, wrap_triton)


@triton_op(f"{NAMESPACE}::ln_pool_bwd", mutates_args={})
def ln_pool_bwd(grad_xn: torch.Tensor, grad_pooled: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _ln_pool_bwd_impl(grad_xn, grad_pooled, x, weight, stats, wrap_triton)


@triton_op(f"{NAMESPACE}::mod_ln_fwd", mutates_args={})
def mod_ln_fwd(y_all: torch.Tensor, xn: torch.Tensor, s: torch.Tensor, skip_scale: torch.Tensor,
               weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    return _mod_ln_fwd_impl(y_all, xn, s, skip_scale, weight, bias, eps, out_dtype, wrap_triton)


@triton_op(f"{NAMESPACE}::mod_ln_bwd", mutates_args={})
def mod_ln_bwd(grad_out: torch.Tensor, y_all: torch.Tensor, xn: torch.Tensor, s: torch.Tensor,
               skip_scale: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mod_ln_bwd_impl(grad_out, y_all, xn, s, skip_scale, weight, stats, wrap_triton)


def _ln_pool_grads(x, grad_xn, grad_pooled):
    B, L, C = x.shape
    grad_xn = torch.zeros_like(x) if grad_xn is None else grad_xn.contiguous()
    grad_pooled = x.new_zeros((B, C)) if grad_pooled is None else grad_pooled.contiguous()
    return grad_xn, grad_pooled


def _ln_pool_setup(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    ctx.save_for_backward(x, weight, output[2])


def _ln_pool_backward(ctx, grad_xn, grad_pooled, _gstats):
    x, weight, stats = ctx.saved_tensors
    grad_xn, grad_pooled = _ln_pool_grads(x, grad_xn, grad_pooled)
    dx, dwb = ln_pool_bwd(grad_xn, grad_pooled, x, weight, stats)
    return dx, dwb[0], dwb[1], None


def _mod_ln_setup(ctx, inputs, output):
    y_all, xn, s, skip_scale, weight, _bias, _eps, _out_dtype = inputs
    ctx.save_for_backward(y_all, xn, s, skip_scale, weight, output[1])


def _mod_ln_backward(ctx, grad_out, _gstats):
    y_all, xn, s, skip_scale, weight, stats = ctx.saved_tensors
    grad_out = torch.zeros_like(y_all) if grad_out is None else grad_out.contiguous()
    dy, dxn, ds, dskip, dwb = mod_ln_bwd(grad_out, y_all, xn, s, skip_scale, weight, stats)
    return dy, dxn, ds, dskip, dwb[0], dwb[1], None, None


ln_pool_fwd.register_autograd(_ln_pool_backward, setup_context=_ln_pool_setup)
mod_ln_fwd.register_autograd(_mod_ln_backward, setup_context=_mod_ln_setup)


# ----------------------------------------------------------------------------------------------
# eager path: plain autograd.Functions launching the kernels directly (the torch.library dispatch and
# wrap_triton cost ~100s of us per call on the host, more than these kernels take on the device)
# ----------------------------------------------------------------------------------------------
class _LayerNormPool(torch.autograd.Function):
    """(xn, pooled), and with a copy_dtype also xn in it (the mixer's in_proj input under autocast) from the
    same pass; the backward then adds that copy's gradient inside the kernel: no cast kernel, and no cast
    and add of the copy's gradient, each a pass over the activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, copy_dtype):
        xn, pooled, stats, *copy = _ln_pool_fwd_impl(x, weight, bias, eps, _identity, copy_dtype)
        ctx.save_for_backward(x, weight, stats)
        return (xn, pooled, *copy)

    @staticmethod
    def backward(ctx, grad_xn, grad_pooled, grad_copy=None):
        x, weight, stats = ctx.saved_tensors
        grad_xn, grad_pooled = _ln_pool_grads(x, grad_xn, grad_pooled)
        grad_copy = None if grad_copy is None else grad_copy.contiguous()
        dx, dwb = _ln_pool_bwd_impl(grad_xn, grad_pooled, x, weight, stats, _identity, grad_copy)
        return dx, dwb[0], dwb[1], None, None


class _AddLayerNormPool(torch.autograd.Function):
    """(y = x + residual [* scale], xn, pooled[, copy]) with xn = LayerNorm(y): a block's pending residual add
    done by the next block's first LayerNorm pass (ops.add_layernorm_pool). Backward: one pass gives y's
    total gradient (its other consumers' plus the LayerNorm's) as x's gradient, and scaled in the
    residual's dtype as the residual's: no separate add of the two gradients, and no cast."""

    @staticmethod
    def forward(ctx, x, residual, scale, weight, bias, eps, copy_dtype):
        y, xn, pooled, stats, *copy = _ln_pool_fwd_impl(x, weight, bias, eps, _identity, copy_dtype, residual, scale)
        ctx.save_for_backward(y, weight, stats, scale)
        ctx.dtypes = (x.dtype, residual.dtype)
        return (y, xn, pooled, *copy)

    @staticmethod
    def backward(ctx, grad_y, grad_xn, grad_pooled, grad_copy=None):
        y, weight, stats, scale = ctx.saved_tensors
        grad_xn, grad_pooled = _ln_pool_grads(y, grad_xn, grad_pooled)
        contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
        dx, dres, dwb = _ln_pool_bwd_impl(grad_xn, grad_pooled, y, weight, stats, _identity, contig(grad_copy),
                                          contig(grad_y), scale, *ctx.dtypes)
        return dx, dres, None, dwb[0], dwb[1], None, None


class _ModulateLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_all, xn, s, skip_scale, weight, bias, eps, out_dtype):
        out, stats = _mod_ln_fwd_impl(y_all, xn, s, skip_scale, weight, bias, eps, out_dtype, _identity)
        ctx.save_for_backward(y_all, xn, s, skip_scale, weight, stats)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y_all, xn, s, skip_scale, weight, stats = ctx.saved_tensors
        grad_out = torch.zeros_like(y_all) if grad_out is None else grad_out.contiguous()
        dy, dxn, ds, dskip, dwb = _mod_ln_bwd_impl(grad_out, y_all, xn, s, skip_scale, weight, stats, _identity)
        return dy, dxn, ds, dskip, dwb[0], dwb[1], None, None


def layernorm_pool_triton(x, weight, bias, eps, copy_dtype=None):
    """(xn, pooled), plus xn in copy_dtype when that is given (and differs from x's dtype)."""
    if use_library_ops(CONFIG):
        xn, pooled, _stats = ln_pool_fwd(x, weight, bias, float(eps))
        return (xn, pooled) if copy_dtype is None else (xn, pooled, xn.to(copy_dtype))   # compile fuses the cast
    return _LayerNormPool.apply(x, weight, bias, float(eps), copy_dtype)


def add_layernorm_pool_triton(x, residual, scale, weight, bias, eps, copy_dtype=None):
    """(y, xn, pooled), plus xn in copy_dtype when that is given; eager only (no torch.library op: under
    torch.compile ops.add_layernorm_pool runs residual_add and layernorm_pool instead)."""
    return _AddLayerNormPool.apply(x, residual, scale, weight, bias, float(eps), copy_dtype)


def modulate_layernorm_triton(y_all, xn, s, skip_scale, weight, bias, eps, out_dtype):
    if use_library_ops(CONFIG):
        return mod_ln_fwd(y_all, xn, s, skip_scale, weight, bias, float(eps), out_dtype)[0]
    return _ModulateLayerNorm.apply(y_all, xn, s, skip_scale, weight, bias, float(eps), out_dtype)
