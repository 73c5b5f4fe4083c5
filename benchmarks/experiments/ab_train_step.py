"""A/B of the sixth to ninth sets of runs' training-step changes in one process each (run from the
repository root):

    for v in "1 1 1 0" "1 1 0 1" "0 0 0 0" "1 1 1 1"; do set -- $v
      AB_KEEP=$1 AB_COLSUM=$2 AB_ACTBWD=$3 AB_FLAT=$4 python benchmarks/experiments/ab_train_step.py \
          --models groupmamba_tiny --cuda-graph --modes train_bf16 --no-baseline --iters 10
    done
    for v in "fused split" "fused cudnn" "cudnn cudnn"; do set -- $v
      AB_WGRAD=$1 AB_WGRAD_KEPT=$2 python benchmarks/experiments/ab_train_step.py --models groupmamba_tiny \
          --cuda-graph --modes train_bf16 --no-baseline --iters 10
    done

Each switch (1 = as shipped, 0 = off) runs benchmarks/bench_models.py with one change undone
(AB_SCRIPT=profile: benchmarks/profile_model.py instead, with the arguments given):
AB_KEEP   the ConvFFN recompute keeps the conv's pre-activation (models/layers.py)
AB_FC2SKIP the ConvFFN recompute skips fc2's GEMM (fast_linear.outputs_unused in models/layers.py)
AB_MODOUT the modulation returns the autocast dtype to proj (models/mixer.py; 0: float32, cast by proj)
AB_LNCOPY the mixer's LayerNorm also writes the bf16 in_proj input (models/mixer.py; 0: a torch cast)
AB_WIDTH  the conv and column-sum kernels get their row width as CV * VEC (_util.channel_split; 0: as a
          plain integer again, which Triton specializes only on divisibility by 16: 2-byte accesses at
          C = 348, 424)
AB_ADDNORM the block's first residual add and norm2 as one op (ops.add_layer_norm; 0: x + drop_path(r),
          then norm2, as before)
AB_RESADD the block's second residual add with ops.residual_add (0: torch's add, its unvectorized float32 +
          bfloat16 kernel); since AB_CHAIN only a stage's last block uses it
AB_CHAIN  each block's second residual add done by the next block's mixer (ops.add_layernorm_pool; 0: by
          ops.residual_add, then the mixer's layernorm_pool, as before)
AB_FC1EDGE ConvFFN's fc1 bias gradient from the conv (ops.dwconv_act x_bias; from the image edges of g until
          the fourteenth set, now summed by its dx pass; 0: fc1's own bias column sum)
AB_PACK   the mixer's group parameters packed by one autograd node (models/group_weights.py; 0: stacked,
          block-diagonal and cast by separate torch ops, stack_group_weights)
AB_MMDT   captured Linears' weight gradient written in float32 by cuBLAS (fast_linear._wgrad; 0: a 16-bit
          product and a cast kernel)
AB_CA     the mixer's channel attention in float32 with autocast off (models/mixer.py; 0: under autocast)
AB_DUAL   the in_proj halves as one autograd node accumulating x's gradient in the second dgrad GEMM
          (fast_linear.dual_linear; 0: two linears and autograd's add)
AB_TILE_WARPS=n  n warps for the LayerNorm and modulation kernels' tiles of at most 2048 elements
          (ops/_util.tile_warps: 2 since the fourteenth set; before, 4. That set's forward-only and
          backward-only runs used a since-removed split of this switch)
AB_MIDSUM the modulation's per-image partials and column_sum's partial rows summed by
          triton_colsum.sum_middle (0: torch's sums)
AB_FWDTILES the conv forward's own tiles below 28 rows, 8 x 64 (ops/triton_dwconv.tiles; 0: 2 x 128 as the
          weight-gradient pass)
AB_COLSUM captured Linears sum their bias gradient with column_sum (ops/fast_linear.py CONFIG)
AB_ACTBWD the conv backward's fused activation derivative + bias sum (ops/triton_dwconv.py CONFIG)
AB_FLAT   AdamW over flat parameter buffers (bench_models --no-flat-params when 0)
AB_FASTACT the Triton kernels' GELU / SiLU from ops/triton_act.py (0: the libdevice erf and tl.sigmoid
          forms they replaced, patched into the kernels' modules before anything compiles)
AB_DGRAD  the conv's input gradient with the Triton stencil (ops/triton_dwconv.py CONFIG; 0: cuDNN dgrad)
AB_BNRELU the stem's BatchNorm + ReLU in Triton (ops/batchnorm.py; 0: torch's BatchNorm2d and ReLU)
AB_WGRAD, AB_WGRAD_KEPT  the conv backward's weight-gradient method when the pre-activation was
          recomputed / kept ("fused", "split" or "cudnn", ops/triton_dwconv.py CONFIG; default: as shipped)
Results: BENCHMARKS.md, sixth to ninth sets (eighth: AB_BNRELU=0 / 1). AB_MODOUT and AB_LNCOPY came
after the ninth set's last device call and were measured in the tenth set; AB_WIDTH: tenth set; AB_ADDNORM and
AB_FWDTILES: eleventh set; AB_RESADD, AB_MIDSUM, AB_CHAIN, AB_FC1EDGE: twelfth set (and AB_INBIAS,
in experiments/dwconv_in_bias.patch); AB_PACK, AB_MMDT, AB_CA, AB_DUAL: thirteenth set; AB_TILE_WARPS:
fourteenth set (and AB_XBDX, the x_bias gradient from the image edges of g, removed with that
code; AB_COLFIN and AB_GATHER live in experiments/final_sum_in_kernel.patch and foreach_gather.patch).
"""
import contextlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import groupmamba.models.layers as layers  # noqa: E402
import groupmamba.models.mixer as mixer  # noqa: E402
import groupmamba.ops.fast_linear as fast_linear  # noqa: E402
import groupmamba.ops.triton_dwconv as triton_dwconv  # noqa: E402

