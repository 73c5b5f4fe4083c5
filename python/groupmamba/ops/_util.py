"""Small helpers shared by the Triton-backed ops: argument checks, the autocast dtype, and the switch
between the eager launch path and the torch.library ops that torch.compile traces."""
from __future__ import annotations

import contextlib
import threading

import torch


def check_float_tensors(op: str, x: torch.Tensor, named) -> None:
    """Every (name, tensor) in ``named`` is a floating-point tensor on x's device (x itself included)."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def autocast_dtype(x: torch.Tensor):
    """The autocast dtype of x's device type when autocast is on there, else None."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def tile_warps(elems: int) -> int:
    """Warps per program of the LayerNorm / modulation kernels (triton_norm, triton_modulation) for a tile of
    `elems` elements. Small tiles (<= 2048: GroupMamba's stage 3-4 rows, 4 x 512) run on 2 warps, forward and
    backward. B training step, H200, same calls (BENCHMARKS.md, fourteenth set): backward 2 warps 1115.3 img/s
    against 1085.3 / 1085.3 with 4 and 972.0 with 8; then 1117.6 against 1112.0 with 1 warp and 1086.5 with 4;
    forward 2 warps (the modulation's) 1125.6. Two warps hold a tile's rows with fewer cross-warp reductions and
    let more programs share an SM."""
    return 8 if elems > 2048 else 2


def identity(kernel):
    """The eager path's stand-in for torch.library.wrap_triton: launch the kernel directly."""
    return kernel


def use_library_ops(config: dict) -> bool:
    """torch.library triton_ops under torch.compile (or when a test asks); autograd.Functions otherwise:
    the library dispatch costs ~100s of us per call on the host, more than these kernels take."""
    return config["eager_library_ops"] or torch.compiler.is_compiling()


class ThreadFlag:
    """A per-thread switch: true inside ``with flag.on():`` (nestable), false elsewhere."""

    def __init__(self):
        self._local = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def on(self):
        prev = bool(self)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = prev


def channel_split(n: int):
    """(n // vec, vec) for vec the largest power of two <= 16 dividing n. Kernels take a row width as
    NV * VEC: Triton specializes an integer argument only on divisibility by 16, so a width like 424 or
    348 (GroupMamba-B / -T stage 3) reached the compiler with no known factor, and every row offset
    (row * N) could be odd: the loads and stores along the row were 2 bytes wide instead of 16."""
    vec = min(16, n & -n) if n > 0 else 1
    return n // vec, vec
