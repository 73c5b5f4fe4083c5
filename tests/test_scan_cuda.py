"""CUDA grouped scan (csrc/cuda/scan_cuda.cu) against the float64 reference on CPU.

Every test is @pytest.mark.gpu (skipped without CUDA). Unwritten outputs are caught by poisoning the
CUDA caching allocator: before each call we allocate large and small tensors filled with NaN and free
them, so the op's outputs (y, states, du, parameter grads and workspaces) are carved out of NaN-filled
memory; any element the kernels fail to write stays NaN and rel_err() returns inf.
"""
import math

import pytest
import torch

import groupmamba  # noqa: F401
from groupmamba import _native
from groupmamba.ops import grouped_scan, grouped_scan_reference
from conftest import float32_scan_tol, random_scan_inputs, rel_err

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NAMES = ["u", "x_proj_weight", "dt_proj_weight", "dt_bias", "A_log", "D"]

# GroupMamba-T/S/B stage shapes (H=W, C); d = C/4, R = ceil(d/16), N = 1.
STAGES = {
    "T1": (56, 64), "T2": (28, 128), "T3": (14, 348), "T4": (7, 448),
    "S1": (56, 64), "S2": (28, 128), "S3": (14, 348), "S4": (7, 512),
    "B1": (56, 96), "B2": (28, 192), "B3": (14, 424), "B4": (7, 512),
}
UNIQUE_STAGES = ["T1", "T2", "T3", "T4", "S4", "B1", "B2", "B3"]  # S1..S3, B4 repeat shapes above


def poison_allocator():
    """Fill the caching allocator's free memory with NaN (large pool and small pool)."""
    big = [torch.full((64 << 20,), float("nan"), device=DEV)]  # 256 MB, large pool
    small = [torch.full((128 << 10,), float("nan"), device=DEV) for _ in range(64)]  # 512 KB each, small pool
    del big, small


def _ref_and_cuda(B, H, W, d, N=1, dtype=torch.float32, chunk=None, seed=None, inputs=None, dy_scale=1.0):
    inputs = inputs or random_scan_inputs(B, H, W, d, N=N, dtype=torch.float64, seed=seed)
    u64 = inputs[0].to(dtype).double()
    params64 = [p.float().double() for p in inputs[1:]]  # what the fp32 kernel sees
    dy64 = (torch.randn(u64.shape, dtype=torch.float64) * dy_scale).to(dtype).double()

    ref_in = [t.clone().requires_grad_() for t in [u64] + params64]
    y_ref = grouped_scan_reference(*ref_in)
    y_ref.backward(dy64)
    ref = [y_ref.detach()] + [t.grad for t in ref_in]

    cu_in = [u64.to(dtype).to(DEV).requires_grad_()] + [p.float().to(DEV).requires_grad_() for p in params64]
    poison_allocator()
    y = grouped_scan(*cu_in, chunk=chunk)
    poison_allocator()
    y.backward(dy64.to(dtype).to(DEV))
    torch.cuda.synchronize()
    got = [y.detach()] + [t.grad for t in cu_in]
    return ref, got


def _check(ref, got, tol, what=""):
    errs = {}
    for name, r, g in zip(["y"] + [f"d{n}" for n in NAMES], ref, got):
        assert g is not None, f"{what}: no gradient for {name}"
        errs[name] = rel_err(g, r)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{what}: rel errors over {tol}: {bad} (all: {errs})"


def test_cuda_kernels_built():
    assert torch.cuda.is_available()
    assert _native.cuda_kernels_available(), "groupmamba._C was built without its CUDA kernels"


