"""The GroupMamba token mixer: four grouped visual state-space branches plus channel modulation.

``GroupMambaLayer`` keeps the official parameters and names (``mamba_g1..4`` with ``in_proj``,
``conv2d``, ``x_proj_weight``, ``dt_projs_weight``, ``dt_projs_bias``, ``A_logs``, ``Ds``, ``out_norm``,
``out_proj``; ``fc1``, ``fc2``, ``norm``, ``proj``, ``skip_scale``) but runs the four groups together:

    xn, pooled = LayerNorm(x), mean_L(LayerNorm(x))            layernorm_pool (+ xn in bf16 under autocast)
    s          = sigmoid(fc2(relu(fc1(pooled))))               channel attention (float32, autocast off)
    x, z       = grouped in_proj(xn)                           one GEMM each (block-diagonal or bmm)
    u          = SiLU(depthwise 3x3 conv over all 4d channels)
    y          = grouped_scan(u, ...)                          all four directions in one call
    y          = per-group LayerNorm(y) * SiLU(z)              stacked out_norm weights (with the scan in one
                                                               op where scan_with_out_norm says so)
    y          = grouped out_proj(y)
    out        = proj(LayerNorm(y * skip_scale * xn * s))      modulate_layernorm (same LayerNorm as xn)

The steps share the groups' parameters joined once per call (group_weights.py): with the block-diagonal
projections (CUDA) and float32 parameters packed by one autograd node, otherwise stacked by torch ops.

``fused=False`` runs the same math the way the official code does (one SS2D branch after another,
flip/transpose copies via ``grouped_scan_naive``); it is the unfused baseline of the benchmarks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from groupmamba.ops import (add_layernorm_pool, dual_linear, dwconv_act, group_layer_norm, grouped_scan,
                            grouped_scan_naive, grouped_scan_norm, layernorm_pool, linear, modulate_layernorm,
                            residual_add)
from groupmamba.ops._util import autocast_dtype

from .group_weights import GroupWeights, pack_group_weights, scan_params, stack_group_weights
from .layers import Linear

GROUPS = 4
PROJ_IMPLS = ("auto", "blockdiag", "bmm")


def grouped_linear_bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., G*i), w (G, o, i) -> (G, M, o) with M = numel / (G*i): group g maps x's g-th chunk."""
    G, o, i = w.shape
    xs = x.reshape(-1, G, i).transpose(0, 1)
    return torch.bmm(xs, w.transpose(1, 2))


def ungroup(y: torch.Tensor, shape) -> torch.Tensor:
    """(G, M, o) -> (*shape, G*o): groups back onto the channel axis (one copy)."""
    return y.transpose(0, 1).reshape(*shape, -1)


class GroupSS2D(nn.Module):
    """Parameters of one group's SS2D branch (official names and shapes, one scan direction).

    d_model = d_inner = d (ssm ratio 1), dt_rank R = ceil(d / 16), d_state N.
    """

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        if d_inner != d_model:
            raise ValueError("GroupMamba uses ssm_ratio=1 (d_inner == d_model)")
        if d_conv != 3:
            raise ValueError("GroupMamba uses a 3x3 depthwise convolution (d_conv=3)")
        R = math.ceil(d_model / 16)
        self.d, self.d_state, self.dt_rank = d_inner, d_state, R
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        self.act = nn.SiLU()
        # x_proj: (1, R + 2N, d), initialised like nn.Linear(d, R + 2N, bias=False)
        bound = 1.0 / math.sqrt(d_inner)
        self.x_proj_weight = nn.Parameter(torch.empty(1, R + 2 * d_state, d_inner).uniform_(-bound, bound))
        # dt projection: uniform weights, bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max]
        std = R ** -0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(1, d_inner, R).uniform_(-std, std))
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt)))[None])
        # S4D-real A (A = -exp(A_logs) = -[1..N]) and D = 1
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.Ds = nn.Parameter(torch.ones(d_inner))
        self.out_norm = nn.LayerNorm(d_inner)  # default eps (1e-5), as in the official code
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True


