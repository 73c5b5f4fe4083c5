"""The Triton kernels (modulation, grouped LayerNorm, depthwise conv, column sum, BatchNorm + ReLU) compile for Hopper (sm_90) with the launchers' tiles.

CI has no GPU: the interpreter tests (test_modulation.py) check the arithmetic, this checks that the
real compiler accepts every kernel, in fp32 and bf16, at a narrow (C=64) and a wide odd (C=348) row.
"""
import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from groupmamba.ops import triton_modulation as tm  # noqa: E402
from groupmamba.ops._util import channel_split  # noqa: E402

F32 = "*fp32"
# pointer arguments in the activation dtype; every other pointer is fp32; scalars as launched
POINTERS = {
    "_ln_pool_fwd": {"X", "XN"},
    "_ln_pool_bwd": {"X", "GXN", "GP", "DX"},
    "_mod_ln_fwd": {"Y", "XN", "S", "OUT"},
    "_mod_ln_bwd": {"G", "Y", "XN", "S", "DY", "DXN"},
}
INTS = {"L", "CV", "T"}
# the constexpr switches of the LayerNorm + pool kernels (all passed explicitly, as the launchers do)
PLAIN = {"_ln_pool_fwd": dict(COPY=False, HAS_RES=False, HAS_SCALE=False),
         "_ln_pool_bwd": dict(COPY=False, ADD_GY=False, HAS_RES=False, HAS_SCALE=False)}


def compile_sm90(kernel, consts, scalars, act_pointers, act, num_warps, pointer_dtypes=None):
    """triton.compile for sm_90: consts as constexprs, scalars {name: type}, pointers named in act_pointers
    in the activation dtype `act`, those in pointer_dtypes {name: type} in theirs, every other pointer fp32.
    Pointers are declared 16-byte aligned, as Triton specializes them when launched on torch tensors."""
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in scalars:
            signature[arg] = scalars[arg]
        else:
            if pointer_dtypes and arg in pointer_dtypes:
                signature[arg] = pointer_dtypes[arg]
            else:
                signature[arg] = act if arg in act_pointers else F32
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


@pytest.mark.parametrize("act", ["*fp32", "*bf16"])
@pytest.mark.parametrize("L,C", [(3136, 64), (784, 192), (196, 348)])
@pytest.mark.parametrize("name", sorted(POINTERS))
def test_kernel_compiles_for_sm90(name, L, C, act):
    kernel = getattr(tm, name)
    elems = tm.CONFIG["fwd_elems" if name.endswith("fwd") else "bwd_elems"]
    block_l, block_c, _, num_warps = tm._tiles(L, C, elems)
    consts = {"BLOCK_L": block_l, "BLOCK_C": block_c, "VEC": channel_split(C)[1], **PLAIN.get(name, {})}
    scalars = {**{k: "i32" for k in INTS}, "eps": "fp32", "inv_L": "fp32"}
    compiled = compile_sm90(kernel, consts, scalars, POINTERS[name], act, num_warps)
    assert len(compiled.asm["cubin"]) > 0
    assert ".target sm_90" in compiled.asm["ptx"]


# The mixer under bf16 autocast: the float32 residual stream x and xn, the bf16 copy of xn for in_proj
# (layernorm_pool's copy_dtype), bf16 y_all, a bf16 modulation result (out_dtype) and bf16 gradients of both
MIXER_DTYPES = {
    "_ln_pool_fwd": {"XN2": "*bf16"},
    "_ln_pool_bwd": {"GXN2": "*bf16"},
    "_mod_ln_fwd": {"Y": "*bf16", "OUT": "*bf16"},
    "_mod_ln_bwd": {"G": "*bf16", "Y": "*bf16", "DY": "*bf16"},
}


