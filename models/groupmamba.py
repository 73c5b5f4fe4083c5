"""GroupMamba (Shaker et al., arXiv 2407.13772): the four-stage network with a class-token head.

Same parameters, state-dict keys and function as the official implementation:

    stem (3 conv-BN-ReLU + stride-2 conv + LN)              -> tokens at stride 4
    per stage i: [DownSample (stride-2 conv + LN) if i > 0], depth_i x GroupMambaBlock, norm_i (i < 3)
    class token = mean of the stage-4 tokens -> ClassBlock -> norm4 -> head (+ dist_head)

Training mode returns (head logits, dist_head logits) when distillation is on; eval returns their mean.
``forward_features`` returns the stage-4 map (B, C, H/32, W/32) and ``forward_head`` the logits
(``pre_logits=True``: the normed class token, which is what the official ``forward_features`` returns).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from functools import partial
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath
from torch.utils.checkpoint import checkpoint

from groupmamba.ops import add_layer_norm, residual_add
from groupmamba.ops._util import autocast_dtype

from .layers import ConvFFN, DownSample, FFN, LayerNorm, Linear, Stem, init_weights, tokens_to_map
from .mixer import GroupMambaLayer


def _nvtx_env() -> bool:
    return os.environ.get("GROUPMAMBA_NVTX", "0") not in ("", "0", "false", "False")


@contextlib.contextmanager
def _nvtx_range(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def _feeds_linear(norm: nn.Module) -> nn.Module:
    """Marks a norm whose output only feeds a Linear: under autocast it may return the autocast dtype."""
    if isinstance(norm, LayerNorm):
        norm.autocast_output = True
    return norm


class GroupMambaBlock(nn.Module):
    """x + GroupMambaLayer(x) (the layer normalises internally), then x + ConvFFN(norm2(x)).

    ``forward_chain`` leaves the second residual add to the caller: it returns (x, branch, scale) for
    x + branch [* scale], which the next block's mixer does inside its first LayerNorm pass
    (GroupMambaLayer.forward_add; the stage's last block is finished with ops.residual_add). On a
    GroupMamba-B training step that saves one pass over the residual stream forward and two backward per
    block (BENCHMARKS.md, twelfth set)."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0, norm_layer=nn.LayerNorm,
                 fused: bool = True, proj_impl: str = "auto", ffn_recompute: bool = True):
        super().__init__()
        self.norm2 = _feeds_linear(norm_layer(dim))
        self.attn = GroupMambaLayer(dim, dim, fused=fused, proj_impl=proj_impl)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), recompute=ffn_recompute)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return residual_add(*self.forward_chain(x, None, None, H, W))

    def forward_chain(self, x: torch.Tensor, branch: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                      H: int, W: int):
        """The block on x + branch [* scale] (the previous block's pending add; branch None: on x), returning
        its own pending add as (x, branch, scale): the block's output is x + branch [* scale]."""
        if branch is None:
            r = self.attn(x, H, W)
        else:
            x, r = self.attn.forward_add(x, branch, scale, H, W)
        norm2 = self.norm2
        if isinstance(norm2, LayerNorm) and norm2.fused and norm2.weight is not None:
            # the residual add and norm2 in one op (ops.add_layer_norm: one pass forward and backward on CUDA)
            out_dtype = autocast_dtype(x) if norm2.autocast_output else None
            x, h = add_layer_norm(x, r, norm2.weight, norm2.bias, norm2.eps, residual_scale=self._drop_scale(r),
                                  out_dtype=out_dtype)
            m = self.mlp(h, H, W)
            return x, m, self._drop_scale(m)
        x = x + self.drop_path(r)
        return x, self.drop_path(self.mlp(norm2(x), H, W)), None

    def _drop_scale(self, r: torch.Tensor):
        """The per-sample factors of timm's DropPath for r (the same draws from the same generator), as a
        float32 (B,) vector; None when stochastic depth is off (eval mode, or a rate of 0)."""
        dp = self.drop_path
        if not isinstance(dp, DropPath) or not self.training or dp.drop_prob == 0.0:
            return None
        keep = 1.0 - dp.drop_prob
        mask = r.new_empty((r.shape[0],) + (1,) * (r.dim() - 1)).bernoulli_(keep)
        if keep > 0.0 and dp.scale_by_keep:
            mask.div_(keep)
        return mask.view(-1).float()


