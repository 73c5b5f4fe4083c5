"""Triton kernel for the depthwise 3x3 convolution + bias + activation on channels-last tokens.

x (B, H, W, C) contiguous (the model's (B, L, C) tokens), weight as (9, C) fp32 taps, bias (C,).

Forward (_dwconv_fwd): a program owns BLOCK_H output rows x BLOCK_C channels of one image and walks
along W with the 3x3 input window in registers, so each output column costs 3 loads instead of 9 and
the row masks are computed once per program. Loads and stores run along C, 16-byte vectors when
C % 8 == 0 (bf16; C reaches the kernel as CV * VEC so the compiler knows it: _util.channel_split).
Accumulate in fp32, add bias, SiLU or exact (erf-form) GELU (triton_act: the activation, not the conv,
was most of this kernel's instructions), store in x's dtype.
History, H200, GroupMamba-T stage-1 FFN conv (C=512 at 56x56, B=128, bf16): the first kernel (one tile
of flattened positions, nine shifted tile loads, 64-bit per-element addresses) took 2.6 ms with 255
registers and spills; with 32-bit in-tile offsets 0.78 ms (88 SASS instructions per element, issue-
bound); this sliding-window kernel 0.56 ms (52 per element with libdevice's erf, 18 without an
activation), and it was faster or equal at every GroupMamba-T shape but one (28x28, C=128: 46 vs 44 us).
See BENCHMARKS.md, "Depthwise conv kernels".
Backward (autograd.Function), all Triton by default; CONFIG picks each piece:
- the weight and bias gradients and g = grad_out * act'(pre) (_dwconv_wgrad, the forward's sliding
  window over x; each output column's g multiplied into nine per-tap accumulators and one for the bias,
  per-program fp32 partials summed afterwards in a fixed order). When the pre-activation was not kept
  ("fused"), the same pass recomputes it from the window; when it was kept ("split"), the activation
  backward + bias sum (triton_colsum.column_sum_act_grad) makes g first and the pass reads it. "cudnn":
  the activation backward, then cuDNN's NHWC depthwise wgrad;
- dx: this file's forward kernel over g with the taps rotated by 180 degrees (a depthwise conv's input
  gradient is its transposed stencil), no bias, no activation (triton_dgrad=False: cuDNN's dgrad).
- x_bias (a bias already inside x): its gradient is dx summed over every position, which the dx pass adds up
  as it writes dx (per-program partial rows, then column_sum). B training step, H200, same call: 1085.3 img/s
  against 1078.4 with the earlier way, two kernels that read the image edges of g and combined their sums
  with the taps (36 us a call; BENCHMARKS.md, fourteenth set), which had replaced fc1's own bias column sum.
Of the activations only x is saved, not the conv output. Inside ``keep_preactivation()`` (ConvFFN's
checkpoint recompute, which runs right before this backward) the forward also stores the pre-activation
and saves it, so the backward needs no recompute: the FFN's conv forward runs twice per step (plus the
dx pass), not three times.
History: a first fused Triton backward (experiments/dwconv_fused_backward.patch, 2048-element tiles, ten
accumulator tiles per program, 180-250 registers) took 22 ms of a GroupMamba-T training step against
~11 ms for cuDNN's kernels; this one holds four channels of one row per thread (the wgrad pass: 167
registers fused, 108 over a given g). Not faster than cuDNN's wgrad at every shape; the T training step
ran at 1723.8 img/s with it and 1712.3 with cuDNN's wgrad (same call, H200; under 1%, about the spread
between machines), and the Triton dx pass is what moved the step (BENCHMARKS.md, seventh set).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import ThreadFlag, channel_split
from .triton_act import gelu, gelu_grad, silu, silu_grad
from .triton_colsum import column_sum, column_sum_act_grad

ACTS = {"none": 0, "silu": 1, "gelu": 2}
# block_h x block_c, num_warps: the forward kernel's (and the dx pass's) output rows x channels per program
# (channels capped at C's next power of two); None: 4 x 128 for H >= 28, else 8 x 64 (105 vs 111 us at
# GroupMamba-B's stage-3 FFN conv, 38 vs 46 at 7x7, in the H200 sweep of benchmarks/bench_dwconv.py
# --sweep, eleventh set). The weight-gradient pass has its own table, WGRAD_TILES.
# fused_act_bwd (the split and cudnn methods below): the activation derivative and bias-gradient sum in one
# Triton pass (triton_colsum.column_sum_act_grad) instead of torch's silu/gelu_backward + column_sum
# triton_dgrad: the input gradient with _dwconv_fwd (taps rotated) instead of cuDNN's dgrad
# wgrad / wgrad_kept: how the backward gets the weight gradient when the pre-activation was not kept /
# was kept (keep_preactivation). "fused" (not kept only) = one _dwconv_wgrad pass: the activation
# derivative from a pre-activation recomputed from the window, the weight and bias gradients; "split" = the
# activation backward (column_sum_act_grad, after a recompute pass when not kept), then _dwconv_wgrad over
# its result (ACT 0); "cudnn" = the same activation backward, then cuDNN's wgrad. Defaults: the fastest
# pair in whole-step A/B runs on an H200 (BENCHMARKS.md, seventh set); a fused pass that loaded a kept
# pre-activation was 1.1-1.2x slower than split at the FFN shapes and was removed.
# wgrad_tile (block_h, block_c, num_warps) and wgrad_programs (about how many programs, the partials' rows):
# the weight-gradient pass's, None: from WGRAD_TILES.
CONFIG = {"block_h": None, "block_c": None, "num_warps": 4, "fused_act_bwd": True, "triton_dgrad": True,
          "wgrad": "fused", "wgrad_kept": "split", "wgrad_tile": None, "wgrad_programs": None}

# The weight-gradient pass's (block_h, block_c, num_warps, programs) by image height (the first row whose
# height H reaches), for the fused pass (the activation's derivative from a recomputed pre-activation) and for
# a given g (ACT 0). From benchmarks/experiments/dwconv_wgrad_sweep.py (H200, eighteenth set, B=128, bf16,
# GroupMamba-T's convs; us for the pass and its column sum, the earlier 4 x 128 x 4 warps x 2048 programs
# -> this table): fused (the mixer convs, SiLU) 56x56 C=64 131 -> the same (the sweep's best: 128),
# 28x28 C=128 118 -> 71, 14x14 C=348 74 -> 57, 7x7 C=448 35 -> 21; given g (the FFN convs) 56x56 C=512
# 339 -> 296, 28x28 C=1024 201 -> 162, 14x14 C=1392 77 -> 71, 7x7 C=1792 44 -> 37. Smaller tiles and fewer
# warps per program won at 28x28 and below (why was not profiled; more programs in flight per SM is a guess).
WGRAD_TILES = {
    True: ((56, (4, 128, 4, 2048)), (28, (1, 128, 2, 4096)), (14, (1, 128, 1, 4096)), (0, (4, 32, 2, 1024))),
    False: ((56, (4, 64, 4, 1024)), (14, (2, 128, 4, 1024)), (0, (4, 64, 4, 1024))),
}


def tiles(H: int, C: int):
    """(BLOCK_H, BLOCK_C, num_warps) of _dwconv_fwd (the forward and the dx pass) for an H-row image with C
    channels."""
    block_h = CONFIG["block_h"] or (4 if H >= 28 else 8)
    block_c = min(CONFIG["block_c"] or (128 if H >= 28 else 64), max(16, triton.next_power_of_2(C)))
    return block_h, block_c, CONFIG["num_warps"]


def wgrad_tiles(H: int, C: int, fused: bool):
    """(BLOCK_H, BLOCK_C, num_warps, programs) of _dwconv_wgrad for an H-row image with C channels; fused:
    the pass applies the activation's derivative (ACT != 0)."""
    block_h, block_c, num_warps, programs = next(t for h, t in WGRAD_TILES[fused] if H >= h)
    if CONFIG["wgrad_tile"]:
        block_h, block_c, num_warps = CONFIG["wgrad_tile"]
    return (block_h, min(block_c, max(16, triton.next_power_of_2(C))), num_warps,
            CONFIG["wgrad_programs"] or programs)


