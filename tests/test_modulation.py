"""Channel modulation ops: layernorm_pool and modulate_layernorm, and add_layernorm_pool (layernorm_pool of
x + residual [* per-sample scale], which also returns that sum: a block's pending residual add).

* CPU (always): the torch references vs a float64 hand computation, forward and every gradient;
  argument checking.
* Triton interpreter (always, when Triton is importable): the fused kernels on CPU tensors with
  TRITON_INTERPRET=1, in a subprocess (the variable must be set before Triton is imported); a few
  seconds.
* GPU (@pytest.mark.gpu): the fused kernels vs float64 at GroupMamba-T stage shapes and odd shapes,
  fp32 / bf16 / fp16, forward and all gradients, outputs poisoned with NaN first; add_layernorm_pool as
  the model runs it (float32 stream, bf16 residual and copy, DropPath factors) at GroupMamba-B's stages.
add_layernorm_pool is checked like the chain: y, xn, pooled (and the bf16 copy) and the gradients of x, the
residual, weight and bias, with a cotangent for every output, against float64; x's and the residual's
gradients come back in their own dtypes.

Tolerances (relative Frobenius error vs float64, conftest.rel_err):
    float32: outputs and activation gradients 1e-5; LayerNorm weight/bias gradients 1e-4 (sums over
             B*L rows); bf16/fp16: 1e-2 everywhere.
    d skip_scale: LayerNorm is scale-invariant, so d out / d skip_scale is ~0 (it only comes from eps)
             and is a sum of large cancelling terms: it is checked with an absolute error against the
             size of those terms, sum_bc |s_bc * q_bc| (q_bc = sum_l dz * y * xn), times a tenth of the
             tolerance (1e-6 for float32; seen ~1e-8 under the interpreter).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import poison_cuda_cache, rel_err, run_triton_interpreter
from groupmamba.ops import modulation as M

EPS = 1e-5
# GroupMamba-T stages at 224x224: (L, C) = (56*56, 64), (28*28, 128), (14*14, 348), (7*7, 448)
STAGES = [(3136, 64), (784, 128), (196, 348), (49, 448)]
ODD = [(3, 1, 348), (2, 50, 87 * 4), (2, 37, 20), (1, 7, 1000), (5, 3, 4)]


# ------------------------------------------------------------------------------------------------
# float64 hand computation
# ------------------------------------------------------------------------------------------------
def ln64(x, w, b, eps=EPS):
    m = x.mean(dim=-1, keepdim=True)
    v = ((x - m) ** 2).mean(dim=-1, keepdim=True)
    return (x - m) / torch.sqrt(v + eps) * w + b


def make_inputs(B, L, C, dtype=torch.float32, s_dtype=torch.float32, device="cpu", seed=None):
    g = torch.Generator().manual_seed(torch.seed() if seed is None else seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(
        x=r(B, L, C) * 2 + 0.5,
        weight=1 + 0.3 * r(C),
        bias=0.2 * r(C),
        y=r(B, L, C),
        s=torch.rand(B, C, generator=g, dtype=torch.float64),
        skip=1 + 0.1 * r(1),
        g_xn=r(B, L, C),          # cotangents
        g_pooled=r(B, C),
        g_out=r(B, L, C),
    )
    act = dict(x=dtype, y=dtype, g_xn=dtype, g_pooled=dtype, g_out=dtype, s=s_dtype)
    pw = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: v.to(act.get(k, pw)).to(device) for k, v in t.items()}


def leaves(inp, keys=("x", "weight", "bias", "y", "s", "skip")):
    return {k: inp[k].detach().clone().requires_grad_() for k in keys}


def run_chain(layernorm_pool, modulate_layernorm, inp):
    """Both ops chained as in the GroupMamba layer (s a leaf here); returns outputs and all gradients."""
    p = leaves(inp)
    xn, pooled = layernorm_pool(p["x"], p["weight"], p["bias"], EPS)
    out = modulate_layernorm(p["y"], xn, p["s"], p["skip"], p["weight"], p["bias"], EPS)
    loss = ((xn.double() * inp["g_xn"].double()).sum() + (pooled.double() * inp["g_pooled"].double()).sum()
            + (out.double() * inp["g_out"].double()).sum())
    loss.backward()
    res = dict(xn=xn, pooled=pooled, out=out)
    res.update({"d" + k: v.grad for k, v in p.items()})
    return res


def hand64(inp):
    """The same chain in float64 by hand (inputs as given, upcast)."""
    d = {k: v.detach().double().cpu() for k, v in inp.items()}
    p = leaves(d)
    xn = ln64(p["x"], p["weight"], p["bias"])
    pooled = xn.mean(dim=1)
    out = ln64(p["y"] * p["skip"] * xn * p["s"][:, None, :], p["weight"], p["bias"])
    ((xn * d["g_xn"]).sum() + (pooled * d["g_pooled"]).sum() + (out * d["g_out"]).sum()).backward()
    res = dict(xn=xn, pooled=pooled, out=out)
    res.update({"d" + k: v.grad for k, v in p.items()})
    # size of the cancelling terms in d skip: sum_bc |s_bc * q_bc|, q = ds / skip
    res["skip_scale_terms"] = (d["s"] * p["s"].grad / d["skip"]).abs().sum().item()
    return res


def compare(res, ref, tol, tol_ln, what="", tol_skip=None):
    errs = {}
    for k in ("xn", "pooled", "out", "dx", "dy", "ds"):
        errs[k] = (rel_err(res[k], ref[k]), tol)
    for k in ("dweight", "dbias"):
        errs[k] = (rel_err(res[k], ref[k]), tol_ln)
    a = res["dskip"].detach().double().cpu()
    skip_err = float("inf") if not torch.isfinite(a).all() else \
        (a - ref["dskip"]).abs().item() / max(ref["skip_scale_terms"], 1e-30)
    errs["dskip"] = (skip_err, tol_skip if tol_skip is not None else tol / 10)
    bad = {k: e for k, (e, t) in errs.items() if not e <= t}
    assert not bad, f"{what}: errors over tolerance {bad} (all: { {k: e for k, (e, _) in errs.items()} })"
    for k in ("xn", "pooled", "out", "dx", "dy", "ds", "dweight", "dbias", "dskip"):
        assert res[k].shape == ref[k].shape, (k, res[k].shape, ref[k].shape)


def make_add_inputs(B, L, C, x_dtype=torch.float32, r_dtype=torch.float32, scale=True, device="cpu"):
    """Inputs of add_layernorm_pool: x (the stream), the residual branch, DropPath-like factors (0 or 2),
    LayerNorm parameters, and cotangents of y, xn, pooled and a bf16 copy."""
    g = torch.Generator().manual_seed(torch.seed())
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(x=r(B, L, C) * 2 + 0.5, res=r(B, L, C), weight=1 + 0.3 * r(C), bias=0.2 * r(C),
             g_y=r(B, L, C), g_xn=r(B, L, C), g_pooled=r(B, C), g_copy=r(B, L, C))
    dts = dict(x=x_dtype, res=r_dtype, g_y=torch.promote_types(x_dtype, r_dtype),
               g_xn=torch.promote_types(x_dtype, r_dtype), g_pooled=torch.promote_types(x_dtype, r_dtype),
               g_copy=torch.bfloat16)
    out = {k: v.to(dts.get(k, torch.float32)).to(device) for k, v in t.items()}
    out["scale"] = (2.0 * (torch.arange(B) % 2)).float().to(device) if scale else None
    return out


def run_add(fn, inp, copy=False):
    """fn = an add_layernorm_pool: its outputs and the gradients of x, the residual, weight and bias."""
    p = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "res", "weight", "bias")}
    out = fn(p["x"], p["res"], p["weight"], p["bias"], EPS, residual_scale=inp["scale"],
             copy_dtype=torch.bfloat16 if copy else None)
    names = ("y", "xn", "pooled", "copy")[:len(out)]
    torch.autograd.backward(list(out), [inp["g_" + n].to(o.dtype) for n, o in zip(names, out)])
    res = dict(zip(names, (o.detach() for o in out)))
    res.update({"d" + k: v.grad for k, v in p.items()})
    return res


def hand64_add(inp, copy=False):
    d = {k: (None if v is None else v.detach().double().cpu()) for k, v in inp.items()}
    p = {k: d[k].clone().requires_grad_() for k in ("x", "res", "weight", "bias")}
    r = p["res"] if d["scale"] is None else p["res"] * d["scale"][:, None, None]
    y = p["x"] + r
    xn = ln64(y, p["weight"], p["bias"])
    res = dict(y=y, xn=xn, pooled=xn.mean(dim=1))
    if copy:
        res["copy"] = xn
    sum((res[n] * d["g_" + n]).sum() for n in res).backward()
    res = {k: v.detach() for k, v in res.items()}
    res.update({"d" + k: v.grad for k, v in p.items()})
    return res


def compare_add(res, ref, tol, tol_ln, what):
    """As compare; a 16-bit result (the residual's gradient, the copy) to 1e-2 whatever tol."""
    low = (torch.bfloat16, torch.float16)
    errs = {k: (rel_err(res[k], ref[k]), 1e-2 if res[k].dtype in low else tol_ln if k in ("dweight", "dbias") else tol)
            for k in ref}
    bad = {k: e for k, (e, t) in errs.items() if not e <= t}
    assert not bad, f"{what}: errors over tolerance {bad} (all: { {k: e for k, (e, _) in errs.items()} })"
    for k in ref:
        assert res[k].shape == ref[k].shape, (what, k)


def check_add_dtypes(res, inp):
    assert res["y"].dtype == res["xn"].dtype == torch.promote_types(inp["x"].dtype, inp["res"].dtype)
    assert res["dx"].dtype == inp["x"].dtype and res["dres"].dtype == inp["res"].dtype
    if "copy" in res:
        assert res["copy"].dtype == torch.bfloat16


def out_dtype_pair(modulate_layernorm, inp, device="cpu"):
    """modulate_layernorm with the default (float32) result and with out_dtype=bfloat16, as the mixer calls
    it under autocast (y in bf16, xn in float32), with the same cotangent (bf16-representable values):
    returns (default results, bf16 results), each the output and the gradients of y, xn, s, skip, weight,
    bias."""
    y = inp["y"].to(torch.bfloat16)
    xn = inp["x"].float()
    g = inp["g_out"].to(torch.bfloat16)
    runs = []
    for out_dtype in (None, torch.bfloat16):
        ts = [t.detach().clone().to(device).requires_grad_() for t in (y, xn, inp["s"], inp["skip"],
                                                                        inp["weight"], inp["bias"])]
        out = modulate_layernorm(*ts, EPS, out_dtype=out_dtype)
        out.backward(g.to(device).to(out.dtype))
        runs.append([out.detach()] + [t.grad for t in ts])
    return runs


def within_bf16_rounding(low: torch.Tensor, ref: torch.Tensor) -> bool:
    """Every element of the bf16 tensor is a rounding of the float32 one: off by under one bf16 ulp
    (2^-7 relative to the element's binade; 2^-8 of |ref| covers rounding to nearest and truncation)."""
    low, ref = low.double().cpu(), ref.double().cpu()
    return bool(torch.isfinite(low).all()) and bool(((low - ref).abs() <= ref.abs() * 2.0 ** -7).all())


# How the fused and the cast path are compared:
#   "exact":       the CPU references: the same float32 operations in the same order, so bitwise equal.
#   "interpreter": the Triton interpreter runs the kernels' operations in the written order (bitwise
#                  equal sums), but its float32 -> bf16 conversion truncates where torch's cast rounds.
#   "compiled":    a GPU build. The extra bf16 operand can change the layout the compiler gives a kernel's
#                  tiles (bf16 loads vectorize 8 wide, float32 ones 4), and with it the order of the row
#                  and column sums: the results agree to float32 rounding, not bitwise (seen on an H200 at
#                  C = 96). The bf16 copy must still be exactly the kernel's own float32 result rounded.
GRAD_TOL_COMPILED = 1e-6


def check_out_dtype_pair(default, low, mode: str):
    """The bf16 result is the float32 result rounded; the gradients are the same (the kernel reads the
    bf16 cotangent as float32 either way)."""
    assert default[0].dtype == torch.float32 and low[0].dtype == torch.bfloat16
    if mode == "exact":
        assert torch.equal(low[0], default[0].to(torch.bfloat16))
    else:
        assert within_bf16_rounding(low[0], default[0])
    for i, (a, b) in enumerate(zip(default[1:], low[1:])):
        if mode == "compiled":
            assert rel_err(b, a) <= GRAD_TOL_COMPILED, (i, rel_err(b, a))
        else:
            assert torch.equal(a, b), i


def copy_pair(layernorm_pool, inp, device="cpu"):
    """layernorm_pool's bf16 copy of xn (copy_dtype, as the mixer uses it under autocast) against a torch
    cast of xn, with the same cotangents for xn, pooled and the copy: returns the two runs' outputs (xn,
    pooled, copy) and gradients (x, weight, bias)."""
    runs = []
    for fused_copy in (False, True):
        p = {k: inp[k].detach().clone().to(device).requires_grad_() for k in ("x", "weight", "bias")}
        if fused_copy:
            xn, pooled, xc = layernorm_pool(p["x"], p["weight"], p["bias"], EPS, copy_dtype=torch.bfloat16)
        else:
            xn, pooled = layernorm_pool(p["x"], p["weight"], p["bias"], EPS)
            xc = xn.to(torch.bfloat16)
        torch.autograd.backward([xn, pooled, xc], [inp["g_xn"].to(device), inp["g_pooled"].to(device),
                                                   inp["g_out"].to(device).to(torch.bfloat16)])
        runs.append([t.detach() for t in (xn, pooled, xc)] + [p[k].grad for k in ("x", "weight", "bias")])
    return runs


def check_copy_pair(cast, fused, mode: str):
    """The copy is the kernel's own xn rounded; xn, pooled and the gradients equal the cast path's (the
    kernel adds the copy's gradient in float32 first, as autograd did)."""
    assert fused[2].dtype == torch.bfloat16
    if mode == "interpreter":
        assert within_bf16_rounding(fused[2], fused[0])
    else:
        assert torch.equal(fused[2], fused[0].to(torch.bfloat16))
    for i in (0, 1, 3, 4, 5):
        if mode == "compiled":
            assert rel_err(fused[i], cast[i]) <= GRAD_TOL_COMPILED, (i, rel_err(fused[i], cast[i]))
        else:
            assert torch.equal(fused[i], cast[i]), i


# ------------------------------------------------------------------------------------------------
# CPU: references
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,L,C", [(2, 49, 64), (3, 1, 348), (2, 16, 20)])
def test_reference_float64_matches_hand(B, L, C):
    inp = make_inputs(B, L, C, dtype=torch.float64, s_dtype=torch.float64)
    res = run_chain(M.layernorm_pool_reference, M.modulate_layernorm_reference, inp)
    compare(res, hand64(inp), 1e-12, 1e-12, "reference float64")


@pytest.mark.parametrize("B,L,C", [(2, 49, 64), (2, 7, 348)])
def test_public_ops_on_cpu_use_reference_float32(B, L, C):
    inp = make_inputs(B, L, C)
    res = run_chain(M.layernorm_pool, M.modulate_layernorm, inp)
    compare(res, hand64(inp), 1e-5, 1e-4, "public ops on cpu, float32")
    assert res["xn"].dtype == res["out"].dtype == res["pooled"].dtype == torch.float32


def test_reference_keeps_activation_dtype():
    inp = make_inputs(2, 5, 8, dtype=torch.bfloat16)
    xn, pooled = M.layernorm_pool(inp["x"], inp["weight"], inp["bias"], EPS)
    out = M.modulate_layernorm(inp["y"], xn, inp["s"], inp["skip"], inp["weight"], inp["bias"], EPS)
    assert xn.dtype == pooled.dtype == out.dtype == torch.bfloat16


def test_reference_out_dtype_is_the_rounded_result():
    default, low = out_dtype_pair(M.modulate_layernorm, make_inputs(2, 7, 24))
    check_out_dtype_pair(default, low, "exact")


def test_reference_copy_is_the_cast():
    check_copy_pair(*copy_pair(M.layernorm_pool, make_inputs(2, 7, 24)), "exact")
    x, w, b = (make_inputs(2, 3, 8)[k] for k in ("x", "weight", "bias"))
    xn, _, xc = M.layernorm_pool(x, w, b, EPS, copy_dtype=torch.float32)   # the copy of a float32 xn is xn
    assert xc is xn


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("copy", [False, True])
def test_add_layernorm_pool_on_cpu(scale, copy):
    """The CPU path (residual_add, then layernorm_pool) vs float64, float32 stream and bf16 residual."""
    inp = make_add_inputs(2, 13, 24, r_dtype=torch.bfloat16, scale=scale)
    res = run_add(M.add_layernorm_pool, inp, copy)
    compare_add(res, hand64_add(inp, copy), 1e-5, 1e-4, f"cpu add_layernorm_pool scale={scale} copy={copy}")
    check_add_dtypes(res, inp)


def test_add_layernorm_pool_argument_errors():
    inp = make_add_inputs(2, 5, 8)
    x, r, w, b = (inp[n] for n in ("x", "res", "weight", "bias"))
    with pytest.raises(ValueError, match="add_layernorm_pool: residual has shape"):
        M.add_layernorm_pool(x, r[:, :3], w, b, EPS)
    with pytest.raises(ValueError, match=r"add_layernorm_pool: residual_scale must be \(2,\)"):
        M.add_layernorm_pool(x, r, w, b, EPS, residual_scale=torch.ones(3))
    with pytest.raises(ValueError, match=r"add_layernorm_pool: x must be \(B, L, C\)"):
        M.add_layernorm_pool(x[0], r[0], w, b, EPS)
    with pytest.raises(ValueError, match="add_layernorm_pool: weight must have shape"):
        M.add_layernorm_pool(x, r, w[:3], b, EPS)


def test_argument_errors():
    inp = make_inputs(2, 5, 8)
    x, w, b, y, s, k = (inp[n] for n in ("x", "weight", "bias", "y", "s", "skip"))
    xn, _ = M.layernorm_pool(x, w, b, EPS)
    with pytest.raises(ValueError, match=r"\(B, L, C\)"):
        M.layernorm_pool(x[0], w, b, EPS)
    with pytest.raises(ValueError, match="weight must have shape"):
        M.layernorm_pool(x, w[:4], b, EPS)
    with pytest.raises(TypeError, match="floating point"):
        M.layernorm_pool(x.long(), w, b, EPS)
    with pytest.raises(ValueError, match="L >= 1"):
        M.layernorm_pool(x[:, :0], w, b, EPS)
    with pytest.raises(ValueError, match="xn has shape"):
        M.modulate_layernorm(y, xn[:, :3], s, k, w, b, EPS)
    with pytest.raises(ValueError, match="s must have shape"):
        M.modulate_layernorm(y, xn, s[:1], k, w, b, EPS)
    with pytest.raises(ValueError, match="skip_scale must hold one element"):
        M.modulate_layernorm(y, xn, s, torch.ones(2), w, b, EPS)
    with pytest.raises(TypeError, match="must be a tensor"):
        M.modulate_layernorm(y, xn, s, 1.0, w, b, EPS)
    with pytest.raises(TypeError, match="copy_dtype must be a floating-point"):
        M.layernorm_pool(x, w, b, EPS, copy_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype must be a floating-point"):
        M.modulate_layernorm(y, xn, s, k, w, b, EPS, out_dtype=torch.int32)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on"):
            M.modulate_layernorm(y.cuda(), xn, s, k, w, b, EPS)


# ------------------------------------------------------------------------------------------------
# Triton interpreter on CPU (subprocess: TRITON_INTERPRET must be set before Triton is imported)
# ------------------------------------------------------------------------------------------------
INTERPRET_CASES = [((2, 49, 64), torch.float32), ((3, 1, 348), torch.float32), ((2, 13, 348), torch.float32),
                   ((2, 9, 20), torch.float32), ((2, 33, 128), torch.bfloat16), ((2, 10, 24), torch.float16)]


def _interpret_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for (B, L, C), dt in INTERPRET_CASES:
        inp = make_inputs(B, L, C, dtype=dt)
        res = run_chain(M.layernorm_pool_fused, M.modulate_layernorm_fused, inp)
        tol, tol_ln = (1e-5, 1e-4) if dt == torch.float32 else (1e-2, 1e-2)
        compare(res, hand64(inp), tol, tol_ln, f"interpreter {dt} {(B, L, C)}")
        assert res["out"].dtype == res["xn"].dtype == res["dx"].dtype == res["dy"].dtype == dt
    # non-contiguous inputs
    inp = make_inputs(2, 12, 24)
    inp["x"] = inp["x"].transpose(1, 2).contiguous().transpose(1, 2)
    inp["y"] = inp["y"][:, torch.arange(11, -1, -1)]
    inp["s"] = inp["s"].t().contiguous().t()
    compare(run_chain(M.layernorm_pool_fused, M.modulate_layernorm_fused, inp), hand64(inp), 1e-5, 1e-4,
            "interpreter non-contiguous")
    # the torch.library ops (the torch.compile path) run eagerly too
    from groupmamba.ops import triton_modulation as tm
    tm.CONFIG["eager_library_ops"] = True
    try:
        inp = make_inputs(2, 21, 348)
        compare(run_chain(M.layernorm_pool_fused, M.modulate_layernorm_fused, inp), hand64(inp), 1e-5, 1e-4,
                "interpreter torch.library ops")
    finally:
        tm.CONFIG["eager_library_ops"] = False
    # out_dtype and copy_dtype (the mixer's bf16 result and in_proj input under autocast), eagerly and
    # through the torch.library ops
    for library in (False, True):
        tm.CONFIG["eager_library_ops"] = library
        try:
            check_out_dtype_pair(*out_dtype_pair(M.modulate_layernorm_fused, make_inputs(2, 9, 40)),
                                 "interpreter")
            check_copy_pair(*copy_pair(M.layernorm_pool_fused, make_inputs(2, 11, 40)), "interpreter")
        finally:
            tm.CONFIG["eager_library_ops"] = False
    # small tiles: many tiles per batch, ragged last tile, partial sums over many programs
    saved = dict(tm.CONFIG)
    try:
        tm.CONFIG.update(fwd_elems=128, bwd_elems=64)
        inp = make_inputs(3, 29, 20)
        compare(run_chain(M.layernorm_pool_fused, M.modulate_layernorm_fused, inp), hand64(inp), 1e-5, 1e-4,
                "interpreter small tiles")
        inp = make_add_inputs(3, 29, 20, r_dtype=torch.bfloat16)
        compare_add(run_add(M.add_layernorm_pool_fused, inp, True), hand64_add(inp, True), 1e-5, 1e-4,
                    "interpreter add_layernorm_pool small tiles")
    finally:
        tm.CONFIG.update(saved)
    # add_layernorm_pool: float32 / bf16 residuals, with and without DropPath factors and the bf16 copy, a
    # bf16 stream (its sum rounded before the LayerNorm), and a gradient of y that nobody sends (None)
    for (B, L, C), x_dt, r_dt, scale, copy in [((2, 9, 40), torch.float32, torch.float32, False, False),
                                               ((3, 13, 348), torch.float32, torch.bfloat16, True, True),
                                               ((2, 5, 24), torch.bfloat16, torch.bfloat16, True, False)]:
        inp = make_add_inputs(B, L, C, x_dt, r_dt, scale)
        res = run_add(M.add_layernorm_pool_fused, inp, copy)
        tol = 1e-5 if x_dt == torch.float32 else 1e-2
        compare_add(res, hand64_add(inp, copy), tol, 1e-4 if x_dt == torch.float32 else 1e-2,
                    f"interpreter add_layernorm_pool {(B, L, C)} {x_dt} {r_dt} scale={scale} copy={copy}")
        check_add_dtypes(res, inp)
    inp = make_add_inputs(2, 7, 16)
    p = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "res", "weight", "bias")}
    y, xn, pooled = M.add_layernorm_pool_fused(p["x"], p["res"], p["weight"], p["bias"], EPS,
                                               residual_scale=inp["scale"])
    (xn * inp["g_xn"]).sum().backward()      # y unused: its gradient is None
    ref = hand64_add({**inp, "g_y": torch.zeros_like(inp["g_y"]), "g_pooled": torch.zeros_like(inp["g_pooled"])})
    assert rel_err(p["x"].grad, ref["dx"]) <= 1e-5 and rel_err(p["res"].grad, ref["dres"]) <= 1e-5
    print("interpreter checks passed:", len(INTERPRET_CASES) + 12)