class ClassBlock(nn.Module):
    """Class-token block: the mixer runs on the single token (H = W = 1), then an MLP.

    forward(cls (B, 1, C)) -> (B, 1, C). The official block receives [cls, tokens] but only reads and
    updates the class token, so the spatial tokens are not passed at all.
    """

    def __init__(self, dim: int, mlp_ratio: float, norm_layer=nn.LayerNorm, fused: bool = True,
                 proj_impl: str = "auto"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm2 = _feeds_linear(norm_layer(dim))
        self.attn = GroupMambaLayer(dim, dim, fused=fused, proj_impl=proj_impl)
        self.mlp = FFN(dim, int(dim * mlp_ratio))

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        cls = cls + self.norm1(self.attn(cls, 1, 1))
        return cls + self.mlp(self.norm2(cls))


class GroupMamba(nn.Module):
    """GroupMamba classifier / backbone. See the module docstring; variants live in registry.py.

    Args:
        fused: batched fast path (True) or official-style per-group path (False), for every mixer.
        proj_impl: grouped projection kernel, see GroupMambaLayer.
        grad_checkpointing: recompute each block in the backward pass to save activation memory.
        ffn_recompute: recompute each ConvFFN's conv -> GELU -> fc2 in the backward (keeps one hidden-width
            tensor per block instead of three; default on, see ConvFFN).
        nvtx: push NVTX ranges per stage and block (default: env GROUPMAMBA_NVTX=1).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        stem_hidden_dim: int = 32,
        embed_dims=(64, 128, 348, 448),
        mlp_ratios=(8, 8, 4, 4),
        depths=(3, 4, 9, 3),
        drop_path_rate: float = 0.0,
        norm_layer=partial(LayerNorm, eps=1e-6),
        distillation: bool = True,
        fused: bool = True,
        proj_impl: str = "auto",
        grad_checkpointing: bool = False,
        ffn_recompute: bool = True,
        nvtx: Optional[bool] = None,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"GroupMamba got unexpected arguments: {sorted(kwargs)}")
        if drop_rate:  # DeiT-style scripts pass it; the official model accepts and ignores it
            warnings.warn(f"GroupMamba has no dropout layer; drop_rate={drop_rate} is ignored (as in the "
                          "official implementation)", stacklevel=2)
        if global_pool != "token":
            raise ValueError("GroupMamba pools with its class-token block (global_pool='token')")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_stages = len(depths)
        self._last_stage = self.num_stages - 1  # stays fixed when prune_intermediate_layers drops stages
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.dist = distillation
        self.global_pool = global_pool
        self.grad_checkpointing = grad_checkpointing
        self.nvtx = _nvtx_env() if nvtx is None else nvtx
        layer_kw = dict(fused=fused, proj_impl=proj_impl)

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.feature_info = []
        cur, stride = 0, 4
        for i in range(self.num_stages):
            if i == 0:
                patch_embed = Stem(in_chans, stem_hidden_dim, embed_dims[0])
            else:
                patch_embed = DownSample(embed_dims[i - 1], embed_dims[i])
                stride *= 2
            blocks = nn.ModuleList([
                GroupMambaBlock(embed_dims[i], mlp_ratios[i], dpr[cur + j], norm_layer, ffn_recompute=ffn_recompute,
                                **layer_kw)
                for j in range(depths[i])
            ])
            cur += depths[i]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", norm_layer(embed_dims[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"block{i + 1}"))

        self.post_network = nn.ModuleList([ClassBlock(embed_dims[-1], mlp_ratios[-1], norm_layer, **layer_kw)])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if distillation:
            self.dist_head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        if not fused:
            self.set_fused(False)

    # ---- configuration -------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_ffn_recompute(self, enable: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, ConvFFN):
                m.recompute = enable

    def set_fused(self, fused: bool = True) -> None:
        """Switches every mixer, LayerNorm, Linear and the stem's BatchNorm + ReLU between the fast path and the official-style path."""
        for m in self.modules():
            if isinstance(m, (GroupMambaLayer, LayerNorm, ConvFFN, Linear, Stem)):
                m.fused = fused

    def set_proj_impl(self, proj_impl: str) -> None:
        for m in self.modules():
            if isinstance(m, GroupMambaLayer):
                m.proj_impl = proj_impl

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Exact names of parameters that should not be weight-decayed: A_logs, Ds, skip_scale,
        every bias (dt_projs_bias included) and every normalisation weight (LayerNorm, BatchNorm)."""
        skip = set()
        norm_types = (nn.LayerNorm, nn.BatchNorm2d)
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if (isinstance(mod, norm_types) or p.ndim <= 1 or p_name.endswith("bias")
                        or p_name in ("A_logs", "Ds", "skip_scale")):
                    skip.add(full)
        return skip

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        """Substrings for Swin/VMamba-style optimizer builders (BatchNorm weights are 1-D, caught by ndim)."""
        return {"A_logs", "Ds", "skip_scale", "bias", "norm"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        blocks = [(rf"^block{i + 1}\.(\d+)" if not coarse else rf"^block{i + 1}", None) for i in range(self.num_stages)]
        return dict(stem=r"^patch_embed1", blocks=[(r"^patch_embed(\d+)", None)] + blocks + [(r"^norm(\d+)", (99999,))])

    @torch.jit.ignore
    def get_classifier(self):
        return (self.head, self.dist_head) if self.dist else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError("GroupMamba pools with its class-token block (global_pool='token')")
        self.num_classes = num_classes
        dim = self.num_features
        device = self.norm1.weight.device
        self.head = nn.Linear(dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if self.dist:
            self.dist_head = nn.Linear(dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        for m in (self.head, getattr(self, "dist_head", None)):
            if m is not None:
                init_weights(m)

    # ---- forward -------------------------------------------------------------------------------

    def _range(self, name: str):
        return _nvtx_range(name) if self.nvtx else contextlib.nullcontext()

    def _run_block(self, blk: nn.Module, x: torch.Tensor, branch, scale, H: int, W: int):
        """blk.forward_chain (see GroupMambaBlock), under activation checkpointing when that is on."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(blk.forward_chain, x, branch, scale, H, W, use_reentrant=False)
        return blk.forward_chain(x, branch, scale, H, W)

    def _stage(self, i: int, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """Stage i (0-based): input image or (B, C, H, W) map -> output tokens (B, L, C), H, W.

        Stages 0..2 end with their norm (the official code applies it before the next stage)."""
        with self._range(f"stage{i + 1}"):
            x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
            branch = scale = None      # each block's second residual add is done by the next block
            for j, blk in enumerate(getattr(self, f"block{i + 1}")):
                with self._range(f"stage{i + 1}.block{j}"):
                    x, branch, scale = self._run_block(blk, x, branch, scale, H, W)
            if branch is not None:
                x = residual_add(x, branch, scale)
            if i != self._last_stage:
                x = getattr(self, f"norm{i + 1}")(x)
        return x, H, W

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> stage-4 map (B, C4, H/32, W/32) (no final norm)."""
        for i in range(self.num_stages):
            x, H, W = self._stage(i, x)
            x = tokens_to_map(x, H, W)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Stage-4 map -> class token (mean) -> ClassBlock -> norm4 -> heads."""
        with self._range("head"):
            cls = x.flatten(2).mean(dim=2, keepdim=True).transpose(1, 2)        # (B, 1, C)
            for blk in self.post_network:
                cls = blk(cls)
            cls = getattr(self, f"norm{self.num_stages}")(cls[:, 0])
            if pre_logits:
                return cls
            if not self.dist:
                return self.head(cls)
            out = self.head(cls), self.dist_head(cls)
            if self.training and not torch.jit.is_scripting():
                return out
            return (out[0] + out[1]) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    # ---- backbone API (timm forward_intermediates / features_only) -----------------------------

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs (strides 4, 8, 16, 32; channels = embed dims).

        Stages 1-3 are returned after their norm (what feeds the next stage); stage 4 raw, or after
        norm4 with ``norm=True``. Returns the list, or (final features, list) unless intermediates_only.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be NCHW or NHWC")
        take, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if (stop_early or intermediates_only) else self.num_stages - 1
        intermediates = []
        for i in range(last + 1):
            x, H, W = self._stage(i, x)
            if i in take:
                feat = x
                if i == self._last_stage and norm:
                    feat = getattr(self, f"norm{i + 1}")(feat)
                feat = feat.unflatten(1, (H, W))
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
            x = tokens_to_map(x, H, W)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """Drops stages after the last requested one (and the head when prune_head)."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for name in (f"patch_embed{i + 1}", f"block{i + 1}", f"norm{i + 1}"):
                delattr(self, name)
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_head:
            self.post_network = nn.ModuleList()
            self.reset_classifier(0)
        return take
