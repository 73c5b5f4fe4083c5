"""Triton kernel for the depthwise 3x3 convolution + bias + activation on channels-last tokens.

x (B, H, W, C) contiguous (the model's (B, L, C) tokens), weight as (9, C) fp32 taps, bias (C,).

Forward (_dwconv_fwd): a program owns BLOCK_H output rows x BLOCK_C channels of one image and walks
along W with the 3x3 input window in registers, so each output column costs 3 loads instead of 9 and
the row masks are computed once per program. Loads and stores run along C, 16-byte vectors when
C % 8 == 0 (bf16). Accumulate in fp32, add bias, SiLU or exact (erf) GELU, store in x's dtype.
History, H200, GroupMamba-T stage-1 FFN conv (C=512 at 56x56, B=128, bf16): the first kernel (one tile
of flattened positions, nine shifted tile loads, 64-bit per-element addresses) took 2.6 ms with 255
registers and spills; with 32-bit in-tile offsets 0.78 ms (88 SASS instructions per element, issue-
bound); this sliding-window kernel 0.56 ms (52 per element), and it was faster or equal at every
GroupMamba-T shape but one (28x28, C=128: 46 vs 44 us). See BENCHMARKS.md, "Depthwise conv kernels".
Backward (autograd.Function): recompute the pre-activation with the same kernel (no activation), apply
the activation's derivative and sum the result over positions for dbias in one pass
(triton_colsum.column_sum_act_grad;
CONFIG["fused_act_bwd"]=False: torch's silu/gelu_backward, then triton_colsum.column_sum), and hand the
rest to aten.convolution_backward (cuDNN's NHWC depthwise dgrad and wgrad) for dx and dweight. Of the
activations only x is saved, not the conv output. Inside ``keep_preactivation()``
(ConvFFN's checkpoint recompute, which runs right before this backward) the forward also stores the
pre-activation and saves it, so the backward skips its recompute: the FFN's conv runs twice per step
instead of three times.
A fused Triton backward (recompute + activation derivative + per-program weight-gradient partials in one
kernel, then dx as this forward with flipped taps) was measured on an H200 on 2026-11-28 and was slower:
22 ms of a GroupMamba-T training step against ~11 ms for the cuDNN kernels (see BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl

from .triton_colsum import column_sum, column_sum_act_grad

ACTS = {"none": 0, "silu": 1, "gelu": 2}
# block_h: output rows per program (None: 4 for H >= 28, else 2: within 1 us of the better of the two at
# every GroupMamba-T shape in the H200 sweep of benchmarks/bench_dwconv.py --sweep); block_c: channels per
# program (capped at C's next power of two); num_warps
# fused_act_bwd: the backward's activation derivative and bias-gradient sum in one Triton pass
# (triton_colsum.column_sum_act_grad) instead of torch's silu/gelu_backward followed by column_sum
CONFIG = {"block_h": None, "block_c": 128, "num_warps": 4, "fused_act_bwd": True}


def tiles(H: int, C: int):
    """(BLOCK_H, BLOCK_C, num_warps) for an H-row image with C channels."""
    block_h = CONFIG["block_h"] or (4 if H >= 28 else 2)
    block_c = min(CONFIG["block_c"], max(16, triton.next_power_of_2(C)))
    return block_h, block_c, CONFIG["num_warps"]


_INV_SQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _row_col(img, off, m, w, W, C):
    """Column w of the tile's input rows (offsets `off` at column 0) as fp32; zero outside the image."""
    return tl.load(img + off + w * C, mask=m & (w < W), other=0.0).to(tl.float32)


@triton.jit
def _out_col(obase, pbase, off, m, w, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
             lu, mu, ru, lm, mm, rm, ld, md, rd, ACT: tl.constexpr, STORE_PRE: tl.constexpr):
    """Output column w from the window (l/m/r = columns w-1, w, w+1; u/m/d = rows above, at, below);
    with STORE_PRE also the pre-activation at pbase."""
    acc = bias + lu * t0 + mu * t1 + ru * t2 + lm * t3 + mm * t4 + rm * t5 + ld * t6 + md * t7 + rd * t8
    if STORE_PRE:
        tl.store(pbase + off + w * C, acc.to(pbase.dtype.element_ty), mask=m & (w < W))
    if ACT == 1:
        acc = acc * tl.sigmoid(acc)
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
    tl.store(obase + off + w * C, acc.to(obase.dtype.element_ty), mask=m & (w < W))


