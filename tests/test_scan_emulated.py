"""The CUDA scan kernels (csrc/cuda/scan_kernels.cuh) run on the CPU by emulation, against the float64 reference.

CI has no GPU, so without this the kernels' logic would be checked only on the device. tests/cuda_emu compiles
the kernel source with g++ for a fiber-based emulator (one fiber per CUDA thread, barriers and warp shuffles
scheduled as on the GPU; see cuda_emu.h for what it does and does not check) and exposes the op's launch
sequence through ctypes: the same planning, kernel choice, look-back workspace and gradient reduction as
scan_fwd_cuda / scan_bwd_cuda. Tolerances are those of the GPU tests (tests/test_scan_cuda.py): relative error
<= 1e-5 for float32 inputs, <= 1e-2 for bfloat16/float16. Outputs start as NaN, so an element no kernel writes
fails; shared memory starts as NaN too. A second build runs the kernels under AddressSanitizer and UBSan with
every buffer at its exact size (the role compute-sanitizer's memcheck plays on the GPU).
"""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import random_scan_inputs, rel_err
from groupmamba.ops import grouped_scan_reference
from groupmamba.ops.norm import group_layer_norm_reference

REPO = Path(__file__).resolve().parents[1]
EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NAMES = ["y", "du", "dx_proj_weight", "ddt_proj_weight", "ddt_bias", "dA_log", "dD"]
P, I64 = ctypes.c_void_p, ctypes.c_int64


def compile_emulated(out, *extra):
    """Compiles the kernels with the emulator (scan_emu.cpp plus `extra` sources and flags) into `out`."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists():
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h) to compile the kernels for the CPU")
    cmd = [cxx, "-std=c++20", "-Wall", "-Wno-unknown-pragmas", "-Wno-class-memaccess", "-DGROUPMAMBA_CUDA_EMULATION",
           f"-I{REPO / 'csrc'}", f"-I{CUDA_INCLUDE}", str(EMU_DIR / "scan_emu.cpp"), *extra, "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"compiling the emulated kernels failed:\n{r.stderr[-4000:]}"
    assert "warning" not in r.stderr, r.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = compile_emulated(tmp_path_factory.mktemp("cuda_emu") / "scan_emu.so", "-O2", "-shared", "-fPIC")
    so = ctypes.CDLL(str(lib))
    so.gm_emu_scan_fwd.argtypes = [ctypes.c_int] + [P] * 8 + [I64] * 7
    so.gm_emu_scan_bwd.argtypes = [ctypes.c_int] + [P] * 14 + [I64] * 7
    so.gm_emu_scan_fwd.restype = so.gm_emu_scan_bwd.restype = ctypes.c_int
    so.gm_emu_error.restype = ctypes.c_char_p
    so.gm_emu_set_schedule.argtypes = [ctypes.c_uint]
    so.gm_emu_scan_norm_fwd.argtypes = [ctypes.c_int] + [P] * 12 + [ctypes.c_double] + [I64] * 7
    so.gm_emu_scan_norm_bwd.argtypes = [ctypes.c_int] + [P] * 14 + [ctypes.c_double] + [P] * 7 + [I64] * 7
    so.gm_emu_scan_norm_fwd.restype = so.gm_emu_scan_norm_bwd.restype = ctypes.c_int
    return so


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def nan_like(t):
    return torch.full_like(t, float("nan"))


def misaligned(t):
    """A copy of t whose data starts one element past an aligned address (no vector access fits)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def ran(so, rc, what):
    """True for the fast kernel, False for the generic one; the emulator's own failure fails the test."""
    assert rc != -2, f"{what}: {so.gm_emu_error().decode()}"
    assert rc in (0, 1), f"{what}: returned {rc}"
    return rc == 1


