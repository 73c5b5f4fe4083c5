"""dwconv_act: depthwise 3x3 conv + bias + activation on (B, H, W, C) tokens.

* CPU (always): the reference vs a float64 hand computation (explicit 3x3 stencil with zero padding),
  forward and gradients of x, weight, bias (and of x_bias: a bias already inside x, whose gradient the op
  returns); argument errors.
* Triton interpreter (always, when Triton is importable): the forward kernel and the Triton backward
  (weight-gradient pass + dx pass) at several tile sizes and program counts, and the cuDNN-backward
  variants (recompute + aten.convolution_backward), on CPU tensors with TRITON_INTERPRET=1, in a
  subprocess; the number and kind of conv passes per weight-gradient method with and without an
  activation checkpoint (ConvFFN's recompute; bit-identical to the plain call with the same method);
  empty inputs; x_bias's gradient (summed by the dx pass, or from cuDNN's dx) with every weight-gradient
  method, at image sizes down to one row and one column, also when x itself needs no gradient.
* GPU (@pytest.mark.gpu): fused vs float64 at the model's shapes (mixer C = 64 .. 512, FFN hidden up to
  1392), fp32 / bf16 / fp16, outputs poisoned first; x_bias at the FFN shapes; under bf16 autocast.
* The kernels' activations (ops/triton_act.py: GELU, SiLU and their derivatives in few instructions)
  against float64 on a dense grid over [-12, 12] plus +-inf and NaN, in the interpreter (the formulas) and
  on the GPU (the approximate PTX instructions).

Tolerances (relative Frobenius error vs float64): float32 1e-5 (weight / bias gradients 1e-4: sums over
B*H*W); bf16 / fp16 1e-2. Activations, per element: |error| <= 2e-6 max(1, |x|) (torch's own fp32 GELU is
off by up to 6e-7 on this grid), and GELU within 1e-4 relative on [-9, -1], where torch's fp32 formula
1 + erf(x / sqrt 2) cancels (its error there reaches 100%).
"""
from __future__ import annotations

import contextlib
import os
import sys

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compare_outputs as compare, poison_cuda_cache, rel_err, run_triton_interpreter
from groupmamba.ops import dwconv as D

ACTS = ("silu", "gelu", "none")


def make(B, H, W, C, dtype=torch.float32, device="cpu", x_bias=False):
    """Random inputs; x_bias: also a bias inside x (as large as x)."""
    g = torch.Generator().manual_seed(torch.seed())
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    inp = dict(x=r(B, H, W, C).to(dtype).to(device), weight=(0.4 * r(C, 1, 3, 3)).to(pdt).to(device),
               bias=(0.2 * r(C)).to(pdt).to(device), g=r(B, H, W, C).to(dtype).to(device))
    if x_bias:
        inp["x_bias"] = r(C).to(pdt).to(device)
    return inp


def run(fn, inp, act):
    """fn's output and gradients. With an x_bias: fn gets x + x_bias (x_bias added without a gradient, as
    ConvFFN's fc1 adds it) and x_bias itself, whose gradient must be the sum of x's."""
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias", "x_bias") if k in inp}
    x, kw = leaves["x"], {}
    if "x_bias" in leaves:
        x = (x + leaves["x_bias"].detach()).to(x.dtype)
        kw["x_bias"] = leaves["x_bias"]
    out = fn(x, leaves["weight"], leaves["bias"], act, **kw)
    (out.double() * inp["g"].double()).sum().backward()
    return dict(out=out, **{"d" + k: v.grad for k, v in leaves.items()})


def hand64(inp, act):
    d = {k: v.detach().double().cpu().requires_grad_() for k, v in inp.items()}
    x, w, b = d["x"], d["weight"], d["bias"]
    B, H, W, C = x.shape
    if "x_bias" in d:
        x = x + d["x_bias"]
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))   # zero padding of H and W
    y = b.expand(B, H, W, C).clone()
    for i in range(3):
        for j in range(3):
            y = y + xp[:, i:i + H, j:j + W, :] * w[:, 0, i, j]
    if act == "silu":
        y = y * torch.sigmoid(y)
    elif act == "gelu":
        y = 0.5 * y * (1 + torch.erf(y / 2 ** 0.5))
    (y * d["g"]).sum().backward()
    res = dict(out=y, dx=d["x"].grad, dweight=w.grad, dbias=b.grad)
    if "x_bias" in d:
        res["dx_bias"] = d["x_bias"].grad
    return res


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (1, 1, 1, 4), (2, 3, 2, 6)])
def test_reference_matches_hand(shape, act):
    for x_bias in (False, True):
        inp = make(*shape, dtype=torch.float64, x_bias=x_bias)
        res = run(D.dwconv_act, inp, act)
        assert ("dx_bias" in res) == x_bias
        compare(res, hand64(inp, act), 1e-12, 1e-12, f"reference {shape} {act} x_bias={x_bias}")