@triton.jit(do_not_specialize=["H", "W", "NHB"])
def _dwconv_fwd(X, WT, Bias, OUT, PRE, H, W, C, NHB, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // NHB
    hh = (pid % NHB) * BLOCK_H + tl.arange(0, BLOCK_H)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cok = cs < C
    cmask = cok[None, :]
    image = b.to(tl.int64) * H * W * C      # 64-bit offset of image b (x and out alike)
    img = X + image
    # input rows hh-1, hh, hh+1: offsets of column 0 inside the image, and their masks
    off_u = ((hh - 1) * W * C)[:, None] + cs[None, :]
    off_m = (hh * W * C)[:, None] + cs[None, :]
    off_d = ((hh + 1) * W * C)[:, None] + cs[None, :]
    m_u = ((hh >= 1) & (hh - 1 < H))[:, None] & cmask
    m_m = (hh < H)[:, None] & cmask
    m_d = (hh + 1 < H)[:, None] & cmask
    t0 = tl.load(WT + 0 * C + cs, mask=cok, other=0.0)[None, :]
    t1 = tl.load(WT + 1 * C + cs, mask=cok, other=0.0)[None, :]
    t2 = tl.load(WT + 2 * C + cs, mask=cok, other=0.0)[None, :]
    t3 = tl.load(WT + 3 * C + cs, mask=cok, other=0.0)[None, :]
    t4 = tl.load(WT + 4 * C + cs, mask=cok, other=0.0)[None, :]
    t5 = tl.load(WT + 5 * C + cs, mask=cok, other=0.0)[None, :]
    t6 = tl.load(WT + 6 * C + cs, mask=cok, other=0.0)[None, :]
    t7 = tl.load(WT + 7 * C + cs, mask=cok, other=0.0)[None, :]
    t8 = tl.load(WT + 8 * C + cs, mask=cok, other=0.0)[None, :]
    bias = tl.load(Bias + cs, mask=cok, other=0.0).to(tl.float32)[None, :]
    # window: columns w-1 (a*) and w (b*) of the three input rows; column -1 is padding. The loop
    # is unrolled by three so the window's roles rotate statically instead of by register moves.
    au = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    am = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    ad = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    bu = _row_col(img, off_u, m_u, 0, W, C)
    bm = _row_col(img, off_m, m_m, 0, W, C)
    bd = _row_col(img, off_d, m_d, 0, W, C)
    obase = OUT + image
    pbase = PRE + image
    for w in range(0, W, 3):
        cu = _row_col(img, off_u, m_u, w + 1, W, C)
        cm = _row_col(img, off_m, m_m, w + 1, W, C)
        cd = _row_col(img, off_d, m_d, w + 1, W, C)
        _out_col(obase, pbase, off_m, m_m, w, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
                 au, bu, cu, am, bm, cm, ad, bd, cd, ACT, STORE_PRE)
        du = _row_col(img, off_u, m_u, w + 2, W, C)
        dm = _row_col(img, off_m, m_m, w + 2, W, C)
        dd = _row_col(img, off_d, m_d, w + 2, W, C)
        _out_col(obase, pbase, off_m, m_m, w + 1, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
                 bu, cu, du, bm, cm, dm, bd, cd, dd, ACT, STORE_PRE)
        eu = _row_col(img, off_u, m_u, w + 3, W, C)
        em = _row_col(img, off_m, m_m, w + 3, W, C)
        ed = _row_col(img, off_d, m_d, w + 3, W, C)
        _out_col(obase, pbase, off_m, m_m, w + 2, W, C, bias, t0, t1, t2, t3, t4, t5, t6, t7, t8,
                 cu, du, eu, cm, dm, em, cd, dd, ed, ACT, STORE_PRE)
        au, am, ad = du, dm, dd
        bu, bm, bd = eu, em, ed


def _check_size(x):
    B, H, W, C = x.shape
    if (H + 1) * W * C >= 2 ** 31:  # offsets inside one image are 32-bit (the image base is 64-bit)
        raise ValueError(f"dwconv_act: x of shape {tuple(x.shape)} is too large for the fused kernel "
                         "(32-bit offsets inside one image); split the image")


def _conv(x, taps, bias, act: str, keep_pre: bool = False):
    """act(conv(x) + bias); with keep_pre, (that, the pre-activation conv(x) + bias) from one pass."""
    B, H, W, C = x.shape
    out = torch.empty_like(x)
    pre = torch.empty_like(x) if keep_pre else out   # out: a placeholder pointer, never written
    if out.numel():
        bh, bc, nw = tiles(H, C)
        nhb = triton.cdiv(H, bh)
        _dwconv_fwd[(B * nhb, triton.cdiv(C, bc))](x, taps, bias, out, pre, H, W, C, nhb, ACT=ACTS[act],
                                                   STORE_PRE=keep_pre, BLOCK_H=bh, BLOCK_C=bc, num_warps=nw)
    return (out, pre) if keep_pre else out


_keep = threading.local()


@contextlib.contextmanager
def keep_preactivation():
    """Inside this context DWConvAct saves the pre-activation for its backward instead of recomputing
    it there. Meant for an activation-checkpoint recompute, whose saved tensors live only until the
    backward that follows; elsewhere it would keep one more activation-sized tensor per call."""
    prev = getattr(_keep, "on", False)
    _keep.on = True
    try:
        yield
    finally:
        _keep.on = prev


def _taps(weight):
    return weight.reshape(weight.shape[0], 9).t().float().contiguous()      # (9, C): coalesced per tap


class DWConvAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, act):
        _check_size(x)
        ctx.act = act
        taps = _taps(weight)
        if act != "none" and getattr(_keep, "on", False):
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
        db = None
        if act == "none":
            gpre = grad_out
        else:
            if pre.data_ptr() == x.data_ptr():
                pre = _conv(x, taps, bias, "none")
            if CONFIG["fused_act_bwd"]:
                gpre, db = column_sum_act_grad(grad_out, pre, act)
            else:
                gpre = (torch.ops.aten.silu_backward(grad_out, pre) if act == "silu"
                        else torch.ops.aten.gelu_backward(grad_out, pre))
        nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731  (channels_last views, no copies)
        dx, dw, _ = torch.ops.aten.convolution_backward(
            nchw(gpre), nchw(x), weight.to(x.dtype), [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        # the bias gradient with the Triton column sum instead of cuDNN/torch's reduction
        if not ctx.needs_input_grad[2]:
            db = None
        else:
            db = (column_sum(gpre.reshape(-1, C)) if db is None else db).to(bias.dtype)
        return (None if dx is None else dx.permute(0, 2, 3, 1),
                None if dw is None else dw.to(weight.dtype), db, None)
