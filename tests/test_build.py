"""Build checks for CI (no GPU needed).

* With nvcc and a CUDA build of torch present, the installed extension must carry the CUDA kernels
  (compiling them needs no GPU, only the toolkit).
* The plain CMake route (`cmake -S . -B build -DGROUPMAMBA_CUDA=OFF && cmake --build build`) must
  build a loadable CPU-only extension.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from groupmamba import _native

REPO = Path(__file__).resolve().parents[1]
NVCC = Path("/usr/local/cuda/bin/nvcc")
OPS = ("groupmamba::scan_fwd", "groupmamba::scan_bwd")


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def test_extension_has_cpu_kernels():
    assert _native.native_available(), "groupmamba._C did not load: rebuild with `make build`"
    for op in OPS:
        assert _has_kernel(op, "CPU"), f"{op} has no CPU kernel"


@pytest.mark.skipif(not (NVCC.exists() and torch.version.cuda), reason="needs nvcc and a CUDA build of torch")
def test_extension_compiled_with_cuda_kernels():
    assert _native.native_available(), "groupmamba._C did not load: rebuild with `make build`"
    missing = [op for op in OPS if not _has_kernel(op, "CUDA")]
    assert not missing, (f"nvcc ({NVCC}) and CUDA torch {torch.version.cuda} are present but the installed "
                         f"extension has no CUDA kernel for {missing}: was it built with GROUPMAMBA_CUDA=OFF, "
                         "or does csrc/cuda/ register nothing?")
    assert _native.cuda_kernels_available()


def _cmake_env():
    env = dict(os.environ)
    # The venv's cmake (and ninja) first, as `make build` does.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    return env


def _cmake_build_dir():
    # One reused directory per checkout keeps later runs incremental.
    tag = hashlib.sha1(str(REPO).encode()).hexdigest()[:10]
    return Path(os.environ.get("GROUPMAMBA_CMAKE_TEST_DIR", Path(tempfile.gettempdir()) / f"groupmamba-cmake-cpu-{tag}"))


@pytest.mark.slow  # a cold build takes ~90 s on 2 cores; reruns reuse the build dir (seconds)
def test_plain_cmake_cpu_only_build():
    env = _cmake_env()
    cmake = shutil.which("cmake", path=env["PATH"])
    assert cmake, "cmake not found (pip install cmake)"
    build = _cmake_build_dir()
    start = time.perf_counter()
    configure = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(build), "-DGROUPMAMBA_CUDA=OFF", f"-DPython_EXECUTABLE={sys.executable}"],
        env=env, capture_output=True, text=True)
    assert configure.returncode == 0, f"cmake configure failed:\n{configure.stdout[-3000:]}\n{configure.stderr[-3000:]}"
    assert "CUDA kernels disabled" in configure.stdout
    compile_ = subprocess.run([cmake, "--build", str(build)], env=env, capture_output=True, text=True)
    assert compile_.returncode == 0, f"cmake --build failed:\n{compile_.stdout[-3000:]}\n{compile_.stderr[-3000:]}"
    elapsed = time.perf_counter() - start

    libs = sorted(build.glob("_C*.so"))
    assert len(libs) == 1, f"expected one _C*.so in {build}, found {libs}"
    # Load it in a fresh interpreter (this one already registered the groupmamba library): the ops
    # must come with CPU kernels and, with CUDA off, without CUDA kernels.
    probe = (
        "import sys, torch\n"
        f"torch.ops.load_library({str(libs[0])!r})\n"
        "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
        "print(has('groupmamba::scan_fwd', 'CPU'), has('groupmamba::scan_bwd', 'CPU'),"
        " has('groupmamba::scan_fwd', 'CUDA'))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True", "False"], out.stdout
    print(f"plain CMake CPU build: {elapsed:.1f} s in {build}")
