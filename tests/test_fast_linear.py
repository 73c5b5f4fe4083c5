"""ops.fast_linear.linear (F.linear; under CUDA graph capture, 16-bit GEMMs padded to multiples of 8) and
triton_colsum.column_sum (the depthwise conv's bias gradient).

* CPU (always): linear is F.linear on CPU (bit-identical values and gradients); linear_padded vs
  F.linear in float64 at unaligned shapes (K and N padded, K only, N only; with and without bias), values
  and gradients of x, weight and bias, and the strided view it returns.
* Triton interpreter (always, when Triton is importable): column_sum vs float64 on ragged shapes (rows
  and columns not multiples of the tile, one row, a single column, several row blocks) and the padded
  Linear's column-sum bias gradient, in a subprocess with TRITON_INTERPRET=1.
  Also sum_middle (a (B, T, N) sum over T: column_sum's second stage and the modulation's per-image
  partials) on ragged shapes.
* GPU (@pytest.mark.gpu): column_sum at GroupMamba-T's bias-gradient shapes (fp32 / bf16), outputs
  poisoned first; sum_middle at the modulation's partial shapes; linear_padded in bf16 at the padded shapes (C = 348) vs float64, and under bf16
  autocast vs F.linear's autocast result; linear pads inside a CUDA graph capture and not eagerly.

Tolerances: relative Frobenius error vs float64 for linear (float64 1e-12; bf16 inputs 1e-2); column
sums: error per column relative to the column's sum of |g| <= 1e-6 (fp32 accumulation; the exact sum
of the same fp32/bf16 inputs is the reference).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import compare_outputs as compare
from conftest import eager_and_cuda_graph, poison_cuda_cache, rel_err, run_triton_interpreter
from groupmamba.ops import fast_linear as L

try:
    from groupmamba.ops import triton_colsum as TC
    _TRITON_ERROR = None
except Exception as e:  # noqa: BLE001
    TC, _TRITON_ERROR = None, f"{type(e).__name__}: {e}"


def make(M, K, N, dtype=torch.float32, device="cpu", lead=(), bias=True):
    g = torch.Generator().manual_seed(torch.seed())
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inp = dict(x=r(*lead, M, K).to(dtype).to(device), weight=(r(N, K) / K ** 0.5).to(dtype).to(device),
               g=r(*lead, M, N).to(dtype).to(device))
    if bias:
        inp["bias"] = r(N).to(dtype).to(device)
    return inp


def run(fn, inp):
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias") if k in inp}
    out = fn(*leaves.values())
    (out.double() * inp["g"].double()).sum().backward()
    return dict(out=out, **{"d" + k: v.grad for k, v in leaves.items()})


def ref64(inp):
    return run(F.linear, {k: v.double().cpu() for k, v in inp.items()})


def test_pad_to():
    assert [L._pad_to(n) for n in (1, 8, 87, 348, 1392)] == [8, 8, 88, 352, 1392]


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_is_f_linear(bias):
    inp = make(7, 12, 5, lead=(2,), bias=bias)
    res, ref = run(L.linear, inp), run(F.linear, inp)
    for k in ref:
        assert torch.equal(res[k], ref[k]), k


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("K,N", [(22, 37), (21, 40), (24, 35), (87, 5)])   # both padded, K only, N only
def test_padded_matches_f_linear_float64(K, N, bias):
    inp = make(13, K, N, dtype=torch.float64, lead=(3,), bias=bias)
    res = run(lambda *a: L.linear_padded(a[0], a[1], a[2] if bias else None, torch.float64), inp)
    compare(res, ref64(inp), 1e-12, 1e-12, f"padded K={K} N={N} bias={bias}")
    assert res["out"].stride()[-2:] == (L._pad_to(N), 1)        # the view of the padded product


def test_padded_bf16_casts_like_autocast():
    inp = make(40, 87, 30)
    res = run(lambda x, w, b: L.linear_padded(x, w, b, torch.bfloat16), inp)
    assert res["out"].dtype == torch.bfloat16
    assert res["dx"].dtype == res["dweight"].dtype == res["dbias"].dtype == torch.float32
    compare(res, ref64(inp), 1e-2, 1e-2, "padded bf16")


def test_column_sum_rejects_non_matrix():
    if TC is None:
        pytest.skip(f"Triton not importable ({_TRITON_ERROR})")
    with pytest.raises(ValueError, match=r"must be \(M, N\)"):
        TC.column_sum(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"sum_middle: p must be a \(B, T, N\) float32"):
        TC.sum_middle(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"float32"):
        TC.sum_middle(torch.zeros(2, 3, 4, dtype=torch.float64))


def colsum_err(out, g):
    """Largest |out - exact column sum| over the columns, relative to that column's sum of |g|: the
    scale of fp32 accumulation error (a relative error of the sum itself is unbounded under
    cancellation). NaN or Inf gives inf."""
    g64 = g.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double().cpu() - g64.sum(0)).abs() / g64.abs().sum(0).clamp_min(1e-300)).max().item()


# (M, N): ragged columns (N % 128 != 0), rows not a multiple of the row tile, one row, a single column
COLSUM_CASES = [(1, 5), (33, 130), (300, 64), (1000, 7), (257, 256), (64, 1)]
# (B, T, N) for sum_middle: T not a multiple of the 64-row tile, one row, N not a multiple of 32
SUM_MIDDLE_CASES = [(1, 1, 5), (3, 65, 33), (2, 200, 64), (1, 130, 1)]


def _interpret_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    saved = dict(TC.CONFIG)
    TC.CONFIG.update(programs=8)            # several row blocks, so the partial-row stage is exercised
    for M, N in COLSUM_CASES:
        g = torch.randn(M, N, dtype=torch.float64).float()
        out = TC.column_sum(g)
        assert out.dtype == torch.float32 and out.shape == (N,)
        e = colsum_err(out, g)
        assert e <= 1e-6, (M, N, e)
    TC.CONFIG.update(saved)
    for shape in SUM_MIDDLE_CASES:
        p = torch.randn(*shape, dtype=torch.float64).float()
        out = TC.sum_middle(p)
        assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2])
        e = colsum_err(out.reshape(-1), p.transpose(0, 1).reshape(shape[1], -1))
        assert e <= 1e-6, (shape, e)
    # the captured Linear's column-sum bias gradient, unpadded (align 1) and padded, vs float64
    for M, K, N, align in [(40, 24, 16, 1), (37, 22, 35, 8)]:
        inp = make(M, K, N, lead=(2,))
        res = run(lambda x, w, b: L.linear_padded(x, w, b, torch.bfloat16, align), inp)
        compare(res, ref64(inp), 1e-2, 1e-2, f"interpreter column-sum Linear {M}x{K}x{N} align {align}")
        assert res["out"].dtype == torch.bfloat16 and res["dbias"].dtype == torch.float32
    one_pass_checks(torch.float16, "cpu")   # the interpreter's bf16 tl.dot is wrong (raw bits); fp16 is not
    print("interpreter checks passed")


# triton_linear.dual_linear_backward: (M, K, N1, N2, block_m, programs): rows not a multiple of the tile,
# one row, widths not powers of two or under 16 (padded), programs with uneven and empty row ranges, no rows
DUAL_CASES = [(200, 64, 64, 64, 64, 3), (37, 24, 16, 40, 16, 2), (1, 16, 8, 16, 16, 4), (130, 64, 64, 48, 32, 264),
              (0, 16, 16, 16, 16, 4)]


def one_pass_checks(dt, device, cases=DUAL_CASES, tol=1e-2):
    """triton_linear's one-pass backwards vs float64 (relative Frobenius error <= tol; 16-bit operands):
    dual_linear_backward's gx, gw1, gw2 in the operands' dtype; linear_backward (g1, w1 only) with the bias
    gradient, gx and gw in float32 (the dtypes it is asked for), the bias gradient in float32. Dtypes and
    shapes too; on CUDA outputs are poisoned first."""
    from groupmamba.ops import triton_linear as TL
    saved = dict(TL.CONFIG)
    try:
        for M, K, N1, N2, bm, progs in cases:
            TL.CONFIG.update(block_m=bm, programs=progs, max_width=max(K, N1, N2))
            gen = torch.Generator().manual_seed(torch.seed())
            x, g1, g2 = (torch.randn(M, n, generator=gen, dtype=torch.float64).to(dt).to(device) for n in (K, N1, N2))
            w1, w2 = ((torch.randn(n, K, generator=gen, dtype=torch.float64) / K ** 0.5).to(dt).to(device)
                      for n in (N1, N2))
            assert TL.supports(x, g1, g2, w1, w2)
            if device == "cuda":
                poison_cuda_cache()
            dual = TL.dual_linear_backward(x, g1, g2, w1, w2)
            if device == "cuda":
                poison_cuda_cache()
            single = TL.linear_backward(x, g1, w1, True, torch.float32, torch.float32)
            x, g1, g2, w1, w2 = (t.double().cpu() for t in (x, g1, g2, w1, w2))
            checks = [(f"dual {n}", o, r, dt) for n, o, r in
                      zip(("gx", "gw1", "gw2"), dual, (g1 @ w1 + g2 @ w2, g1.t() @ x, g2.t() @ x))]
            checks += [(f"single {n}", o, r, torch.float32) for n, o, r in
                       zip(("gx", "gw", "gb"), single, (g1 @ w1, g1.t() @ x, g1.sum(0)))]
            for name, o, r, want in checks:
                assert o.dtype == want and o.shape == r.shape, (name, o.dtype, o.shape)
                if r.numel() == 0:
                    continue
                # no rows: the weight and bias gradients must be exact zeros
                e = rel_err(o, r) if r.norm() > 0 else o.double().abs().max().item()
                assert e <= tol, (M, K, N1, N2, name, e)
    finally:
        TL.CONFIG.clear()
        TL.CONFIG.update(saved)


def test_dual_linear_backward_rejects_wrong_shapes():
    pytest.importorskip("triton")
    from groupmamba.ops import triton_linear as TL
    x, g = torch.zeros(4, 16, dtype=torch.float16), torch.zeros(4, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="g2 \\(4, 8\\)"):
        TL.dual_linear_backward(x, g, g[:, :8], torch.zeros(16, 16, dtype=torch.float16),
                                torch.zeros(16, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="linear_backward: shapes x \\(4, 16\\), g1 \\(4, 8\\)"):
        TL.linear_backward(x, g[:, :8], torch.zeros(16, 16, dtype=torch.float16), True, x.dtype, x.dtype)
    assert not TL.supports(x.float(), g, g, g, g)
    assert not TL.supports(torch.zeros(4, 200, dtype=torch.float16), g, g, g, g)


def test_triton_interpreter_cpu():
    if TC is None:
        pytest.skip(f"Triton not importable ({_TRITON_ERROR})")
    run_triton_interpreter(__file__)


# GroupMamba-T at B=128: tokens x width of every depthwise-conv bias gradient (mixer and FFN convs)
GPU_COLSUM = [(401408, 64), (401408, 512), (100352, 128), (100352, 1024), (25088, 348), (25088, 424), (25088, 1392),
              (6272, 448), (6272, 1792), (3, 5), (77, 106)]   # N: every VEC of channel_split


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N", GPU_COLSUM, ids=str)
def test_gpu_column_sum_vs_float64(M, N, dt):
    g = torch.randn(M, N, dtype=torch.float64, device="cuda").to(dt)
    poison_cuda_cache()
    out = TC.column_sum(g)
    e = colsum_err(out, g)
    assert out.dtype == torch.float32 and e <= 1e-6, e


# (B, T, N): the modulation's per-image partials at GroupMamba-B stages 1 and 3, column_sum's partial rows
GPU_SUM_MIDDLE = [(128, 784, 96), (128, 49, 424), (1, 256, 424), (1, 73, 16960), (5, 3, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,N", GPU_SUM_MIDDLE, ids=str)
def test_gpu_sum_middle_vs_float64(B, T, N):
    p = torch.randn(B, T, N, dtype=torch.float64, device="cuda").float()
    poison_cuda_cache()
    out = TC.sum_middle(p)
    e = colsum_err(out.reshape(-1), p.transpose(0, 1).reshape(T, -1))
    assert out.dtype == torch.float32 and out.shape == (B, N) and e <= 1e-6, e


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,K,N", [(25088, 348, 348), (25088, 348, 1392), (25088, 1392, 348), (7, 87, 5)], ids=str)
def test_gpu_linear_padded_bf16_vs_float64(M, K, N, bias):
    inp = make(M, K, N, dtype=torch.bfloat16, device="cuda", bias=bias)
    poison_cuda_cache()
    res = run(lambda *a: L.linear_padded(a[0], a[1], a[2] if bias else None, torch.bfloat16), inp)
    assert res["out"].dtype == torch.bfloat16 and res["out"].stride() == (L._pad_to(N), 1)  # padded product
    compare(res, ref64(inp), 1e-2, 1e-2, f"gpu linear_padded bf16 {M}x{K}x{N}")


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_gpu_linear_pads_under_graph_capture_only(autocast):
    dt = torch.float32 if autocast else torch.bfloat16
    inp = make(1568, 348, 348, dtype=dt, device="cuda")
    x, w, b = inp["x"], inp["weight"], inp["bias"]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        eager, graphed = eager_and_cuda_graph(lambda: L.linear(x, w, b))
    assert eager.is_contiguous() and graphed.stride() == (352, 1)   # F.linear / the padded product
    assert eager.dtype == graphed.dtype == torch.bfloat16
    ref = F.linear(x.double(), w.double(), b.double())
    assert rel_err(eager, ref) <= 1e-2 and rel_err(graphed, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(348, 348), (64, 512)], ids=str)
def test_gpu_captured_linear_step_matches_eager(K, N):
    """A captured forward + backward of linear() (padded GEMMs where needed, the bias gradient by
    column_sum) against the eager F.linear step under bf16 autocast: values and all three gradients."""
    inp = make(1568, K, N, device="cuda", lead=(2,))
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias")}

    def step():
        for t in leaves.values():
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = L.linear(*leaves.values())
        (out.float() * inp["g"]).sum().backward()
        return [out] + [t.grad for t in leaves.values()]

    eager, graphed = eager_and_cuda_graph(step)
    ref = ref64(inp)
    for name, e, gr in zip(("out", "dx", "dweight", "dbias"), eager, graphed):
        assert gr.dtype == e.dtype and gr.shape == e.shape, name
        assert rel_err(e, ref[name]) <= 1e-2 and rel_err(gr, ref[name]) <= 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(3136, 128, 1024), (196, 348, 1392), (196, 1392, 348)], ids=str)
def test_gpu_linear_padded_under_autocast_matches_f_linear(M, K, N):
    inp = make(M, K, N, device="cuda", lead=(4,))    # float32 x and parameters, as in the model
    with torch.autocast("cuda", dtype=torch.bfloat16):
        padded = run(lambda x, w, b: L.linear_padded(x, w, b, torch.bfloat16), inp)
        ref = run(F.linear, inp)
    assert padded["out"].dtype == ref["out"].dtype == torch.bfloat16
    assert padded["dx"].dtype == padded["dweight"].dtype == padded["dbias"].dtype == torch.float32
    for k in ref:
        e = rel_err(padded[k], ref[k])
        assert e <= 1e-2, (k, e)


def test_padded_dtype_decides_which_gemms_pad():
    """The one predicate linear() uses inside a capture: 16-bit operands (or a 16-bit autocast) with K or N
    not a multiple of 8 pad; aligned widths, float32 without autocast and mismatched inputs do not."""
    padded_dtype = L.padded_dtype
    w348, w352 = torch.zeros(348, 348), torch.zeros(352, 352)
    assert padded_dtype(torch.zeros(2, 348, dtype=torch.bfloat16), w348) == torch.bfloat16
    assert padded_dtype(torch.zeros(2, 348, dtype=torch.float16), torch.zeros(64, 348)) == torch.float16
    assert padded_dtype(torch.zeros(2, 352, dtype=torch.bfloat16), w352) is None
    assert padded_dtype(torch.zeros(2, 348), w348) is None
    assert padded_dtype(torch.zeros(2, 64, dtype=torch.bfloat16), w348) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert padded_dtype(torch.zeros(2, 348), w348) == torch.bfloat16


def test_checkpoint_recompute_skips_padded_gemm():
    """Under outputs_unused (ConvFFN's recompute context) the padded Function still saves its inputs but
    runs no GEMM: a checkpointed act -> Linear gives the gradients of the plain one (float64, 1e-12) with
    one F.linear call (the forward) instead of two (forward + recompute)."""
    import contextlib
    from unittest import mock

    from torch.utils.checkpoint import checkpoint

    inp = make(9, 22, 37, dtype=torch.float64, lead=(2,))
    tail = lambda x, w, b: L.linear_padded(torch.tanh(x), w, b, torch.float64)  # noqa: E731
    ref = run(tail, inp)
    calls = {}
    for skip in (False, True):
        ctx = (lambda: (contextlib.nullcontext(), L.outputs_unused())) if skip else None
        with mock.patch.object(L.F, "linear", wraps=F.linear) as spy:
            res = run(lambda *a: checkpoint(tail, *a, use_reentrant=False, **({"context_fn": ctx} if ctx else {})),
                      inp)
        calls[skip] = spy.call_count
        compare(res, ref, 1e-12, 1e-12, f"checkpointed, skip={skip}")
    assert calls == {False: 2, True: 1}


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpret_checks()


# the in_proj halves, packed (C, C): GroupMamba-T stage 1 at B=128 and B=8, stage 2, B stage 1 (C = 96);
# odd widths; fewer rows than programs
GPU_DUAL = [(401408, 64, 64, 64, 64, 264), (25088, 64, 64, 64, 64, 264), (100352, 128, 128, 128, 64, 264),
            (3000, 96, 96, 96, 64, 264), (1000, 40, 24, 56, 64, 7), (5, 64, 64, 64, 64, 264)]


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_one_pass_linear_backward_vs_float64(dt):
    one_pass_checks(dt, "cuda", GPU_DUAL)


def on_off_grads(key, fn_name, run):
    """run() (its leaves' gradients) with triton_linear.CONFIG[key] on, then off: the same gradients within
    bf16 rounding and dtypes, and triton_linear.<fn_name> called on the first run only."""
    from groupmamba.ops import triton_linear as TL
    calls, orig, saved, res = [], getattr(TL, fn_name), TL.CONFIG[key], {}
    setattr(TL, fn_name, lambda *a: calls.append(1) or orig(*a))
    try:
        for on in (True, False):
            TL.CONFIG[key] = on
            res[on] = run()
    finally:
        TL.CONFIG[key] = saved
        setattr(TL, fn_name, orig)
    assert len(calls) == 1
    for t, c in zip(res[True], res[False]):
        assert t.dtype == c.dtype and rel_err(t.double(), c.double()) <= 1e-2


@pytest.mark.gpu
def test_gpu_dual_linear_routes_through_triton():
    """_DualLinear's CUDA backward: the Triton pass (enabled) and cuBLAS (disabled) give the same gradients."""
    gen = torch.Generator(device="cuda").manual_seed(torch.seed())
    x0 = torch.randn(8, 56, 56, 64, device="cuda", generator=gen).bfloat16()
    w = [torch.randn(64, 64, device="cuda", generator=gen).div(8).bfloat16() for _ in range(2)]
    gs = [torch.randn(8, 56, 56, 64, device="cuda", generator=gen).bfloat16() for _ in range(2)]

    def run():
        leaves = [t.clone().requires_grad_() for t in (x0, *w)]
        torch.autograd.backward(L.dual_linear(*leaves), gs)
        return [t.grad for t in leaves]
    on_off_grads("enabled", "dual_linear_backward", run)


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_single_linear_one_pass_matches_cublas(bias):
    """_PaddedLinear at align 1 (a captured aligned Linear) with triton_linear's CONFIG "single" on and off:
    same gradients, the weight and bias gradients float32 as the parameters."""
    gen = torch.Generator(device="cuda").manual_seed(torch.seed())
    x0 = torch.randn(8, 3136, 64, device="cuda", generator=gen).bfloat16()
    w0 = torch.randn(64, 64, device="cuda", generator=gen).div(8)
    b0 = torch.randn(64, device="cuda", generator=gen) if bias else None
    g = torch.randn(8, 3136, 64, device="cuda", generator=gen).bfloat16()

    def run():
        leaves = [t.clone().requires_grad_() for t in (x0, w0, b0) if t is not None]
        L.linear_padded(*leaves, *([] if bias else [None]), torch.bfloat16, 1).backward(g)
        return [t.grad for t in leaves]
    on_off_grads("single", "linear_backward", run)


def test_dual_linear_function_gradients():
    """_DualLinear (CUDA path of dual_linear; the Function itself is device-agnostic): float64 gradcheck, and
    a one-sided loss (one output's gradient None) gives the other half's gradients and zeros elsewhere."""
    from groupmamba.ops.fast_linear import _DualLinear
    gen = torch.Generator().manual_seed(11)
    x, w1, w2 = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
                 for s in ((2, 3, 5), (4, 5), (6, 5)))
    assert torch.autograd.gradcheck(lambda *a: _DualLinear.apply(*a), (x, w1, w2))
    a, _ = _DualLinear.apply(x, w1, w2)
    gx, g1, g2 = torch.autograd.grad(a.sum(), (x, w1, w2), allow_unused=True)
    assert torch.allclose(gx, torch.ones(2, 3, 4, dtype=torch.float64) @ w1)
    assert torch.allclose(g1, torch.ones(6, 4, dtype=torch.float64).t() @ x.detach().reshape(6, 5))
    assert g2 is None or torch.count_nonzero(g2) == 0