@triton.jit
def _row_col(img, off, m, w, W, C):
    """Column w of the tile's input rows (offsets `off` at column 0) as fp32; zero outside the image."""
    return tl.load(img + off + w * C, mask=m & (w < W), other=0.0).to(tl.float32)


@triton.jit
def _stencil(bias, t0, t1, t2, t3, t4, t5, t6, t7, t8, lu, mu, ru, lm, mm, rm, ld, md, rd):
    """The pre-activation: bias + the nine taps times the window (l/m/r = columns w-1, w, w+1; u/m/d =
    rows above, at, below), in one fixed order, so the backward's recompute equals the forward's bits."""
    return bias + lu * t0 + mu * t1 + ru * t2 + lm * t3 + mm * t4 + rm * t5 + ld * t6 + md * t7 + rd * t8


@triton.jit
def _out_col(obase, pbase, off, m, w, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
             lu, mu, ru, lm, mm, rm, ld, md, rd, ACT: tl.constexpr, STORE_PRE: tl.constexpr):
    """Output column w from the window (l/m/r = columns w-1, w, w+1; u/m/d = rows above, at, below);
    with STORE_PRE also the pre-activation at pbase."""
    acc = _stencil(bias, t0, t1, t2, t3, t4, t5, t6, t7, t8, lu, mu, ru, lm, mm, rm, ld, md, rd)
    if STORE_PRE:
        tl.store(pbase + off + w * C, acc.to(pbase.dtype.element_ty), mask=m & (w < W))
    if ACT == 1:
        acc = silu(acc)
    elif ACT == 2:
        acc = gelu(acc)
    tl.store(obase + off + w * C, acc.to(obase.dtype.element_ty), mask=m & (w < W))
    return acc


