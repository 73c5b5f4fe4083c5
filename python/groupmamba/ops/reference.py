"""Pure-PyTorch reference of the four-direction grouped selective scan.

Written for clarity, not speed: it gathers each group's sequence with an index map, runs the
recurrence step by step, and scatters back. Works in any floating dtype; the tests run it in
float64 and compare every other implementation against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GROUPS = 4


def scan_order(H: int, W: int, device=None) -> torch.Tensor:
    """(4, H*W) int64: entry [g, t] is the row-major position that group g visits at step t.

    g0 row-major, g1 column-major, g2 reversed row-major, g3 reversed column-major, matching the
    official CrossScan_1..4 / CrossMerge_1..4.
    """
    L = H * W
    t = torch.arange(L, device=device)
    col_major = (t % H) * W + t // H
    return torch.stack([t, col_major, t.flip(0), col_major.flip(0)])


def grouped_scan_reference(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, compute_dtype=None):
    """Reference grouped scan; same contract as :func:`groupmamba.ops.grouped_scan`.

    compute_dtype: dtype of the arithmetic (default: float64 if any operand is float64, else
    float32). The result has u's dtype.
    """
    B, H, W, C = u.shape
    d = C // GROUPS
    N = A_log.shape[-1]
    R = x_proj_weight.shape[1] - 2 * N
    L = H * W
    if compute_dtype is None:
        compute_dtype = torch.float64 if torch.float64 in (u.dtype, x_proj_weight.dtype) else torch.float32
    cast = lambda t: t.to(compute_dtype)  # noqa: E731
    Wx, Wdt, bdt, A_log_c, Dc = map(cast, (x_proj_weight, dt_proj_weight, dt_bias, A_log, D))

    order = scan_order(H, W, u.device)                                   # (4, L)
    ug = cast(u).reshape(B, L, GROUPS, d).permute(0, 2, 1, 3)            # (B, 4, L, d)
    us = ug[:, torch.arange(GROUPS, device=u.device)[:, None], order]    # (B, 4, L, d) scan order

    x_dbl = torch.einsum("bgld,gkd->bglk", us, Wx)                       # (B, 4, L, R+2N)
    dt_r, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)
    delta = F.softplus(torch.einsum("bglr,gdr->bgld", dt_r, Wdt) + bdt[None, :, None, :])
    A = -torch.exp(A_log_c)                                              # (4, d, N)
    decay = torch.exp(delta[..., None] * A[None, :, None])               # (B, 4, L, d, N)
    drive = (delta * us)[..., None] * Bm[:, :, :, None, :]               # (B, 4, L, d, N)

    if L == 0:  # an empty map: nothing to scan (torch.stack below needs at least one step)
        return u.new_empty(u.shape)
    h = torch.zeros(B, GROUPS, d, N, dtype=compute_dtype, device=u.device)
    ys = []
    for t in range(L):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append((h * Cm[:, :, t, None, :]).sum(-1))
    y_scan = torch.stack(ys, dim=2) + Dc[None, :, None, :] * us          # (B, 4, L, d)

    inverse = torch.argsort(order, dim=1)                                # step at which each position is visited
    y = y_scan[:, torch.arange(GROUPS, device=u.device)[:, None], inverse]  # (B, 4, L, d) row-major
    return y.permute(0, 2, 1, 3).reshape(B, H, W, C).to(u.dtype)