@pytest.mark.parametrize("L,C", [(3136, 96), (196, 348)])
@pytest.mark.parametrize("name", sorted(MIXER_DTYPES))
def test_modulation_kernels_compile_with_the_mixers_dtypes(name, L, C):
    kernel = getattr(tm, name)
    block_l, block_c, _, num_warps = tm._tiles(L, C, None)
    consts = {"BLOCK_L": block_l, "BLOCK_C": block_c, "VEC": channel_split(C)[1], **PLAIN.get(name, {})}
    if "COPY" in kernel.arg_names:
        consts["COPY"] = True
    scalars = {**{k: "i32" for k in INTS}, "eps": "fp32", "inv_L": "fp32"}
    compiled = compile_sm90(kernel, consts, scalars, (), "*fp32", num_warps, MIXER_DTYPES[name])
    assert len(compiled.asm["cubin"]) > 0


# add_layernorm_pool as the model runs it under bf16 autocast: float32 stream and sum, bf16 residual (the FFN
# output) and its gradient, the bf16 copy of xn for in_proj and its gradient, DropPath factors
ADD_POOL_DTYPES = {
    "_ln_pool_fwd": {"RES": "*bf16", "XN2": "*bf16"},
    "_ln_pool_bwd": {"GXN2": "*bf16", "DRES": "*bf16"},
}


@pytest.mark.parametrize("L,C", [(3136, 96), (196, 424)])
@pytest.mark.parametrize("name", sorted(ADD_POOL_DTYPES))
def test_add_layernorm_pool_kernels_compile_for_sm90(name, L, C):
    kernel = getattr(tm, name)
    block_l, block_c, _, num_warps = tm._tiles(L, C, None)
    consts = {"BLOCK_L": block_l, "BLOCK_C": block_c, "VEC": channel_split(C)[1],
              **{k: True for k in PLAIN[name]}}
    scalars = {**{k: "i32" for k in INTS}, "eps": "fp32", "inv_L": "fp32"}
    compiled = compile_sm90(kernel, consts, scalars, (), "*fp32", num_warps, ADD_POOL_DTYPES[name])
    assert len(compiled.asm["cubin"]) > 0


NORM_ACT = {"_gln_fwd": {"X", "Z", "OUT"}, "_gln_bwd": {"GO", "X", "Z", "DX", "DZ"}}


@pytest.mark.parametrize("act", ["*fp32", "*bf16"])
@pytest.mark.parametrize("M,G,d,gate", [(401408, 1, 64, False), (25088, 1, 348, False), (401408, 4, 16, True),
                                        (25088, 4, 87, True), (6272, 4, 112, True)])
@pytest.mark.parametrize("name", sorted(NORM_ACT))
def test_norm_kernel_compiles_for_sm90(name, M, G, d, gate, act):
    from groupmamba.ops import triton_norm as tn
    kernel = getattr(tn, name)
    tiles = tn.bwd_tiles if name == "_gln_bwd" else tn.fwd_tiles   # the launchers' tiles
    block_m, block_d, _, num_warps = tiles(M, G, d)
    consts = dict(G=G, D=d, BLOCK_M=block_m, BLOCK_D=block_d, HAS_GATE=gate, SAVE_STATS=True, HAS_RES=False,
                  HAS_SCALE=False)
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    compiled = compile_sm90(kernel, consts, {"M": "i32", "RPS": "i32", "eps": "fp32"}, NORM_ACT[name], act,
                            num_warps)
    assert len(compiled.asm["cubin"]) > 0
    assert ".target sm_90" in compiled.asm["ptx"]


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("M,d", [(401408, 96), (25088, 424), (6272, 512)])
@pytest.mark.parametrize("name", sorted(NORM_ACT))
def test_add_norm_kernels_compile_for_sm90(name, M, d, scale):
    """The residual-add variants (add_layer_norm) as the block runs them under bf16 autocast: the float32
    residual stream and sum, a bf16 residual branch, its bf16 gradient and the bf16 LayerNorm output."""
    from groupmamba.ops import triton_norm as tn
    kernel = getattr(tn, name)
    tiles = tn.bwd_tiles if name == "_gln_bwd" else tn.fwd_tiles
    block_m, block_d, _, num_warps = tiles(M, 1, d)
    consts = dict(G=1, D=d, BLOCK_M=block_m, BLOCK_D=block_d, HAS_GATE=False, SAVE_STATS=True, HAS_RES=True,
                  HAS_SCALE=scale)
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    bf16 = {"RES", "OUT", "GO", "DRES"}
    compiled = compile_sm90(kernel, consts, {"M": "i32", "RPS": "i32", "eps": "fp32"}, bf16, "*bf16", num_warps)
    assert len(compiled.asm["cubin"]) > 0


