"""Convolutional and MLP building blocks of GroupMamba (stem, downsampling, feed-forward networks).

Attribute names follow the official implementation so that state-dict keys match it exactly.
All token tensors are (B, L, C) with L = H * W in row-major order.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch.utils.checkpoint import checkpoint

from groupmamba.ops import bn_relu, dwconv_act, group_layer_norm, keep_preactivation, linear
from groupmamba.ops.fast_linear import outputs_unused
from groupmamba.ops._util import autocast_dtype


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
        self.norm = LayerNorm(out_dim)  # default eps (1e-5), as in the official code
        self.fused = True  # BatchNorm + ReLU in fused kernels (ops.bn_relu); set by GroupMamba.set_fused

    def forward(self, x: torch.Tensor):
        # channels_last on CUDA: cuDNN's NHWC convolutions, the fused BatchNorm + ReLU's row layout, and
        # map_to_tokens is a view. Measured against keeping the input's NCHW (H200, GroupMamba-T CUDA-graph
        # training step, BENCHMARKS.md seventh set, with torch's NHWC BatchNorm): 1707.8 vs 1467.7 img/s.
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fused:
            conv = self.conv
            for i in (0, 3, 6):   # conv, BatchNorm, ReLU
                x = bn_relu(conv[i + 1], conv[i](x))
        else:
            x = self.conv(x)
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(map_to_tokens(x)), H, W


class DownSample(nn.Module):
    """3x3 stride-2 convolution + LayerNorm between stages: (B, C, H, W) -> tokens, H/2, W/2."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm(out_dim)  # default eps (1e-5), as in the official code

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


@contextlib.contextmanager
def _tail_recompute():
    """The FFN tail's checkpoint recompute (run just before the tail's backward) keeps the conv's
    pre-activation for dwconv_act's backward, which then skips a third pass of the conv, and skips fc2's
    GEMM where fc2 runs as the padded Function (CUDA-graph capture): the recompute only has to rebuild
    fc2's saved input, its output is thrown away."""
    with keep_preactivation(), outputs_unused():
        yield


def _recompute_context():
    return contextlib.nullcontext(), _tail_recompute()


class ConvFFN(nn.Module):
    """PVTv2-style feed-forward: fc1 -> depthwise 3x3 conv -> GELU -> fc2 (the official PVT2FFN).

    recompute=True (default): in training, dwconv -> GELU -> fc2 runs under activation checkpointing,
    so only fc1's output is kept for the backward instead of three hidden-width tensors (fc1 output,
    conv output, GELU output). The hidden layer is mlp_ratio (4-8) times wider than the block, so this
    is the largest activation of the model; the price is re-running the conv, GELU and fc2 forward.
    The recompute keeps the conv's pre-activation (ops.keep_preactivation), which the conv's backward
    would otherwise recompute once more, and inside a CUDA graph capture skips fc2's GEMM (its output is
    not needed, only its saved input; fast_linear.outputs_unused).
    fused (and fc1_bias_grad_from_conv): fc1 adds its bias detached, and the conv returns the bias's
    gradient (ops.dwconv_act's x_bias: the sum of the conv's input gradient, added up by its dx pass), so
    fc1's backward has no bias column sum over the hidden-width gradient.
    """

    fc1_bias_grad_from_conv = True   # class-wide switch, for A/B runs (benchmarks/experiments/ab_train_step.py)

    def __init__(self, dim: int, hidden_dim: int, recompute: bool = True):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.recompute = recompute
        self.fused = True  # dwconv + bias + GELU in one kernel (ops.dwconv_act); set by GroupMamba.set_fused

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        fc1 = self.fc1
        h = linear(x, fc1.weight, fc1.bias.detach()) if self._bias_grad_from_conv() else fc1(x)
        if self.recompute and h.requires_grad and torch.is_grad_enabled():
            # no RNG in the tail, so no RNG state to stash (that would also break CUDA-graph capture).
            # Under torch.compile the conv is torch's own (nothing to keep), and compile accepts only
            # selective-checkpoint contexts as context_fn.
            if torch.compiler.is_compiling():
                return checkpoint(self._tail, h, H, W, use_reentrant=False, preserve_rng_state=False)
            return checkpoint(self._tail, h, H, W, use_reentrant=False, preserve_rng_state=False,
                              context_fn=_recompute_context)
        return self._tail(h, H, W)

    def _bias_grad_from_conv(self) -> bool:
        return self.fused and self.fc1_bias_grad_from_conv and self.fc1.bias is not None

    def _tail(self, h: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if self.fused:
            conv = self.dwconv.dwconv
            x_bias = self.fc1.bias if self._bias_grad_from_conv() else None
            h = dwconv_act(h.unflatten(1, (H, W)), conv.weight, conv.bias, "gelu", x_bias=x_bias).flatten(1, 2)
            return self.fc2(h)
        return self.fc2(self.act(self.dwconv(h, H, W)))


class FFN(nn.Module):
    """Plain two-layer MLP with GELU, used by the class-token block."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Linear(nn.Linear):
    """nn.Linear (same parameters, keys and semantics) on ops.linear (inside a CUDA graph capture, 16-bit
    GEMMs padded to widths that are multiples of 8); ``fused=False`` (set by GroupMamba.set_fused) runs
    F.linear."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias) if self.fused else super().forward(x)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, keys and semantics) on the fused kernel of ops.group_layer_norm.

    torch's CUDA LayerNorm runs one row per thread block, which is slow for GroupMamba's narrow rows
    (C = 64 .. 512 over 10^5 - 10^6 tokens). ``fused=False`` (set by GroupMamba.set_fused) runs
    F.layer_norm, as the official-style baseline does. ``autocast_output=True``: under autocast, return
    the autocast dtype instead of float32, for norms whose only consumer is a Linear (same rounding as
    that Linear's input cast, half the bytes written and read).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, autocast_output: bool = False, **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)
        self.fused = True
        self.autocast_output = autocast_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused or self.weight is None or self.bias is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        out_dtype = autocast_dtype(x) if self.autocast_output else None
        return group_layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype)
