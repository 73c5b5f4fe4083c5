"""Argument checks shared by the Triton-backed ops: errors name the op, the argument and the problem."""
from __future__ import annotations

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
