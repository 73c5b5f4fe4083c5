"""The C++ CPU kernel (groupmamba::scan_fwd / scan_bwd on CPU) against the float64 reference.

Inputs are fresh random draws; every failure message carries the seed that reproduces it.
"""
import time

import pytest
import torch

import groupmamba.ops.scan as scan_mod
from conftest import float32_scan_tol, random_scan_inputs, rel_err
from groupmamba import _native
from groupmamba.ops import grouped_scan, grouped_scan_reference

pytestmark = pytest.mark.skipif(not _native.native_available(), reason="native extension not built")

NAMES = ["u", "x_proj_weight", "dt_proj_weight", "dt_bias", "A_log", "D"]

# (B, H, W, d, N, R): every map shape meets d in {1, 16, 87} and N in {1, 4}; R=None is GroupMamba's
# ceil(d/16). Large d only with small B to keep the file fast.
CASES = [
    (3, 1, 1, 1, 1, None), (2, 1, 1, 16, 4, None), (2, 1, 1, 87, 1, None),
    (2, 1, 7, 1, 4, None), (2, 1, 7, 87, 1, None), (2, 1, 7, 16, 1, 3),
    (2, 7, 1, 16, 1, None), (2, 7, 1, 87, 4, 3), (2, 7, 1, 1, 1, None),
    (1, 14, 14, 16, 4, None), (1, 14, 14, 87, 1, None), (2, 14, 14, 1, 1, None),
    (2, 5, 9, 1, 1, 2), (2, 5, 9, 16, 4, None), (1, 5, 9, 87, 4, None),
]


def _case_id(c):
    B, H, W, d, N, R = c
    return f"B{B}-{H}x{W}-d{d}-N{N}-R{R or 'auto'}"


def _seeded_inputs(*shape, **kw):
    seed = torch.seed()
    return seed, random_scan_inputs(*shape, seed=seed, **kw)


def reference_fwd_bwd(ins, grad_y):
    """y and the six gradients from the float64 reference, for the given (possibly rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in ins]
    y = grouped_scan_reference(*leaves)
    y.backward(grad_y.double())
    return y.detach(), [t.grad for t in leaves]


def native_fwd_bwd(ins, grad_y, chunk=None):
    """y and the six gradients through groupmamba.ops.grouped_scan (autograd over the C++ op)."""
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    y = grouped_scan(*leaves, chunk=chunk)
    y.backward(grad_y)
    return y.detach(), [t.grad for t in leaves]


def direct_fwd_bwd(ins, grad_y, chunk):
    """y, states and the six gradients calling torch.ops.groupmamba.* directly (no autograd)."""
    y, states = torch.ops.groupmamba.scan_fwd(*ins, chunk)
    grads = torch.ops.groupmamba.scan_bwd(grad_y, *ins, states, chunk)
    return y, states, list(grads)


def assert_close(actual, expected, tol, what, seed):
    """Relative L2 error within tol, finite everywhere, and no element far off (catches unwritten output)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (seed={seed})"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: rel err {err:.3e} > {tol:.0e} (seed={seed})"
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item() if e.numel() else 0.0
    bad = (a - e).abs() > 100 * tol * (scale + e.abs())
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, e.g. {a[bad][:4]} vs {e[bad][:4]} (seed={seed})"


def check_all(y, grads, y_ref, grads_ref, tol, seed, label=""):
    assert_close(y, y_ref, tol, f"{label}y", seed)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g is not None, f"{label}d{name} missing"
        assert_close(g, g_ref, tol, f"{label}d{name}", seed)


# ---- accuracy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_float32_matches_reference(case):
    B, H, W, d, N, R = case
    seed, ins = _seeded_inputs(B, H, W, d, N, R, dtype=torch.float32)
    grad_y = torch.randn_like(ins[0])
    y_ref, g_ref = reference_fwd_bwd(ins, grad_y)

    y, grads = native_fwd_bwd(ins, grad_y, chunk=3)
    assert y.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32] * 6
    check_all(y, grads, y_ref, g_ref, float32_scan_tol(d), seed, "grouped_scan ")

    y2, states, grads2 = direct_fwd_bwd(ins, grad_y, chunk=4)
    assert states.shape == (B, 4, -(-H * W // 4), d, N) and states.dtype == torch.float32
    check_all(y2, grads2, y_ref, g_ref, float32_scan_tol(d), seed, "torch.ops ")


@pytest.mark.parametrize("case", [(2, 5, 9, 16, 4, None), (1, 1, 7, 87, 1, None), (2, 1, 1, 1, 1, None)],
                         ids=_case_id)
def test_float64_matches_reference(case):
    seed, ins = _seeded_inputs(*case, dtype=torch.float64)
    grad_y = torch.randn_like(ins[0])
    y_ref, g_ref = reference_fwd_bwd(ins, grad_y)
    y, grads = native_fwd_bwd(ins, grad_y, chunk=5)
    assert y.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads)
    check_all(y, grads, y_ref, g_ref, 1e-12, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(2, 5, 9, 16, 4, None), (1, 14, 14, 87, 1, None), (2, 1, 1, 1, 1, None)],
                         ids=_case_id)
