"""Reading GroupMamba checkpoints and loading them strictly.

Accepted files: a flat state_dict (the published ``groupmamba_*_ema.pth``), a training checkpoint that
wraps it under ``model`` / ``model_ema`` (or ``state_dict``), and ``.safetensors``. A ``module.``
prefix (DDP) is stripped. Loading is always strict: any missing, unexpected or mis-shaped key raises
``CheckpointMismatchError`` listing them.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Iterable

import torch
import torch.nn as nn

from groupmamba.atomic import atomic_write

WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema")
HEAD_PREFIXES = ("head.", "dist_head.")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model's."""


def _torch_load(path: str):
    try:
        # training checkpoints may carry the argparse Namespace of the run
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with a useful message
        raise RuntimeError(
            f"could not read checkpoint {path!r} with torch.load(weights_only=True): {e}\n"
            "If you trust the file, load it yourself (torch.load(..., weights_only=False)) and pass "
            "the state dict to groupmamba.models.load_state_dict_strict(model, state_dict).") from e


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj, use_ema: bool = False, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Extracts the model state dict from a flat or wrapped checkpoint object."""
    if _is_state_dict(obj):
        sd = obj
    elif isinstance(obj, dict):
        keys = EMA_KEYS if use_ema else WRAPPER_KEYS
        found = next((k for k in keys if k in obj), None)
        if found is None:
            what = "an EMA state dict (model_ema)" if use_ema else "a state dict (flat, or under 'model')"
            raise CheckpointMismatchError(f"{source}: no {what} found; top-level keys: {sorted(map(str, obj))[:20]}")
        sd = obj[found]
        if not _is_state_dict(sd) and isinstance(sd, dict):  # e.g. {'model_ema': {'module': ...}}
            sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if not _is_state_dict(sd):
            raise CheckpointMismatchError(f"{source}: '{found}' does not hold a tensor state dict")
    else:
        raise CheckpointMismatchError(f"{source}: expected a dict, got {type(obj).__name__}")
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel, torch.compile
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def read_state_dict(path: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Reads a .pth/.pt/.bin (torch.save) or .safetensors file and returns the model state dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GroupMamba checkpoint not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(path, device="cpu"), use_ema, path)
    return unwrap_state_dict(_torch_load(path), use_ema, path)


def _fmt(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n    {shown}{more}"


def check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], ignore_prefixes=(),
                     source: str = "checkpoint") -> None:
    """Raises CheckpointMismatchError listing missing, unexpected and mis-shaped keys (if any)."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(ignore_prefixes))}
    given = {k: v for k, v in state_dict.items() if not k.startswith(tuple(ignore_prefixes))}
    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    mis_shaped = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(expected.keys() & given.keys()) if given[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        parts = [f"{source} does not match {type(model).__name__} "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped keys)"]
        if missing:
            parts.append("missing keys:" + _fmt(missing))
        if unexpected:
            parts.append("unexpected keys:" + _fmt(unexpected))
        if mis_shaped:
            parts.append("mis-shaped keys:" + _fmt(mis_shaped))
        if any(k.startswith(HEAD_PREFIXES) for k in list(missing) + list(unexpected) + mis_shaped):
            parts.append("(a different number of classes? pass drop_head=True to keep the model's fresh heads)")
        raise CheckpointMismatchError("\n".join(parts))


def load_state_dict_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor], drop_head: bool = False,
                           source: str = "checkpoint"):
    """Loads strictly after checking keys and shapes; drop_head skips head/dist_head (fine-tuning)."""
    ignore = HEAD_PREFIXES if drop_head else ()
    check_state_dict(model, state_dict, ignore, source)
    if drop_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        bad = [k for k in missing if not k.startswith(HEAD_PREFIXES)] + list(unexpected)
        if bad:  # unreachable after check_state_dict; kept as a guard
            raise CheckpointMismatchError(f"{source}: unexpected load result {bad}")
    else:
        model.load_state_dict(state_dict, strict=True)
    return model


def load_checkpoint(model: nn.Module, path: str, use_ema: bool = False, drop_head: bool = False) -> nn.Module:
    """Reads ``path`` (any accepted form) and loads it into ``model`` strictly. Returns the model."""
    return load_state_dict_strict(model, read_state_dict(path, use_ema), drop_head, source=os.fspath(path))


def save_state_dict(model: nn.Module, path: str) -> None:
    """Writes the official-layout state dict atomically (.safetensors by suffix, else torch.save)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(sd, tmp))
    else:
        atomic_write(path, lambda tmp: torch.save(sd, tmp))
