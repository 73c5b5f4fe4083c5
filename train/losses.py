"""DeiT-style distillation loss as used by the GroupMamba training code.

The student returns (head_logits, dist_logits) in training mode.  The label loss is computed on the class
head only, the teacher term on the distillation head only:

    loss = (1 - alpha) * base(head_logits, targets) + alpha * teacher_term(dist_logits)

hard: teacher_term = CE(dist_logits, argmax(teacher_logits))
soft: teacher_term = tau^2 * KL(softmax(teacher/tau) || softmax(dist/tau)), summed and divided by the number of
      logits (batch x classes), as in DeiT.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SoftTargetCE(nn.Module):
    """Cross-entropy against a probability target (mixup/cutmix output)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def base_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
    if mixup_active:  # smoothing is folded into the mixed targets
        return SoftTargetCE()
    return nn.CrossEntropyLoss(label_smoothing=smoothing)


def hard_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))


def soft_distillation(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    kl = F.kl_div(F.log_softmax(dist_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                  reduction="sum", log_target=True)
    return kl * (tau * tau) / dist_logits.numel()


class DistillationLoss(nn.Module):
    """forward(inputs, outputs, targets) -> (loss, parts) where parts holds detached components for logging.

    ``teacher_autocast`` is a context-manager factory (autocast or nullcontext) for the teacher forward.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None, kind: str = "none", alpha: float = 0.5,
                 tau: float = 1.0, teacher_autocast=None):
        super().__init__()
        if kind not in ("none", "hard", "soft"):
            raise ValueError(f"unknown distillation type {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError(f"{kind} distillation needs a teacher model")
        self.base, self.kind, self.alpha, self.tau = base, kind, alpha, tau
        # plain attribute, not a submodule: the teacher stays out of state_dict() and of DDP
        object.__setattr__(self, "teacher", teacher)
        self.teacher_autocast = teacher_autocast

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        import contextlib

        ctx = self.teacher_autocast() if self.teacher_autocast is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return self.teacher(inputs).float()

    def forward(self, inputs, outputs, targets):
        if isinstance(outputs, (tuple, list)):
            head, dist = outputs
        else:
            head, dist = outputs, None
        head = head.float()
        base = self.base(head, targets)
        if self.kind == "none":
            return base, {"loss_cls": base.detach()}
        if dist is None:
            raise ValueError("distillation needs a student that returns (head_logits, dist_logits) in train mode "
                             "(create it with distillation=True)")
        dist = dist.float()
        t = self.teacher_logits(inputs)
        kd = hard_distillation(dist, t) if self.kind == "hard" else soft_distillation(dist, t, self.tau)
        loss = base * (1 - self.alpha) + kd * self.alpha
        return loss, {"loss_cls": base.detach(), "loss_kd": kd.detach()}
