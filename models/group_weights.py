"""The four SS2D groups' parameters in the layouts the fused mixer ops take (GroupWeights), built by one
autograd node (pack_group_weights, the CUDA training path) or by plain torch ops (stack_group_weights).

The mixer runs the four groups together, so every step it needs their parameters stacked (scan, conv,
out_norm) and its two projections as block-diagonal matrices in the autocast dtype. Built from the 44
parameters with torch.stack / cat / block_diagonal / casts (stack_group_weights: float64 and 16-bit
parameters, torch.compile, which fuses them, and the bmm projections), that is about 18 small kernels forward and 17
backward per layer (the backward's block extraction, casts and AccumulateGrad's copies of non-contiguous
gradients): on GroupMamba-B's CUDA-graph training step, most of ~4000 kernels of under 6 us
(BENCHMARKS.md, thirteenth set).

``pack_group_weights`` does the same in 4 kernels forward and 4 backward: one cat of every parameter into
a float32 buffer laid out kind by kind (the four groups' conv weights, then their conv biases, ...), so the
stacked tensors are views of it; one zero-fill and one strided copy (with the cast) for the block-diagonal
projections. The backward writes every gradient into one buffer of the same layout (a cat, plus one copy
per projection that takes its diagonal blocks) and hands each parameter a contiguous view of it, which
autograd stores as the parameter's .grad without another copy.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from groupmamba.ops._util import autocast_dtype

GROUPS = 4

# (attribute path in a GroupSS2D, how the four are joined) in buffer order, as the fused ops take them:
# "cat" along dim 0, "stack" on a new leading dim. The projections come last, so the backward's cat covers
# one leading range of the buffer.
_STACKED = (
    ("conv2d.weight", "cat"),         # (d, 1, 3, 3) -> (4d, 1, 3, 3)
    ("conv2d.bias", "cat"),           # (d,) -> (4d,)
    ("x_proj_weight", "cat"),         # (1, R+2N, d) -> (4, R+2N, d)
    ("dt_projs_weight", "cat"),       # (1, d, R) -> (4, d, R)
    ("dt_projs_bias", "cat"),         # (1, d) -> (4, d)
    ("A_logs", "stack"),              # (d, N) -> (4, d, N)
    ("Ds", "stack"),                  # (d,) -> (4, d)
    ("out_norm.weight", "stack"),     # (d,) -> (4, d)
    ("out_norm.bias", "stack"),       # (d,) -> (4, d)
)
_PROJ = ("in_proj.weight", "out_proj.weight")   # (2d, d), (d, d)


class GroupWeights(NamedTuple):
    w_x: Optional[torch.Tensor]     # (C, C) block-diagonal: the x half of every group's in_proj (None: the
    w_z: Optional[torch.Tensor]     # (C, C) block-diagonal: the z half               bmm projections, which
    w_out: Optional[torch.Tensor]   # (C, C) block-diagonal out_proj                  stack their own)
    conv_w: torch.Tensor   # (C, 1, 3, 3)
    conv_b: torch.Tensor   # (C,)
    x_proj: torch.Tensor   # (4, R+2N, d)
    dt_w: torch.Tensor     # (4, d, R)
    dt_b: torch.Tensor     # (4, d)
    A_log: torch.Tensor    # (4, d, N)
    D: torch.Tensor        # (4, d)
    norm_w: torch.Tensor   # (4, d)
    norm_b: torch.Tensor   # (4, d)


_SCAN = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")   # grouped_scan's order


def block_diagonal(w: torch.Tensor) -> torch.Tensor:
    """(*lead, G, o, i) -> (*lead, G*o, G*i) block-diagonal matrices (two kernels, differentiable)."""
    *lead, G, o, i = w.shape
    out = w.new_zeros(*lead, G, o, G, i)
    out.diagonal(dim1=-4, dim2=-2).copy_(w.movedim(-3, -1))
    return out.reshape(*lead, G * o, G * i)


def _param(module: torch.nn.Module, path: str) -> torch.Tensor:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def group_parameters(groups) -> list:
    """The 44 parameters in buffer order: kind by kind, group 1..4 within a kind."""
    return [_param(g, path) for path in [p for p, _ in _STACKED] + list(_PROJ) for g in groups]


def _join(groups, path: str, how: str) -> torch.Tensor:
    params = [_param(g, path) for g in groups]
    return torch.cat(params) if how == "cat" else torch.stack(params)


def scan_params(groups, dtype_like: torch.Tensor) -> tuple:
    """The four groups' scan parameters joined to grouped_scan's (4, ...) layout, in float64 for a float64
    dtype_like and float32 otherwise."""
    want = torch.float64 if dtype_like.dtype == torch.float64 else torch.float32
    how = dict(_STACKED)
    return tuple(p if p.dtype == want else p.to(want) for p in (_join(groups, k, how[k]) for k in _SCAN))


def stack_group_weights(groups, x: torch.Tensor, blockdiag: bool) -> GroupWeights:
    """The GroupWeights for input x by separate torch ops per kind (any parameter dtype; traceable by
    torch.compile): the scan parameters as scan_params gives them, the block-diagonal projections (blockdiag;
    else None) in the autocast dtype when autocast is on (the cast autocast would make), else the parameters'."""
    joined = {path: _join(groups, path, how) for path, how in _STACKED if path not in _SCAN}
    w_x = w_z = w_out = None
    if blockdiag:
        d = groups[0].d
        w_in = torch.stack([g.in_proj.weight for g in groups])          # (4, 2d, d): rows [x | z]
        w_x, w_z = block_diagonal(w_in.view(GROUPS, 2, d, d).transpose(0, 1))
        w_out = block_diagonal(torch.stack([g.out_proj.weight for g in groups]))
        dt = autocast_dtype(x)
        if dt is not None:
            w_x, w_z, w_out = w_x.to(dt), w_z.to(dt), w_out.to(dt)
    return GroupWeights(w_x, w_z, w_out, joined["conv2d.weight"], joined["conv2d.bias"], *scan_params(groups, x),
                        joined["out_norm.weight"], joined["out_norm.bias"])