def test_argument_errors():
    inp = make(1, 4, 4, 8)
    x, w, b = inp["x"], inp["weight"], inp["bias"]
    with pytest.raises(ValueError, match="act must be"):
        D.dwconv_act(x, w, b, "relu")
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        D.dwconv_act(x[0], w, b, "silu")
    with pytest.raises(ValueError, match="weight must have shape"):
        D.dwconv_act(x, w[:4], b, "silu")
    with pytest.raises(ValueError, match="bias must have shape"):
        D.dwconv_act(x, w, b[:3], "silu")
    with pytest.raises(TypeError, match="floating point"):
        D.dwconv_act(x.long(), w, b, "silu")
    with pytest.raises(ValueError, match=r"x_bias must have shape \(8,\)"):
        D.dwconv_act(x, w, b, "gelu", x_bias=b[:3])
    with pytest.raises(TypeError, match="x_bias must be floating point"):
        D.dwconv_act(x, w, b, "gelu", x_bias=b.long())


class _FakeCtx:
    """What DWConvAct.backward reads from its autograd context (x saved in the pre-activation slot)."""

    def __init__(self, inp):
        x, w, b = inp["x"], inp["weight"], inp["bias"]
        self.saved_tensors = (x, w, D._td._taps(w), b, x)
        self.act = "silu"
        self.x_bias_dtype = None
        self.needs_input_grad = (True, True, True, False)


def test_unknown_weight_gradient_method():
    if D._td is None:
        pytest.skip(f"Triton not importable ({D._TRITON_ERROR})")
    inp = make(1, 4, 4, 8)
    saved = dict(D._td.CONFIG)
    D._td.CONFIG["wgrad"] = "fast"
    try:
        with pytest.raises(ValueError, match="unknown weight-gradient method 'fast'"):
            D._td.DWConvAct.backward(_FakeCtx(inp), torch.ones(1, 4, 4, 8))
    finally:
        D._td.CONFIG.update(saved)


# (shape, act, (rows, channels) per program): small tiles give several programs per image and ragged
# last tiles (rows past H, channels past C); a loop step of three columns past W (W % 3 != 0).
INTERPRET_CASES = [((2, 5, 7, 16), "silu", (4, 128)), ((1, 6, 6, 20), "gelu", (2, 16)),
                   ((2, 4, 9, 8), "none", (4, 16)), ((1, 1, 1, 12), "gelu", (4, 128)),
                   ((2, 7, 7, 40), "silu", (8, 32)), ((1, 3, 5, 24), "gelu", (1, 16))]