@triton.jit
def _rows(hh, H, W, C, cs, cmask):
    """Input rows hh-1, hh, hh+1 of a tile: offsets of their column 0 inside the image, and masks."""
    off_u = ((hh - 1) * W * C)[:, None] + cs[None, :]
    off_m = (hh * W * C)[:, None] + cs[None, :]
    off_d = ((hh + 1) * W * C)[:, None] + cs[None, :]
    m_u = ((hh >= 1) & (hh - 1 < H))[:, None] & cmask
    m_m = (hh < H)[:, None] & cmask
    m_d = (hh + 1 < H)[:, None] & cmask
    return off_u, off_m, off_d, m_u, m_m, m_d


@triton.jit
def _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, w, W, C):
    """Column w of the window's three input rows (above, at, below the output row)."""
    return (_row_col(img, off_u, m_u, w, W, C), _row_col(img, off_m, m_m, w, W, C),
            _row_col(img, off_d, m_d, w, W, C))


@triton.jit
def _tap(WT, k: tl.constexpr, C, cs, cok, FLIP: tl.constexpr):
    return tl.load(WT + (8 - k if FLIP else k) * C + cs, mask=cok, other=0.0)[None, :]


@triton.jit
def _taps_bias(WT, Bias, C, cs, cok, HAS_BIAS: tl.constexpr = True, FLIP: tl.constexpr = False):
    """The nine taps and the bias of channels cs, as fp32 rows. FLIP: the taps rotated by 180 degrees (tap k
    read from row 8 - k); no HAS_BIAS: a zero bias."""
    taps = (_tap(WT, 0, C, cs, cok, FLIP), _tap(WT, 1, C, cs, cok, FLIP), _tap(WT, 2, C, cs, cok, FLIP),
            _tap(WT, 3, C, cs, cok, FLIP), _tap(WT, 4, C, cs, cok, FLIP), _tap(WT, 5, C, cs, cok, FLIP),
            _tap(WT, 6, C, cs, cok, FLIP), _tap(WT, 7, C, cs, cok, FLIP), _tap(WT, 8, C, cs, cok, FLIP))
    if HAS_BIAS:
        bias = tl.load(Bias + cs, mask=cok, other=0.0).to(tl.float32)[None, :]
    else:
        bias = tl.zeros_like(taps[0])
    return taps + (bias,)


