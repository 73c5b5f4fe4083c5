"""Training configuration: one flat dict of primitives.

Precedence (lowest to highest): built-in defaults (the official GroupMamba/DeiT ImageNet recipe) ->
``--demo`` preset -> YAML file given with ``--config`` -> command-line flags.  The merged config is stored
in every checkpoint and in ``<output>/config.yaml`` as a plain dict, so checkpoints load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import yaml

# name -> (default, help).  Types are inferred from the default (None defaults carry an explicit type below).
RECIPE: dict[str, tuple[Any, str]] = {
    # data
    "data": (None, "ImageNet-layout root with train/ and val/ class folders; omitted -> the embedded digits demo"),
    "demo": (False, "train the embedded scikit-learn digits demo (CPU, a few minutes)"),
    "img_size": (224, "input resolution"),
    "num_classes": (None, "number of classes (default: number of class folders)"),
    "batch_size": (128, "per-process (per-GPU) batch size"),
    "accum_steps": (1, "gradient accumulation steps (global batch = batch_size x world x accum_steps)"),
    "workers": (8, "data-loader worker processes per rank"),
    "pin_memory": (True, "pin host memory in the loaders (CUDA only)"),
    "interpolation": ("bicubic", "resize interpolation"),
    "crop_pct": (0.875, "eval centre-crop fraction (224/256)"),
    "limit_train": (0, "use only N training images, evenly spaced over the set (0: all; for smoke tests)"),
    "limit_val": (0, "use only N validation images, evenly spaced (0: all)"),
    "bad_images": ("error", "unreadable image: 'error' (stop, naming the file) or 'skip' (warn, count, use the next image)"),
    # augmentation
    "color_jitter": (0.4, "colour-jitter strength"),
    "auto_augment": ("rand-m9-mstd0.5-inc1", "timm RandAugment spec ('none' to disable)"),
    "reprob": (0.25, "random-erasing probability"),
    "remode": ("pixel", "random-erasing mode"),
    "recount": (1, "random-erasing count"),
    "mixup": (0.8, "mixup alpha (0 disables)"),
    "cutmix": (1.0, "cutmix alpha (0 disables)"),
    "mixup_prob": (1.0, "probability of applying mixup or cutmix to a batch"),
    "mixup_switch_prob": (0.5, "probability of cutmix instead of mixup when both are on"),
    "mixup_mode": ("batch", "mixup mode: batch, pair or elem"),
    "smoothing": (0.1, "label smoothing"),
    "demo_aug": (False, "light tensor augmentation of the demo (random shift); set by the demo preset"),
    # model
    "model": ("groupmamba_tiny", "model name for groupmamba.create_model"),
    "drop_rate": (0.0, "classifier dropout, passed to the model only when > 0 (the official script passes 0.1 but its model ignores it)"),
    "drop_path": (0.05, "stochastic-depth rate"),
    "grad_checkpointing": (False, "activation checkpointing (saves memory, costs ~30% speed)"),
    "pretrained": (None, "initialise the student from this checkpoint (weights only; not a resume)"),
    "channels_last": (False, "channels_last memory format for inputs and the teacher"),
    "compile": (False, "torch.compile the student"),
    "cuda_graph": (False, "capture the whole optimizer step (forward, loss, backward, clipping, fused AdamW) in one "
                          "CUDA graph and replay it: one GPU, bf16 or no AMP, no gradient accumulation"),
    # optimisation
    "epochs": (300, "training epochs"),
    "lr": (5e-4, "peak learning rate for a global batch of 512 (scaled linearly when scale_lr)"),
    "warmup_lr": (5e-7, "learning rate at the start of warm-up (scaled like lr)"),
    "min_lr": (5e-6, "final cosine learning rate (scaled like lr)"),
    "scale_lr": (True, "scale lr/warmup_lr/min_lr by global batch / 512 (official recipe)"),
    "warmup_epochs": (20, "linear warm-up epochs"),
    "weight_decay": (0.05, "AdamW weight decay (not applied to norms, biases, no_weight_decay params)"),
    "beta1": (0.9, "AdamW beta1"),
    "beta2": (0.999, "AdamW beta2"),
    "eps": (1e-8, "AdamW epsilon"),
    "clip_grad": (5.0, "gradient-norm clipping (0 disables)"),
    "fused_adamw": (True, "use the fused AdamW implementation on CUDA"),
    "flat_params": (True, "keep each optimizer group's parameters in one buffer, so AdamW and gradient clipping run "
                          "as a few large launches instead of dozens of small ones (not with --compile)"),
    "amp": ("auto", "mixed precision: auto (bf16 on CUDA, none on CPU), bf16, fp16 (with grad scaler) or none"),
    # EMA
    "ema": (True, "keep an exponential moving average of the weights (also evaluated)"),
    "ema_decay": (0.9999, "EMA decay per optimizer step"),
    # distillation
    "distillation": ("hard", "distillation type: hard, soft or none"),
    "distillation_alpha": (0.5, "weight of the distillation term"),
    "distillation_tau": (1.0, "soft-distillation temperature"),
    "teacher_model": ("regnety_160", "timm teacher architecture"),
    "teacher_path": (None, "local teacher checkpoint (state dict or {'model': state dict}); required for hard/soft"),
    "teacher_amp": (True, "run the teacher under the same autocast as the student (faster; official code ran it in fp32)"),
    # run control
    "output": ("runs/groupmamba", "output folder (checkpoints, logs)"),
    "resume": (None, "resume from this checkpoint (default: <output>/last.pth when present)"),
    "auto_resume": (True, "resume from <output>/last.pth automatically"),
    "seed": (0, "random seed"),
    "max_steps": (0, "stop after this many optimizer steps, saving a checkpoint (0: run all epochs)"),
    "save_every_steps": (0, "also write last.pth every N optimizer steps (0: only at epoch ends)"),
    "eval_every": (1, "evaluate every N epochs (the last epoch is always evaluated)"),
    "log_interval": (20, "steps between loss checks / step log records"),
    "progress": (True, "tqdm progress bar on rank 0"),
    "tensorboard": (True, "write TensorBoard scalars to <output>/tb"),
    "device": (None, "cuda or cpu (default: cuda when available)"),
}

_TYPES = {"warmup_epochs": float, "data": str, "num_classes": int, "pretrained": str, "teacher_path": str, "resume": str, "device": str}

# The embedded demo: scikit-learn digits at 32x32, small model, short schedule, light augmentation.
DEMO_PRESET: dict[str, Any] = {
    "demo": True,
    "model": "groupmamba_demo",
    "img_size": 32,
    "batch_size": 32,
    "workers": 0,
    "epochs": 2,
    "lr": 2e-3,
    "warmup_lr": 1e-5,
    "min_lr": 1e-5,
    "scale_lr": False,
    "warmup_epochs": 0.25,
    "weight_decay": 0.05,
    "drop_path": 0.0,
    "drop_rate": 0.0,
    "auto_augment": "none",
    "color_jitter": 0.0,
    "reprob": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "smoothing": 0.0,
    "demo_aug": True,
    "ema_decay": 0.95,
    "distillation": "none",
    "output": "runs/demo",
    "log_interval": 10,
}


def defaults() -> dict[str, Any]:
    return {k: v for k, (v, _) in RECIPE.items()}


def _str2bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def build_parser(prog: str = "groupmamba-train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train GroupMamba with the official ImageNet recipe (DeiT distillation, EMA, AMP, DDP). "
        "Run with no --data for the embedded CPU demo. Launch with torchrun for multi-GPU/multi-node.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML file of settings (keys as below, with _ or -); CLI flags override it")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    for name, (default, help_) in RECIPE.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            # --flag / --no-flag, and --flag=false also works.
            p.add_argument(flag, dest=name, nargs="?", const=True, default=None, type=_str2bool, help=f"{help_} (default {default})")
            p.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const=False, help=argparse.SUPPRESS)
        else:
            typ = _TYPES.get(name, type(default) if default is not None else str)
            p.add_argument(flag, dest=name, type=typ, default=None, help=f"{help_} (default {default})")
    return p


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    out = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_").lower()
        if key not in RECIPE:
            raise ValueError(f"unknown setting {k!r} in {path}; known: {', '.join(sorted(RECIPE))}")
        out[key] = v
    return out


def resolve(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse argv and merge defaults <- demo preset <- YAML <- CLI into a plain dict."""
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k in RECIPE and v is not None}
    file_cfg = load_yaml(args.config) if args.config else {}
    cfg = defaults()
    demo = cli.get("demo", file_cfg.get("demo", False)) or (cli.get("data", file_cfg.get("data")) is None)
    if demo:
        cfg.update(DEMO_PRESET)
    cfg.update(file_cfg)
    cfg.update(cli)
    cfg["demo"] = bool(demo) and cfg.get("data") is None
    _coerce(cfg)
    if args.print_config:
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        raise SystemExit(0)
    return cfg


def _coerce(cfg: dict[str, Any]) -> None:
    for name, (default, _) in RECIPE.items():
        v = cfg.get(name)
        if v is None:
            continue
        if isinstance(default, bool):
            cfg[name] = v if isinstance(v, bool) else _str2bool(v)
        elif isinstance(default, float) or _TYPES.get(name) is float:
            cfg[name] = float(v)
        elif isinstance(default, int):
            cfg[name] = int(v)
    if cfg["distillation"] not in ("none", "hard", "soft"):
        raise ValueError(f"distillation must be none, hard or soft, got {cfg['distillation']!r}")
    if cfg["amp"] not in ("auto", "bf16", "fp16", "none"):
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {cfg['amp']!r}")
    if cfg["bad_images"] not in ("error", "skip"):
        raise ValueError(f"bad_images must be error or skip, got {cfg['bad_images']!r}")
    if cfg["batch_size"] < 1 or cfg["accum_steps"] < 1 or cfg["epochs"] < 1:
        raise ValueError("batch_size, accum_steps and epochs must be >= 1")
