"""The float64 reference agrees with the official-style naive path; scan orders; input validation."""
import itertools

import pytest
import torch

from conftest import random_scan_inputs, rel_err
from groupmamba.ops import check_scan_inputs, grouped_scan, grouped_scan_naive, grouped_scan_reference, scan_order

SHAPES = [(1, 1), (1, 7), (7, 1), (14, 14), (5, 9)]


@pytest.mark.parametrize("H,W", SHAPES)
@pytest.mark.parametrize("d,N", [(1, 1), (16, 4), (87, 1), (16, 1), (1, 4)])
def test_reference_matches_naive(H, W, d, N):
    seed = torch.seed()
    B = 1 if H * W * d > 2000 else 2
    ins = random_scan_inputs(B, H, W, d, N, seed=seed)
    ref = grouped_scan_reference(*ins)
    naive = grouped_scan_naive(*ins, compute_dtype=torch.float64)
    assert ref.shape == ins[0].shape and ref.dtype == torch.float64
    assert torch.isfinite(ref).all()
    err = rel_err(naive, ref)
    assert err <= 1e-12, f"seed={seed}: reference vs naive rel err {err:.3e}"


def test_reference_is_not_trivially_equal_across_groups():
    """Guards the comparison above: the four groups' outputs really differ (orders matter)."""
    ins = random_scan_inputs(1, 3, 4, 2, 1, seed=0)
    u = ins[0]
    # Same parameters for every group: outputs then differ only through the scan order.
    params = [p[:1].expand(4, *p.shape[1:]).contiguous() for p in ins[1:]]
    y = grouped_scan_reference(u[..., :2].repeat(1, 1, 1, 4), *params)
    groups = y.reshape(1, 3, 4, 4, 2).unbind(3)
    for a, b in itertools.combinations(groups, 2):
        assert not torch.allclose(a, b)


def _official_orders(H, W):
    """Scan orders from an explicit index grid with flip/transpose, as in the official CrossScan."""
    grid = torch.arange(H * W).reshape(H, W)          # grid[r, c] = row-major position
    row_major = grid.flatten()
    col_major = grid.t().flatten()                    # walks down each column, then the next column
    return [row_major, col_major, row_major.flip(0), col_major.flip(0)]


@pytest.mark.parametrize("H,W", SHAPES + [(2, 3), (3, 2), (4, 4)])
def test_scan_order(H, W):
    order = scan_order(H, W)
    assert order.shape == (4, H * W) and order.dtype == torch.int64
    for g, expected in enumerate(_official_orders(H, W)):
        assert torch.equal(torch.sort(order[g]).values, torch.arange(H * W)), f"group {g} is not a permutation"
        assert torch.equal(order[g], expected), f"group {g}: {order[g].tolist()} != {expected.tolist()}"


def test_scan_order_small_explicit():
    # 2 x 3 map, positions 0 1 2 / 3 4 5.
    assert scan_order(2, 3).tolist() == [
        [0, 1, 2, 3, 4, 5],
        [0, 3, 1, 4, 2, 5],
        [5, 4, 3, 2, 1, 0],
        [5, 2, 4, 1, 3, 0],
    ]


# ---- input validation -------------------------------------------------------------------------------

def _good(**kw):
    ins = random_scan_inputs(1, 2, 3, 4, 2, seed=0, dtype=torch.float32)
    return dict(zip(["u", "x_proj_weight", "dt_proj_weight", "dt_bias", "A_log", "D"], ins), **kw)


def _both_raise(exc, match, **kw):
    """check_scan_inputs and grouped_scan both reject the operands with the given message."""
    args = _good(**kw)
    with pytest.raises(exc, match=match):
        check_scan_inputs(**args)
    with pytest.raises(exc, match=match):
        grouped_scan(**args)


def test_good_inputs_pass():
    check_scan_inputs(**_good())
    y = grouped_scan(**_good())
    assert y.shape == (1, 2, 3, 16)


def test_channels_not_divisible_by_4():
    _both_raise(ValueError, "C=15 is not divisible by 4", u=torch.randn(1, 2, 3, 15))


@pytest.mark.parametrize("shape", [(2, 3, 16), (1, 1, 2, 3, 16)])
def test_wrong_rank(shape):
    _both_raise(ValueError, r"u must be \(B, H, W, C\)", u=torch.randn(*shape))


@pytest.mark.parametrize("name,shape,match", [
    ("A_log", (4, 3, 2), r"A_log must be \(4, d=4, N\)"),
    ("A_log", (3, 4, 2), r"A_log must be \(4, d=4, N\)"),
    ("x_proj_weight", (4, 5, 3), r"x_proj_weight must be \(4, R\+2N, d=4\)"),
    ("x_proj_weight", (4, 4, 4), r"x_proj_weight has 4 rows; needs R\+2N with R>=1"),
    ("dt_proj_weight", (4, 4, 2), r"dt_proj_weight must have shape \(4, 4, 1\)"),
    ("dt_bias", (4, 5), r"dt_bias must have shape \(4, 4\)"),
    ("D", (4,), r"D must have shape \(4, 4\)"),
])
def test_parameter_shapes_disagree(name, shape, match):
    _both_raise(ValueError, match, **{name: torch.randn(*shape)})


def test_mixed_devices():
    meta_D = torch.empty(4, 4, device="meta")
    _both_raise(ValueError, "D is on meta but u is on cpu", D=meta_D)


def test_mixed_parameter_dtypes():
    _both_raise(TypeError, "dt_bias is torch.float64 but x_proj_weight is torch.float32",
                dt_bias=torch.randn(4, 4, dtype=torch.float64))


def test_float64_u_needs_float64_parameters():
    _both_raise(TypeError, "float64 u needs float64 parameters", u=torch.randn(1, 2, 3, 16, dtype=torch.float64))


def test_half_parameters_rejected():
    args = {k: (v.half() if k != "u" else v) for k, v in _good().items()}
    with pytest.raises(TypeError, match="parameters must be float32 or float64"):
        check_scan_inputs(**args)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_integer_u(dtype):
    _both_raise(TypeError, "u must be floating point", u=torch.zeros(1, 2, 3, 16, dtype=dtype))


def test_non_tensor():
    _both_raise(TypeError, "D must be a tensor", D=[1.0, 2.0])


# The C++ checks (csrc/scan_common.h) give the same diagnoses when the op is called directly.
@pytest.mark.parametrize("kw,match", [
    (dict(u=torch.randn(1, 2, 3, 15)), "C=15 is not divisible by 4"),
    (dict(u=torch.randn(2, 3, 16)), r"u must be \(B, H, W, C\)"),
    (dict(u=torch.zeros(1, 2, 3, 16, dtype=torch.int32)), "u must be floating point"),
    (dict(dt_bias=torch.randn(4, 5)), r"dt_bias must be \(4, d=4\)"),
    (dict(dt_proj_weight=torch.randn(4, 4, 2)), r"dt_proj_weight must be \(4, d=4, R=1\)"),
    (dict(x_proj_weight=torch.randn(4, 4, 4)), "needs R \\+ 2N with R >= 1"),
    (dict(A_log=torch.randn(4, 4, 2, dtype=torch.float64)), "A_log has dtype Double but x_proj_weight has Float"),
    (dict(u=torch.randn(1, 2, 3, 16, dtype=torch.float64)), "float64 u needs float64 parameters"),
])
def test_native_checks(kw, match):
    from groupmamba import _native
    if not _native.native_available():
        pytest.skip("native extension not built")
    args = _good(**kw)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.groupmamba.scan_fwd(*args.values(), 4)