@triton.jit(do_not_specialize=["H", "W", "CV", "NHB"])
def _dwconv_fwd(X, WT, Bias, OUT, PRE, PSUM, H, W, CV, NHB, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr, HAS_BIAS: tl.constexpr = True,
                FLIP_TAPS: tl.constexpr = False, SUM_OUT: tl.constexpr = False):
    """act(conv + bias) for a tile of BLOCK_H rows x BLOCK_C channels; see the module docstring. FLIP_TAPS
    and no HAS_BIAS: the backward's dx pass (the taps rotated by 180 degrees, no bias). SUM_OUT: also this
    program's fp32 column sums of its outputs (unrounded), one row of PSUM per program (row pid, C wide)."""
    C = CV * VEC  # see _util.channel_split
    pid = tl.program_id(0)
    b = pid // NHB
    hh = (pid % NHB) * BLOCK_H + tl.arange(0, BLOCK_H)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cok = cs < C
    cmask = cok[None, :]
    image = b.to(tl.int64) * H * W * C      # 64-bit offset of image b (x and out alike)
    img = X + image
    off_u, off_m, off_d, m_u, m_m, m_d = _rows(hh, H, W, C, cs, cmask)
    t0, t1, t2, t3, t4, t5, t6, t7, t8, bias = _taps_bias(WT, Bias, C, cs, cok, HAS_BIAS, FLIP_TAPS)
    # window: columns w-1 (a*), w (b*) and w+1 (c*) of the three input rows; column -1 is padding. Each
    # iteration first issues the loads of the next three columns (d*, e*, f*), then computes and stores
    # its three output columns: output w needs no new column, so its arithmetic and store overlap the nine
    # loads in flight. (Loads placed after a store cannot be hoisted above it by the compiler, which must
    # assume that OUT and X may alias: loading each column right before its use left three loads per warp
    # in flight, and the kernel latency-bound.) The loop is unrolled by three so the window's roles rotate
    # statically instead of by register moves.
    au = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    am = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    ad = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    bu, bm, bd = _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, 0, W, C)
    cu, cm, cd = _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, 1, W, C)
    obase = OUT + image
    pbase = PRE + image
    osum = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for w in range(0, W, 3):
        du, dm, dd = _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, w + 2, W, C)
        eu, em, ed = _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, w + 3, W, C)
        fu, fm, fd = _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, w + 4, W, C)
        o0 = _out_col(obase, pbase, off_m, m_m, w, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
                      au, bu, cu, am, bm, cm, ad, bd, cd, ACT, STORE_PRE)
        o1 = _out_col(obase, pbase, off_m, m_m, w + 1, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
                      bu, cu, du, bm, cm, dm, bd, cd, dd, ACT, STORE_PRE)
        o2 = _out_col(obase, pbase, off_m, m_m, w + 2, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
                      cu, du, eu, cm, dm, em, cd, dd, ed, ACT, STORE_PRE)
        if SUM_OUT:   # outputs outside the image (rows >= H, columns >= W) are not zero: masked out
            osum += (tl.where(m_m & (w < W), o0, 0.0) + tl.where(m_m & (w + 1 < W), o1, 0.0)
                     + tl.where(m_m & (w + 2 < W), o2, 0.0))
        au, am, ad = du, dm, dd
        bu, bm, bd = eu, em, ed
        cu, cm, cd = fu, fm, fd
    if SUM_OUT:
        tl.store(PSUM + pid.to(tl.int64) * C + cs, tl.sum(osum, axis=0), mask=cok)


@triton.jit
def _grad_col(gobase, gbase, off, m, w, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
              lu, mu, ru, lm, mm, rm, ld, md, rd, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, ACT: tl.constexpr):
    """Output column w of the backward: g = grad_out * act'(pre), with the pre-activation from the window
    (_stencil, as in _out_col), stored at gbase; the ten accumulators of the taps'
    and the bias's gradients updated with the unrounded g. ACT 0: g is grad_out, nothing stored."""
    mw = m & (w < W)
    g = tl.load(gobase + off + w * C, mask=mw, other=0.0).to(tl.float32)
    if ACT != 0:
        pre = _stencil(bias, t0, t1, t2, t3, t4, t5, t6, t7, t8, lu, mu, ru, lm, mm, rm, ld, md, rd)
        if ACT == 1:
            g = g * silu_grad(pre)
        else:
            g = g * gelu_grad(pre)
        tl.store(gbase + off + w * C, g.to(gbase.dtype.element_ty), mask=mw)
    return (a0 + g * lu, a1 + g * mu, a2 + g * ru, a3 + g * lm, a4 + g * mm, a5 + g * rm, a6 + g * ld,
            a7 + g * md, a8 + g * rd, a9 + g)


