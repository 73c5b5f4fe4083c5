"""ops.batchnorm.bn_relu and triton_batchnorm.batch_norm_relu: relu(BatchNorm2d(x)) with running statistics.

* CPU (always): bn_relu on CPU is relu(bn(x)) exactly (values, gradients, running statistics); bad input
  is rejected with a message naming it.
* Triton interpreter (always, when Triton is importable), in a subprocess with TRITON_INTERPRET=1:
  batch_norm_relu vs float64 F.batch_norm + relu, training (output, the three gradients, the running mean
  and variance after the update) and eval; channel counts that are not powers of two, row counts that
  are not multiples of the tiles, several summing programs, fp32 and bf16, and inputs whose mean is 100x
  their spread (the shifted sums must not cancel).
* GPU (@pytest.mark.gpu): the same at the stem's shape (B=128 at 112x112, 32 channels) with outputs
  poisoned first, and the Stem module fused and unfused in fp32 against float64 (values, gradients,
  running statistics, num_batches_tracked).

Tolerances (relative Frobenius error vs float64 on the same rounded inputs, the incoming gradient rounded
to the output's dtype as autograd delivers it): fp32 1e-5 for everything; bf16 inputs: output and dx
1e-2 (rounded to bf16 once), weight / bias gradients and running statistics 1e-4 (fp32 sums of bf16
values).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import compare_outputs as compare
from conftest import poison_cuda_cache, rel_err, run_triton_interpreter
from groupmamba.ops.batchnorm import bn_relu

try:
    from groupmamba.ops import triton_batchnorm as TB
    _TRITON_ERROR = None
except Exception as e:  # noqa: BLE001
    TB, _TRITON_ERROR = None, f"{type(e).__name__}: {e}"

MOMENTUM, EPS = 0.1, 1e-5


def make(B, C, H, W, dtype=torch.float32, device="cpu", offset=0.0):
    g = torch.Generator().manual_seed(torch.seed())
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = (r(B, C, H, W) * 2 + offset).to(dtype).to(device).contiguous(memory_format=torch.channels_last)
    return dict(x=x, weight=(1 + 0.3 * r(C)).float().to(device), bias=(0.2 * r(C)).float().to(device),
                running_mean=r(C).float().to(device), running_var=(1 + r(C).abs()).float().to(device),
                g=r(B, C, H, W).to(device))


def run(fn, inp, training):
    """fn(x, weight, bias, running_mean, running_var, training) -> dict of out, grads and running stats."""
    x, w, b = (inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias"))
    rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()
    out = fn(x, w, b, rm, rv, training)
    (out.double() * inp["g"].double()).sum().backward()
    res = dict(out=out, dx=x.grad, dweight=w.grad, dbias=b.grad)
    if training:
        res.update(running_mean=rm, running_var=rv)
    return res


def ref64(inp, training, mask=None):
    """float64 F.batch_norm + ReLU; ``mask`` (the fused output > 0): take the ReLU's decision from it. Elements
    whose pre-activation is within rounding of 0 can go either way in fp32, and each such flip moves a
    gradient by a whole |g| (at 1.6M rows a few flips cost ~1e-4 of dx and dbias); everywhere else the
    output comparison checks the mask (a wrong 0 or a wrong positive value shows in out)."""
    def fn(x, w, b, rm, rv, tr):
        y = F.batch_norm(x, rm, rv, w, b, tr, MOMENTUM, EPS)
        return F.relu(y) if mask is None else y * mask
    rounded = dict(inp, g=inp["g"].to(inp["x"].dtype))   # the fused op receives the gradient of its bf16 output
    return run(fn, {k: v.double().cpu() for k, v in rounded.items()}, training)


def fused(x, w, b, rm, rv, training):
    return TB.batch_norm_relu(x, w, b, rm, rv, training, MOMENTUM, EPS)


def check(inp, training, what, fp32_tol=1e-5):
    """fp32_tol: the float32 tolerance of out, dx, dweight and dbias (a large mean needs more, see
    INTERPRET_CASES)."""
    res = run(fused, inp, training)
    ref = ref64(inp, training, mask=(res["out"] > 0).double().cpu())
    bf16 = inp["x"].dtype == torch.bfloat16
    assert res["out"].dtype == inp["x"].dtype and res["out"].is_contiguous(memory_format=torch.channels_last)
    # compare() uses the second tolerance for dweight / dbias; running stats go through rel_err below
    stats = {k: ref.pop(k) for k in ("running_mean", "running_var") if k in ref}
    compare(res, ref, 1e-2 if bf16 else fp32_tol, 1e-4 if bf16 else fp32_tol, what)
    for k, v in stats.items():
        e = rel_err(res[k], v)
        assert e <= (1e-4 if bf16 else 1e-5), (what, k, e)


def test_cpu_bn_relu_is_torch():
    bn = nn.BatchNorm2d(6).train()
    bn2 = nn.BatchNorm2d(6).train()
    bn2.load_state_dict(bn.state_dict())
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = bn_relu(bn, a), F.relu(bn2(b))
    (ya * ya).sum().backward()
    (yb * yb).sum().backward()
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, bn2.state_dict()[k]), k


def test_batch_norm_relu_rejects_bad_input():
    if TB is None:
        pytest.skip(f"Triton not importable ({_TRITON_ERROR})")
    w, b, rm, rv = torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="channels_last"):
        TB.batch_norm_relu(torch.zeros(2, 4, 3, 3), w, b, rm, rv, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="empty"):
        TB.batch_norm_relu(torch.zeros(0, 4, 3, 3).contiguous(memory_format=torch.channels_last), w, b, rm, rv,
                           False, 0.1, 1e-5)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        TB.batch_norm_relu(torch.zeros(1, 4, 2, 2).contiguous(memory_format=torch.channels_last), w, b, None, None,
                           False, 0.1, 1e-5)
    with pytest.raises(ValueError, match="more than one value per channel"):
        TB.batch_norm_relu(torch.zeros(1, 4, 1, 1).contiguous(memory_format=torch.channels_last), w, b, rm, rv,
                           True, 0.1, 1e-5)


# (B, C, H, W, dtype, mean offset): odd channel counts, ragged rows, bf16, a large mean. At mean 200 and spread 2,
# each float32 step on x - mean rounds by up to ulp(200) / 2 = 7.6e-6 of the spread, so out's relative error
# reaches 1e-5 on some draws (1.04e-5 seen in CI): its tolerance is 4e-5 there, still far under what a
# variance by E[x^2] - E[x]^2 would give (about 200^2 / 2^2 x 6e-8 = 6e-4).
INTERPRET_CASES = [(2, 5, 7, 9, torch.float32, 0.0), (3, 32, 6, 6, torch.bfloat16, 0.0),
                   (2, 3, 11, 5, torch.float32, 200.0), (1, 16, 3, 1, torch.float32, 0.0)]


def _interpret_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    saved = dict(TB.CONFIG)
    TB.CONFIG.update(block_r=16, programs=4, apply_block_r=32)   # several programs and loop steps
    for B, C, H, W, dt, offset in INTERPRET_CASES:
        for training in (True, False):
            check(make(B, C, H, W, dt, offset=offset), training, f"interpreter {B}x{C}x{H}x{W} {dt} {training}",
                  fp32_tol=4e-5 if offset > 100 else 1e-5)
    TB.CONFIG.update(saved)
    print("interpreter checks passed")


def test_triton_interpreter_cpu():
    if TB is None:
        pytest.skip(f"Triton not importable ({_TRITON_ERROR})")
    run_triton_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(128, 32, 112, 112), (3, 5, 7, 9)], ids=str)
def test_gpu_batch_norm_relu_vs_float64(shape, dt, training):
    inp = make(*shape, dtype=dt, device="cuda", offset=3.0)
    poison_cuda_cache()
    check(inp, training, f"gpu {shape} {dt} {training}")


@pytest.mark.gpu
def test_gpu_stem_fused_as_accurate_as_torch(monkeypatch):
    """The Stem with the fused BatchNorm + ReLU and with torch's, both in fp32, against torch's in float64 after
    two training steps (the running statistics updated twice): output, every gradient and every buffer within
    2x torch's own fp32 error (or 1e-5). Through three BatchNorms the first conv's weight gradient cancels
    heavily (BatchNorm makes the loss invariant to that weight's scale), so fp32 differs from float64 by
    ~1e-3 there whichever implementation runs; a fixed bound would either fail torch or miss bugs."""
    from groupmamba.models.layers import Stem
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # fp32 convolutions, not TF32
    torch.manual_seed(0)
    ref = Stem(3, 32, 64).cuda().double().train()
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.float64)
    results = {}
    for name, fused, dtype in (("fused", True, torch.float32), ("torch", False, torch.float32),
                               ("float64", False, torch.float64)):
        m = Stem(3, 32, 64).cuda().to(dtype).train()
        m.load_state_dict(ref.state_dict())
        m.fused = fused
        for _ in range(2):
            m.zero_grad()
            y, H, W = m(x.to(dtype))
            (y * y).sum().backward()
        results[name] = dict(out=y, **{"grad " + n: p.grad for n, p in m.named_parameters()},
                             **{k: v for k, v in m.state_dict().items() if v.is_floating_point()})
        assert m.state_dict()["conv.1.num_batches_tracked"].item() == 2
    exact = results["float64"]
    for k, v in exact.items():
        e_fused, e_torch = rel_err(results["fused"][k], v), rel_err(results["torch"][k], v)
        assert e_fused <= max(2 * e_torch, 1e-5), (k, e_fused, e_torch)


if __name__ == "__main__" and "--interpret" in sys.argv:
    _interpret_checks()
