"""Triton kernel for the depthwise 3x3 convolution + bias + activation on channels-last tokens.

x (B, H, W, C) contiguous (the model's (B, L, C) tokens), weight as (9, C) fp32 taps, bias (C,).
One program computes BLOCK_W positions of one image row for BLOCK_C channels: nine shifted, masked
loads (zero padding at the borders; neighbours come from L1/L2), fp32 accumulation, bias, then SiLU or
exact (erf) GELU, stored in x's dtype. torch runs this as cuDNN's depthwise conv, a separate bias add
(a slow broadcast kernel in channels_last) and the activation: three passes over the tensor.

Backward (autograd.Function): recompute the pre-activation with the same kernel (ACT = none), apply
the activation's derivative, and hand the rest to aten.convolution_backward (cuDNN): dx, dweight and
dbias. Only x is saved, not the conv output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTS = {"none": 0, "silu": 1, "gelu": 2}
CONFIG = {"block_w": None, "block_c": None}


def tiles(W: int, C: int):
    block_c = CONFIG["block_c"] or min(128, max(16, triton.next_power_of_2(C)))
    block_w = CONFIG["block_w"] or min(triton.next_power_of_2(W), max(1, 4096 // block_c))
    return block_w, block_c, 4 if block_w * block_c <= 2048 else 8


@triton.jit(do_not_specialize=["H", "W", "C", "NWB"])
def _dwconv_act_fwd(X, WT, Bias, OUT, H, W, C, NWB, ACT: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // NWB                    # b * H + h
    h = row % H
    w0 = (pid % NWB) * BLOCK_W
    ws = w0 + tl.arange(0, BLOCK_W)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for dh in tl.static_range(3):
        hh = h + dh - 1
        hok = (hh >= 0) & (hh < H)
        base = (row + dh - 1).to(tl.int64) * W
        for dw in tl.static_range(3):
            wn = ws + dw - 1
            m = ((wn >= 0) & (wn < W) & hok)[:, None] & cmask[None, :]
            xv = tl.load(X + (base + wn)[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
            tap = tl.load(WT + (dh * 3 + dw) * C + cs, mask=cmask, other=0.0)
            acc += xv * tap[None, :]
    acc += tl.load(Bias + cs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = acc * tl.sigmoid(acc)
    elif ACT == 2:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    omask = (ws < W)[:, None] & cmask[None, :]
    tl.store(OUT + (row.to(tl.int64) * W + ws)[:, None] * C + cs[None, :], acc.to(OUT.dtype.element_ty), mask=omask)


def dwconv_act_forward(x, weight, bias, act: str):
    """x (B, H, W, C) contiguous; weight (C, 1, 3, 3); bias (C,). Returns (B, H, W, C) in x's dtype."""
    B, H, W, C = x.shape
    taps = weight.reshape(C, 9).t().float().contiguous()      # (9, C): coalesced per tap
    out = torch.empty_like(x)
    bw, bc, nw = tiles(W, C)
    nwb = triton.cdiv(W, bw)
    if out.numel():
        _dwconv_act_fwd[(B * H * nwb, triton.cdiv(C, bc))](x, taps, bias, out, H, W, C, nwb, ACT=ACTS[act],
                                                           BLOCK_W=bw, BLOCK_C=bc, num_warps=nw)
    return out


class DWConvAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, act):
        ctx.act = act
        ctx.save_for_backward(x, weight, bias)
        return dwconv_act_forward(x, weight, bias, act)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        act = ctx.act
        grad_out = grad_out.contiguous()
        if act == "none":
            gpre = grad_out
        else:
            pre = dwconv_act_forward(x, weight, bias, "none")
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