def _interpret_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from groupmamba.ops import triton_dwconv as td
    defaults = dict(td.CONFIG)
    for shape, act, (bh, bc) in INTERPRET_CASES:   # the same tile for the forward and the wgrad pass
        td.CONFIG.update(defaults, block_h=bh, block_c=bc, wgrad_tile=(bh, bc, 4))
        inp = make(*shape)
        compare(run(D.dwconv_act_fused, inp, act), hand64(inp, act), 1e-5, 1e-4, f"interpreter {shape} {act}")
    for programs in (1, 7, 10):   # the weight-gradient pass: one program, ragged and even row-block splits
        td.CONFIG.update(defaults, block_h=2, block_c=16, wgrad_tile=(2, 16, 4), wgrad_programs=programs)
        inp = make(3, 7, 5, 40)
        compare(run(D.dwconv_act_fused, inp, "gelu"), hand64(inp, "gelu"), 1e-5, 1e-4, f"interpreter {programs} programs")
    for shape, act, (bh, bc) in INTERPRET_CASES[:4]:     # x_bias: its gradient summed by the dx pass
        td.CONFIG.update(defaults, block_h=bh, block_c=bc)
        inp = make(*shape, x_bias=True)
        compare(run(D.dwconv_act_fused, inp, act), hand64(inp, act), 1e-5, 1e-4, f"interpreter x_bias {shape} {act}")
    # x_bias at one row, one column, 2 x 2, rows not a multiple of the tile; the dx pass's partial sums (2-row
    # tiles: several per image) and cuDNN's dx summed by column_sum (triton_dgrad off)
    for triton_dgrad in (True, False):
        td.CONFIG.update(defaults, wgrad_programs=3, block_h=2, block_c=16, wgrad_tile=(2, 16, 4),
                         triton_dgrad=triton_dgrad)
        for shape in ((5, 1, 7, 16), (3, 6, 1, 8), (4, 2, 2, 40), (5, 9, 4, 24)):
            inp = make(*shape, x_bias=True)
            compare(run(D.dwconv_act_fused, inp, "gelu"), hand64(inp, "gelu"), 1e-5, 1e-4,
                    f"interpreter x_bias {shape} triton_dgrad={triton_dgrad}")
    td.CONFIG.update(defaults)
    # x_bias's gradient when x needs none: the dx pass still runs for its sums
    inp = make(2, 5, 4, 24, x_bias=True)
    want = hand64(inp, "gelu")["dx_bias"]
    xb = inp["x_bias"].clone().requires_grad_()
    x = (inp["x"] + xb.detach()).to(inp["x"].dtype)
    (D.dwconv_act_fused(x, inp["weight"], inp["bias"], "gelu", x_bias=xb).double() * inp["g"].double()).sum().backward()
    assert rel_err(xb.grad, want) <= 1e-5, rel_err(xb.grad, want)
    inp = make(2, 5, 5, 24, dtype=torch.bfloat16)
    res = run(D.dwconv_act_fused, inp, "gelu")
    compare(res, hand64(inp, "gelu"), 1e-2, 1e-2, "interpreter bf16")
    assert res["out"].dtype == res["dx"].dtype == torch.bfloat16 and res["dweight"].dtype == torch.float32
    inp = make(2, 5, 5, 24, dtype=torch.bfloat16, x_bias=True)
    res = run(D.dwconv_act_fused, inp, "gelu")
    compare(res, hand64(inp, "gelu"), 1e-2, 1e-2, "interpreter bf16 x_bias")
    assert res["dx_bias"].dtype == torch.float32
    _check_conv_passes(td)
    _check_conv_passes(td, x_bias=True)
    _check_act_backward_and_bias_grad()
    check_activations("cpu")
    for method in ("split", "cudnn"):   # the other weight-gradient methods, with dx from aten (cuDNN) too
        td.CONFIG.update(defaults, wgrad=method, triton_dgrad=False)
        for act in ("silu", "none"):
            for x_bias in (False, True):
                inp = make(2, 5, 7, 16, x_bias=x_bias)
                compare(run(D.dwconv_act_fused, inp, act), hand64(inp, act), 1e-5, 1e-4,
                        f"interpreter {method} {act} x_bias={x_bias}")
    for method in ("fused", "split", "cudnn"):   # empty batch: empty / zero gradients, nothing launched
        td.CONFIG.update(defaults, wgrad=method)
        for act in ("gelu", "none"):
            inp = make(0, 4, 5, 8, x_bias=method == "fused")
            compare(run(D.dwconv_act_fused, inp, act), hand64(inp, act), 0, 0, f"interpreter empty {method} {act}")
    td.CONFIG.update(defaults, wgrad="cudnn", fused_act_bwd=False)  # torch's derivative + column_sum
    for act in ("silu", "gelu"):
        inp = make(2, 5, 7, 16)
        compare(run(D.dwconv_act_fused, inp, act), hand64(inp, act), 1e-5, 1e-4, f"interpreter unfused bwd {act}")
    td.CONFIG.update(defaults)
    print("interpreter checks passed")


