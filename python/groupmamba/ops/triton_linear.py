"""Triton backward of a dual Linear, (y1, y2) = (x @ w1^T, x @ w2^T), for narrow widths: the mixer's in_proj
(x and z halves) at GroupMamba's first stages, where C is 64 to 128 and the GEMMs are bound by memory. The
same kernel without the second half (and optionally with the bias gradient) is linear_backward, for single
Linears (fast_linear, CONFIG "single": off by default, not yet measured).

cuBLAS does that backward in four passes over the (tokens, C) tensors: gx = g1 @ w1, gx += g2 @ w2 (reading
and writing gx again), g1^T @ x, g2^T @ x: 18 bytes per element of x in bf16. Here one pass reads each of
x, g1 and g2 once and writes gx once (8 bytes per element): every program walks its own contiguous range of
row tiles, writes gx = g1 @ w1 + g2 @ w2 for each tile (fp32 sum, one rounding) and accumulates g1^T @ x
and g2^T @ x in registers; the per-program fp32 partials are then summed in a fixed order
(triton_colsum.sum_middle). Deterministic: no atomics.

Widths up to CONFIG["max_width"] only (padded to powers of two >= 16 for tl.dot): each program holds both
weight gradients, (N1 + N2) x K fp32, in registers; 4 warps up to 64 padded columns, 8 above (at 128, 4 warps
ran out of shared memory or ran slower than cuBLAS).

H200, bf16, B=128 (benchmarks/bench_dual_linear.py --sweep, twenty-first set; cuBLAS in the same run):
GroupMamba-T stage 1 (C = 64) 64.2 us against 152.0 (75% of the copy bandwidth for its 8 bytes per element);
T stage 2 (C = 128) 65.3 against 82.6; B stage 1 (C = 96) 164.2 against 222.8. The T1 layer (fwd+bwd, CUDA
graph, bench_layer.py --config triton_linear.enabled=..., same call, on / off / on): 1.480 ms against 1.573
with cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_colsum import sum_middle

# enabled: whether serves() accepts anything (benchmarks switch it off for A/B runs); block_m: rows per
# tile; num_warps (None: by width, module docstring); num_stages: loads in flight (tl.range pipelining);
# programs: about how many programs (each sums its own row range; two per SM of an H100 / H200);
# max_width: the widest K, N1 or N2 served (wider: the caller uses cuBLAS)
# single: whether fast_linear's captured single Linears (out_proj, proj) use linear_backward (off until
# measured on a GPU: BENCHMARKS.md, twenty-first set)
CONFIG = {"enabled": True, "single": False, "block_m": 64, "num_warps": None, "num_stages": 3, "programs": 264,
          "max_width": 128}


@triton.jit(do_not_specialize=["M", "TILES"])
def _linear_bwd(X, G1, G2, W1, W2, GX, PART, M, TILES, K: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                BK: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr, BLOCK_M: tl.constexpr,
                NUM_STAGES: tl.constexpr, TWO: tl.constexpr, BIAS: tl.constexpr):
    """Program p: row tiles [p * TILES, (p + 1) * TILES); GX rows = G1 @ W1 (+ G2 @ W2 if TWO); PART[p] = the
    (N1 + N2, K) fp32 sums of [G1 | G2]^T @ X over those rows, then with BIAS the N1 column sums of G1 (rows
    past M load as zeros). Without TWO, N2 is 0 and G2 / W2 are unused."""
    pid = tl.program_id(0)
    kk = tl.arange(0, BK)
    n1 = tl.arange(0, BN1)
    n2 = tl.arange(0, BN2)
    km = kk < K
    w1 = tl.load(W1 + n1[:, None] * K + kk[None, :], mask=(n1 < N1)[:, None] & km[None, :], other=0.0)
    w2 = tl.load(W2 + n2[:, None] * K + kk[None, :], mask=(n2 < N2)[:, None] & km[None, :], other=0.0)
    acc1 = tl.zeros((BN1, BK), dtype=tl.float32)
    acc2 = tl.zeros((BN2, BK), dtype=tl.float32)
    accb = tl.zeros((BN1,), dtype=tl.float32)
    for t in tl.range(0, TILES, num_stages=NUM_STAGES):
        rows = (pid * TILES + t).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = rows < M
        x = tl.load(X + rows[:, None] * K + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        g1 = tl.load(G1 + rows[:, None] * N1 + n1[None, :], mask=rm[:, None] & (n1 < N1)[None, :], other=0.0)
        if TWO:
            g2 = tl.load(G2 + rows[:, None] * N2 + n2[None, :], mask=rm[:, None] & (n2 < N2)[None, :], other=0.0)
        gx = tl.dot(g1, w1)
        if TWO:
            gx = gx + tl.dot(g2, w2)
        tl.store(GX + rows[:, None] * K + kk[None, :], gx.to(GX.dtype.element_ty), mask=rm[:, None] & km[None, :])
        acc1 = tl.dot(tl.trans(g1), x, acc1)
        if TWO:
            acc2 = tl.dot(tl.trans(g2), x, acc2)
        if BIAS:
            accb += tl.sum(g1.to(tl.float32), axis=0)
    part = PART + pid.to(tl.int64) * ((N1 + N2) * K + BIAS * N1)
    tl.store(part + n1[:, None] * K + kk[None, :], acc1, mask=(n1 < N1)[:, None] & km[None, :])
    if TWO:
        tl.store(part + (N1 + n2[:, None]) * K + kk[None, :], acc2, mask=(n2 < N2)[:, None] & km[None, :])
    if BIAS:
        tl.store(part + (N1 + N2) * K + n1, accb, mask=n1 < N1)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def warps(K: int, N1: int, N2: int = 0) -> int:
    """Warps per program: CONFIG's, else 4 up to 64 padded columns and 8 above (module docstring)."""
    return CONFIG["num_warps"] or (4 if max(_block(n) for n in (K, N1, N2)) <= 64 else 8)


