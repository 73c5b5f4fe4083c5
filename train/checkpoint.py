"""Atomic checkpoints that load with ``torch.load(weights_only=True)``.

Layout of a training checkpoint (all tensors, dicts, lists and primitives)::

    {"format": "groupmamba-train/1", "model": state_dict, "model_ema": state_dict | None,
     "optimizer": ..., "scaler": ... | None, "scheduler": {"step": int}, "epoch": int (epoch in progress),
     "step_in_epoch": int (optimizer steps done in it), "global_step": int, "best_acc1": float,
     "best_acc1_ema": float, "rng": {...}, "config": plain dict}
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from groupmamba.atomic import atomic_write
from groupmamba.models.checkpoint import EMA_KEYS, unwrap_state_dict

FORMAT = "groupmamba-train/1"


def atomic_save(obj: Any, path: str) -> None:
    """torch.save through groupmamba.atomic.atomic_write: never a half-written checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    st = {
        "torch": torch.random.default_generator.get_state(),
        "numpy": _np_state_to_plain(np.random.get_state()),
        "python": _py_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.random.default_generator.set_state(st["torch"])
    np.random.set_state(_np_state_from_plain(st["numpy"]))
    random.setstate(_py_state_from_plain(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _np_state_to_plain(s):
    name, keys, pos, has_gauss, cached = s
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_plain(d):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _py_state_to_plain(s):
    version, internal, gauss = s
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_state_from_plain(d):
    return (d["version"], tuple(int(v) for v in d["internal"].tolist()), d["gauss"])


def extract_model_state(ckpt: dict, prefer_ema: bool = False) -> dict:
    """Model weights from ours ({'model', 'model_ema'}), the official ({'model': ...} or flat) or DeiT-style
    files; with prefer_ema, the EMA weights where the file has them."""
    use_ema = prefer_ema and isinstance(ckpt, dict) and any(isinstance(ckpt.get(k), dict) for k in EMA_KEYS)
    return unwrap_state_dict(ckpt, use_ema=use_ema)
