"""Channel modulation of the GroupMamba layer (official semantics).

    xn  = LayerNorm(x)                                   x: (B, L, C)
    s   = sigmoid(fc2(relu(fc1(mean_L(xn)))))            (the two tiny FCs stay in torch)
    out = LayerNorm(y_all * skip_scale * xn * s[:, None, :])   same LayerNorm weights as xn

Two ops carry the bytes: layernorm_pool (xn and its token mean) and modulate_layernorm.
These are the reference implementations; fused kernels replace them on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layernorm_pool(x, weight, bias, eps: float):
    """Returns (xn, pooled): xn = LayerNorm(x) over the last dim, pooled = xn.mean(dim=1). x: (B, L, C)."""
    xn = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return xn, xn.mean(dim=1)


def modulate_layernorm(y_all, xn, s, skip_scale, weight, bias, eps: float):
    """LayerNorm(y_all * skip_scale * xn * s[:, None, :]). y_all, xn: (B, L, C); s: (B, C); skip_scale: (1,)."""
    z = y_all * skip_scale * xn * s[:, None, :]
    return F.layer_norm(z, (z.shape[-1],), weight, bias, eps)
