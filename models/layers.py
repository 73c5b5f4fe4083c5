"""Convolutional and MLP building blocks of GroupMamba (stem, downsampling, feed-forward networks).

Attribute names follow the official implementation so that state-dict keys match it exactly.
All token tensors are (B, L, C) with L = H * W in row-major order.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


def init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated-normal Linear, unit LayerNorm, fan-out normal Conv2d."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        if m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def tokens_to_map(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) view in channels_last memory format (no copy)."""
    return x.unflatten(1, (H, W)).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); free for channels_last inputs."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class Stem(nn.Module):
    """Three conv-BN-ReLU layers (7x7 stride 2, 3x3, 3x3), a 3x3 stride-2 projection and LayerNorm.

    (B, 3, H, W) -> tokens (B, H/4 * W/4, C), H/4, W/4. Keys: conv.{0,1,3,4,6,7}, proj, norm.
    """

    def __init__(self, in_chans: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(hidden_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)  # default eps (1e-5), as in the official code

    def forward(self, x: torch.Tensor):
        x = self.proj(self.conv(x))
        H, W = x.shape[-2:]
        return self.norm(map_to_tokens(x)), H, W


class DownSample(nn.Module):
    """3x3 stride-2 convolution + LayerNorm between stages: (B, C, H, W) -> tokens, H/2, W/2."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)  # default eps (1e-5), as in the official code

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(map_to_tokens(x)), H, W


class DWConv(nn.Module):
    """Depthwise 3x3 convolution on tokens (B, L, C) laid out as an H x W map. Key: dwconv."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(x, H, W)))


class ConvFFN(nn.Module):
    """PVTv2-style feed-forward: fc1 -> depthwise 3x3 conv -> GELU -> fc2 (the official PVT2FFN)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class FFN(nn.Module):
    """Plain two-layer MLP with GELU, used by the class-token block."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def layer_norm_stacked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-group LayerNorm: x (..., G, d) normalised over d with group weights/biases (G, d)."""
    x = F.layer_norm(x, x.shape[-1:], None, None, eps)
    return torch.addcmul(bias.to(x.dtype), x, weight.to(x.dtype))