def serves(dtype: torch.dtype, K: int, *N: int) -> bool:
    """Whether the one-pass backward serves a Linear of this 16-bit dtype, K inputs and N outputs: enabled,
    widths <= max_width."""
    return CONFIG["enabled"] and dtype in (torch.bfloat16, torch.float16) and max(K, *N) <= CONFIG["max_width"]


def supports(x, g1, g2, w1, w2) -> bool:
    """Whether dual_linear_backward serves these operands: all of one dtype that serves() takes."""
    return (all(t.dtype == x.dtype for t in (g1, g2, w1, w2))
            and serves(x.dtype, x.shape[-1], w1.shape[0], w2.shape[0]))


def _backward(op, x, g1, g2, w1, w2, bias: bool, gx_dtype, gw_dtype):
    """(gx (M, K) in gx_dtype, [gw1; gw2] (N1 + N2, K) in gw_dtype, the bias gradient (N1,) fp32 or None)."""
    M, K = x.shape
    N1, N2 = w1.shape[0], 0 if w2 is None else w2.shape[0]
    if (g1.shape != (M, N1) or w1.shape != (N1, K)
            or (w2 is not None and (g2 is None or g2.shape != (M, N2) or w2.shape != (N2, K)))):
        raise ValueError(f"{op}: shapes x {tuple(x.shape)}, " + ", ".join(
            f"{n} {tuple(t.shape)}" for n, t in (("g1", g1), ("g2", g2), ("w1", w1), ("w2", w2)) if t is not None)
            + " do not fit")
    two = w2 is not None
    x, g1, w1 = (t.contiguous() for t in (x, g1, w1))
    g2, w2 = (g2.contiguous(), w2.contiguous()) if two else (g1, w1)
    bm = CONFIG["block_m"]
    tiles = triton.cdiv(M, bm)
    per_prog = triton.cdiv(tiles, max(1, min(CONFIG["programs"], tiles)))
    progs = triton.cdiv(tiles, per_prog) if M else 0
    gx = torch.empty((M, K), device=x.device, dtype=gx_dtype)
    width = (N1 + N2) * K + (N1 if bias else 0)
    part = torch.empty((1, max(progs, 1), width), device=x.device, dtype=torch.float32)
    if progs == 0:
        part.zero_()
    else:
        _linear_bwd[(progs,)](x, g1, g2, w1, w2, gx, part, M, per_prog, K=K, N1=N1, N2=N2, BK=_block(K),
                              BN1=_block(N1), BN2=_block(N2), BLOCK_M=bm, NUM_STAGES=CONFIG["num_stages"],
                              TWO=two, BIAS=bias, num_warps=warps(K, N1, N2))
    sums = sum_middle(part)[0] if progs > 1 else part[0, 0]
    gw = sums[:(N1 + N2) * K].view(N1 + N2, K).to(gw_dtype)
    return gx, gw, (sums[(N1 + N2) * K:] if bias else None)


def dual_linear_backward(x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, w1: torch.Tensor,
                         w2: torch.Tensor):
    """(gx, gw1, gw2) for (y1, y2) = (x @ w1^T, x @ w2^T): x (M, K), g1 (M, N1), g2 (M, N2), w1 (N1, K),
    w2 (N2, K), all of one 16-bit dtype and device. gx in x's dtype; gw1, gw2 in the weights' dtype (summed
    in fp32)."""
    gx, gw, _ = _backward("dual_linear_backward", x, g1, g2, w1, w2, False, x.dtype, w1.dtype)
    return gx, gw[:w1.shape[0]], gw[w1.shape[0]:]


def linear_backward(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, bias: bool, gx_dtype: torch.dtype,
                    gw_dtype: torch.dtype):
    """(gx in gx_dtype, gw in gw_dtype, the bias gradient in fp32 or None) for y = x @ w^T (+ b): x (M, K),
    g (M, N), w (N, K) of one 16-bit dtype; bias: whether to sum g's columns too (same pass)."""
    return _backward("linear_backward", x, g, None, w, None, bias, gx_dtype, gw_dtype)
