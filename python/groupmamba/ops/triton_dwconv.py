"""Triton kernels for the depthwise 3x3 convolution + bias + activation on channels-last tokens.

x (B, H, W, C) contiguous (the model's (B, L, C) tokens), weight as (9, C) fp32 taps, bias (C,).

Tiling: a program owns BLOCK_P consecutive positions of the flattened (B*H*W) index and BLOCK_C
channels. Each of the nine taps is one load of the tile shifted by (dh-1)*W + (dw-1) positions, masked
where the neighbour falls outside its image (zero padding); neighbours mostly hit L1/L2. Offsets inside
a tile are 32-bit and relative to the tile's 64-bit base pointer, and C is left to Triton's divisibility
specialisation, so loads and stores along C are 16-byte vectors whenever C % 8 == 0 (bf16). The first
version of this kernel used 64-bit per-element addresses, an unspecialised C and 4096-element tiles: 255
registers with spills, scalar loads, 2.6 ms for one GroupMamba-T stage-1 FFN conv at B=128 on an H200.

Forward (_dwconv_fwd): accumulate in fp32, add bias, SiLU or exact (erf) GELU, store in x's dtype.
Backward (autograd.Function): recompute the pre-activation with the same kernel (no activation), apply
the activation's derivative, and hand the rest to aten.convolution_backward (cuDNN's NHWC depthwise
dgrad and wgrad): dx, dweight and dbias. Only x is saved, not the conv output.
A fused Triton backward (recompute + activation derivative + per-program weight-gradient partials in one
kernel, then dx as this forward with flipped taps) was measured on an H200 on 2026-11-28 and was slower:
22 ms of a GroupMamba-T training step against ~11 ms for the cuDNN kernels (see BENCHMARKS.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTS = {"none": 0, "silu": 1, "gelu": 2}
# elems: tile size (positions x channels), 8 per thread at 8 warps; the best of the H200 sweep
# (benchmarks/bench_dwconv.py --sweep) at most of GroupMamba-T's shapes
CONFIG = {"elems": 2048, "num_warps": 8, "block_c": None}

_INV_SQRT2 = tl.constexpr(0.7071067811865476)


def tiles(C: int):
    """(BLOCK_P, BLOCK_C, num_warps) for C channels."""
    block_c = CONFIG["block_c"] or min(128, max(16, triton.next_power_of_2(C)))
    block_p = max(1, CONFIG["elems"] // block_c)
    return block_p, block_c, CONFIG["num_warps"]


@triton.jit
def _tap_tile(X, rp, cs, cmask, pok, h, w, H, W, C, DH: tl.constexpr, DW: tl.constexpr):
    """x at the tile's positions shifted by (DH-1, DW-1), zero outside the image, as fp32."""
    hn = h + (DH - 1)
    wn = w + (DW - 1)
    ok = pok & (hn >= 0) & (hn < H) & (wn >= 0) & (wn < W)
    offs = (rp + ((DH - 1) * W + (DW - 1)))[:, None] * C + cs[None, :]
    return tl.load(X + offs, mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["NPOS", "H", "W"])
def _dwconv_fwd(X, WT, Bias, OUT, NPOS, H, W, C, ACT: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p0 = tl.program_id(0) * BLOCK_P
    rp = tl.arange(0, BLOCK_P)
    p = p0 + rp
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    pok = p < NPOS
    w = p % W
    h = (p // W) % H
    base = p0.to(tl.int64) * C
    Xb = X + base
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for dh in tl.static_range(3):
        for dw in tl.static_range(3):
            tap = tl.load(WT + (dh * 3 + dw) * C + cs, mask=cmask, other=0.0)
            acc += _tap_tile(Xb, rp, cs, cmask, pok, h, w, H, W, C, dh, dw) * tap[None, :]
    acc += tl.load(Bias + cs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = acc * tl.sigmoid(acc)
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
    offs = rp[:, None] * C + cs[None, :]
    tl.store(OUT + base + offs, acc.to(OUT.dtype.element_ty), mask=pok[:, None] & cmask[None, :])


def _check_size(x):
    if x.shape[0] * x.shape[1] * x.shape[2] + 2 * x.shape[2] + 2 >= 2 ** 31:
        raise ValueError(f"dwconv_act: B*H*W = {x.shape[0] * x.shape[1] * x.shape[2]} positions is too many for "
                         "the fused kernel (32-bit position index); split the batch")


def _conv(x, taps, bias, act: str):
    B, H, W, C = x.shape
    out = torch.empty_like(x)
    if out.numel():
        npos = B * H * W
        bp, bc, nw = tiles(C)
        _dwconv_fwd[(triton.cdiv(npos, bp), triton.cdiv(C, bc))](
            x, taps, bias, out, npos, H, W, C, ACT=ACTS[act], BLOCK_P=bp, BLOCK_C=bc,
            num_warps=nw)
    return out


def _taps(weight):
    return weight.reshape(weight.shape[0], 9).t().float().contiguous()      # (9, C): coalesced per tap


class DWConvAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, act):
        _check_size(x)
        ctx.act = act
        ctx.save_for_backward(x, weight, bias)
        return _conv(x, _taps(weight), bias, act)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        act = ctx.act
        grad_out = grad_out.contiguous()
        if act == "none":
            gpre = grad_out
        else:
            pre = _conv(x, _taps(weight), bias, "none")
            gpre = (torch.ops.aten.silu_backward(grad_out, pre) if act == "silu"
                    else torch.ops.aten.gelu_backward(grad_out, pre))
        C = x.shape[-1]
        nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731  (channels_last views, no copies)
        dx, dw, db = torch.ops.aten.convolution_backward(
            nchw(gpre), nchw(x), weight.to(x.dtype), [C], [1, 1], [1, 1], [1, 1], False, [0, 0], C,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return (None if dx is None else dx.permute(0, 2, 3, 1),
                None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None)
