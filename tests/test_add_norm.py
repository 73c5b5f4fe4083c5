"""add_layer_norm: a block's residual add and the LayerNorm after it, (s = x + residual [* scale], LN(s)).

* CPU (always): the torch reference vs a float64 hand computation, forward and every gradient (x, residual,
  weight, bias, with cotangents for both s and the LayerNorm's output); argument errors; the model's block
  on this op equals the plain formula x + drop_path(r), norm2(x) under stochastic depth (same random draws).
* Triton interpreter (always, when Triton is importable): the fused kernels on CPU tensors, subprocess.
* GPU (@pytest.mark.gpu): the fused kernels vs float64 at the model's norm2 shapes, outputs poisoned first.

Tolerances (relative Frobenius error vs float64): float32 results 1e-5 (weight / bias gradients, sums over
many rows, 1e-4); anything stored in bf16 (the residual's gradient when the residual is bf16), and every
gradient when the LayerNorm's output is bf16 (its cotangent then arrives in bf16), 1e-2.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import poison_cuda_cache, rel_err, run_triton_interpreter
from groupmamba.ops import norm as N

EPS = 1e-6
KEYS = ("x", "residual", "weight", "bias")
GRADS_OF_BF16_OUT = ("dx", "dresidual", "dweight", "dbias")   # the cotangent of a bf16 output is bf16


def make(shape, G, d, x_dtype=torch.float32, r_dtype=torch.float32, scale=False, device="cpu"):
    g = torch.Generator().manual_seed(torch.seed())
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w, b = 1 + 0.3 * r(G, d), 0.2 * r(G, d)
    if G == 1:
        w, b = w[0], b[0]
    sc = None
    if scale:   # stochastic depth: some samples dropped (0), the others scaled by 1 / keep
        sc = (torch.rand(shape[0], generator=g, dtype=torch.float64) > 0.3).double() / 0.7
        sc[0] = 0.0
    t = dict(x=r(*shape) * 2 + 0.5, residual=r(*shape), weight=w, bias=b, scale=sc, g_s=r(*shape), g_out=r(*shape))
    cast = dict(x=x_dtype, residual=r_dtype, weight=torch.float32, bias=torch.float32, scale=torch.float32,
                g_s=x_dtype, g_out=torch.float32)
    return {k: (None if v is None else v.to(cast[k]).to(device)) for k, v in t.items()}


def run(fn, inp, out_dtype=None):
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in KEYS}
    s, out = fn(leaves["x"], leaves["residual"], leaves["weight"], leaves["bias"], EPS,
                residual_scale=inp["scale"], out_dtype=out_dtype)
    ((s.double() * inp["g_s"].double()).sum() + (out.double() * inp["g_out"].double()).sum()).backward()
    res = dict(s=s, out=out)
    res.update({"d" + k: v.grad for k, v in leaves.items()})
    return res


def hand64(inp):
    d = {k: inp[k].detach().double().cpu().requires_grad_() for k in KEYS}
    x, r, w, b = d["x"], d["residual"], d["weight"], d["bias"]
    if inp["scale"] is not None:
        r = r * inp["scale"].double().cpu().view(-1, *([1] * (r.dim() - 1)))
    s = x + r
    G, dd = (1, w.numel()) if w.dim() == 1 else w.shape
    ss = s.reshape(*s.shape[:-1], G, dd)
    m = ss.mean(-1, keepdim=True)
    v = ((ss - m) ** 2).mean(-1, keepdim=True)
    out = ((ss - m) / torch.sqrt(v + EPS) * w.reshape(G, dd) + b.reshape(G, dd)).reshape(s.shape)
    ((s * inp["g_s"].double().cpu()).sum() + (out * inp["g_out"].double().cpu()).sum()).backward()
    res = dict(s=s, out=out)
    res.update({"d" + k: v.grad for k, v in d.items()})
    return res


def compare(res, ref, what, low=()):
    """Every result within its tolerance of float64 (module docstring); names in `low` are bf16-stored."""
    for k, v in ref.items():
        tol = 1e-2 if k in low or res[k].dtype in (torch.bfloat16, torch.float16) else (
            1e-4 if k in ("dweight", "dbias") else 1e-5)
        err = rel_err(res[k], v)
        assert err <= tol, f"{what}: {k} rel err {err:.3g} > {tol}"


CASES = [((2, 9, 64), 1, 64), ((3, 4, 5, 348), 1, 348), ((2, 7, 40), 4, 10), ((3, 5), 1, 5)]


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_hand(case, scale):
    inp = make(*case, scale=scale)
    compare(run(N.add_layer_norm, inp), hand64(inp), f"reference {case} scale={scale}")


def test_reference_dtypes():
    inp = make((2, 6, 16), 1, 16, r_dtype=torch.bfloat16)
    res = run(N.add_layer_norm, inp)
    assert res["s"].dtype == torch.float32 and res["out"].dtype == torch.float32
    assert res["dresidual"].dtype == torch.bfloat16 and res["dx"].dtype == torch.float32
    s, out = N.add_layer_norm(inp["x"], inp["residual"], inp["weight"], inp["bias"], EPS, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_argument_errors():
    x, w, b = torch.randn(2, 3, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="residual has shape"):
        N.add_layer_norm(x, torch.randn(2, 3, 4), w, b, EPS)
    with pytest.raises(ValueError, match="residual_scale must be"):
        N.add_layer_norm(x, torch.randn(2, 3, 8), w, b, EPS, residual_scale=torch.ones(3))
    with pytest.raises(TypeError, match="residual must be floating point"):
        N.add_layer_norm(x, torch.ones(2, 3, 8, dtype=torch.int64), w, b, EPS)
    with pytest.raises(ValueError, match="the last dim of x"):
        N.add_layer_norm(x, x, torch.ones(4), torch.zeros(4), EPS)


def test_block_equals_plain_formula_under_stochastic_depth():
    """GroupMambaBlock runs its first residual add and norm2 through add_layer_norm; with stochastic depth on
    (training, drop_path > 0) it must draw the same per-sample factors as timm's DropPath and give what
    x + drop_path(attn(x)), norm2(x) give."""
    from functools import partial

    import groupmamba.models.groupmamba as gm
    from groupmamba.models.layers import LayerNorm
    torch.manual_seed(0)
    blk = gm.GroupMambaBlock(32, 2.0, drop_path=0.5, norm_layer=partial(LayerNorm, eps=1e-6)).train()
    x = torch.randn(8, 16, 32)
    calls = []
    orig = gm.add_layer_norm
    gm.add_layer_norm = lambda *a, **k: calls.append(k["residual_scale"]) or orig(*a, **k)
    try:
        torch.manual_seed(1)
        got = blk(x, 4, 4)
    finally:
        gm.add_layer_norm = orig
    assert len(calls) == 1 and calls[0] is not None and (calls[0] == 0).any() and (calls[0] == 2).any()

    def plain(x):
        r = blk.attn(x, 4, 4)
        x = x + blk.drop_path(r)
        return x + blk.drop_path(blk.mlp(blk.norm2(x), 4, 4))
    torch.manual_seed(1)
    want = plain(x)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    blk.eval()
    assert torch.allclose(blk(x, 4, 4), plain(x), rtol=1e-6, atol=1e-6)


def test_stage_chain_equals_blocks_one_by_one():
    """A stage runs its blocks as a chain (each block's second residual add is done by the next block's mixer,
    in add_layernorm_pool, and the last one by residual_add); in training with stochastic depth it must give
    what the blocks give called one by one, with the same DropPath draws."""
    import groupmamba.models.mixer as mixer
    from groupmamba.models.groupmamba import GroupMamba
    torch.manual_seed(0)
    model = GroupMamba(stem_hidden_dim=8, embed_dims=(16, 32, 48, 64), mlp_ratios=(2, 2, 2, 2), depths=(3, 1, 1, 1),
                       drop_path_rate=0.5).train()
    img = torch.randn(4, 3, 32, 32)
    calls = []
    orig = mixer.add_layernorm_pool
    mixer.add_layernorm_pool = lambda *a, **k: calls.append(a[3]) or orig(*a, **k)
    try:
        torch.manual_seed(1)
        got, H, W = model._stage(0, img)
    finally:
        mixer.add_layernorm_pool = orig
    assert len(calls) == 2      # blocks 1 and 2 take the pending add of blocks 0 and 1
    torch.manual_seed(1)
    x, H, W = model.patch_embed1(img)
    for blk in model.block1:
        x = blk(x, H, W)
    want = model.norm1(x)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Triton interpreter on CPU
# ------------------------------------------------------------------------------------------------
def _interpret_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for case in CASES:
        for r_dtype in (torch.float32, torch.bfloat16):
            for scale in (False, True):
                inp = make(*case, r_dtype=r_dtype, scale=scale)
                low = ("dresidual",) if r_dtype == torch.bfloat16 else ()
                compare(run(N.add_layer_norm_fused, inp), hand64(inp), f"interpreter {case} {r_dtype} {scale}", low)
    inp = make((2, 9, 64), 1, 64, r_dtype=torch.bfloat16, scale=True)   # the model's: bf16 output for fc1
    res = run(N.add_layer_norm_fused, inp, out_dtype=torch.bfloat16)
    assert res["out"].dtype == torch.bfloat16
    compare(res, hand64(inp), "interpreter bf16 out", GRADS_OF_BF16_OUT)
    from groupmamba.ops import triton_norm as tn
    saved = dict(tn.CONFIG)
    try:  # small tiles: many programs, a ragged last tile, rows of a sample split across programs
        tn.CONFIG.update(elems=64, bwd_elems=64)
        inp = make((3, 29, 40), 1, 40, scale=True)
        compare(run(N.add_layer_norm_fused, inp), hand64(inp), "interpreter small tiles")
    finally:
        tn.CONFIG.clear()
        tn.CONFIG.update(saved)
    print("interpreter checks passed")


@pytest.mark.skipif(N._tn is None, reason=f"Triton not importable ({N._TRITON_ERROR})")
def test_triton_interpreter_cpu():
    run_triton_interpreter(__file__)


# GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("case", [((4, 3136, 96), 1, 96), ((4, 196, 424), 1, 424), ((4, 49, 512), 1, 512),
                                  ((3, 5, 20), 1, 20)], ids=str)
def test_gpu_fused_vs_float64(case, scale):
    inp = make(*case, r_dtype=torch.bfloat16, scale=scale, device="cuda")
    poison_cuda_cache()
    called = []
    orig = N._tn.add_layer_norm_triton
    N._tn.add_layer_norm_triton = lambda *a: called.append(1) or orig(*a)
    try:
        res = run(N.add_layer_norm, inp, out_dtype=torch.bfloat16)
    finally:
        N._tn.add_layer_norm_triton = orig
    assert called, "the CUDA call did not take the fused path"
    compare(res, hand64(inp), f"gpu {case} scale={scale}", GRADS_OF_BF16_OUT)


@pytest.mark.gpu
def test_gpu_float32_residual():
    inp = make((2, 784, 192), 1, 192, scale=True, device="cuda")
    poison_cuda_cache()
    compare(run(N.add_layer_norm, inp), hand64(inp), "gpu float32")


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpret_checks()
