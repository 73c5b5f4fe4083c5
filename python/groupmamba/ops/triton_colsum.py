"""Triton column sum of a (M, N) matrix in fp32: the bias gradient of a Linear or a depthwise conv (for the
conv optionally through its activation's derivative, which the same pass applies and stores).

torch computes a bias gradient as grad.sum(0) with its generic reduction, which on a GroupMamba-T
training step (B=128, bf16, H200) took 6.3 ms for 136 calls, several times the bytes-over-bandwidth
time. Here: stage 1 splits the rows into about PROGRAMS / ceil(N / BLOCK_N) row blocks; each program
reads its block of rows (16-byte loads along N) and writes one fp32 partial row; stage 2 (sum_middle)
sums the few partial rows. Deterministic: no atomics.

sum_middle: (B, T, N) fp32 -> (B, N), the sum over T in a fixed order. Used for stage 2 above and for the
modulation kernels' per-image partials. torch's reduction over a middle or leading dimension launched
few thread blocks for these small buffers: 4-7 us a call for column_sum's partials and 10-12 us for the
modulation's (B, T, C) partials at GroupMamba-B stage 3 (H200 profile, eleventh set), with 200-400 such
calls per training step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import channel_split
from .triton_act import gelu_grad, silu_grad

# BLOCK_M x BLOCK_N tile per loop step, num_warps (None: by width, see tile()); PROGRAMS: about how many
# programs to launch (a few per SM)
CONFIG = {"block_m": None, "block_n": None, "num_warps": None, "programs": 1024}
# sum_middle: BLOCK_T x BLOCK_N tile per loop step of one program (narrow columns: more programs, each with
# all of its tile's loads in flight at once)
MIDDLE = {"block_t": 64, "block_n": 32, "num_warps": 4}

ACT_GRADS = {"silu": 1, "gelu": 2}   # ACT codes of _colsum_partial (0: plain column sum)


@triton.jit(do_not_specialize=["M", "NV", "ROWS"])
def _colsum_partial(G, P, M, NV, ROWS, PRE, GPRE, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, VEC: tl.constexpr):
    """P[pid_m, cols] = sum of G[rows of this program's block, cols] in fp32. ACT 1 (SiLU) / 2 (exact
    erf-form GELU): the rows are first G * act'(PRE), computed in fp32 (triton_act) and stored
    to GPRE in its dtype; the sums add the stored (rounded) values. PRE and GPRE are unused at ACT 0.
    N = NV * VEC columns (channel_split)."""
    N = NV * VEC
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    r0 = pid_m * ROWS
    nrows = tl.minimum(ROWS, M - r0)
    base = r0.to(tl.int64) * N           # 64-bit block base, 32-bit offsets inside the block
    g = G + base
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, nrows, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        m = (rows < nrows)[:, None] & cmask[None, :]
        # the two branches address differently, as the two kernels they replaced did (the plain column
        # sum and the activation backward; the plain branch still compiles to the measured kernel's SASS)
        if ACT == 0:
            v = tl.load(g + rows[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
        else:
            off = base + rows[:, None] * N + cols[None, :]
            v = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
            z = tl.load(PRE + off, mask=m, other=0.0).to(tl.float32)
            d = silu_grad(z) if ACT == 1 else gelu_grad(z)
            gp = (v * d).to(GPRE.dtype.element_ty)
            tl.store(GPRE + off, gp, mask=m)
            v = gp.to(tl.float32)            # masked entries are 0
        acc += v
    tl.store(P + pid_m * N + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["T", "N"])
def _sum_middle(P, OUT, T, N, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[b, cols] = sum over t of P[b, t, cols], t in increasing tiles (fixed order)."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    base = P + b.to(tl.int64) * T * N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        acc += tl.load(base + ts[:, None] * N + cols[None, :], mask=(ts < T)[:, None] & cmask[None, :], other=0.0)
    tl.store(OUT + b * N + cols, tl.sum(acc, axis=0), mask=cmask)


def sum_middle(p: torch.Tensor) -> torch.Tensor:
    """p (B, T, N) float32 -> (B, N) float32: the sum over T (see the module docstring)."""
    if p.dim() != 3 or p.dtype != torch.float32:
        raise ValueError(f"sum_middle: p must be a (B, T, N) float32 tensor, got {p.dtype} {tuple(p.shape)}")
    B, T, N = p.shape
    p = p.contiguous()
    out = torch.empty((B, N), device=p.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if T * N >= 2 ** 31:
        raise ValueError(f"sum_middle: {T} x {N} rows per image need 64-bit offsets")
    bt, bn = MIDDLE["block_t"], MIDDLE["block_n"]
    _sum_middle[(B, triton.cdiv(N, bn))](p, out, T, N, BLOCK_T=bt, BLOCK_N=bn, num_warps=MIDDLE["num_warps"])
    return out


def tile(N: int, act: int = 0):
    """(BLOCK_M, BLOCK_N, num_warps) for N columns (act: _colsum_partial's ACT), CONFIG's values where set.
    The plain sum: 64 columns per tile; 32 rows x 8 warps from 256 columns in 16-byte rows (N % 8 == 0), else
    64 rows x 4 warps. Through an activation's derivative: 32 x 128 x 4 warps. From the tile sweep on an H200
    (benchmarks/experiments/colsum_sweep.py, eighteenth set, bf16, GroupMamba-T/B bias-gradient shapes at
    B=128): against the earlier single tile (32 x 128, 4 warps) the plain sum took 24.7 instead of 35.0 us at
    (401408, 64), where half of that tile was masked off, and 7-15% less at the other shapes, within 2% of
    the sweep's fastest except at (401408, 96) (37.5 against 32.4 us); with the GELU derivative, 64-column
    tiles were 13-20% slower than the earlier tile. (25088, 348) with 32 x 64 x 8 warps: 14.5 us, 10.5 here."""
    if act:
        rule = (32, 128, 4)
    else:
        rule = (32, 64, 8) if N >= 256 and N % 8 == 0 else (64, 64, 4)
    return tuple(CONFIG[k] or r for k, r in zip(("block_m", "block_n", "num_warps"), rule))


def split_rows(M: int, block: int, programs: int):
    """(rows per program, a multiple of ``block``; how many programs) to spread M rows over about
    ``programs`` programs (at least one, at most one per block)."""
    target = max(1, min(triton.cdiv(M, block), programs))
    rows = triton.cdiv(triton.cdiv(M, target), block) * block
    return rows, triton.cdiv(M, rows)


def column_sum(g: torch.Tensor) -> torch.Tensor:
    """g (M, N) contiguous -> (N,) float32 sums over the rows."""
    if g.dim() != 2:
        raise ValueError(f"column_sum: g must be (M, N), got shape {tuple(g.shape)}")
    return _column_sums(g.contiguous(), None, None, 0, "column_sum")


def column_sum_act_grad(grad_out: torch.Tensor, pre: torch.Tensor, act: str):
    """(grad_out * act'(pre) in grad_out's dtype, its float32 sums over all but the last dim) for contiguous
    (..., N) tensors, act "silu" or "gelu": an activation's backward and its bias gradient in one pass."""
    N = pre.shape[-1]
    g2 = grad_out.reshape(-1, N)
    gpre = torch.empty_like(g2)
    return gpre.view(pre.shape), _column_sums(g2, pre.reshape(-1, N), gpre, ACT_GRADS[act], "column_sum_act_grad")


def _column_sums(g, pre, gpre, act: int, op: str):
    M, N = g.shape
    if M == 0:
        return torch.zeros(N, device=g.device, dtype=torch.float32)
    bm, bn, nw = tile(N, act)
    n_blocks = triton.cdiv(N, bn)
    rows, progs_m = split_rows(M, bm, CONFIG["programs"] // n_blocks)
    if rows * N >= 2 ** 31:
        raise ValueError(f"{op}: a block of {rows} rows x {N} columns needs 64-bit offsets")
    partial = torch.empty(progs_m, N, device=g.device, dtype=torch.float32)
    nv, vec = channel_split(N)
    _colsum_partial[(progs_m, n_blocks)](g, partial, M, nv, rows, g if pre is None else pre,
                                         g if gpre is None else gpre, ACT=act, BLOCK_M=bm, BLOCK_N=bn, VEC=vec,
                                         num_warps=nw)
    return sum_middle(partial[None])[0] if progs_m > 1 else partial[0]
