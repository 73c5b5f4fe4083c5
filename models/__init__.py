"""GroupMamba models (installed as ``groupmamba.models``): variants, checkpoints, timm registration.

    from groupmamba.models import create_model
    model = create_model("groupmamba_tiny", checkpoint="groupmamba_tiny_ema.pth").eval()
"""
from .checkpoint import (CheckpointMismatchError, check_state_dict, load_checkpoint, load_state_dict_strict,
                         read_state_dict, save_state_dict)
from .groupmamba import ClassBlock, GroupMamba, GroupMambaBlock
from .mixer import GroupMambaLayer, GroupSS2D
from .registry import (MODEL_CONFIGS, create_model, groupmamba_base, groupmamba_demo, groupmamba_small,
                       groupmamba_tiny, list_models)

__all__ = [
    "CheckpointMismatchError",
    "ClassBlock",
    "GroupMamba",
    "GroupMambaBlock",
    "GroupMambaLayer",
    "GroupSS2D",
    "MODEL_CONFIGS",
    "check_state_dict",
    "create_model",
    "groupmamba_base",
    "groupmamba_demo",
    "groupmamba_small",
    "groupmamba_tiny",
    "list_models",
    "load_checkpoint",
    "load_state_dict_strict",
    "read_state_dict",
    "save_state_dict",
]
