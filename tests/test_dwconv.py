"""dwconv_act: depthwise 3x3 conv + bias + activation on (B, H, W, C) tokens.

* CPU (always): the reference vs a float64 hand computation (explicit 3x3 stencil with zero padding),
  forward and gradients of x, weight, bias; argument errors.
* Triton interpreter (always, when Triton is importable): the forward kernel at several tile sizes
  and the backward (recompute + aten.convolution_backward) on CPU tensors
  with TRITON_INTERPRET=1, in a subprocess; under an activation checkpoint that keeps the
  pre-activation (ConvFFN's recompute), one conv pass fewer and bit-identical results.
* GPU (@pytest.mark.gpu): fused vs float64 at the model's shapes (mixer C = 64 .. 512, FFN hidden up to
  1392), fp32 / bf16 / fp16, outputs poisoned first; under bf16 autocast.

Tolerances (relative Frobenius error vs float64): float32 1e-5 (weight / bias gradients 1e-4: sums over
B*H*W); bf16 / fp16 1e-2.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import compare_outputs as compare, poison_cuda_cache, rel_err, run_triton_interpreter
from groupmamba.ops import dwconv as D

ACTS = ("silu", "gelu", "none")


def make(B, H, W, C, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(torch.seed())
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(x=r(B, H, W, C).to(dtype).to(device), weight=(0.4 * r(C, 1, 3, 3)).to(pdt).to(device),
                bias=(0.2 * r(C)).to(pdt).to(device), g=r(B, H, W, C).to(dtype).to(device))


def run(fn, inp, act):
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias")}
    out = fn(leaves["x"], leaves["weight"], leaves["bias"], act)
    (out.double() * inp["g"].double()).sum().backward()
    return dict(out=out, **{"d" + k: v.grad for k, v in leaves.items()})


def hand64(inp, act):
    d = {k: v.detach().double().cpu().requires_grad_() for k, v in inp.items()}
    x, w, b = d["x"], d["weight"], d["bias"]
    B, H, W, C = x.shape
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
    return dict(out=y, dx=x.grad, dweight=w.grad, dbias=b.grad)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (1, 1, 1, 4), (2, 3, 2, 6)])
def test_reference_matches_hand(shape, act):
    inp = make(*shape, dtype=torch.float64)
    compare(run(D.dwconv_act, inp, act), hand64(inp, act), 1e-12, 1e-12, f"reference {shape} {act}")


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


# (shape, act, (rows, channels) per program): small tiles give several programs per image and ragged
# last tiles (rows past H, channels past C); a loop step of three columns past W (W % 3 != 0).
INTERPRET_CASES = [((2, 5, 7, 16), "silu", (4, 128)), ((1, 6, 6, 20), "gelu", (2, 16)),
                   ((2, 4, 9, 8), "none", (4, 16)), ((1, 1, 1, 12), "gelu", (4, 128)),
                   ((2, 7, 7, 40), "silu", (8, 32)), ((1, 3, 5, 24), "gelu", (1, 16))]


def _interpret_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from groupmamba.ops import triton_dwconv as td
    defaults = dict(td.CONFIG)
    for shape, act, (bh, bc) in INTERPRET_CASES:
        td.CONFIG.update(defaults, block_h=bh, block_c=bc)
        inp = make(*shape)
        compare(run(D.dwconv_act_fused, inp, act), hand64(inp, act), 1e-5, 1e-4, f"interpreter {shape} {act}")
    td.CONFIG.update(defaults)
    inp = make(2, 5, 5, 24, dtype=torch.bfloat16)
    res = run(D.dwconv_act_fused, inp, "gelu")
    compare(res, hand64(inp, "gelu"), 1e-2, 1e-2, "interpreter bf16")
    assert res["out"].dtype == res["dx"].dtype == torch.bfloat16 and res["dweight"].dtype == torch.float32
    _check_kept_preactivation(td)
    _check_act_backward_and_bias_grad()
    td.CONFIG.update(defaults, fused_act_bwd=False)      # the unfused backward (torch's derivative + column_sum)
    for act in ("silu", "gelu"):
        inp = make(2, 5, 7, 16)
        compare(run(D.dwconv_act_fused, inp, act), hand64(inp, act), 1e-5, 1e-4, f"interpreter unfused bwd {act}")
    td.CONFIG.update(defaults)
    print("interpreter checks passed")


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


def _check_kept_preactivation(td, device="cpu", dtype=torch.float32):
    """Under an activation checkpoint whose recompute keeps the pre-activation (as ConvFFN runs it), the
    conv runs twice (forward, recompute) instead of three times (+ the backward's recompute), and the
    results equal the plain call's bit for bit (the kept pre-activation is the same rounding of the same
    sums as the recomputed one)."""
    from torch.utils.checkpoint import checkpoint

    calls = []
    conv = td._conv
    td._conv = lambda *a, **k: calls.append(k.get("keep_pre", False)) or conv(*a, **k)
    try:
        inp = make(2, 6, 5, 24, dtype=dtype, device=device)
        plain = run(D.dwconv_act_fused, inp, "gelu")
        assert calls == [False, False], calls   # forward + the backward's recompute
        calls.clear()
        ctx = lambda: (contextlib.nullcontext(), D.keep_preactivation())  # noqa: E731
        ckpt = run(lambda *a: checkpoint(D.dwconv_act_fused, *a, use_reentrant=False, context_fn=ctx), inp, "gelu")
        assert calls == [False, True], calls    # forward, recompute keeping the pre-activation; no third
    finally:
        td._conv = conv
    for k in plain:
        assert torch.equal(plain[k], ckpt[k]), k
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    compare(ckpt, hand64(inp, "gelu"), tol, 1e-4 if dtype == torch.float32 else 1e-2,
            f"checkpoint + kept pre-activation {device} {dtype}")


def test_triton_interpreter_cpu():
    if D._td is None:
        pytest.skip(f"Triton not importable ({D._TRITON_ERROR})")
    run_triton_interpreter(__file__)


GPU_SHAPES = [(2, 56, 56, 64), (2, 56, 56, 512), (2, 28, 28, 1024), (2, 14, 14, 348), (2, 14, 14, 1392),
              (2, 7, 7, 448), (1, 1, 1, 448), (3, 5, 9, 20)]


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
def test_gpu_checkpoint_keeps_preactivation(dt):
    _check_kept_preactivation(D._td, "cuda", dt)


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