@triton.jit(do_not_specialize=["H", "W", "CV", "NHB", "NRB", "PER_PROGRAM"])
def _dwconv_wgrad(X, GO, WT, Bias, G, DWP, H, W, CV, NHB, NRB, PER_PROGRAM, ACT: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """The backward's activation derivative, weight and bias gradients in one pass over x and grad_out.
    Program (p, c) walks row blocks p*PER_PROGRAM .. (p+1)*PER_PROGRAM - 1 of the B*NHB blocks of BLOCK_H
    rows (channels c*BLOCK_C ...) with _dwconv_fwd's sliding window over x; it stores G = grad_out *
    act'(pre) (ACT 0: nothing, G is grad_out) and its fp32 partial sums DWP[p, k, c] of G * x shifted by
    tap k (k < 9) and of G (k = 9), summed over programs afterwards in a fixed order (deterministic)."""
    C = CV * VEC  # see _util.channel_split
    pid = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cok = cs < C
    cmask = cok[None, :]
    t0, t1, t2, t3, t4, t5, t6, t7, t8, bias = _taps_bias(WT, Bias, C, cs, cok)
    a0 = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7, a8, a9 = a0, a0, a0, a0, a0, a0, a0, a0, a0
    for j in range(pid * PER_PROGRAM, tl.minimum(NRB, (pid + 1) * PER_PROGRAM)):
        b = j // NHB
        hh = (j % NHB) * BLOCK_H + tl.arange(0, BLOCK_H)
        image = b.to(tl.int64) * H * W * C
        img = X + image
        gobase = GO + image
        gbase = G + image
        off_u, off_m, off_d, m_u, m_m, m_d = _rows(hh, H, W, C, cs, cmask)
        au = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        am, ad = au, au
        bu, bm, bd = _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, 0, W, C)
        for w in range(0, W, 3):
            cu, cm, cd = _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, w + 1, W, C)
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _grad_col(
                gobase, gbase, off_m, m_m, w, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
                au, bu, cu, am, bm, cm, ad, bd, cd, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, ACT)
            du, dm, dd = _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, w + 2, W, C)
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _grad_col(
                gobase, gbase, off_m, m_m, w + 1, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
                bu, cu, du, bm, cm, dm, bd, cd, dd, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, ACT)
            eu, em, ed = _col3(img, off_u, off_m, off_d, m_u, m_m, m_d, w + 3, W, C)
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _grad_col(
                gobase, gbase, off_m, m_m, w + 2, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
                cu, du, eu, cm, dm, em, cd, dd, ed, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, ACT)
            au, am, ad = du, dm, dd
            bu, bm, bd = eu, em, ed
    pbase = DWP + pid.to(tl.int64) * 10 * C + cs
    tl.store(pbase + 0 * C, tl.sum(a0, axis=0), mask=cok)
    tl.store(pbase + 1 * C, tl.sum(a1, axis=0), mask=cok)
    tl.store(pbase + 2 * C, tl.sum(a2, axis=0), mask=cok)
    tl.store(pbase + 3 * C, tl.sum(a3, axis=0), mask=cok)
    tl.store(pbase + 4 * C, tl.sum(a4, axis=0), mask=cok)
    tl.store(pbase + 5 * C, tl.sum(a5, axis=0), mask=cok)
    tl.store(pbase + 6 * C, tl.sum(a6, axis=0), mask=cok)
    tl.store(pbase + 7 * C, tl.sum(a7, axis=0), mask=cok)
    tl.store(pbase + 8 * C, tl.sum(a8, axis=0), mask=cok)
    tl.store(pbase + 9 * C, tl.sum(a9, axis=0), mask=cok)