@pytest.mark.parametrize("stage", UNIQUE_STAGES)
def test_stage_shapes_fp32(stage):
    hw, C = STAGES[stage]
    ref, got = _ref_and_cuda(2, hw, hw, C // 4, dtype=torch.float32)
    _check(ref, got, TOL[torch.float32], f"{stage} fp32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stage", ["T1", "T2", "T3", "B3", "B4"])   # B3: d = 106, pairs of channels
def test_stage_shapes_half(stage, dtype):
    hw, C = STAGES[stage]
    ref, got = _ref_and_cuda(2, hw, hw, C // 4, dtype=dtype)
    _check(ref, got, TOL[dtype], f"{stage} {dtype}")


ODD = [  # (B, H, W, d, N)
    (2, 1, 1, 16, 1), (2, 1, 7, 16, 1), (2, 7, 1, 8, 1), (3, 5, 9, 16, 1), (2, 6, 10, 32, 1),
    (2, 9, 5, 87, 1), (2, 5, 9, 1, 1), (2, 5, 9, 16, 4), (1, 4, 6, 3, 2), (2, 7, 7, 128, 1),
    (2, 9, 5, 106, 1), (2, 3, 4, 2, 1),   # even d, not a multiple of 4: two-element vectors
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ODD, ids=lambda s: "B{}_{}x{}_d{}_N{}".format(*s))
def test_odd_shapes(shape, dtype):
    B, H, W, d, N = shape
    ref, got = _ref_and_cuda(B, H, W, d, N=N, dtype=dtype)
    _check(ref, got, float32_scan_tol(d) if dtype == torch.float32 else TOL[dtype], f"{shape} {dtype}")


@pytest.mark.parametrize("chunk", [1, 4, 8, 12, 16, 32, 64, 100, 256, 4096])
@pytest.mark.parametrize("shape", [(2, 14, 14, 16), (2, 9, 11, 87), (1, 28, 28, 32)], ids=str)
def test_chunks(shape, chunk):
    B, H, W, d = shape
    ref, got = _ref_and_cuda(B, H, W, d, dtype=torch.float32, chunk=chunk)
    _check(ref, got, TOL[torch.float32], f"{shape} chunk={chunk}")


def test_states_consistent_across_segmentations():
    """states[:, 0, k] (group 0, row-major) equals the state after k*chunk steps, computed by a second call
    on the 1 x (k*chunk + 1) prefix image with chunk = k*chunk (a different segmentation, often the
    generic kernel), so both the fast and the generic forward agree on the saved states."""
    B, H, W, d, chunk = 2, 10, 13, 16, 32
    inputs = random_scan_inputs(B, H, W, d, dtype=torch.float32, device=DEV)
    _, states = torch.ops.groupmamba.scan_fwd(*inputs, chunk)
    L = H * W
    assert states.shape == (B, 4, math.ceil(L / chunk), d, 1) and states.dtype == torch.float32
    assert torch.isfinite(states).all()
    assert (states[:, :, 0] == 0).all()
    for k in range(1, states.shape[2]):
        n = k * chunk
        sub = inputs[0].reshape(B, 1, L, 4 * d)[:, :, : n + 1].contiguous()
        _, st2 = torch.ops.groupmamba.scan_fwd(sub, *inputs[1:], n)
        torch.testing.assert_close(states[:, 0, k], st2[:, 0, 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 28, 28, 32), (2, 14, 14, 87), (2, 7, 7, 16)], ids=str)
def test_blowup_finite(shape, dtype):
    """delta up to ~20 (large dt_bias) and |u| up to 1e3: outputs and gradients stay finite."""
    B, H, W, d = shape
    u, Wx, Wdt, bias, A_log, D = random_scan_inputs(B, H, W, d, dtype=torch.float32)
    u = (u * 300).clamp(-1e3, 1e3)
    bias = torch.full_like(bias, 20.0)
    bias[0] = 5.0
    if dtype == torch.float16:
        # keep the true y and du inside float16's range (|x| < 65504): with |u| ~ 1e3 the x_proj rows
        # give B, C ~ |u| and y ~ |u|^3, which no float16 output can hold; scale them to O(1).
        Wx = Wx * 1e-3
        D = D * 1e-2
    ins = [u.to(dtype).to(DEV).requires_grad_()] + [p.to(DEV).requires_grad_() for p in (Wx, Wdt, bias, A_log, D)]
    y = grouped_scan(*ins)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all()
    for name, t in zip(NAMES, ins):
        assert torch.isfinite(t.grad).all(), f"non-finite grad of {name}"


# Bitwise equal across runs. The second shape (GroupMamba-T stage 1 width, 8 images) has 13 forward and 13
# backward segments per sequence and over 400 blocks, so look-backs meet predecessors at every stage of
# progress (composing aggregates in the order a look-back met them once gave run-to-run differences here).
@pytest.mark.parametrize("shape", [(4, 28, 28, 32), (8, 56, 56, 16)], ids=lambda s: "B{}_{}x{}_d{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_determinism(dtype, shape):
    inputs = random_scan_inputs(*shape, dtype=torch.float32, device=DEV)
    inputs[0] = inputs[0].to(dtype)
    dy = torch.randn_like(inputs[0])
    outs = []
    for _ in range(4):
        ins = [t.clone().requires_grad_() for t in inputs]
        y = grouped_scan(*ins)
        y.backward(dy)
        outs.append([y.detach()] + [t.grad for t in ins])
    for i, run in enumerate(outs[1:], 1):
        for name, a, b in zip(["y"] + ["grad of " + n for n in NAMES], outs[0], run):
            assert torch.equal(a, b), f"run {i}: {name} differs from run 0 by up to {(a - b).abs().max().item():.3g}"


def test_float64_rejected_clearly():
    inputs = random_scan_inputs(1, 3, 3, 4, dtype=torch.float64, device=DEV)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.groupmamba.scan_fwd(*inputs, 64)


def test_opcheck():
    inputs = random_scan_inputs(2, 5, 7, 16, dtype=torch.float32, device=DEV)
    ins = [t.requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.groupmamba.scan_fwd.default, (*ins, 16))
    y, states = torch.ops.groupmamba.scan_fwd(*[t.detach() for t in inputs], 16)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.groupmamba.scan_bwd.default,
                          (dy, *[t.detach() for t in inputs], states, 16))