def test_triton_interpreter_cpu():
    if not M.triton_available():
        pytest.skip(f"Triton not importable ({M._TRITON_ERROR})")
    run_triton_interpreter(__file__)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gpu_case(B, L, C, dt, s_dtype=torch.float32):
    inp = make_inputs(B, L, C, dtype=dt, s_dtype=s_dtype, device="cuda")
    poison_cuda_cache()
    res = run_chain(M.layernorm_pool, M.modulate_layernorm, inp)   # public ops: CUDA -> fused
    torch.cuda.synchronize()
    tol, tol_ln = (1e-5, 1e-4) if dt == torch.float32 else (1e-2, 1e-2)
    compare(res, hand64(inp), tol, tol_ln, f"gpu {dt} {(B, L, C)}")
    assert res["out"].dtype == res["xn"].dtype == res["pooled"].dtype == dt
    assert res["dx"].dtype == res["dy"].dtype == dt and res["ds"].dtype == s_dtype
    assert res["dweight"].dtype == res["dskip"].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("L,C", STAGES)
def test_gpu_stage_shapes(L, C, dt):
    _gpu_case(2, L, C, dt)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,L,C", ODD)
def test_gpu_odd_shapes(B, L, C, dt):
    _gpu_case(B, L, C, dt)


@pytest.mark.gpu
def test_gpu_s_in_activation_dtype():
    _gpu_case(2, 196, 348, torch.bfloat16, s_dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_uses_fused_path(monkeypatch):
    if not M.triton_available():
        pytest.skip("Triton not importable")
    calls = []
    for name in ("layernorm_pool_triton", "modulate_layernorm_triton"):
        orig = getattr(M._tm, name)
        monkeypatch.setattr(M._tm, name, lambda *a, _o=orig, _n=name: calls.append(_n) or _o(*a))
    inp = make_inputs(2, 49, 64, device="cuda")
    run_chain(M.layernorm_pool, M.modulate_layernorm, inp)
    assert calls == ["layernorm_pool_triton", "modulate_layernorm_triton"]
    monkeypatch.setenv("GROUPMAMBA_FORCE_REFERENCE", "1")
    run_chain(M.layernorm_pool, M.modulate_layernorm, inp)
    assert len(calls) == 2


@pytest.mark.gpu
def test_gpu_library_ops_eager(monkeypatch):
    """The torch.library triton_ops (what torch.compile traces) run eagerly as well."""
    monkeypatch.setitem(M._tm.CONFIG, "eager_library_ops", True)
    _gpu_case(2, 196, 348, torch.bfloat16)
    _gpu_case(2, 784, 128, torch.float32)


@pytest.mark.gpu
def test_gpu_non_contiguous():
    inp = make_inputs(2, 196, 348, device="cuda")
    inp["x"] = inp["x"].transpose(1, 2).contiguous().transpose(1, 2)
    inp["y"] = inp["y"].flip(1)
    inp["s"] = inp["s"].t().contiguous().t()
    poison_cuda_cache()
    compare(run_chain(M.layernorm_pool, M.modulate_layernorm, inp), hand64(inp), 1e-5, 1e-4, "gpu non-contiguous")


@pytest.mark.gpu
@pytest.mark.parametrize("L,C", [(3136, 96), (196, 348)])
@pytest.mark.parametrize("op", ["modulate_layernorm out_dtype", "layernorm_pool copy_dtype"])
def test_gpu_low_precision_results_are_the_rounded_ones(op, L, C):
    """The mixer's bf16 results under autocast are the rounded float32 ones; the gradients equal the cast
    path's to float32 rounding (see "compiled" above)."""
    inp = make_inputs(4, L, C)
    poison_cuda_cache()
    if op.startswith("modulate"):
        check_out_dtype_pair(*out_dtype_pair(M.modulate_layernorm, inp, device="cuda"), "compiled")
    else:
        check_copy_pair(*copy_pair(M.layernorm_pool, inp, device="cuda"), "compiled")


# GroupMamba-B's stages at 224x224 (L, C), as the model runs add_layernorm_pool under bf16 autocast
B_STAGES = [(3136, 96), (784, 192), (196, 424), (49, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("L,C", B_STAGES)
def test_gpu_add_layernorm_pool_model_dtypes(L, C):
    """float32 stream, bf16 residual (the FFN output), DropPath factors, the bf16 copy for in_proj."""
    inp = make_add_inputs(4, L, C, r_dtype=torch.bfloat16, device="cuda")
    poison_cuda_cache()
    res = run_add(M.add_layernorm_pool, inp, copy=True)
    compare_add(res, hand64_add(inp, copy=True), 1e-5, 1e-4, f"gpu add_layernorm_pool {(L, C)}")
    check_add_dtypes(res, inp)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,L,C", [(2, 196, 348), (3, 1, 87 * 4), (2, 37, 20)])
def test_gpu_add_layernorm_pool(B, L, C, dt):
    inp = make_add_inputs(B, L, C, dt, dt, scale=B > 2, device="cuda")
    poison_cuda_cache()
    res = run_add(M.add_layernorm_pool, inp)
    tol = 1e-5 if dt == torch.float32 else 1e-2
    compare_add(res, hand64_add(inp), tol, 1e-4 if dt == torch.float32 else 1e-2, f"gpu add_layernorm_pool {dt}")
    check_add_dtypes(res, inp)


@pytest.mark.gpu
def test_gpu_torch_compile():
    """The triton_ops trace through torch.compile (fullgraph, aot_eager: fake impls + autograd)."""
    inp = make_inputs(2, 49, 64, device="cuda")
    eager = run_chain(M.layernorm_pool, M.modulate_layernorm, inp)
    lp = torch.compile(M.layernorm_pool, backend="aot_eager", fullgraph=True)
    ml = torch.compile(M.modulate_layernorm, backend="aot_eager", fullgraph=True)
    comp = run_chain(lp, ml, inp)
    for k in ("xn", "pooled", "out", "dx", "dy", "ds", "dweight", "dbias", "dskip"):
        assert rel_err(comp[k], eager[k]) <= 1e-6, k


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpret_checks()