def _check_size(x):
    B, H, W, C = x.shape
    if (H + 1) * W * C >= 2 ** 31:  # offsets inside one image are 32-bit (the image base is 64-bit)
        raise ValueError(f"dwconv_act: x of shape {tuple(x.shape)} is too large for the fused kernel "
                         "(32-bit offsets inside one image); split the image")


def _conv(x, taps, bias, act: str, keep_pre: bool = False, flip_taps: bool = False, sum_out: bool = False):
    """act(conv(x) + bias); with keep_pre, (that, the pre-activation conv(x) + bias) from one pass; with
    sum_out, (that, its float32 sum over (B, H, W)), the sum from per-program partial rows (column_sum).
    bias None: no bias; flip_taps: the taps rotated by 180 degrees (read in reverse, no copy)."""
    B, H, W, C = x.shape
    out = torch.empty_like(x)
    pre = torch.empty_like(x) if keep_pre else out   # out: a placeholder pointer, never written
    bh, bc, nw = tiles(H, C)
    nhb = triton.cdiv(H, bh)
    psum = torch.empty((B * nhb, C), device=x.device, dtype=torch.float32) if sum_out else out   # else a placeholder
    if out.numel():
        cv, vec = channel_split(C)
        _dwconv_fwd[(B * nhb, triton.cdiv(C, bc))](x, taps, taps if bias is None else bias, out, pre, psum, H, W, cv,
                                                   nhb, ACT=ACTS[act], STORE_PRE=keep_pre, BLOCK_H=bh, BLOCK_C=bc,
                                                   VEC=vec, HAS_BIAS=bias is not None, FLIP_TAPS=flip_taps,
                                                   SUM_OUT=sum_out, num_warps=nw)
    if sum_out:
        return out, column_sum(psum) if psum.numel() else torch.zeros(C, device=x.device, dtype=torch.float32)
    return (out, pre) if keep_pre else out


