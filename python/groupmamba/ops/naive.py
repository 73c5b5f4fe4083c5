"""The official GroupMamba algorithm, step for step, as an unfused baseline.

Per group: move to (B, d, H, W), build the group's sequence by flip/transpose copies (the official
CrossScan_k), project with einsums, run a plain selective scan on (B, d, L) tensors, then undo the
reordering with more copies (CrossMerge_k) and concatenate. This is what the fused kernels replace:
the tests check it equals the index-map reference, and the benchmarks time it as the baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import GROUPS


def _to_sequence(x: torch.Tensor, g: int) -> torch.Tensor:
    """(B, d, H, W) -> (B, d, L) in group g's scan order (the official CrossScan_{g+1})."""
    seq = x.transpose(2, 3).flatten(2) if g % 2 else x.flatten(2)
    return seq.flip(-1) if g >= 2 else seq


def _from_sequence(y: torch.Tensor, g: int, H: int, W: int) -> torch.Tensor:
    """(B, d, L) in group g's scan order -> (B, d, H, W) (the official CrossMerge_{g+1})."""
    if g >= 2:
        y = y.flip(-1)
    B, d, _ = y.shape
    if g % 2:
        return y.view(B, d, W, H).transpose(2, 3).contiguous()
    return y.view(B, d, H, W)


def selective_scan_sequence(u, delta, A, Bs, Cs, D):
    """Plain selective scan over the last axis. u, delta: (B, d, L); A: (d, N); Bs, Cs: (B, N, L)."""
    Bsz, d, L = u.shape
    decay = torch.exp(delta[..., None] * A[None, :, None, :])            # (B, d, L, N)
    drive = (delta * u)[..., None] * Bs.transpose(1, 2)[:, None]         # (B, d, L, N)
    h = u.new_zeros(Bsz, d, A.shape[-1])
    ys = []
    for t in range(L):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cs[:, :, t]))
    return torch.stack(ys, dim=-1) + D[None, :, None] * u


def grouped_scan_naive(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, compute_dtype=torch.float32):
    """Official-style grouped scan; same contract as :func:`groupmamba.ops.grouped_scan`.

    Like the official code it computes in float32 (pass float64 for tests).
    """
    B, H, W, C = u.shape
    N = A_log.shape[-1]
    R = x_proj_weight.shape[1] - 2 * N
    outs = []
    for g, x in enumerate(torch.chunk(u.to(compute_dtype), GROUPS, dim=-1)):
        x = x.permute(0, 3, 1, 2).contiguous()                           # (B, d, H, W)
        xs = _to_sequence(x, g)                                          # (B, d, L)
        x_dbl = torch.einsum("bdl,cd->bcl", xs, x_proj_weight[g].to(compute_dtype))
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=1)
        dts = torch.einsum("brl,dr->bdl", dts, dt_proj_weight[g].to(compute_dtype))
        delta = F.softplus(dts + dt_bias[g].to(compute_dtype)[None, :, None])
        A = -torch.exp(A_log[g].to(compute_dtype))
        ys = selective_scan_sequence(xs, delta, A, Bs, Cs, D[g].to(compute_dtype))
        outs.append(_from_sequence(ys, g, H, W).permute(0, 2, 3, 1))     # (B, H, W, d)
    return torch.cat(outs, dim=-1).to(u.dtype)
