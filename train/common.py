"""Model construction, distributed setup, EMA, learning-rate schedule and optimizer."""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


# ----------------------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Set up from torchrun's environment (RANK/WORLD_SIZE/LOCAL_RANK); NCCL on CUDA, gloo on CPU."""
    want_cuda = torch.cuda.is_available() if device in (None, "", "auto") else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        kw = {"device_id": dev} if want_cuda else {}
        dist.init_process_group(backend=backend, **kw)
    return DistInfo(rank=rank, world=world, local_rank=local, device=dev)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------------------------- models
class StandInModel(nn.Module):
    """Tiny convnet with the GroupMamba interface (two heads; tuple in train mode, mean in eval mode).
    Name ``standin``: lets the trainer's tests (resume, DDP, logging) run in seconds on a CPU."""

    def __init__(self, num_classes=10, distillation=True, drop_path_rate=0.0, drop_rate=0.0, width=16, **_):
        super().__init__()
        self.distillation = distillation
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(2 * width), nn.Dropout(drop_rate))
        self.head = nn.Linear(2 * width, num_classes)
        self.dist_head = nn.Linear(2 * width, num_classes) if distillation else None
        self.pos = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def no_weight_decay(self):
        return {"pos"}

    def no_weight_decay_keywords(self):
        return set()

    def forward(self, x):
        f = self.features(x + self.pos)
        if self.dist_head is None:
            return self.head(f)
        a, b = self.head(f), self.dist_head(f)
        return (a, b) if self.training else (a + b) / 2


def create_student(name: str, num_classes: int, distillation: bool, drop_path: float = 0.0, drop_rate: float = 0.0,
                   grad_checkpointing: bool = False, checkpoint: str | None = None) -> nn.Module:
    if name == "standin":
        return StandInModel(num_classes=num_classes, distillation=distillation, drop_path_rate=drop_path,
                            drop_rate=drop_rate)
    import groupmamba

    kw = dict(num_classes=num_classes, distillation=distillation, drop_path_rate=drop_path)
    if drop_rate:
        kw["drop_rate"] = drop_rate
    if grad_checkpointing:
        kw["grad_checkpointing"] = True
    return groupmamba.create_model(name, checkpoint=checkpoint, **kw)


def build_teacher(name: str, path: str | None, num_classes: int) -> nn.Module:
    """timm teacher, weights from a local file only (no downloads), eval mode, frozen."""
    if not path:
        raise FileNotFoundError("distillation needs a teacher checkpoint: pass --teacher-path FILE "
                                "(e.g. DeiT's regnety_160-a5fe301d.pth) or --distillation none")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint not found: {path} (pass --teacher-path to an existing local "
                                "file, or --distillation none)")
    import timm

    teacher = timm.create_model(name, pretrained=False, num_classes=num_classes)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    from .checkpoint import extract_model_state

    sd = extract_model_state(sd)
    missing, unexpected = teacher.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"teacher checkpoint {path} does not match timm '{name}' with {num_classes} classes: "
                           f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                           f"(e.g. {unexpected[:3]})")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of parameters (buffers are copied), updated after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = [p for p in self.module.parameters()]
        cur_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, cur_p, 1.0 - self.decay)
        for b_e, b in zip(self.module.buffers(), model.buffers()):
            b_e.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, sd):
        self.module.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, base_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from warmup_lr to base_lr over warmup_steps, then cosine from base_lr to min_lr over the
    remaining steps (warm-up as a prefix, like the official timm CosineLRScheduler set-up, stepped per update)."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    t = step - warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(t, span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t / span))


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups: no decay for 1-D params (norms, biases) and the model's no_weight_decay names/keywords."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    keywords = set(getattr(model, "no_weight_decay_keywords", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast_factory(device: torch.device, amp: str):
    """Returns (context factory, resolved amp mode)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return contextlib.nullcontext, amp
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), amp