def _conv_grads(x, grad_out, taps, bias, act: str):
    """(g = grad_out * act'(pre) in grad_out's dtype (grad_out itself for act "none"), the taps' gradient
    (9, C) and the bias gradient (C,), both fp32) from one _dwconv_wgrad pass over x and grad_out."""
    B, H, W, C = x.shape
    bh, bc, nw, target = wgrad_tiles(H, C, act != "none")
    nhb = triton.cdiv(H, bh)
    n_blocks, n_cblocks = B * nhb, triton.cdiv(C, bc)
    per_program = triton.cdiv(n_blocks, max(1, target // n_cblocks))
    programs = triton.cdiv(n_blocks, per_program)
    g = grad_out if act == "none" else torch.empty_like(grad_out)
    partial = torch.empty(programs, 10, C, device=x.device, dtype=torch.float32)
    cv, vec = channel_split(C)
    _dwconv_wgrad[(programs, n_cblocks)](x, grad_out, taps, bias, g, partial, H, W, cv, nhb, n_blocks,
                                         per_program, ACT=ACTS[act], BLOCK_H=bh, BLOCK_C=bc, VEC=vec, num_warps=nw)
    # the Triton column sum: torch's reduction over the partials' leading dimension took 7-31 us a call at
    # GroupMamba-B's FFN shapes (H200 profile, eleventh set)
    sums = column_sum(partial.view(programs, 10 * C)).view(10, C)
    return g, sums[:9], sums[9]


_KEEP = ThreadFlag()


def keep_preactivation():
    """Context manager: inside it DWConvAct saves the pre-activation for its backward instead of
    recomputing it there. Meant for an activation-checkpoint recompute, whose saved tensors live only until
    the backward that follows; elsewhere it would keep one more activation-sized tensor per call."""
    return _KEEP.on()


def _taps(weight):
    return weight.reshape(weight.shape[0], 9).t().float().contiguous()      # (9, C): coalesced per tap


class DWConvAct(torch.autograd.Function):
    """act(conv(x) + bias); x_bias (C,) or None: a bias already inside x (the producing Linear's, added
    there without a gradient), whose gradient, the sum of dx over the image, this op returns (the dx pass's
    own sums)."""

    @staticmethod
    def forward(ctx, x, weight, bias, act, x_bias=None):
        _check_size(x)
        ctx.act = act
        ctx.x_bias_dtype = None if x_bias is None else x_bias.dtype
        taps = _taps(weight)
        if act != "none" and _KEEP:
            out, pre = _conv(x, taps, bias, act, keep_pre=True)
        else:
            out, pre = _conv(x, taps, bias, act), x
        # Always five saved tensors of the same shapes: a checkpoint recompute must save what the
        # original forward saved. The original forward's ctx is the one the backward sees, so "was the
        # pre-activation kept" is read from the tensors: the fifth slot holds x itself when it was not.
        ctx.save_for_backward(x, weight, taps, bias, pre)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, taps, bias, pre = ctx.saved_tensors
        act = ctx.act
        grad_out = grad_out.contiguous()
        C = x.shape[-1]
        need = ctx.needs_input_grad
        want_xb = ctx.x_bias_dtype is not None and need[4]
        if x.numel() == 0:  # nothing to launch (the passes below split B*H rows into programs)
            return (torch.zeros_like(x) if need[0] else None, torch.zeros_like(weight) if need[1] else None,
                    torch.zeros_like(bias) if need[2] else None, None,
                    x.new_zeros(C, dtype=ctx.x_bias_dtype) if want_xb else None)
        kept = act != "none" and pre.data_ptr() != x.data_ptr()
        method = CONFIG["wgrad_kept" if kept else "wgrad"]
        if method not in (("split", "cudnn") if kept else ("fused", "split", "cudnn")):
            raise ValueError(f"dwconv_act: unknown weight-gradient method {method!r} (triton_dwconv.CONFIG)")
        dw = db = None
        if method == "fused":
            gpre, dtaps, db = _conv_grads(x, grad_out, taps, bias, act)
        else:
            if act == "none":
                gpre = grad_out
            else:
                if not kept:
                    pre = _conv(x, taps, bias, "none")
                if CONFIG["fused_act_bwd"]:
                    gpre, db = column_sum_act_grad(grad_out, pre, act)
                else:
                    gpre = (torch.ops.aten.silu_backward(grad_out, pre) if act == "silu"
                            else torch.ops.aten.gelu_backward(grad_out, pre))
            if method == "split" and ctx.needs_input_grad[1]:
                _, dtaps, db_pass = _conv_grads(x, gpre, taps, bias, "none")
                db = db_pass if db is None else db
        if method != "cudnn" and ctx.needs_input_grad[1]:
            dw = dtaps.t().reshape(weight.shape)
        dx = d_xb = None
        # x_bias's gradient is dx summed over (B, H, W): dx is computed for it even when x needs no gradient
        want_dx = ctx.needs_input_grad[0] or want_xb
        if want_dx and CONFIG["triton_dgrad"]:
            # dx is the same stencil over gpre with the taps rotated by 180 degrees, no bias; the same pass adds
            # up x_bias's gradient as it goes
            if want_xb:
                dx, d_xb = _conv(gpre, taps, None, "none", flip_taps=True, sum_out=True)
            else:
                dx = _conv(gpre, taps, None, "none", flip_taps=True)
            want_dx = False
        if want_dx or (method == "cudnn" and ctx.needs_input_grad[1]):
            nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731  (channels_last views, no copies)
            dx_cudnn, dw_cudnn, _ = torch.ops.aten.convolution_backward(
                nchw(gpre), nchw(x), weight.to(x.dtype), [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C,
                [want_dx, method == "cudnn" and ctx.needs_input_grad[1], False])
            if want_dx:
                dx = dx_cudnn.permute(0, 2, 3, 1)
                d_xb = column_sum(dx.reshape(-1, C)) if want_xb else None
            if method == "cudnn":
                dw = dw_cudnn
        # g's sum (the bias gradient) with the Triton column sum instead of cuDNN/torch's reduction, when no
        # pass above made it
        if db is None and need[2]:
            db = column_sum(gpre.reshape(-1, C))
        d_xb = d_xb.to(ctx.x_bias_dtype) if want_xb else None
        db = db.to(bias.dtype) if need[2] else None
        dx = dx if ctx.needs_input_grad[0] else None
        return dx, None if dw is None else dw.to(weight.dtype), db, None, d_xb
