"""residual_add: a block's residual add, x + residual [* residual_scale per sample].

* CPU (always): the reference vs a float64 hand computation, forward and gradients; argument errors.
* Triton interpreter (always, when Triton is importable; subprocess with TRITON_INTERPRET=1): the kernel
  and its backward vs the float64 hand computation, with and without the per-sample scale, with element
  counts that are and are not multiples of the block and of 16, float32 and bfloat16 branches.
* sm_90 compile: the kernel loads and stores 16 bytes at a time for a float32 stream + bfloat16 branch.
* GPU (@pytest.mark.gpu): the public op on CUDA vs float64, outputs poisoned first, float32 / bfloat16 /
  float16 branches.

Tolerances (relative Frobenius error vs float64): the sum is one float32 add of the operands as given
(the branch's value is exact in float32), so 1e-6 for a float32 result; the branch's gradient in bf16 /
fp16 is the float32 gradient rounded once, 1e-2.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import compare_outputs as compare, poison_cuda_cache, run_triton_interpreter
from groupmamba.ops import residual as R


def make(shape, r_dtype=torch.float32, scale=False, device="cpu"):
    g = torch.Generator().manual_seed(torch.seed())
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    r = torch.randn(*shape, generator=g, dtype=torch.float64).to(r_dtype)
    s = (torch.rand(shape[0], generator=g, dtype=torch.float64) > 0.3).double() * 1.25 if scale else None
    go = torch.randn(*shape, generator=g, dtype=torch.float64)
    return dict(x=x.float().to(device), r=r.to(device), s=None if s is None else s.float().to(device),
                g=go.to(device))


def run(fn, inp):
    x = inp["x"].detach().clone().requires_grad_()
    r = inp["r"].detach().clone().requires_grad_()
    out = fn(x, r, inp["s"])
    (out.double() * inp["g"].double()).sum().backward()
    return dict(out=out, dx=x.grad, dr=r.grad)


def hand64(inp):
    x, r, g = inp["x"].double().cpu(), inp["r"].double().cpu(), inp["g"].double().cpu()
    s = None if inp["s"] is None else inp["s"].double().cpu().view(-1, *([1] * (x.dim() - 1)))
    out = x + (r if s is None else r * s)
    return dict(out=out, dx=g, dr=g if s is None else g * s)


SHAPES = [(2, 7, 5), (3, 4096), (2, 33, 16), (1, 1)]


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_hand(shape, scale):
    inp = make(shape, scale=scale)
    res = run(R.residual_add_reference, {**inp, "x": inp["x"].double(), "r": inp["r"].double(),
                                         "s": None if inp["s"] is None else inp["s"].double()})
    compare(res, hand64(inp), 1e-12, 1e-12, f"reference {shape} {scale}")


def test_public_op_on_cpu_is_the_reference():
    inp = make((2, 5, 8), torch.bfloat16, scale=True)
    out = R.residual_add(inp["x"], inp["r"], inp["s"])
    assert out.dtype == torch.float32
    assert torch.equal(out, R.residual_add_reference(inp["x"], inp["r"], inp["s"]))


def test_argument_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="residual has shape"):
        R.residual_add(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one factor per sample"):
        R.residual_add(x, torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(TypeError, match="residual must be floating point"):
        R.residual_add(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="residual must be a tensor"):
        R.residual_add(x, 1.0)


def check_fused(fn, inp, what):
    """out and dx within 1e-6 of float64 (one float32 add), dr within its dtype's rounding; dtypes."""
    res, ref = run(fn, inp), hand64(inp)
    r_dtype = inp["r"].dtype
    compare({k: res[k] for k in ("out", "dx")}, {k: ref[k] for k in ("out", "dx")}, 1e-6, 1e-6, what)
    compare({"dr": res["dr"]}, {"dr": ref["dr"]}, 1e-6 if r_dtype == torch.float32 else 1e-2, 0, what + " dr")
    assert res["out"].dtype == torch.float32 and res["dr"].dtype == r_dtype, what
    return res


def _interpret_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for shape in SHAPES + [(2, R.BLOCK + 3)]:
        for r_dtype in (torch.float32, torch.bfloat16):
            for scale in (False, True):
                inp = make(shape, r_dtype, scale)
                res = check_fused(R.residual_add_fused, inp, f"interpreter {shape} {r_dtype} {scale}")
                # no FMA contraction in the interpreter: the same float32 operations as torch's
                assert torch.equal(res["out"], R.residual_add_reference(inp["x"], inp["r"].float(), inp["s"]))
    print("interpreter checks passed")


def test_triton_interpreter_cpu():
    if R.triton is None:
        pytest.skip(f"Triton not importable ({R._TRITON_ERROR})")
    run_triton_interpreter(__file__)


def test_kernel_loads_16_bytes_on_sm90():
    if R.triton is None:
        pytest.skip(f"Triton not importable ({R._TRITON_ERROR})")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from test_triton_compile import global_access_widths
    kernel = R._residual_add_kernel
    sig = {"X": "*fp32", "R": "*bf16", "SCALE": "*fp32", "OUT": "*fp32", "N": "i32", "PER_SAMPLE": "i32",
           "HAS_SCALE": "constexpr", "BLOCK": "constexpr"}
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in ("X", "R", "SCALE", "OUT", "N")}
    consts = {(kernel.arg_names.index("HAS_SCALE"),): False, (kernel.arg_names.index("BLOCK"),): R.BLOCK}
    compiled = R.triton.compile(ASTSource(fn=kernel, signature=sig, attrs=attrs, constexprs=consts),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert global_access_widths(compiled) == {".128"}


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(128, 196, 424), (2, 3136, 96), (3, 5, 7)], ids=str)
def test_gpu_vs_float64(shape, r_dtype, scale, monkeypatch):
    def no_reference(*a):
        raise AssertionError("residual_add took the reference path on CUDA")
    monkeypatch.setattr(R, "residual_add_reference", no_reference)
    inp = make(shape, r_dtype, scale, device="cuda")
    poison_cuda_cache()
    check_fused(R.residual_add, inp, f"gpu {shape} {r_dtype} {scale}")


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpret_checks()