@pytest.mark.parametrize("act", ["*fp32", "*bf16"])
@pytest.mark.parametrize("C,fn", [(64, "silu"), (512, "gelu"), (348, "silu"), (1392, "gelu")])
@pytest.mark.parametrize("H", [56, 14])
def test_dwconv_kernel_compiles_for_sm90(H, C, fn, act):
    from groupmamba.ops import triton_dwconv as td
    block_h, block_c, num_warps = td.tiles(H, C)
    kernel, ints = td._dwconv_fwd, ("H", "W", "CV", "NHB")
    vec = channel_split(C)[1]
    # the forward with and without the pre-activation store, and the backward's dx pass (taps rotated, no bias),
    # also with its sums of dx (x_bias's gradient)
    for act_code, keep_pre, dx_pass, sum_out in ((td.ACTS[fn], False, False, False), (td.ACTS[fn], True, False, False),
                                                 (0, False, True, False), (0, False, True, True)):
        consts = dict(ACT=act_code, STORE_PRE=keep_pre, BLOCK_H=block_h, BLOCK_C=block_c, VEC=vec,
                      HAS_BIAS=not dx_pass, FLIP_TAPS=dx_pass, SUM_OUT=sum_out)
        compiled = compile_sm90(kernel, consts, {k: "i32" for k in ints}, {"X", "OUT", "PRE"}, act, num_warps)
        assert len(compiled.asm["cubin"]) > 0
    for act_code in (td.ACTS[fn], 0):     # the backward's weight-gradient pass: fused, and over a given g
        block_h, block_c, num_warps, _ = td.wgrad_tiles(H, C, act_code != 0)
        consts = dict(ACT=act_code, BLOCK_H=block_h, BLOCK_C=block_c, VEC=vec)
        compiled = compile_sm90(td._dwconv_wgrad, consts, {k: "i32" for k in ints + ("NRB", "PER_PROGRAM")},
                                {"X", "GO", "G"}, act, num_warps)
        assert len(compiled.asm["cubin"]) > 0 and ".target sm_90" in compiled.asm["ptx"]


@pytest.mark.parametrize("act", ["*fp32", "*bf16"])
@pytest.mark.parametrize("act_code", [0, 1, 2])   # plain column sum, through SiLU' and GELU'
def test_colsum_kernel_compiles_for_sm90(act, act_code):
    compiled = compile_colsum(424, act, act_code)
    assert len(compiled.asm["cubin"]) > 0
    assert ".target sm_90" in compiled.asm["ptx"]


def test_sum_middle_kernel_compiles_for_sm90():
    from groupmamba.ops import triton_colsum as tc
    m = tc.MIDDLE
    compiled = compile_sm90(tc._sum_middle, dict(BLOCK_T=m["block_t"], BLOCK_N=m["block_n"]), {"T": "i32", "N": "i32"},
                            (), F32, m["num_warps"])
    assert ".target sm_90" in compiled.asm["ptx"]


def compile_colsum(N, act, act_code):
    from groupmamba.ops import triton_colsum as tc
    bm, bn, nw = tc.tile(N, act_code)
    consts = dict(ACT=act_code, BLOCK_M=bm, BLOCK_N=bn, VEC=channel_split(N)[1])
    return compile_sm90(tc._colsum_partial, consts, {"M": "i32", "NV": "i32", "ROWS": "i32"},
                        {"G", "PRE", "GPRE"}, act, nw)


