"""Loads the compiled extension ``groupmamba._C`` once.

Without it every op falls back to the pure-PyTorch reference; we say so once, with the reason, so a
silent 50x slowdown never goes unnoticed.
"""
from __future__ import annotations

import os
import warnings

import torch

_loaded: bool | None = None
_error: str | None = None


def force_reference() -> bool:
    """True when GROUPMAMBA_FORCE_REFERENCE=1 asks for the reference path (for debugging)."""
    return os.environ.get("GROUPMAMBA_FORCE_REFERENCE", "0") not in ("", "0", "false", "False")


def native_available() -> bool:
    """Whether the C++/CUDA ops are registered (imports the extension on first call)."""
    global _loaded, _error
    if _loaded is None:
        try:
            from groupmamba import _C  # noqa: F401  (registers torch.ops.groupmamba.*)

            _loaded = hasattr(torch.ops.groupmamba, "scan_fwd")
            if not _loaded:
                _error = "groupmamba._C imported but registered no ops"
        except ImportError as e:  # not built, or built against another torch
            _loaded, _error = False, str(e)
        if not _loaded:
            warnings.warn(
                "groupmamba: native extension unavailable, using the slow PyTorch reference for every op "
                f"({_error}). Reinstall with `pip install --no-build-isolation .` to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded


_cuda_kernels: bool | None = None


def cuda_kernels_available() -> bool:
    """Whether the extension was compiled with its CUDA kernels (asked once: every scan call checks)."""
    global _cuda_kernels
    if _cuda_kernels is None:
        _cuda_kernels = native_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "groupmamba::scan_fwd", "CUDA")
    return _cuda_kernels