def emulated_fwd_bwd(so, u, params, dy, chunk, misalign=False):
    """(y, du, parameter grads, fast forward?, fast backward?) from the emulated kernels."""
    Wx, Wdt, bias, A_log, D = params
    B, H, W, C = u.shape
    N, R = A_log.shape[-1], Wdt.shape[-1]
    dims = [B, H, W, C, N, R, chunk]
    place = misaligned if misalign else (lambda t: t)   # where u, dy, y and du live
    u, dy = place(u), place(dy)
    y = place(nan_like(u))
    n_chunks = -(-H * W // chunk)
    states = torch.full((B, 4, n_chunks, C // 4, N), float("nan"))
    fast_f = ran(so, so.gm_emu_scan_fwd(DTYPE_CODE[u.dtype], ptr(u), ptr(y), ptr(states), *map(ptr, params), *dims),
                 "forward")
    assert torch.isfinite(states).all(), "states: an element was not written"
    du = place(nan_like(u))
    grads = [nan_like(p) for p in params]
    fast_b = ran(so, so.gm_emu_scan_bwd(DTYPE_CODE[u.dtype], ptr(dy), ptr(u), ptr(du), ptr(states),
                                        *map(ptr, params), *map(ptr, grads), *dims), "backward")
    return [y, du] + grads, fast_f, fast_b


def reference(u, params, dy):
    leaves = [u.double().requires_grad_()] + [p.double().requires_grad_() for p in params]
    y = grouped_scan_reference(*leaves)
    y.backward(dy.double())
    return [y.detach()] + [t.grad for t in leaves]


def check(so, B, H, W, d, N, chunk, dtype, expect_fast, misalign=False, reverse=False):
    so.gm_emu_set_schedule(int(reverse))
    u64, *params64 = random_scan_inputs(B, H, W, d, N=N, dtype=torch.float64)
    u = u64.to(dtype)
    params = [p.float() for p in params64]
    dy = torch.randn(u.shape, dtype=torch.float64).to(dtype)
    got, fast_f, fast_b = emulated_fwd_bwd(so, u, params, dy, chunk, misalign)
    assert (fast_f, fast_b) == expect_fast, f"kernels run (fast fwd, fast bwd): {(fast_f, fast_b)}"
    ref = reference(u, params, dy)
    errs = {n: rel_err(g, r) for n, g, r in zip(NAMES, got, ref)}
    bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f"rel errors over {TOL[dtype]}: {bad} (all: {errs})"


# (B, H, W, d, N, chunk, (fast forward, fast backward)); the stage widths of GroupMamba-T/B (d = 16, 24, 32, 48,
# 87, 106, 112) on small maps, with maps long enough for several segments per sequence where noted: with three, a
# block's look-back can meet a predecessor that has published only its aggregate.
SHAPES = [
    (1, 24, 24, 16, 1, 64, (True, True)),    # T1 width, 3 forward and 3 backward segments
    (2, 9, 11, 32, 1, 32, (True, True)),     # T2 width, H != W, 2 backward segments
    (1, 9, 9, 24, 1, 64, (True, True)),      # B1 width
    (1, 7, 9, 48, 1, 64, (True, True)),      # B2 width: 16 lanes per step
    (1, 9, 9, 87, 1, 32, (True, True)),      # T3 width: 32 lanes per step, single elements, 3 segments
    (1, 5, 6, 106, 1, 32, (True, True)),     # B3 width: element pairs
    (1, 5, 5, 112, 1, 32, (True, True)),     # T4 width
    (2, 1, 1, 16, 1, 64, (True, True)),      # L = 1
    (1, 7, 1, 8, 1, 64, (True, True)),       # W = 1
    (1, 3, 4, 2, 1, 64, (True, True)),       # d = 2
    (1, 5, 9, 16, 1, 12, (True, True)),      # chunks of 12: segments of whole chunks, chunk states mid-segment
    (1, 23, 23, 16, 1, 12, (True, True)),    # 3 forward segments that do not start at chunk starts
    (1, 4, 6, 3, 2, 64, (False, False)),     # N = 2: the generic kernels
    (1, 5, 9, 16, 1, 3, (False, False)),     # chunk not a multiple of 4: the generic kernels
    (1, 4, 4, 128, 1, 64, (True, False)),    # d = 128, chunk 64: the backward's rows exceed shared memory
    (1, 4, 4, 128, 1, 32, (True, True)),     # B4 width at its default chunk
    (1, 3, 5, 136, 1, 64, (False, False)),   # d > 128: the generic kernels, 5 warps per block
]


# Each block's threads run first to last and last to first: a barrier missing between a shared-memory write and
# a read by a thread that runs earlier leaves NaN (the initial shared memory) in the results.
ORDERS = pytest.mark.parametrize("reverse", [False, True], ids=["ascending", "descending"])


@ORDERS
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_{}x{}_d{}_N{}_chunk{}".format(*s[:6]))
def test_emulated_kernels_match_reference_fp32(emu, shape, reverse):
    *dims, expect = shape
    check(emu, *dims, torch.float32, expect, reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3]], ids=lambda s: "d{}".format(s[3]))
def test_emulated_kernels_match_reference_half(emu, shape, dtype):
    *dims, expect = shape
    check(emu, *dims, dtype, expect, reverse=dtype == torch.float16)


# 6 segments per sequence both ways: look-backs meet predecessors with only their aggregates out (a look-back
# that composed two or more of them rounded differently from run to run, and failed here)
@pytest.mark.parametrize("shape", [(1, 36, 36, 16, 1, 64), (1, 13, 13, 87, 1, 32)],
                         ids=lambda s: "{}x{}_d{}_chunk{}".format(*s[1:4], s[5]))
def test_emulated_kernels_deterministic(emu, shape):
    """Bitwise the same outputs whatever order the blocks run in: a look-back that meets finished or unfinished
    predecessors must produce the same carry (one that composed the aggregates in the order it met them gave
    run-to-run differences on an H200)."""
    B, H, W, d, N, chunk = shape
    u, *params = random_scan_inputs(B, H, W, d, N=N, dtype=torch.float32)
    dy = torch.randn_like(u)
    schedules = [0, 1, 2, 3, 4, 5]  # first to last, last to first, four shuffled
    runs = []
    for schedule in schedules:
        emu.gm_emu_set_schedule(schedule)
        runs.append(emulated_fwd_bwd(emu, u, params, dy, chunk)[0])
    emu.gm_emu_set_schedule(0)
    for schedule, run in zip(schedules[1:], runs[1:]):
        for name, a, b in zip(NAMES, runs[0], run):
            assert torch.equal(a, b), f"{name} under schedule {schedule}: max |diff| {(a - b).abs().max().item():.3g}"


def test_emulated_kernels_unaligned_pointers(emu):
    """u, dy, y and du one element off alignment: the single-element loads and stores."""
    check(emu, 1, 9, 9, 16, 1, 32, torch.bfloat16, (True, True), misalign=True)


def test_emulated_kernels_memcheck(tmp_path):
    """No access outside any buffer and no undefined behaviour (ASan + UBSan), every output written."""
    exe = compile_emulated(tmp_path / "scan_memcheck", "-O1", "-g", "-fsanitize=address,undefined",
                           "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                           str(EMU_DIR / "memcheck_main.cpp"))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)
    report = r.stdout + r.stderr
    assert r.returncode == 0 and "ERROR" not in r.stderr and "runtime error" not in r.stderr, report[-6000:]
    assert report.count(": kernels ") == 8 and "FAILED" not in report, report[-6000:]
    assert report.count("norm kernels fast/fast") == 5, report[-6000:]   # the shapes the fast plans take both ways


# ---- the gated out_norm fused into the fast kernels (GateNorm) ----------------------------------------------
NORM_NAMES = ["out", "du", "dz", "dx_proj_weight", "ddt_proj_weight", "ddt_bias", "dA_log", "dD", "dnorm_w",
              "dnorm_b"]
EPS = 1e-5  # the model's out_norm (nn.LayerNorm default)


def norm_inputs(B, H, W, d, dtype, seed=None):
    """Scan operands plus the gate z (like u) and the norm's (4, d) weight and bias, float32 parameters."""
    g = torch.Generator().manual_seed(torch.seed() if seed is None else seed)
    u64, *params64 = random_scan_inputs(B, H, W, d, dtype=torch.float64, seed=int(torch.randint(1 << 62, (1,), generator=g)))
    z = torch.randn(u64.shape, generator=g, dtype=torch.float64).to(dtype)
    norm_w = (1 + 0.2 * torch.randn(4, d, generator=g, dtype=torch.float64)).float()
    norm_b = (0.2 * torch.randn(4, d, generator=g, dtype=torch.float64)).float()
    dout = torch.randn(u64.shape, generator=g, dtype=torch.float64).to(dtype)
    return u64.to(dtype), z, [p.float() for p in params64], norm_w, norm_b, dout


def emulated_norm_fwd_bwd(so, u, z, params, norm_w, norm_b, dout, chunk):
    """(out, du, dz, scan parameter grads, dnorm_w, dnorm_b) from the NORM kernels; None where they do not apply."""
    B, H, W, C = u.shape
    A_log, Wdt = params[3], params[1]
    dims = [B, H, W, C, A_log.shape[-1], Wdt.shape[-1], chunk]
    code = DTYPE_CODE[u.dtype]
    out = nan_like(u)
    states = torch.full((B, 4, -(-H * W // chunk), C // 4, A_log.shape[-1]), float("nan"))
    stats = torch.full((B, 4, H * W, 2), float("nan"))
    rc = so.gm_emu_scan_norm_fwd(code, ptr(u), ptr(z), ptr(out), ptr(states), ptr(stats), *map(ptr, params),
                                 ptr(norm_w), ptr(norm_b), EPS, *dims)
    if rc == -3:
        return None
    assert ran(so, rc, "forward (norm)")
    assert torch.isfinite(stats).all(), "stats: an element was not written"
    du, dz = nan_like(u), nan_like(u)
    grads = [nan_like(p) for p in params] + [nan_like(norm_w), nan_like(norm_b)]
    rc = so.gm_emu_scan_norm_bwd(code, ptr(dout), ptr(u), ptr(z), ptr(du), ptr(dz), ptr(states), ptr(stats),
                                 *map(ptr, params), ptr(norm_w), ptr(norm_b), EPS, *map(ptr, grads), *dims)
    assert ran(so, rc, "backward (norm)")
    return [out, du, dz] + grads


def norm_reference(u, z, params, norm_w, norm_b, dout):
    leaves = [t.double().requires_grad_() for t in [u, z, *params, norm_w, norm_b]]
    u_, z_, *scan_params, w_, b_ = leaves
    out = group_layer_norm_reference(grouped_scan_reference(u_, *scan_params), w_, b_, EPS, gate=z_)
    out.backward(dout.double())
    grads = [t.grad for t in leaves]
    return [out.detach(), grads[0], grads[1]] + grads[2:]


# (B, H, W, d, chunk): GroupMamba's compiled-in widths, runtime widths (d = 6: pairs, 8, 40), several segments per
# sequence both ways, chunk states inside segments, L = 1
NORM_SHAPES = [
    (1, 24, 24, 16, 64), (2, 9, 11, 32, 32), (1, 9, 9, 24, 64), (1, 7, 9, 48, 64), (1, 9, 9, 87, 32),
    (1, 5, 6, 106, 32), (1, 5, 5, 112, 32), (1, 4, 4, 128, 32), (1, 3, 4, 6, 64), (1, 5, 7, 8, 64),
    (1, 6, 5, 40, 64), (1, 23, 23, 16, 12), (4, 1, 1, 16, 64),
]


def check_norm(so, shape, dtype, tol, reverse=False):
    B, H, W, d, chunk = shape
    so.gm_emu_set_schedule(int(reverse))
    u, z, params, norm_w, norm_b, dout = norm_inputs(B, H, W, d, dtype)
    got = emulated_norm_fwd_bwd(so, u, z, params, norm_w, norm_b, dout, chunk)
    assert got is not None, "the fused out_norm kernels did not run (no fast plan)"
    ref = norm_reference(u, z, params, norm_w, norm_b, dout)
    errs = {n: rel_err(g, r) for n, g, r in zip(NORM_NAMES, got, ref)}
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"rel errors over {tol}: {bad} (all: {errs})"


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "B{}_{}x{}_d{}_chunk{}".format(*s))
def test_emulated_norm_kernels_fp32(emu, shape):
    check_norm(emu, shape, torch.float32, TOL[torch.float32], reverse=shape[3] % 2 == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [NORM_SHAPES[0], NORM_SHAPES[4], NORM_SHAPES[5]], ids=lambda s: f"d{s[3]}")
def test_emulated_norm_kernels_half(emu, shape, dtype):
    check_norm(emu, shape, dtype, TOL[dtype], reverse=dtype == torch.float16)


def test_emulated_norm_kernels_only_on_the_fast_path(emu):
    """N = 2, chunks not a multiple of 4, d > 128: no fused out_norm (-3), so the op composes the two there."""
    for B, H, W, d, N, chunk in [(1, 4, 6, 3, 2, 64), (1, 5, 9, 16, 1, 3), (1, 3, 5, 136, 1, 64)]:
        u, z, params, norm_w, norm_b, dout = norm_inputs(B, H, W, d, torch.float32)
        if N != 1:
            _, *params = random_scan_inputs(B, H, W, d, N=N, dtype=torch.float32)
        assert emulated_norm_fwd_bwd(emu, u, z, params, norm_w, norm_b, dout, chunk) is None


def test_emulated_norm_kernels_deterministic(emu):
    """The NORM kernels' results are bitwise the same whatever order the blocks run in (6 segments per sequence
    both ways: look-backs meet unfinished predecessors)."""
    u, z, params, norm_w, norm_b, dout = norm_inputs(1, 36, 36, 16, torch.float32)
    runs = []
    for schedule in (0, 1, 7):  # first to last, last to first, shuffled
        emu.gm_emu_set_schedule(schedule)
        runs.append(emulated_norm_fwd_bwd(emu, u, z, params, norm_w, norm_b, dout, 64))
    emu.gm_emu_set_schedule(0)
    for run in runs[1:]:
        for name, a, b in zip(NORM_NAMES, runs[0], run):
            assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item():.3g}"