def global_access_widths(compiled) -> set:
    """The suffixes of the SASS global loads and stores ('' = 32-bit, '.64', '.128', '.U16' = 16-bit...)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    assert cuobjdump.exists(), f"Triton's cuobjdump is missing at {cuobjdump}"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    widths = set(re.findall(r"\b(?:LDG|STG)\.E((?:\.[A-Z0-9]+)*)", sass))
    assert widths, "no global loads or stores found in the SASS"
    return widths


@pytest.mark.parametrize("C", [348, 424])
def test_unaligned_widths_get_wide_loads(C):
    """Row widths that are not multiples of 16 (GroupMamba-T / -B stage 3: 348, 424) still give the
    compiler their factor of 4 / 8 (row widths reach the kernels as CV * VEC): no 16-bit accesses in bf16.
    They used to load and store 2 bytes at a time, and the column sum ran at 0.44 TB/s at C = 424 (H200)."""
    from groupmamba.ops import triton_dwconv as td
    widths = {"colsum": global_access_widths(compile_colsum(C, "*bf16", 0))}
    block_h, block_c, num_warps = td.tiles(14, C)
    vec = channel_split(C)[1]
    consts = dict(ACT=1, STORE_PRE=False, BLOCK_H=block_h, BLOCK_C=block_c, VEC=vec, HAS_BIAS=True,
                  FLIP_TAPS=False)
    widths["dwconv fwd"] = global_access_widths(compile_sm90(
        td._dwconv_fwd, consts, {k: "i32" for k in ("H", "W", "CV", "NHB")}, {"X", "OUT", "PRE"}, "*bf16",
        num_warps))
    block_h, block_c, num_warps, _ = td.wgrad_tiles(14, C, True)
    widths["dwconv wgrad"] = global_access_widths(compile_sm90(
        td._dwconv_wgrad, dict(ACT=1, BLOCK_H=block_h, BLOCK_C=block_c, VEC=vec),
        {k: "i32" for k in ("H", "W", "CV", "NHB", "NRB", "PER_PROGRAM")}, {"X", "GO", "G"}, "*bf16", num_warps))
    for name, w in widths.items():
        assert not any("U16" in x or "S16" in x for x in w), (name, w)
    assert ".128" in widths["colsum"] or ".64" in widths["colsum"], widths["colsum"]



@pytest.mark.parametrize("act", ["*fp32", "*bf16"])
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("name", ["_bn_sums", "_bn_apply"])
def test_batchnorm_kernel_compiles_for_sm90(name, backward, act):
    from groupmamba.ops import triton_batchnorm as tb
    kernel = getattr(tb, name)
    block_r = tb.CONFIG["block_r" if name == "_bn_sums" else "apply_block_r"]
    consts = dict(C=32, BACKWARD=backward, BLOCK_R=block_r, BLOCK_C=32)
    scalars = {"R": "i32", "ROWS": "i32", "inv_R": "fp32"}
    compiled = compile_sm90(kernel, consts, scalars, {"X", "G", "SHIFT", "OUT"}, act, tb.CONFIG["num_warps"])
    assert len(compiled.asm["cubin"]) > 0
    assert ".target sm_90" in compiled.asm["ptx"]


@pytest.mark.parametrize("act", ["*bf16", "*fp16"])
@pytest.mark.parametrize("two,bias", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("C", [64, 96, 128])
def test_one_pass_linear_backward_compiles_for_sm90(C, two, bias, act):
    """triton_linear's kernel at the launcher's tiles, warps and stages for the widths it serves (the dual
    in_proj; a single Linear with and without bias): compiles for sm_90 and fits an H100 / H200 block's
    shared memory (227 KiB)."""
    from groupmamba.ops import triton_linear as tl_
    N2 = C if two else 0
    consts = dict(K=C, N1=C, N2=N2, BK=tl_._block(C), BN1=tl_._block(C), BN2=tl_._block(N2),
                  BLOCK_M=tl_.CONFIG["block_m"], NUM_STAGES=tl_.CONFIG["num_stages"], TWO=two, BIAS=bias)
    compiled = compile_sm90(tl_._linear_bwd, consts, {"M": "i32", "TILES": "i32"},
                            {"X", "G1", "G2", "W1", "W2", "GX"}, act, tl_.warps(C, C, N2))
    assert len(compiled.asm["cubin"]) > 0
    assert compiled.metadata.shared <= 227 * 1024, compiled.metadata.shared
