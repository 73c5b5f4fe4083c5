"""Model variants, ``create_model`` and timm registration.

    model = groupmamba.create_model("groupmamba_tiny", checkpoint="groupmamba_tiny_ema.pth")
    model = timm.create_model("groupmamba_tiny", num_classes=100)          # after `import groupmamba`
    backbone = timm.create_model("groupmamba_small", features_only=True)   # 4 maps, strides 4..32

No weights are downloaded: ``pretrained=True`` raises; pass ``checkpoint=`` (or timm's
``checkpoint_path=``) with a local file instead.
"""
from __future__ import annotations

from typing import Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet

from .checkpoint import load_checkpoint
from .groupmamba import GroupMamba

# Official configurations (classification/models/groupmamba.py of Amshaker/GroupMamba); every
# variant uses d_state 1, ssm ratio 1, 3x3 depthwise conv, reduction 16, LayerNorm eps 1e-6 norms.
MODEL_CONFIGS = {
    "groupmamba_tiny": dict(stem_hidden_dim=32, embed_dims=(64, 128, 348, 448), mlp_ratios=(8, 8, 4, 4),
                            depths=(3, 4, 9, 3)),
    "groupmamba_small": dict(stem_hidden_dim=64, embed_dims=(64, 128, 348, 512), mlp_ratios=(8, 8, 4, 4),
                             depths=(3, 4, 16, 3)),
    "groupmamba_base": dict(stem_hidden_dim=64, embed_dims=(96, 192, 424, 512), mlp_ratios=(8, 8, 4, 4),
                            depths=(3, 6, 21, 3)),
    # Small CPU model for the demo (32x32 digits); not an official variant.
    "groupmamba_demo": dict(stem_hidden_dim=16, embed_dims=(32, 64, 96, 128), mlp_ratios=(4, 4, 4, 4),
                            depths=(1, 1, 2, 1)),
}

OFFICIAL_WEIGHTS = {
    "groupmamba_tiny": "groupmamba_tiny_ema.pth",
    "groupmamba_small": "groupmamba_small_ema.pth",
    "groupmamba_base": "groupmamba_base_ema.pth",
}


def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.conv.0", "classifier": ("head", "dist_head"),
        "paper_ids": "arXiv:2407.13772", "origin_url": "https://github.com/Amshaker/GroupMamba",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "groupmamba_tiny": _cfg(),
    "groupmamba_small": _cfg(),
    "groupmamba_base": _cfg(),
    "groupmamba_demo": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0),
})


def _build(variant: str, pretrained: bool = False, **kwargs) -> GroupMamba:
    if pretrained:
        weights = OFFICIAL_WEIGHTS.get(variant, "a local checkpoint")
        raise ValueError(
            f"{variant}: pretrained=True is not supported (groupmamba never downloads weights). "
            f"Download {weights} yourself and pass groupmamba.create_model({variant!r}, checkpoint=PATH) "
            "or timm.create_model(..., checkpoint_path=PATH).")
    args = dict(MODEL_CONFIGS[variant])
    args.update(kwargs)
    return build_model_with_cfg(
        GroupMamba, variant, pretrained=False,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **args,
    )


@register_model
def groupmamba_tiny(pretrained: bool = False, **kwargs) -> GroupMamba:
    """GroupMamba-T: 23.36M parameters, 4.6 GFLOPs at 224x224."""
    return _build("groupmamba_tiny", pretrained, **kwargs)


@register_model
def groupmamba_small(pretrained: bool = False, **kwargs) -> GroupMamba:
    """GroupMamba-S: 34.78M parameters, 7.0 GFLOPs at 224x224."""
    return _build("groupmamba_small", pretrained, **kwargs)


@register_model
def groupmamba_base(pretrained: bool = False, **kwargs) -> GroupMamba:
    """GroupMamba-B: 57.15M parameters, 14 GFLOPs at 224x224."""
    return _build("groupmamba_base", pretrained, **kwargs)


@register_model
def groupmamba_demo(pretrained: bool = False, **kwargs) -> GroupMamba:
    """A tiny GroupMamba for CPU demos on 32x32 images (not an official variant)."""
    return _build("groupmamba_demo", pretrained, **kwargs)


VARIANTS = {
    "groupmamba_tiny": groupmamba_tiny,
    "groupmamba_small": groupmamba_small,
    "groupmamba_base": groupmamba_base,
    "groupmamba_demo": groupmamba_demo,
}


def list_models() -> list:
    return sorted(VARIANTS)


def create_model(name: str, checkpoint: Optional[str] = None, num_classes: int = 1000,
                 distillation: bool = True, pretrained: bool = False, use_ema: bool = False,
                 drop_head: bool = False, **kwargs):
    """Builds a GroupMamba variant and optionally loads a local checkpoint strictly.

    Args:
        name: groupmamba_tiny | groupmamba_small | groupmamba_base | groupmamba_demo.
        checkpoint: path to a flat state dict (.pth), a training checkpoint with 'model'/'model_ema',
            or a .safetensors file. Any key/shape mismatch raises CheckpointMismatchError.
        num_classes, distillation: head size; distillation=False drops dist_head.
        use_ema: take 'model_ema' from a training checkpoint instead of 'model'.
        drop_head: load everything but head/dist_head (fine-tuning to another num_classes).
        **kwargs: GroupMamba arguments (drop_path_rate, fused, proj_impl, grad_checkpointing, nvtx,
            features_only / out_indices for a backbone that returns the four stage maps).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown GroupMamba model {name!r}; choose from {list_models()}")
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    model = VARIANTS[name](pretrained=pretrained, num_classes=num_classes, distillation=distillation, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, use_ema=use_ema, drop_head=drop_head)
    if features_only:
        cfg = model.pretrained_cfg
        model = FeatureGetterNet(model, out_indices=out_indices)
        model.pretrained_cfg = model.default_cfg = cfg
    return model