if os.environ.get("AB_KEEP", "1") == "0":
    layers.keep_preactivation = contextlib.nullcontext
if os.environ.get("AB_FC2SKIP", "1") == "0":
    layers.outputs_unused = contextlib.nullcontext
if os.environ.get("AB_MODOUT", "1") == "0":
    _modulate = mixer.modulate_layernorm
    mixer.modulate_layernorm = lambda *a, out_dtype=None: _modulate(*a)
if os.environ.get("AB_LNCOPY", "1") == "0":
    _ln_pool = mixer.layernorm_pool

    def _ln_pool_cast(x, w, b, eps, copy_dtype=None):
        xn, pooled = _ln_pool(x, w, b, eps)
        return (xn, pooled) if copy_dtype is None else (xn, pooled, xn.to(copy_dtype))
    mixer.layernorm_pool = _ln_pool_cast
if os.environ.get("AB_WIDTH", "1") == "0":
    import groupmamba.ops.triton_colsum as _colsum  # noqa: E402

    def _width_as_int(n):     # what the compiler knew before: a factor of 16 or nothing
        return (n // 16, 16) if n % 16 == 0 else (n, 1)
    triton_dwconv.channel_split = _colsum.channel_split = _width_as_int
if os.environ.get("AB_PACK", "1") == "0":
    mixer.GroupMambaLayer._packed_weights = lambda self, x: None
if os.environ.get("AB_CA", "1") == "0":
    mixer.GroupMambaLayer.channel_attention = lambda self, p: self.sigmoid(self.fc2(self.relu(self.fc1(p))))
if os.environ.get("AB_DUAL", "1") == "0":
    mixer.dual_linear = lambda x, w1, w2: (mixer.linear(x, w1), mixer.linear(x, w2))
if os.environ.get("AB_MMDT", "1") == "0":
    fast_linear._MM_OUT_DTYPE = False
if os.environ.get("AB_FC1EDGE", "1") == "0":
    layers.ConvFFN.fc1_bias_grad_from_conv = False
if os.environ.get("AB_CHAIN", "1") == "0":
    def _add_then_forward(self, x, residual, scale, H, W):
        y = mixer.residual_add(x, residual, scale)
        return y, self.forward(y, H, W)
    mixer.GroupMambaLayer.forward_add = _add_then_forward
if os.environ.get("AB_TILE_WARPS"):   # warps of the LayerNorm / modulation kernels' small tiles
    import groupmamba.ops.triton_modulation as _modulation  # noqa: E402
    import groupmamba.ops.triton_norm as _norm  # noqa: E402
    _tile_warps = _modulation.tile_warps
    _modulation.tile_warps = _norm.tile_warps = \
        lambda elems: int(os.environ["AB_TILE_WARPS"]) if elems <= 2048 else _tile_warps(elems)
if os.environ.get("AB_MIDSUM", "1") == "0":
    import groupmamba.ops.triton_colsum as _colsum  # noqa: E402
    import groupmamba.ops.triton_modulation as _modulation  # noqa: E402
    _modulation.sum_middle = _colsum.sum_middle = lambda p: p.sum(1)
if os.environ.get("AB_FWDTILES", "1") == "0":
    _tiles = triton_dwconv.tiles
    triton_dwconv.tiles = lambda H, C, forward=False: _tiles(H, C)   # the weight-gradient pass's tiles
if os.environ.get("AB_ADDNORM", "1") == "0":
    import groupmamba.models.groupmamba as _gm  # noqa: E402

    def _plain_forward(self, x, H, W):
        x = x + self.drop_path(self.attn(x, H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))
    _gm.GroupMambaBlock.forward = _plain_forward
if os.environ.get("AB_RESADD", "1") == "0":
    import groupmamba.models.groupmamba as _gm  # noqa: E402
    _gm.residual_add = lambda x, r, scale=None: x + (r if scale is None else r * scale.view(-1, 1, 1))
fast_linear.CONFIG["column_sum_bias"] = os.environ.get("AB_COLSUM", "1") == "1"
triton_dwconv.CONFIG["fused_act_bwd"] = os.environ.get("AB_ACTBWD", "1") == "1"
triton_dwconv.CONFIG["triton_dgrad"] = os.environ.get("AB_DGRAD", "1") == "1"
triton_dwconv.CONFIG["wgrad"] = os.environ.get("AB_WGRAD", triton_dwconv.CONFIG["wgrad"])
triton_dwconv.CONFIG["wgrad_kept"] = os.environ.get("AB_WGRAD_KEPT", triton_dwconv.CONFIG["wgrad_kept"])
if os.environ.get("AB_BNRELU", "1") == "0":
    import torch.nn.functional as F  # noqa: E402
    layers.bn_relu = lambda bn, x: F.relu(bn(x), inplace=True)
extra = [] if os.environ.get("AB_FLAT", "1") == "1" else ["--no-flat-params"]

if os.environ.get("AB_FASTACT", "1") == "0":
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402

    import groupmamba.ops.triton_colsum as triton_colsum  # noqa: E402
    import groupmamba.ops.triton_norm as triton_norm  # noqa: E402

    @triton.jit
    def libdevice_gelu(x):
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))

    @triton.jit
    def libdevice_gelu_grad(x):
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327

    @triton.jit
    def tl_sigmoid(x):
        return tl.sigmoid(x)

    @triton.jit
    def tl_silu(x):
        return x * tl.sigmoid(x)

    @triton.jit
    def tl_silu_grad(x):
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))

    triton_dwconv.gelu, triton_dwconv.silu = libdevice_gelu, tl_silu
    triton_dwconv.gelu_grad, triton_dwconv.silu_grad = libdevice_gelu_grad, tl_silu_grad   # the fused wgrad pass
    triton_colsum.gelu_grad, triton_colsum.silu_grad = libdevice_gelu_grad, tl_silu_grad
    triton_norm.sigmoid, triton_norm.silu = tl_sigmoid, tl_silu

if os.environ.get("AB_SCRIPT") == "profile":   # profile_model.py's view of the same configuration
    import profile_model  # noqa: E402  (benchmarks/ is on sys.path above)
    sys.exit(profile_model.main(sys.argv[1:]))

import bench_models  # noqa: E402  (benchmarks/ is on sys.path above)

sys.exit(bench_models.main(sys.argv[1:] + extra))
