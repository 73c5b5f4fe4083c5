"""Triton kernels for the grouped LayerNorm with an optional SiLU gate (semantics: norm.py).

x (M rows of G*d, contiguous) is read as a (BLOCK_M, G, BLOCK_D) tile per program: every one of the G
slices of d channels is normalized on its own with its own weight row. Many rows per program, so the
narrow rows of GroupMamba (d = 16 .. 128, C = 64 .. 512) fill the GPU; torch's LayerNorm kernel runs
one row per thread block and took 0.6-2.4 ms per call at T stage 1 (B=128) on an H200.

    _gln_fwd   x [, z] -> out = (xhat * w + b) [* silu(z)], mean and rstd (fp32, per row and group)
    _gln_bwd   dout, x [, z], mean, rstd -> dx [, dz], per-program partials of dweight, dbias

The backward recomputes xhat from the saved statistics; weight/bias partials (fp32, one (2, G, d) row per
program) are reduced by triton_colsum.column_sum (eagerly; torch sums in the torch.library op):
deterministic, no atomics. All arithmetic is fp32.
Tiles (H200, benchmarks/bench_norm.py --sweep-warps, B=128 at every GroupMamba-T and -B shape, each direction
swept on its own, twenty-first set): the forward takes 1024 elements per program on one warp; it had taken
4096-8192 on 8 warps, 0-50% slower (T stage 3 gate 51.0 vs 25.3 us, T1 gate 56.5 vs 46.9). The backward of
the gated group norm: 1024 elements per program (2048 for rows of 512 padded channels over >= 16384 rows) on
2 warps; of a plain LayerNorm (G = 1): 2048 elements on one warp, which took about half the time of the
earlier 8192-element, 8-warp tiles at B stages 1-2 (115.8 vs 217.7 us, 67.5 vs 167.8) and 0-17% less
elsewhere. The partials are reduced in one column_sum call (10-27 us) instead of two torch sums (16-29 us
together, with the forward's fewer programs).
Under torch.compile the ops are torch.library triton_ops (traceable); eagerly, an autograd.Function
launches the same kernels with less host overhead.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._util import identity as _identity, tile_warps, use_library_ops
from .triton_act import sigmoid, silu
from .triton_colsum import column_sum

NAMESPACE = "groupmamba_triton"
# elems / bwd_elems: elements per program of the forward / backward (None: fwd_tiles' / bwd_tiles' rules);
# num_warps / bwd_num_warps: warps per program of the forward / backward (None: the same rules). The benchmark
# sweeps each direction on its own: bench_norm.py --sweep-warps.
CONFIG = {"elems": None, "bwd_elems": None, "num_warps": None, "bwd_num_warps": None, "eager_library_ops": False}


def bwd_elems(M: int, G: int, d: int) -> int:
    """Elements per program of the backward (module docstring: measured per shape class)."""
    row = G * max(2, triton.next_power_of_2(d))
    if G > 1:
        return 2048 if row >= 512 and M >= 16384 else 1024
    return 2048


def tiles(M: int, G: int, d: int, elems: int, num_warps: Optional[int] = None, one_warp_upto: int = 0):
    """(BLOCK_M, BLOCK_D, programs, num_warps) for M rows of G slices of d channels at about `elems` elements
    per program; num_warps None: one warp for tiles of <= one_warp_upto elements, else _util.tile_warps."""
    block_d = max(2, triton.next_power_of_2(d))
    row = G * block_d
    block_m = max(1, min(triton.next_power_of_2(M), elems // row))
    tile = block_m * row
    return block_m, block_d, triton.cdiv(M, block_m), num_warps or (1 if tile <= one_warp_upto else tile_warps(tile))


def fwd_tiles(M: int, G: int, d: int):
    """The forward's tiles: 1024 elements on one warp (module docstring), or CONFIG's."""
    return tiles(M, G, d, CONFIG["elems"] or 1024, CONFIG["num_warps"], one_warp_upto=1024)


def bwd_tiles(M: int, G: int, d: int, elems: Optional[int] = None):
    """The backward's tiles: elems (default CONFIG's or bwd_elems) per program; one warp for a plain
    LayerNorm's tiles of <= 2048 elements, else _util.tile_warps (module docstring), or CONFIG's warps."""
    return tiles(M, G, d, elems or CONFIG["bwd_elems"] or bwd_elems(M, G, d), CONFIG["bwd_num_warps"],
                 one_warp_upto=2048 if G == 1 else 0)


@triton.jit
def _tile(pid, M, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    gs = tl.arange(0, G)
    cs = tl.arange(0, BLOCK_D)
    offs = rows[:, None, None] * (G * D) + gs[None, :, None] * D + cs[None, None, :]
    mask = (rows[:, None, None] < M) & (gs[None, :, None] < G) & (cs[None, None, :] < D)
    widx = gs[:, None] * D + cs[None, :]
    wmask = (gs[:, None] < G) & (cs[None, :] < D)
    sidx = rows[:, None] * G + gs[None, :]
    smask = (rows[:, None] < M) & (gs[None, :] < G)
    return offs, mask, widx, wmask, sidx, smask


@triton.jit(do_not_specialize=["M", "RPS"])
def _gln_fwd(X, Z, W, Bias, OUT, MEAN, RSTD, M, eps, G: tl.constexpr, D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr, SAVE_STATS: tl.constexpr,
             RES, SCALE, SUM, RPS, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr):
    """HAS_RES: the rows normalized are x + RES (times SCALE[row // RPS] with HAS_SCALE: a residual branch
    under stochastic depth), that sum stored to SUM in SUM's dtype (the residual stream)."""
    offs, mask, widx, wmask, sidx, smask = _tile(tl.program_id(0), M, G, D, BLOCK_M, BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            sc = tl.load(SCALE + rows // RPS, mask=rows < M, other=0.0)
            r = r * sc[:, None, None]
        x = x + r
        tl.store(SUM + offs, x.to(SUM.dtype.element_ty), mask=mask)
        x = x.to(SUM.dtype.element_ty).to(tl.float32)   # normalize the stored sum (the same for float32)
    mean = tl.sum(x, axis=2) / D
    xc = tl.where(mask, x - mean[:, :, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=2) / D + eps)
    w = tl.load(W + widx, mask=wmask, other=0.0).to(tl.float32)
    b = tl.load(Bias + widx, mask=wmask, other=0.0).to(tl.float32)
    out = xc * rstd[:, :, None] * w[None, :, :] + b[None, :, :]
    if HAS_GATE:
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        out = out * silu(z)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    if SAVE_STATS:
        tl.store(MEAN + sidx, mean, mask=smask)
        tl.store(RSTD + sidx, rstd, mask=smask)


@triton.jit(do_not_specialize=["M", "RPS"])
def _gln_bwd(GO, X, Z, W, Bias, MEAN, RSTD, DX, DZ, PART, M, G: tl.constexpr, D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATE: tl.constexpr,
             GSUM, DRES, SCALE, RPS, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr):
    """dx [, dz] of a tile; PART[pid] = this tile's sums of g * xhat (dweight) and of g (dbias), (2, G, D).
    HAS_RES (X is then the stored sum): dx also gets GSUM, the gradient the sum received from its other
    uses, and DRES = dx [* SCALE[row // RPS]] in DRES's dtype, the residual branch's gradient."""
    pid = tl.program_id(0)
    offs, mask, widx, wmask, sidx, smask = _tile(pid, M, G, D, BLOCK_M, BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + sidx, mask=smask, other=0.0)
    rstd = tl.load(RSTD + sidx, mask=smask, other=0.0)
    xhat = tl.where(mask, (x - mean[:, :, None]) * rstd[:, :, None], 0.0)
    w = tl.load(W + widx, mask=wmask, other=0.0).to(tl.float32)
    g = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        b = tl.load(Bias + widx, mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        sig = sigmoid(z)
        ln = xhat * w[None, :, :] + b[None, :, :]
        dz = g * ln * sig * (1.0 + z * (1.0 - sig))
        tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)
        g = g * (z * sig)
    g = tl.where(mask, g, 0.0)
    dxhat = g * w[None, :, :]
    c1 = tl.sum(dxhat * xhat, axis=2) / D
    c2 = tl.sum(dxhat, axis=2) / D
    dx = (dxhat - xhat * c1[:, :, None] - c2[:, :, None]) * rstd[:, :, None]
    if HAS_RES:
        dx = dx + tl.load(GSUM + offs, mask=mask, other=0.0).to(tl.float32)
        dr = dx
        if HAS_SCALE:
            rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            sc = tl.load(SCALE + rows // RPS, mask=rows < M, other=0.0)
            dr = dr * sc[:, None, None]
        tl.store(DRES + offs, dr.to(DRES.dtype.element_ty), mask=mask)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    poffs = pid.to(tl.int64) * (2 * G * D) + widx
    tl.store(PART + poffs, tl.sum(g * xhat, axis=0), mask=wmask)
    tl.store(PART + G * D + poffs, tl.sum(g, axis=0), mask=wmask)


def _fwd_impl(x, z, weight, bias, eps, out_dtype, save_stats, wrap, res=None):
    """res: the residual arguments of _gln_fwd (RES, SCALE, SUM, RPS, HAS_RES, HAS_SCALE) or None (then
    placeholders: every argument is passed, since torch.compile's Triton wrapper does not take defaults)."""
    G, d = weight.shape
    M = x.numel() // (G * d)
    bm, bd, P, nw = fwd_tiles(M, G, d)
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    stats = torch.empty((2, M * G if save_stats else 1), device=x.device, dtype=torch.float32)
    if M > 0:
        res = res or dict(RES=x, SCALE=stats, SUM=out, RPS=1, HAS_RES=False, HAS_SCALE=False)
        wrap(_gln_fwd)[(P,)](x, x if z is None else z, weight, bias, out, stats[0], stats[1], M, eps,
                             G=G, D=d, BLOCK_M=bm, BLOCK_D=bd, HAS_GATE=z is not None, SAVE_STATS=save_stats,
                             num_warps=nw, **res)
    return out, stats


def _bwd_kernel(grad_out, x, z, weight, bias, stats, wrap, elems=None, res=None):
    """The backward kernel alone: (dx, dz or None, the (programs, 2 * G * d) weight / bias partials); elems:
    elements per program (default: bwd_tiles'); res: the residual arguments of _gln_bwd (GSUM, DRES, SCALE,
    RPS, HAS_RES, HAS_SCALE) or None (placeholders)."""
    G, d = weight.shape
    M = x.numel() // (G * d)
    bm, bd, P, nw = bwd_tiles(M, G, d, elems)
    dx = torch.empty_like(x)
    dz = torch.empty_like(z) if z is not None else dx
    part = torch.empty((P, 2 * G * d), device=x.device, dtype=torch.float32)
    if M > 0:
        res = res or dict(GSUM=x, DRES=dx, SCALE=part, RPS=1, HAS_RES=False, HAS_SCALE=False)
        wrap(_gln_bwd)[(P,)](grad_out, x, x if z is None else z, weight, bias, stats[0], stats[1], dx, dz,
                             part, M, G=G, D=d, BLOCK_M=bm, BLOCK_D=bd, HAS_GATE=z is not None, num_warps=nw,
                             **res)
    else:
        part.zero_()
    return dx, (dz if z is not None else None), part


def _bwd_impl(grad_out, x, z, weight, bias, stats, wrap, res=None):
    G, d = weight.shape
    dx, dz, part = _bwd_kernel(grad_out, x, z, weight, bias, stats, wrap, res=res)
    if wrap is _identity:
        sums = column_sum(part)
        dw, db = sums[:G * d].view(G, d), sums[G * d:].view(G, d)
    else:
        # the torch.library op (traced by torch.compile: its kernels must go through wrap_triton) returns
        # outputs that must not alias each other: two separate torch sums
        dw, db = part[:, :G * d].sum(0).view(G, d), part[:, G * d:].sum(0).view(G, d)
    return dx, dz, dw.to(weight.dtype), db.to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library ops (used under torch.compile; also usable eagerly)
# ----------------------------------------------------------------------------------------------
@triton_op(f"{NAMESPACE}::group_ln_fwd", mutates_args={})
def group_ln_fwd(x: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(x, z, weight, bias, eps, out_dtype, True, wrap_triton)


@triton_op(f"{NAMESPACE}::group_ln_bwd", mutates_args={})
def group_ln_bwd(grad_out: torch.Tensor, x: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor,
                 bias: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    dx, dz, dw, db = _bwd_impl(grad_out, x, z, weight, bias, stats, wrap_triton)
    return dx, (dz if dz is not None else torch.empty(0, device=x.device, dtype=x.dtype)), dw, db


def _setup(ctx, inputs, output):
    x, z, weight, bias, _eps, _dt = inputs
    ctx.has_gate = z is not None
    ctx.save_for_backward(x, z, weight, bias, output[1])


def _backward(ctx, grad_out, _gstats):
    x, z, weight, bias, stats = ctx.saved_tensors
    dx, dz, dw, db = group_ln_bwd(grad_out.contiguous(), x, z, weight, bias, stats)
    return dx, (dz if ctx.has_gate else None), dw, db, None, None


group_ln_fwd.register_autograd(_backward, setup_context=_setup)


class _GroupLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, bias, eps, out_dtype):
        save = any(ctx.needs_input_grad[:4])
        out, stats = _fwd_impl(x, z, weight, bias, eps, out_dtype, save, _identity)
        if save:
            ctx.save_for_backward(x, z, weight, bias, stats)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, z, weight, bias, stats = ctx.saved_tensors
        dx, dz, dw, db = _bwd_impl(grad_out.contiguous(), x, z, weight, bias, stats, _identity)
        return dx, dz, dw, db, None, None


class _AddLayerNorm(torch.autograd.Function):
    """(s = x + residual [* scale per sample], LayerNorm(s)) in one pass; the backward adds s's gradient from
    its other uses to the LayerNorm's and writes the residual branch's gradient in the residual's dtype, in
    the same kernel (no separate add and cast passes)."""

    @staticmethod
    def forward(ctx, x, residual, scale, weight, bias, eps, out_dtype):
        s = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, residual.dtype))
        rps = x.numel() // (x.shape[0] * weight.numel()) if scale is not None else 1   # rows per sample
        res = dict(RES=residual, SCALE=scale, SUM=s, RPS=rps, HAS_RES=True, HAS_SCALE=scale is not None)
        out, stats = _fwd_impl(x, None, weight, bias, eps, out_dtype, True, _identity, res)
        ctx.save_for_backward(s, weight, bias, stats, scale)
        ctx.rps, ctx.res_dtype = rps, residual.dtype
        return s, out

    @staticmethod
    def backward(ctx, grad_s, grad_out):
        s, weight, bias, stats, scale = ctx.saved_tensors
        grad_s = torch.zeros_like(s) if grad_s is None else grad_s.contiguous()
        grad_out = torch.zeros(s.shape, device=s.device, dtype=s.dtype) if grad_out is None else grad_out
        dres = torch.empty(s.shape, device=s.device, dtype=ctx.res_dtype)
        res = dict(GSUM=grad_s, DRES=dres, SCALE=scale, RPS=ctx.rps, HAS_RES=True, HAS_SCALE=scale is not None)
        dx, _, dw, db = _bwd_impl(grad_out.contiguous(), s, None, weight, bias, stats, _identity, res)
        return dx, dres, None, dw, db, None, None


def add_layer_norm_triton(x, residual, scale, weight, bias, eps, out_dtype):
    """x, residual: contiguous (B, ..., G*d); scale: None or contiguous float32 (B,); weight, bias: (G, d)."""
    return _AddLayerNorm.apply(x, residual, scale, weight, bias, float(eps), out_dtype)


def group_layer_norm_triton(x, z, weight, bias, eps, out_dtype):
    """x, z: contiguous (..., G*d); weight, bias: contiguous (G, d)."""
    if use_library_ops(CONFIG):
        return group_ln_fwd(x, z, weight, bias, float(eps), out_dtype)[0]
    return _GroupLayerNorm.apply(x, z, weight, bias, float(eps), out_dtype)