def test_half_u_matches_reference(dtype, case):
    seed, ins = _seeded_inputs(*case, dtype=dtype, param_dtype=torch.float32)
    assert ins[0].dtype == dtype and ins[1].dtype == torch.float32
    grad_y = torch.randn_like(ins[0])
    # The reference sees exactly the rounded u and grad_y the kernel sees, in float64.
    y_ref, g_ref = reference_fwd_bwd(ins, grad_y)
    y, grads = native_fwd_bwd(ins, grad_y)
    assert y.dtype == dtype and grads[0].dtype == dtype
    assert all(g.dtype == torch.float32 for g in grads[1:])
    check_all(y, grads, y_ref, g_ref, 1e-2, seed)


def test_states_are_the_scan_state_entering_each_chunk():
    """states[b, g, k] against an independent float64 recurrence over each group's sequence."""
    B, H, W, d, N, chunk = 2, 3, 5, 3, 2, 4
    seed, ins = _seeded_inputs(B, H, W, d, N, dtype=torch.float32)
    _, states = torch.ops.groupmamba.scan_fwd(*ins, chunk)
    u, Wx, Wdt, bias, A_log, D = [t.double() for t in ins]
    R = Wx.shape[1] - 2 * N
    grid = torch.arange(H * W).reshape(H, W)
    orders = [grid.flatten(), grid.t().flatten(), grid.flatten().flip(0), grid.t().flatten().flip(0)]
    expected = torch.zeros(B, 4, -(-H * W // chunk), d, N, dtype=torch.float64)
    for g in range(4):
        seq = u.reshape(B, H * W, 4, d)[:, orders[g], g]                   # (B, L, d)
        h = torch.zeros(B, d, N, dtype=torch.float64)
        for t in range(H * W):
            if t % chunk == 0:
                expected[:, g, t // chunk] = h
            x = seq[:, t]
            proj = x @ Wx[g].T
            delta = torch.nn.functional.softplus(proj[:, :R] @ Wdt[g].T + bias[g])
            h = torch.exp(delta[..., None] * -torch.exp(A_log[g])) * h + \
                (delta * x)[..., None] * proj[:, None, R:R + N]
    assert torch.equal(states[:, :, 0], torch.zeros_like(states[:, :, 0]))
    assert_close(states, expected, 1e-5, "states", seed)


# ---- chunking, strides, threads -----------------------------------------------------------------------

@pytest.mark.parametrize("H,W", [(5, 9), (1, 1), (1, 7)])
def test_chunk_does_not_change_results(H, W):
    seed, ins = _seeded_inputs(2, H, W, 16, 4, dtype=torch.float32)
    grad_y = torch.randn_like(ins[0])
    L = H * W
    y0, grads0 = native_fwd_bwd(ins, grad_y, chunk=1)
    assert torch.isfinite(y0).all() and all(torch.isfinite(g).all() for g in grads0)
    for chunk in (3, 64, L + 5, 10**9):
        y, states, grads = direct_fwd_bwd(ins, grad_y, chunk)
        assert states.shape[2] == -(-L // chunk)
        # The backward recomputes each chunk from its saved state with the forward's own arithmetic,
        # so the chunk size must not change a single bit.
        assert torch.equal(y, y0), f"chunk={chunk}: y differs (seed={seed})"
        for name, g, g0 in zip(NAMES, grads, grads0):
            assert torch.equal(g, g0), f"chunk={chunk}: d{name} differs, rel {rel_err(g, g0):.2e} (seed={seed})"


def test_default_chunk_used_when_none():
    seed, ins = _seeded_inputs(1, 3, 3, 4, 1, dtype=torch.float32)
    y_default = grouped_scan(*ins)
    y_explicit = grouped_scan(*ins, chunk=scan_mod.DEFAULT_CHUNK["cpu"])
    assert torch.equal(y_default, y_explicit)


def _strided_like(t, perm):
    """A copy of t whose memory layout follows `perm` (non-contiguous as seen from t's shape)."""
    inv = [perm.index(i) for i in range(t.dim())]
    out = torch.empty([t.shape[p] for p in perm], dtype=t.dtype).permute(inv)
    out.copy_(t)
    return out


def test_non_contiguous_inputs():
    seed, ins = _seeded_inputs(2, 5, 4, 8, 2, 3, dtype=torch.float32)
    u, Wx, Wdt, bias, A_log, D = ins
    strided = [
        _strided_like(u, [0, 3, 1, 2]),                                  # channels-first storage
        _strided_like(Wx, [2, 0, 1]),
        _strided_like(Wdt, [0, 2, 1]),
        torch.stack([bias, torch.full_like(bias, float("nan"))], -1)[..., 0],  # every other element
        _strided_like(A_log, [2, 1, 0]),
        D.t().contiguous().t(),
    ]
    assert not any(t.is_contiguous() for t in strided)
    assert all(torch.equal(a, b) for a, b in zip(strided, ins))
    grad_y = torch.randn_like(u)
    strided_grad_y = _strided_like(grad_y, [2, 1, 0, 3])
    y_ref, g_ref = native_fwd_bwd(ins, grad_y)

    y, grads = native_fwd_bwd(strided, strided_grad_y)
    assert torch.equal(y, y_ref), f"seed={seed}"
    for name, g, g0 in zip(NAMES, grads, g_ref):
        assert torch.equal(g, g0), f"d{name} differs for strided inputs (seed={seed})"

    # The op itself makes its operands contiguous (direct calls with strided tensors).
    y2, _, grads2 = direct_fwd_bwd(strided, strided_grad_y, scan_mod.DEFAULT_CHUNK["cpu"])
    assert torch.equal(y2, y_ref)
    for name, g, g0 in zip(NAMES, grads2, g_ref):
        assert torch.equal(g, g0), f"direct d{name} differs for strided inputs (seed={seed})"


def test_deterministic_and_thread_count_independent():
    seed, ins = _seeded_inputs(3, 6, 5, 16, 2, dtype=torch.float32)
    grad_y = torch.randn_like(ins[0])
    prev = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2, 3):
            torch.set_num_threads(threads)
            results.append(native_fwd_bwd(ins, grad_y, chunk=7))
    finally:
        torch.set_num_threads(prev)
    y0, g0 = results[0]
    for y, grads in results[1:]:
        assert torch.equal(y, y0)
        assert all(torch.equal(a, b) for a, b in zip(grads, g0)), f"seed={seed}"


def test_scan_bwd_rejects_bad_states_and_chunk():
    _, ins = _seeded_inputs(1, 2, 3, 4, 1, dtype=torch.float32)
    y, states = torch.ops.groupmamba.scan_fwd(*ins, 2)
    with pytest.raises(RuntimeError, match="chunk must be >= 1"):
        torch.ops.groupmamba.scan_fwd(*ins, 0)
    with pytest.raises(RuntimeError, match=r"states must be \(B, 4, ceil\(L/chunk\)=2, d, N\)"):
        torch.ops.groupmamba.scan_bwd(y, *ins, states, 3)
    with pytest.raises(RuntimeError, match="states must have the parameter dtype"):
        torch.ops.groupmamba.scan_bwd(y, *ins, states.double(), 2)
    with pytest.raises(RuntimeError, match="grad_y must have u's shape"):
        torch.ops.groupmamba.scan_bwd(y[:, :1], *ins, states, 2)


# ---- autograd / torch.library machinery -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 2, 2, 2, 1), (2, 1, 1, 2, 2, 1)], ids=["3x2", "L1"])
def test_gradcheck_float64(shape):
    _, ins = _seeded_inputs(*shape, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in ins]

    def f(*args):
        return grouped_scan(*args, chunk=2)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _opcheck_args(requires_grad):
    _, ins = _seeded_inputs(2, 3, 2, 3, 2, dtype=torch.float32)
    return [t.requires_grad_(requires_grad) for t in ins]


def test_opcheck_scan_fwd():
    for requires_grad in (False, True):
        torch.library.opcheck(torch.ops.groupmamba.scan_fwd, (*_opcheck_args(requires_grad), 4))


def test_opcheck_scan_bwd():
    ins = _opcheck_args(False)
    y, states = torch.ops.groupmamba.scan_fwd(*ins, 4)
    torch.library.opcheck(torch.ops.groupmamba.scan_bwd, (torch.randn_like(y), *ins, states, 4))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    seed, ins = _seeded_inputs(1, 3, 4, 4, 2, dtype=torch.float32)
    grad_y = torch.randn_like(ins[0])

    def f(u, *params):
        return grouped_scan(u, *params) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    leaves_c = [t.clone().requires_grad_() for t in ins]
    leaves_e = [t.clone().requires_grad_() for t in ins]
    start = time.perf_counter()
    y_c = compiled(*leaves_c)
    y_c.backward(grad_y)
    elapsed = time.perf_counter() - start
    y_e = f(*leaves_e)
    y_e.backward(grad_y)
    assert torch.allclose(y_c, y_e, rtol=1e-6, atol=1e-6), f"seed={seed}"
    for name, a, b in zip(NAMES, leaves_c, leaves_e):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), f"d{name} (seed={seed})"
    assert elapsed < 180, f"torch.compile took {elapsed:.0f} s"


# ---- dispatch -----------------------------------------------------------------------------------------

def test_force_reference_env(monkeypatch):
    _, ins = _seeded_inputs(2, 4, 3, 8, 2, dtype=torch.float32)
    calls = []
    real_reference = scan_mod.grouped_scan_reference

    def spy(*args, **kw):
        calls.append(1)
        return real_reference(*args, **kw)

    monkeypatch.setattr(scan_mod, "grouped_scan_reference", spy)

    monkeypatch.setenv("GROUPMAMBA_FORCE_REFERENCE", "0")
    y_native = grouped_scan(*ins)
    assert calls == [], "native path expected without GROUPMAMBA_FORCE_REFERENCE"

    monkeypatch.setenv("GROUPMAMBA_FORCE_REFERENCE", "1")
    y_forced = grouped_scan(*ins)
    assert calls == [1], "GROUPMAMBA_FORCE_REFERENCE=1 must route to the reference"
    assert torch.equal(y_forced, real_reference(*ins))
    assert rel_err(y_native, y_forced) <= 1e-5


# ---- edge cases -----------------------------------------------------------------------------------------

def test_softplus_threshold_branches():
    """dt_bias pushing z past torch's softplus threshold (20) and far below zero."""
    seed, ins = _seeded_inputs(2, 3, 3, 4, 2, dtype=torch.float32)
    ins[3] = ins[3] + torch.tensor([25.0, -30.0, 0.0, 19.9])
    grad_y = torch.randn_like(ins[0])
    y_ref, g_ref = reference_fwd_bwd(ins, grad_y)
    y, grads = native_fwd_bwd(ins, grad_y, chunk=2)
    check_all(y, grads, y_ref, g_ref, 1e-5, seed)


@pytest.mark.parametrize("case", [(1, 2, 2, 2, 1, 5), (1, 1, 3, 1, 3, 7)], ids=_case_id)
def test_rank_larger_than_d(case):
    seed, ins = _seeded_inputs(*case, dtype=torch.float32)
    grad_y = torch.randn_like(ins[0])
    y_ref, g_ref = reference_fwd_bwd(ins, grad_y)
    y, grads = native_fwd_bwd(ins, grad_y, chunk=2)
    check_all(y, grads, y_ref, g_ref, float32_scan_tol(case[3]), seed)


def test_empty_map_and_batch():
    for shape in [(2, 0, 3, 4, 1), (0, 3, 3, 4, 1)]:
        _, ins = _seeded_inputs(*shape, dtype=torch.float32)
        y, states, grads = direct_fwd_bwd(ins, torch.zeros_like(ins[0]), 4)
        assert y.shape == ins[0].shape and states.shape[2] == -(-shape[1] * shape[2] // 4)
        for g, t in zip(grads, ins):
            assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


def test_reference_empty_map():
    # The reference must accept what the kernels accept: an empty map gives an empty output.
    from groupmamba.ops import grouped_scan_reference
    _, ins = _seeded_inputs(2, 0, 3, 4, 1, dtype=torch.float32)
    assert grouped_scan_reference(*ins).shape == ins[0].shape