def _stacked_shape(k: int, shape) -> tuple:
    """The four groups' joined shape for stacked kind k, from one group's parameter shape."""
    if _STACKED[k][1] == "cat":
        return (GROUPS * shape[0], *shape[1:])
    return (GROUPS, *shape)


class _PackGroupWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype, *params):
        d = params[0].shape[0]
        C = GROUPS * d
        src = torch.cat([p.detach().reshape(-1) for p in params])
        ctx.shapes = [p.shape for p in params]
        ctx.d = d
        stacked, o = [], 0
        for k in range(len(_STACKED)):
            shape = _stacked_shape(k, params[k * GROUPS].shape)
            n = GROUPS * params[k * GROUPS].numel()
            stacked.append(src[o:o + n].view(shape))
            o += n
        w_in = src[o:o + GROUPS * 2 * d * d].view(GROUPS, 2, d, d)
        w_out = src[o + GROUPS * 2 * d * d:].view(GROUPS, d, d)
        # one zero-filled buffer for the three (C, C) matrices; each copy writes the diagonal blocks
        # (x, z: one copy for both) in the target dtype
        mats = torch.zeros(3, GROUPS, d, GROUPS, d, dtype=dtype, device=src.device)
        mats[:2].diagonal(dim1=1, dim2=3).copy_(w_in.permute(1, 2, 3, 0))
        mats[2].diagonal(dim1=0, dim2=2).copy_(w_out.permute(1, 2, 0))
        mats = mats.view(3, C, C)
        return (mats[0], mats[1], mats[2], *stacked)

    @staticmethod
    def backward(ctx, gw_x, gw_z, gw_out, *g_stacked):
        # every incoming gradient is a tensor: autograd materializes an unused output's as zeros
        shapes, d, G = ctx.shapes, ctx.d, GROUPS
        sizes = [s.numel() for s in shapes]
        n_stacked = sum(sizes[:len(_STACKED) * G])
        grad = torch.empty(sum(sizes), dtype=torch.float32, device=gw_x.device)
        torch.cat([g.reshape(-1) for g in g_stacked], out=grad[:n_stacked])
        g_in = grad[n_stacked:n_stacked + G * 2 * d * d].view(G, 2, d, d)
        g_out = grad[n_stacked + G * 2 * d * d:].view(G, d, d)
        for dst, gw in ((g_in[:, 0], gw_x), (g_in[:, 1], gw_z), (g_out, gw_out)):
            dst.copy_(gw.reshape(G, d, G, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1))   # the diagonal blocks
        outs, o = [], 0
        for s, n in zip(shapes, sizes):
            outs.append(grad[o:o + n].view(s))
            o += n
        return (None, *outs)


def pack_group_weights(groups, dtype: torch.dtype) -> GroupWeights:
    """The four GroupSS2D modules' parameters as GroupWeights, the projections in ``dtype``.

    Every parameter must be float32 and on one device (the fused CUDA path's case)."""
    params = group_parameters(groups)
    bad = sorted({(str(p.dtype), str(p.device)) for p in params} - {("torch.float32", str(params[0].device))})
    if bad:
        raise ValueError(f"pack_group_weights: parameters must be float32 on one device, found {bad}")
    return GroupWeights(*_PackGroupWeights.apply(dtype, *params))
