"""BatchNorm2d + ReLU over a channels_last map in Triton: the stem's three conv-BN-ReLU layers.

Why: the stem runs BatchNorm over (B*H*W, 32) rows at 112x112 (1.6M rows at B=128). torch's NHWC
BatchNorm kernels took 2.8 ms of a 73 ms GroupMamba-T training step on an H200 (the statistics pass alone
0.33 ms per call, ~14x its bytes over bandwidth; BENCHMARKS.md, seventh set), and the ReLU after it is two
more passes over the map (forward, backward).

Same function as relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)),
including the running-statistics update (unbiased variance, exponential average with ``momentum``):

    training forward  _bn_sums (ACT 0): per-program fp32 sums of x - shift and (x - shift)^2 per channel,
                      shift = x's first row (keeps E[x^2] - E[x]^2 from cancelling when |mean| >> std);
                      torch sums the few partial rows -> mean, var; _bn_apply: y = relu(x * a + c) with
                      a = weight * rstd, c = bias - mean * a
    eval forward      _bn_apply with the running statistics
    backward          _bn_sums (ACT 1): sums of gy and gy * xhat, gy = g where x * a + c > 0 (the ReLU's
                      mask, recomputed from x); _bn_apply's backward branch:
                      dx = a * (gy - mean(gy) - xhat * mean(gy * xhat))

All arithmetic in fp32; x, y, g, dx in the activation dtype. Deterministic (partials summed in a fixed
order, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_colsum import split_rows

# rows per tile; about how many programs the sums launch (each sums a contiguous block of rows)
CONFIG = {"block_r": 64, "programs": 1024, "num_warps": 4, "apply_block_r": 128}


@triton.jit
def _channel_vectors(MEAN, RSTD, W, B, cols, cmask):
    mean = tl.load(MEAN + cols, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + cols, mask=cmask, other=0.0)
    a = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) * rstd
    c = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32) - mean * a
    return mean, rstd, a, c


@triton.jit(do_not_specialize=["R", "ROWS"])
def _bn_sums(X, G, SHIFT, MEAN, RSTD, W, B, P1, P2, R, ROWS, C: tl.constexpr, BACKWARD: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """P1[pid], P2[pid] (C,) fp32 over this program's ROWS rows. Forward: sums of x - shift and its square.
    BACKWARD: sums of gy and gy * xhat (gy: G where the ReLU passed)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    r0 = pid * ROWS
    nrows = tl.minimum(ROWS, R - r0)
    base = r0.to(tl.int64) * C
    s1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if BACKWARD:
        mean, rstd, a, c = _channel_vectors(MEAN, RSTD, W, B, cols, cmask)
    else:
        shift = tl.load(SHIFT + cols, mask=cmask, other=0.0).to(tl.float32)
    for r in range(0, nrows, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        m = (rows < nrows)[:, None] & cmask[None, :]
        off = base + rows[:, None] * C + cols[None, :]
        x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
            gy = tl.where(x * a[None, :] + c[None, :] > 0, g, 0.0)
            s1 += gy
            s2 += gy * (x - mean[None, :]) * rstd[None, :]
        else:
            d = tl.where(m, x - shift[None, :], 0.0)
            s1 += d
            s2 += d * d
    tl.store(P1 + pid * C + cols, tl.sum(s1, axis=0), mask=cmask)
    tl.store(P2 + pid * C + cols, tl.sum(s2, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["R"])
def _bn_apply(X, G, OUT, MEAN, RSTD, W, B, S1, S2, R, inv_R, C: tl.constexpr, BACKWARD: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward: OUT = relu(x * a + c). BACKWARD: OUT = dx from g, x and the sums S1 (gy), S2 (gy * xhat)."""
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m = (rows < R)[:, None] & cmask[None, :]
    off = rows[:, None] * C + cols[None, :]
    mean, rstd, a, c = _channel_vectors(MEAN, RSTD, W, B, cols, cmask)
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
        gy = tl.where(x * a[None, :] + c[None, :] > 0, g, 0.0)
        mg = tl.load(S1 + cols, mask=cmask, other=0.0) * inv_R
        mgx = tl.load(S2 + cols, mask=cmask, other=0.0) * inv_R
        xhat = (x - mean[None, :]) * rstd[None, :]
        out = a[None, :] * (gy - mg[None, :] - xhat * mgx[None, :])
    else:
        out = tl.maximum(x * a[None, :] + c[None, :], 0.0)
    tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) channels_last -> its (B*H*W, C) rows (a view)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _sums(x2, g2, shift, stats, weight, bias, backward: bool):
    R, C = x2.shape
    block_r = CONFIG["block_r"]
    rows, progs = split_rows(R, block_r, CONFIG["programs"])
    p = torch.empty(2, progs, C, device=x2.device, dtype=torch.float32)
    mean, rstd = stats if stats is not None else (p, p)
    _bn_sums[(progs,)](x2, x2 if g2 is None else g2, x2 if shift is None else shift, mean, rstd,
                       p if weight is None else weight, p if bias is None else bias, p[0], p[1], R, rows,
                       C=C, BACKWARD=backward, BLOCK_R=block_r, BLOCK_C=triton.next_power_of_2(C),
                       num_warps=CONFIG["num_warps"])
    return p.sum(1)          # (2, C): a fixed-order sum of the partial rows


def _apply(x2, g2, out, mean, rstd, weight, bias, sums, backward: bool):
    R, C = x2.shape
    block_r = CONFIG["apply_block_r"]
    s = sums if sums is not None else mean[None].expand(2, C)   # the forward reads no sums: any pointer
    _bn_apply[(triton.cdiv(R, block_r),)](x2, x2 if g2 is None else g2, out, mean, rstd, weight, bias, s[0], s[1],
                                          R, 1.0 / max(R, 1), C=C, BACKWARD=backward, BLOCK_R=block_r,
                                          BLOCK_C=triton.next_power_of_2(C), num_warps=CONFIG["num_warps"])


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        x2 = _rows(x)
        R, C = x2.shape
        if training:
            s1, s2 = _sums(x2, None, x2[0], None, None, None, backward=False)
            d = s1 / R
            var = (s2 / R - d * d).clamp_min_(0.0)
            mean = x2[0].float() + d
            if running_mean is not None:
                with torch.no_grad():
                    running_mean.lerp_(mean, momentum)
                    running_var.lerp_(var * (R / max(R - 1, 1)), momentum)
        else:
            mean, var = running_mean.float(), running_var.float()
        rstd = torch.rsqrt(var + eps)
        out = torch.empty_like(x)            # channels_last, like x
        _apply(x2, None, _rows(out), mean, rstd, weight, bias, None, backward=False)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.training = training
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        x2 = _rows(x)
        g = g.contiguous(memory_format=torch.channels_last)
        g2 = _rows(g)
        sums = _sums(x2, g2, None, (mean, rstd), weight, bias, backward=True)
        dx = torch.empty_like(x)
        # in eval mode the statistics are constants: dx = a * gy (the sums' terms drop out)
        _apply(x2, g2, _rows(dx), mean, rstd, weight, bias, sums if ctx.training else torch.zeros_like(sums),
               backward=True)
        dw = sums[1].to(weight.dtype) if ctx.needs_input_grad[1] else None   # sum(gy * xhat)
        db = sums[0].to(bias.dtype) if ctx.needs_input_grad[2] else None     # sum(gy)
        return dx, dw, db, None, None, None, None, None


def batch_norm_relu(x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float):
    """relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)) for a
    channels_last CUDA x (B, C, H, W); updates the running statistics in training mode. See the module
    docstring."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"batch_norm_relu: x must be a channels_last (B, C, H, W) map, got shape {tuple(x.shape)} "
                         f"and strides {x.stride()}")
    if x.numel() == 0:
        raise ValueError(f"batch_norm_relu: x is empty (shape {tuple(x.shape)})")
    if training and x.numel() // x.shape[1] < 2:
        raise ValueError(f"batch_norm_relu: training needs more than one value per channel, got shape {tuple(x.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm_relu: eval mode needs running_mean and running_var")
    return _BatchNormReLU.apply(x, weight, bias, running_mean, running_var, training, momentum, eps)
