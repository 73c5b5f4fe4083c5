"""groupmamba: fast GroupMamba (grouped visual state space model) for PyTorch.

    import groupmamba
    model = groupmamba.create_model("groupmamba_tiny", checkpoint="groupmamba_tiny_ema.pth")

Submodules: ``groupmamba.ops`` (fused kernels and references), ``groupmamba.models`` (GroupMamba-T/S/B,
timm registration), ``groupmamba.train`` (ImageNet training and evaluation).
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401
from .models import (create_model, groupmamba_base, groupmamba_demo, groupmamba_small,  # noqa: E402,F401
                     groupmamba_tiny, list_models)
