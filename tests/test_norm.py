"""group_layer_norm: the grouped (optionally SiLU-gated) LayerNorm of the GroupMamba model.

* CPU (always): the torch reference vs a float64 hand computation, forward and every gradient
  (x, gate, weight, bias); output dtype rules; argument errors; the model's LayerNorm module equals
  nn.LayerNorm on CPU.
* Triton interpreter (always, when Triton is importable): the fused kernels on CPU tensors with
  TRITON_INTERPRET=1 in a subprocess (the variable must be set before Triton is imported).
* GPU (@pytest.mark.gpu): the fused kernels vs float64 at the model's shapes (block norms C = 64 .. 512,
  out_norm G = 4 with d = 16 .. 128 and the odd d = 87), fp32 / bf16 / fp16, outputs poisoned first.

Tolerances (relative Frobenius error vs float64, conftest.rel_err): float32 outputs and x / gate
gradients 1e-5, weight / bias gradients 1e-4 (sums over many rows); bf16 / fp16 inputs 1e-2.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import compare_outputs as compare, poison_cuda_cache, rel_err, run_triton_interpreter
from groupmamba.ops import norm as N

EPS = 1e-5
# (x shape, G, d, gated): block norms (G = 1) and the mixer's four out_norms (G = 4) of GroupMamba-T/S/B
MODEL_CASES = [((2, 3136, 64), 1, 64, False), ((2, 196, 348), 1, 348, False), ((2, 49, 512), 1, 512, False),
               ((2, 56, 56, 64), 4, 16, True), ((2, 28, 28, 128), 4, 32, True), ((2, 14, 14, 348), 4, 87, True),
               ((2, 7, 7, 448), 4, 112, True), ((2, 7, 7, 512), 4, 128, True)]
ODD_CASES = [((1, 1, 4), 4, 1, True), ((3, 5), 1, 5, False), ((7, 20), 2, 10, True), ((1, 1, 1000), 1, 1000, False)]


def make(shape, G, d, gated, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(torch.seed())
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w, b = 1 + 0.3 * r(G, d), 0.2 * r(G, d)
    if G == 1:
        w, b = w[0], b[0]
    t = dict(x=r(*shape) * 2 + 0.5, weight=w, bias=b, gate=r(*shape) * 1.5 if gated else None, g_out=r(*shape))
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    cast = dict(x=dtype, gate=dtype, g_out=dtype, weight=pdt, bias=pdt)
    return {k: (None if v is None else v.to(cast[k]).to(device)) for k, v in t.items()}


def run(fn, inp, out_dtype=None):
    leaves = {k: (None if inp[k] is None else inp[k].detach().clone().requires_grad_())
              for k in ("x", "weight", "bias", "gate")}
    out = fn(leaves["x"], leaves["weight"], leaves["bias"], EPS, gate=leaves["gate"], out_dtype=out_dtype)
    (out.double() * inp["g_out"].double()).sum().backward()
    res = dict(out=out)
    res.update({"d" + k: v.grad for k, v in leaves.items() if v is not None})
    return res


def hand64(inp):
    d = {k: (None if v is None else v.detach().double().cpu().requires_grad_()) for k, v in inp.items()}
    x, w, b, z = d["x"], d["weight"], d["bias"], d["gate"]
    G, dd = (1, w.numel()) if w.dim() == 1 else w.shape
    xs = x.reshape(*x.shape[:-1], G, dd)
    m = xs.mean(-1, keepdim=True)
    v = ((xs - m) ** 2).mean(-1, keepdim=True)
    out = ((xs - m) / torch.sqrt(v + EPS) * w.reshape(G, dd) + b.reshape(G, dd)).reshape(x.shape)
    if z is not None:
        out = out * z * torch.sigmoid(z)
    (out * d["g_out"]).sum().backward()
    res = dict(out=out, dx=x.grad, dweight=w.grad, dbias=b.grad)
    if z is not None:
        res["dgate"] = z.grad
    return res


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", MODEL_CASES[:2] + MODEL_CASES[3:5] + ODD_CASES, ids=str)
def test_reference_matches_hand(case):
    inp = make(*case, dtype=torch.float64)
    compare(run(N.group_layer_norm, inp), hand64(inp), 1e-12, 1e-12, f"reference float64 {case}")
    inp = make(*case)
    compare(run(N.group_layer_norm, inp), hand64(inp), 1e-5, 1e-4, f"reference float32 {case}")


def test_output_dtype_rules():
    inp = make((2, 5, 8), 4, 2, True, dtype=torch.bfloat16)
    out = N.group_layer_norm(inp["x"], inp["weight"], inp["bias"], EPS, gate=inp["gate"])
    assert out.dtype == torch.float32  # promote(bf16 x, fp32 weight), as F.layer_norm under autocast
    out = N.group_layer_norm(inp["x"], inp["weight"], inp["bias"], EPS, gate=inp["gate"], out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16


def test_model_layernorm_equals_nn_layernorm():
    from groupmamba.models.layers import LayerNorm
    ref, ours = torch.nn.LayerNorm(48, eps=1e-6), LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 10, 48)
    assert rel_err(ours(x), ref(x)) <= 1e-6
    ours.fused = False
    assert torch.equal(ours(x), ref(x))


def test_argument_errors():
    x, w, b = torch.randn(2, 3, 8), torch.ones(4, 2), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="last dim of x"):
        N.group_layer_norm(x[..., :6], w, b, EPS)
    with pytest.raises(ValueError, match="weight and bias"):
        N.group_layer_norm(x, w, b[:2], EPS)
    with pytest.raises(ValueError, match="gate has shape"):
        N.group_layer_norm(x, w, b, EPS, gate=x[:1])
    with pytest.raises(TypeError, match="floating point"):
        N.group_layer_norm(x.long(), w, b, EPS)
    with pytest.raises(TypeError, match="out_dtype"):
        N.group_layer_norm(x, w, b, EPS, out_dtype=torch.int32)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on"):
            N.group_layer_norm(x.cuda(), w, b, EPS)


# ------------------------------------------------------------------------------------------------
# Triton interpreter on CPU
# ------------------------------------------------------------------------------------------------
INTERPRET_CASES = [(((2, 9, 64), 1, 64, False), torch.float32), (((2, 3, 348), 1, 348, False), torch.float32),
                   (((2, 5, 5, 64), 4, 16, True), torch.float32), (((1, 3, 3, 348), 4, 87, True), torch.float32),
                   (((2, 7, 448), 4, 112, True), torch.bfloat16), (((7, 20), 2, 10, True), torch.float16),
                   (((3, 5), 1, 5, False), torch.float32)]


def _interpret_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for case, dt in INTERPRET_CASES:
        inp = make(*case, dtype=dt)
        tol, tol_wb = (1e-5, 1e-4) if dt == torch.float32 else (1e-2, 1e-2)
        res = run(N.group_layer_norm_fused, inp)
        compare(res, hand64(inp), tol, tol_wb, f"interpreter {dt} {case}")
        assert res["dx"].dtype == dt and res["dweight"].dtype == torch.float32
        out = N.group_layer_norm_fused(inp["x"], inp["weight"], inp["bias"], EPS, gate=inp["gate"],
                                       out_dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16 and rel_err(out, res["out"]) <= 1e-2
    from groupmamba.ops import triton_norm as tn
    saved = dict(tn.CONFIG)
    try:  # small tiles: many programs, a ragged last tile, weight partials over many programs
        tn.CONFIG.update(elems=64, bwd_elems=64)
        inp = make((3, 29, 40), 4, 10, True)
        compare(run(N.group_layer_norm_fused, inp), hand64(inp), 1e-5, 1e-4, "interpreter small tiles")
        tn.CONFIG.update(elems=None, bwd_elems=None, eager_library_ops=True)  # the torch.compile path, run eagerly
        inp = make((2, 6, 348), 4, 87, True)
        compare(run(N.group_layer_norm_fused, inp), hand64(inp), 1e-5, 1e-4, "interpreter torch.library ops")
        inp = make((2, 6, 64), 1, 64, False)
        compare(run(N.group_layer_norm_fused, inp), hand64(inp), 1e-5, 1e-4, "interpreter torch.library, no gate")
    finally:
        tn.CONFIG.clear()
        tn.CONFIG.update(saved)
    # non-contiguous input
    inp = make((4, 6, 16), 4, 4, True)
    inp["x"] = inp["x"].transpose(0, 1).contiguous().transpose(0, 1)
    compare(run(N.group_layer_norm_fused, inp), hand64(inp), 1e-5, 1e-4, "interpreter non-contiguous")
    print("interpreter checks passed")


def test_triton_interpreter_cpu():
    if N._tn is None:
        pytest.skip(f"Triton not importable ({N._TRITON_ERROR})")
    run_triton_interpreter(__file__)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", MODEL_CASES + ODD_CASES, ids=str)
def test_gpu_fused_vs_float64(case, dt):
    inp = make(*case, dtype=dt, device="cuda")
    poison_cuda_cache()
    called = []
    orig = N._tn.group_layer_norm_triton
    N._tn.group_layer_norm_triton = lambda *a: called.append(1) or orig(*a)
    try:
        res = run(N.group_layer_norm, inp)
    finally:
        N._tn.group_layer_norm_triton = orig
    assert called, "the CUDA call did not take the fused path"
    tol, tol_wb = (1e-5, 1e-4) if dt == torch.float32 else (1e-2, 1e-2)
    compare(res, hand64(inp), tol, tol_wb, f"gpu {dt} {case}")
    assert res["dx"].dtype == dt


@pytest.mark.gpu
def test_gpu_out_dtype_and_inference_mode():
    inp = make((2, 14, 14, 348), 4, 87, True, dtype=torch.bfloat16, device="cuda")
    ref = N.group_layer_norm_reference(inp["x"], inp["weight"], inp["bias"], EPS, inp["gate"], torch.bfloat16)
    with torch.inference_mode():
        out = N.group_layer_norm(inp["x"], inp["weight"], inp["bias"], EPS, gate=inp["gate"],
                                 out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
def test_gpu_torch_compile():
    inp = make((2, 7, 7, 448), 4, 112, True, device="cuda")
    eager = run(N.group_layer_norm, inp)
    comp = run(torch.compile(N.group_layer_norm, backend="aot_eager", fullgraph=True), inp)
    for k in eager:
        assert rel_err(comp[k], eager[k]) <= 1e-6, k


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpret_checks()