class GroupMambaLayer(nn.Module):
    """Grouped Mamba mixer with channel affinity modulation (the official GroupMambaLayer).

    forward(x (B, L, C), H, W) -> (B, L, C). ``fused`` picks the batched fast path (default) or the
    official-style per-group path; ``proj_impl`` picks how the grouped in/out projections run:
    ``blockdiag`` (one dense GEMM with a block-diagonal weight: no layout copies, 4x the MACs),
    ``bmm`` (a batched GEMM over groups: exact MACs, two layout copies) or ``auto`` (block-diagonal
    on CUDA, bmm on CPU). On an H200 the bmm's weight gradient at d = 87 (C = 348) ran as an unaligned
    32x32-tile kernel, 0.66 ms per call; the dense GEMM with 4x the MACs is far cheaper there.

    ``scan_with_out_norm`` (class attribute; set it on an instance or the class) says when the scan and the
    out_norm * SiLU(z) run as one op, ops.grouped_scan_norm (on CUDA the scan kernels apply the norm and y never
    reaches memory): ``"inference"`` (default) on CUDA where autograd records nothing (no_grad, inference_mode, or
    no input needing a gradient), ``True`` always, ``False`` never. Measured on an H200 (B=128, bf16,
    BENCHMARKS.md, twentieth set): the joined forward is 1-12% faster than scan + norm, its backward 20-75%
    slower, so training layers were 2-21% slower with it. The norm then sees y before its rounding to bfloat16,
    a difference of about one bfloat16 step from the separate ops.
    """

    scan_with_out_norm: bool | str = "inference"

    def __init__(self, dim: int, out_dim: int | None = None, d_state: int = 1, d_conv: int = 3,
                 expand: float = 1.0, reduction: int = 16, fused: bool = True, proj_impl: str = "auto"):
        super().__init__()
        out_dim = out_dim or dim
        if dim % GROUPS:
            raise ValueError(f"GroupMambaLayer: dim={dim} must be divisible by {GROUPS}")
        if out_dim != dim:
            raise ValueError("the channel modulation multiplies by xn, so out_dim must equal dim")
        if proj_impl not in PROJ_IMPLS:
            raise ValueError(f"proj_impl must be one of {PROJ_IMPLS}, got {proj_impl!r}")
        self.dim, self.out_dim = dim, out_dim
        self.fused, self.proj_impl = fused, proj_impl
        reduced = dim // reduction
        self.fc1 = nn.Linear(dim, reduced, bias=True)
        self.fc2 = nn.Linear(reduced, out_dim, bias=True)
        self.relu = nn.ReLU()
        self.sigmoid = nn.Sigmoid()
        self.norm = nn.LayerNorm(dim)  # default eps (1e-5), as in the official code
        d = dim // GROUPS
        self.mamba_g1 = GroupSS2D(d, d_state=d_state, ssm_ratio=expand, d_conv=d_conv)
        self.mamba_g2 = GroupSS2D(d, d_state=d_state, ssm_ratio=expand, d_conv=d_conv)
        self.mamba_g3 = GroupSS2D(d, d_state=d_state, ssm_ratio=expand, d_conv=d_conv)
        self.mamba_g4 = GroupSS2D(d, d_state=d_state, ssm_ratio=expand, d_conv=d_conv)
        self.proj = Linear(dim, out_dim)
        self.proj.fused = fused
        self.skip_scale = nn.Parameter(torch.ones(1))

    @property
    def groups(self):
        return (self.mamba_g1, self.mamba_g2, self.mamba_g3, self.mamba_g4)

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self._forward(x, H, W)[1]

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, residual_scale, H: int, W: int):
        """(y, layer(y)) for y = x + residual [* residual_scale[b]]: the previous block's second residual add,
        which the fused path does inside its first LayerNorm pass (ops.add_layernorm_pool)."""
        return self._forward(x, H, W, residual, residual_scale)

    def _forward(self, x, H, W, residual=None, residual_scale=None):
        """(the layer's input after the pending residual add, in the stream's dtype; the layer's output)."""
        if residual is not None and (not self.fused or torch.promote_types(x.dtype, residual.dtype) == torch.float16):
            x, residual = residual_add(x, residual, residual_scale), None
        stream = x
        if x.dtype == torch.float16:  # the official layer computes in float32 for float16 inputs
            x = x.float()
        B, L, C = x.shape
        norm = self.norm
        if self.fused:
            # under autocast the same pass also writes xn in the autocast dtype: the in_proj input
            if residual is None:
                xn, pooled, *copy = layernorm_pool(x, norm.weight, norm.bias, norm.eps, copy_dtype=autocast_dtype(x))
            else:
                stream, xn, pooled, *copy = add_layernorm_pool(x, residual, norm.weight, norm.bias, norm.eps,
                                                               residual_scale, copy_dtype=autocast_dtype(x))
        else:
            xn, copy = norm(x), ()
            pooled = xn.mean(dim=1)
        s = self.channel_attention(pooled)
        xmap = (copy[0] if copy else xn).view(B, H, W, C)
        y = self._mix_fused(xmap) if self.fused else self._mix_unfused(xmap)
        y = y.reshape(B, L, C)
        if self.fused:
            # under autocast in the autocast dtype: proj's input cast would round the same
            y = modulate_layernorm(y, xn, s, self.skip_scale, norm.weight, norm.bias, norm.eps,
                                   out_dtype=autocast_dtype(y))
        else:
            y = norm(y * self.skip_scale * xn * s.unsqueeze(1))
        return stream, self.proj(y)

    def channel_attention(self, pooled: torch.Tensor) -> torch.Tensor:
        """s = sigmoid(fc2(relu(fc1(pooled)))), (B, C), in the parameters' dtype with autocast off: on
        (B, C) inputs autocast's casts of the input, weights and biases, and of their gradients back, were
        more kernels than the two tiny GEMMs themselves (about 11 per layer and step)."""
        with torch.autocast(pooled.device.type, enabled=False):
            return self.sigmoid(self.fc2(self.relu(self.fc1(pooled.to(self.fc1.weight.dtype)))))

    def _use_blockdiag(self, x: torch.Tensor) -> bool:
        if self.proj_impl == "auto":
            return x.is_cuda
        return self.proj_impl == "blockdiag"

    def _mix_fused(self, xn: torch.Tensor) -> torch.Tensor:
        """xn (B, H, W, C) -> the four groups' SS2D outputs concatenated, (B, H, W, C).

        Each step is a method of its own so benchmarks/bench_layer.py can time them one by one; they share
        the groups' weights ``w`` (group_weights), which a step called alone builds itself."""
        w = self.group_weights(xn)
        x, z = self.grouped_in_proj(xn, w)
        u = self.conv_silu(x, w)
        if self._join_scan_and_out_norm(u, z, w):
            y = self.scan_out_norm_gate(u, z, w)
        else:
            y = self.out_norm_gate(self.grouped_scan(u, w), z, w)
        return self.grouped_out_proj(y, w)

    def _join_scan_and_out_norm(self, u: torch.Tensor, z: torch.Tensor, w: GroupWeights) -> bool:
        """Whether _mix_fused runs ops.grouped_scan_norm (see scan_with_out_norm)."""
        mode = self.scan_with_out_norm
        if mode != "inference" and mode not in (True, False):
            raise ValueError(f"GroupMambaLayer.scan_with_out_norm must be True, False or 'inference', got {mode!r}")
        if not mode or z.dtype != u.dtype:
            return False
        if mode != "inference":
            return True
        if not u.is_cuda:  # on the CPU the joined op composes the same ops: nothing to gain
            return False
        inputs = (u, z, w.x_proj, w.dt_w, w.dt_b, w.A_log, w.D, w.norm_w, w.norm_b)
        return not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs)

    def group_weights(self, x: torch.Tensor) -> GroupWeights:
        """The groups' parameters in the fused ops' layouts for input x: packed by one autograd node where
        that applies (_packed_weights), else stacked by torch ops (stack_group_weights)."""
        w = self._packed_weights(x)
        return w if w is not None else stack_group_weights(self.groups, x, self._use_blockdiag(x))

    def _packed_weights(self, x: torch.Tensor) -> GroupWeights | None:
        """The groups' parameters packed in 4 kernels (forward and backward) instead of ~35, for the
        block-diagonal projections (CUDA) with float32 parameters; None elsewhere. Not under torch.compile,
        which fuses the stacking itself."""
        if not self._use_blockdiag(x) or torch.compiler.is_compiling() or x.dtype == torch.float64:
            return None
        if any(p.dtype != torch.float32 for p in (self.mamba_g1.in_proj.weight, self.mamba_g1.Ds)):
            return None
        return pack_group_weights(self.groups, autocast_dtype(x) or x.dtype)

    def grouped_in_proj(self, xn: torch.Tensor, w: GroupWeights | None = None):
        """(B, H, W, C) -> x, z (B, H, W, C): every group's in_proj in one GEMM."""
        w = self.group_weights(xn) if w is None else w
        if w.w_x is not None:
            if xn.dtype != w.w_x.dtype:
                # Cast once for both GEMMs. Autocast casts a non-leaf input anew at every call, so each
                # GEMM would make, and keep for its weight gradient, a copy of its own: 0.32 GiB of
                # GroupMamba-T's training peak at B=128 (H200, BENCHMARKS.md). (forward() passes
                # layernorm_pool's copy in the autocast dtype, so this cast is for other callers.)
                xn = xn.to(w.w_x.dtype)
            return dual_linear(xn, w.w_x, w.w_z)
        B, H, W, C = xn.shape
        d = C // GROUPS
        xz = grouped_linear_bmm(xn, torch.stack([g.in_proj.weight for g in self.groups]))   # (4, M, 2d)
        return ungroup(xz[..., :d], (B, H, W)), ungroup(xz[..., d:], (B, H, W))

    def conv_silu(self, x: torch.Tensor, w: GroupWeights | None = None) -> torch.Tensor:
        """SiLU(depthwise 3x3 conv) over all 4d channels at once (the groups' kernels concatenated)."""
        w = self.group_weights(x) if w is None else w
        return dwconv_act(x, w.conv_w, w.conv_b, "silu")

    def grouped_scan(self, u: torch.Tensor, w: GroupWeights | None = None) -> torch.Tensor:
        """The four directional scans in one call, (B, H, W, C) -> (B, H, W, C)."""
        w = self.group_weights(u) if w is None else w
        return grouped_scan(u, w.x_proj, w.dt_w, w.dt_b, w.A_log, w.D)

    def out_norm_gate(self, y: torch.Tensor, z: torch.Tensor, w: GroupWeights | None = None) -> torch.Tensor:
        """Per-group out_norm times SiLU(z), one fused op (stacked weights). Under autocast the result is
        already in the autocast dtype: its only consumer is out_proj, whose input cast rounds the same."""
        w = self.group_weights(y) if w is None else w
        return group_layer_norm(y, w.norm_w, w.norm_b, self.groups[0].out_norm.eps, gate=z, out_dtype=autocast_dtype(y))

    def scan_out_norm_gate(self, u: torch.Tensor, z: torch.Tensor, w: GroupWeights | None = None) -> torch.Tensor:
        """grouped_scan then out_norm_gate as one op (ops.grouped_scan_norm); u and z of one dtype, the result's."""
        w = self.group_weights(u) if w is None else w
        nw, nb = (t.to(w.x_proj.dtype) for t in (w.norm_w, w.norm_b))   # float32 already unless bf16-pure
        return grouped_scan_norm(u, z, w.x_proj, w.dt_w, w.dt_b, w.A_log, w.D, nw, nb, self.groups[0].out_norm.eps)

    def grouped_out_proj(self, y: torch.Tensor, w: GroupWeights | None = None) -> torch.Tensor:
        """Every group's out_proj in one GEMM, (B, H, W, C) -> (B, H, W, C)."""
        w = self.group_weights(y) if w is None else w
        if w.w_out is not None:
            return linear(y, w.w_out)
        return ungroup(grouped_linear_bmm(y, torch.stack([g.out_proj.weight for g in self.groups])), y.shape[:3])

    def _mix_unfused(self, xn: torch.Tensor) -> torch.Tensor:
        """Official-style: each group's SS2D one after another, scan via flip/transpose copies."""
        groups = self.groups
        us, zs = [], []
        for g, xg in zip(groups, torch.chunk(xn, GROUPS, dim=-1)):
            xg, zg = g.in_proj(xg).chunk(2, dim=-1)
            zs.append(g.act(zg))
            ug = g.act(g.conv2d(xg.permute(0, 3, 1, 2).contiguous()))
            us.append(ug.permute(0, 2, 3, 1))
        ys = grouped_scan_naive(torch.cat(us, dim=-1), *scan_params(groups, us[0]))
        outs = [g.out_proj(g.out_norm(yg) * zg) for g, yg, zg in zip(groups, torch.chunk(ys, GROUPS, dim=-1), zs)]
        return torch.cat(outs, dim=-1)
