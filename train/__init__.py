"""ImageNet training and evaluation for GroupMamba (official recipe: AdamW, cosine, EMA, mixup/cutmix,
RandAugment, DeiT distillation with a RegNetY-160 teacher, AMP, DDP via torchrun).

Entry points: ``groupmamba-train`` (``python -m groupmamba.train``), ``groupmamba-eval``
(``python -m groupmamba.eval``), ``groupmamba-plot``.  Programmatic use::

    from groupmamba.train import config, run
    cfg = config.resolve(["--demo", "--epochs", "2"])
    summary = run(cfg)
"""
from . import config  # noqa: F401


def run(cfg):
    from .engine import run as _run

    return _run(cfg)