if D._td is not None:
    import triton
    import triton.language as tl
    from groupmamba.ops import triton_act as ta

    @triton.jit
    def _apply_activations(X, OUT, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(X + offs, mask=m, other=0.0)
        tl.store(OUT + 0 * N + offs, ta.gelu(x), mask=m)
        tl.store(OUT + 1 * N + offs, ta.gelu_grad(x), mask=m)
        tl.store(OUT + 2 * N + offs, ta.silu(x), mask=m)
        tl.store(OUT + 3 * N + offs, ta.silu_grad(x), mask=m)


def check_activations(device):
    """triton_act's four functions against float64 (see the module docstring for the tolerances)."""
    x = torch.cat([torch.linspace(-12, 12, 48001, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan], dtype=torch.float64)])
    x32 = x.float().to(device)
    out = torch.full((4, x.numel()), 12345.0, device=device)          # poisoned
    _apply_activations[(triton.cdiv(x.numel(), 1024),)](x32, out, x.numel(), BLOCK=1024)
    out = out.double().cpu()
    x = x32.double().cpu()
    cdf = 0.5 * torch.special.erfc(-x / math.sqrt(2))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    sig = torch.sigmoid(x)
    refs = {"gelu": x * cdf, "gelu_grad": cdf + x * pdf, "silu": x * sig, "silu_grad": sig * (1 + x * (1 - sig))}
    fin = x.isfinite()
    for got, (name, ref) in zip(out, refs.items()):
        err = ((got - ref).abs() / x.abs().clamp(min=1))[fin]
        assert err.max() <= 2e-6, (name, err.max().item(), x[fin][err.argmax()].item())
        assert torch.isnan(got[x.isnan()]).all(), name
    tail = (x >= -9) & (x <= -1)
    rel = ((out[0] - refs["gelu"]).abs() / refs["gelu"].abs())[tail]
    assert rel.max() <= 1e-4, rel.max().item()
    inf = x == math.inf
    assert out[0][inf].item() == math.inf and out[2][inf].item() == math.inf    # GELU(inf), SiLU(inf)


def _check_act_backward_and_bias_grad():
    """The backward's fused activation derivative + bias-gradient partials against torch's derivative
    and a float64 column sum: several row blocks, a ragged column block (N = 130), fp32 and bf16."""
    from groupmamba.ops import triton_colsum as tc
    saved = dict(tc.CONFIG)
    tc.CONFIG.update(programs=8)
    try:
        for dt in (torch.float32, torch.bfloat16):
            for act in ("silu", "gelu"):
                g = torch.randn(3, 37, 130, dtype=torch.float64).to(dt)
                pre = (3 * torch.randn(3, 37, 130, dtype=torch.float64)).to(dt)
                gpre, db = tc.column_sum_act_grad(g, pre, act)
                ref = getattr(torch.ops.aten, f"{act}_backward")(g.double(), pre.double())
                assert gpre.dtype == dt and gpre.shape == g.shape and db.dtype == torch.float32
                assert rel_err(gpre, ref) <= (1e-6 if dt == torch.float32 else 1e-2), (act, dt)
                # db sums the stored (rounded) gpre
                assert rel_err(db, gpre.double().sum((0, 1))) <= 1e-6, (act, dt)
    finally:
        tc.CONFIG.update(saved)


def _check_conv_passes(td, device="cpu", dtype=torch.float32, x_bias=False):
    """How many conv passes a GELU conv's forward + backward makes with each weight-gradient method, with
    and without an activation checkpoint whose recompute keeps the pre-activation (as ConvFFN runs it),
    and that both give the float64 results.
    Without the checkpoint (CONFIG["wgrad"]): the forward, a recompute of the pre-activation (not with
    "fused", whose weight-gradient pass recomputes it itself), the dx pass. With it (CONFIG["wgrad_kept"]:
    "split" or "cudnn"): the forward, the recompute that keeps the pre-activation, the dx pass. With the
    same method both ways the results are bit-identical. x_bias: the same passes.
    """
    from torch.utils.checkpoint import checkpoint

    defaults = dict(td.CONFIG)
    # per conv pass (keep_pre, an input-gradient pass: no bias, over the output gradient); per weight-
    # gradient pass ("wgrad", its activation: "gelu" when it applies the derivative itself)
    calls = []
    conv, conv_grads = td._conv, td._conv_grads
    td._conv = lambda *a, **k: calls.append((k.get("keep_pre", False), a[2] is None)) or conv(*a, **k)
    td._conv_grads = lambda *a: calls.append(("wgrad", a[4])) or conv_grads(*a)
    ctx = lambda: (contextlib.nullcontext(), D.keep_preactivation())  # noqa: E731
    fwd, recompute, kept, dx_pass = (False, False), (False, False), (True, False), (False, True)
    wgrad = {"fused": [("wgrad", "gelu")], "split": [("wgrad", "none")], "cudnn": []}
    inp = make(2, 6, 5, 24, dtype=dtype, device=device, x_bias=x_bias)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    try:
        for method, method_kept in (("fused", "split"), ("split", "split"), ("cudnn", "cudnn")):
            td.CONFIG.update(defaults, wgrad=method, wgrad_kept=method_kept)
            calls.clear()
            plain = run(D.dwconv_act_fused, inp, "gelu")
            passes = [fwd] + ([] if method == "fused" else [recompute]) + wgrad[method] + [dx_pass]
            assert calls == passes, (method, calls)
            calls.clear()
            ckpt = run(lambda *a, **k: checkpoint(D.dwconv_act_fused, *a, **k, use_reentrant=False, context_fn=ctx),
                       inp, "gelu")
            assert calls == [fwd, kept] + wgrad[method_kept] + [dx_pass], (method_kept, calls)
            if method == method_kept:
                for k in plain:
                    assert torch.equal(plain[k], ckpt[k]), (method, k)
            for res, what in ((plain, "plain"), (ckpt, "checkpoint")):
                compare(res, hand64(inp, "gelu"), tol, 1e-4 if dtype == torch.float32 else 1e-2,
                        f"{what}, wgrad={method}, {device} {dtype}")
    finally:
        td._conv, td._conv_grads = conv, conv_grads
        td.CONFIG.update(defaults)


def test_triton_interpreter_cpu():
    if D._td is None:
        pytest.skip(f"Triton not importable ({D._TRITON_ERROR})")
    run_triton_interpreter(__file__)


GPU_SHAPES = [(2, 56, 56, 64), (2, 56, 56, 512), (2, 28, 28, 1024), (2, 14, 14, 348), (2, 14, 14, 424),
              (2, 14, 14, 1392), (2, 7, 7, 448), (1, 1, 1, 448), (3, 5, 9, 20),
              (2, 5, 3, 106)]   # C: every VEC of _util.channel_split


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ("silu", "gelu"))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_fused_vs_float64(shape, act, dt):
    inp = make(*shape, dtype=dt, device="cuda")
    poison_cuda_cache()
    res = run(D.dwconv_act, inp, act)
    tol = 1e-5 if dt == torch.float32 else 1e-2
    compare(res, hand64(inp, act), tol, 1e-4 if dt == torch.float32 else 1e-2, f"gpu {shape} {act} {dt}")
    assert res["out"].dtype == dt


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 56, 56, 768), (3, 28, 28, 1536), (2, 14, 14, 1696), (2, 7, 7, 2048),
                                   (3, 5, 9, 20), (1, 1, 1, 8), (70, 3, 1, 16)], ids=str)
def test_gpu_x_bias_vs_float64(shape, dt):
    """The FFN's conv with fc1's bias inside x (x_bias): forward and all four gradients."""
    inp = make(*shape, dtype=dt, device="cuda", x_bias=True)
    poison_cuda_cache()
    res = run(D.dwconv_act, inp, "gelu")
    tol = 1e-5 if dt == torch.float32 else 1e-2
    compare(res, hand64(inp, "gelu"), tol, 1e-4 if dt == torch.float32 else 1e-2, f"gpu x_bias {shape} {dt}")


@pytest.mark.gpu
@pytest.mark.parametrize("x_bias", [False, True])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_conv_passes_and_checkpoint(dt, x_bias):
    _check_conv_passes(D._td, "cuda", dt, x_bias)


@pytest.mark.gpu
def test_gpu_activations_vs_float64():
    check_activations("cuda")


@pytest.mark.gpu
def test_gpu_autocast_matches_reference():
    inp = make(4, 28, 28, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = run(D.dwconv_act, inp, "gelu")
        ref = run(D.dwconv_act_reference, inp, "gelu")
    assert fused["out"].dtype == ref["out"].dtype == torch.bfloat16
    for k in ref:
        assert rel_err(fused[k], ref[k]) <= 1e-2, k


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpret_checks()
