"""GELU (exact, erf form) and SiLU with their derivatives, as Triton device functions in fp32, written for
few instructions: the kernels that use them (the depthwise conv's forward, the activation backward) are
bound by instruction issue, not bytes.

Why not tl.erf / tl.sigmoid: libdevice's erff cost about 34 SASS instructions per element in the conv
forward (sm_90, Triton 3.8: the whole conv + bias + GELU kernel issued 52 per element, the conv + bias
alone 18), and Triton's divisions and exponentials add range fix-ups around each hardware instruction.

GELU(x) = x * Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2, and erfc(z), z >= 0, from the Chebyshev-fitted
formula in Press et al., Numerical Recipes (section 6.2, "erfcc"): erfc(z) = t * exp(-z^2 + P(t)),
t = 1 / (1 + z / 2), P a degree-9 polynomial; its fractional error is below 1.2e-7 for every z >= 0.
Computing the negative side as that product instead of 1 + erf(x / sqrt 2) keeps it accurate where GELU
is tiny. Here the exponent is taken in base 2 with log2(e) and the factor 1/2 folded into P's
coefficients, and a = |x| sqrt(log2(e) / 2) gives both a^2 = z^2 log2(e) and, for the derivative,
exp(-x^2 / 2) = 2^(-a^2). Checked against float64 over [-12, 12] (tests/test_dwconv.py).
On the GPU the reciprocal and 2^y are the bare approximate instructions (rcp / ex2 .approx.ftz, about
1 ulp; their arguments here are >= 1 and results below 2^-126 may flush to zero); the Triton interpreter,
which runs no PTX, uses plain division and tl.exp2 instead.
"""
from __future__ import annotations

import math
import os

import triton
import triton.language as tl

_LOG2E = math.log2(math.e)
_ERFC_P = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
           1.48851587, -0.82215223, 0.17087277)          # P(t), lowest order first
_Q = [c * _LOG2E for c in _ERFC_P]                        # log2(e) P(t) - 1: 2^(...) is exp(P(t)) / 2
_Q[0] -= 1.0
_Q0, _Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8, _Q9 = (tl.constexpr(c) for c in _Q)
_A = tl.constexpr(math.sqrt(_LOG2E / 2))                  # a = |x| * _A
_HALF_Z_PER_A = tl.constexpr(0.5 / (math.sqrt(2) * math.sqrt(_LOG2E / 2)))   # z / 2 = a * this
_NEG_LOG2E = tl.constexpr(-_LOG2E)
_INV_SQRT_2PI = tl.constexpr(1 / math.sqrt(2 * math.pi))

if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def _recip(y):
        return 1.0 / y

    @triton.jit
    def _exp2(y):
        return tl.exp2(y)
else:
    @triton.jit
    def _recip(y):
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [y], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _exp2(y):
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [y], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _cdf_parts(x):
    """(a = |x| sqrt(log2(e) / 2), Phi(x)) of fp32 x."""
    a = tl.abs(x) * _A
    t = _recip(1.0 + a * _HALF_Z_PER_A)
    q = _Q9
    q = q * t + _Q8
    q = q * t + _Q7
    q = q * t + _Q6
    q = q * t + _Q5
    q = q * t + _Q4
    q = q * t + _Q3
    q = q * t + _Q2
    q = q * t + _Q1
    q = q * t + _Q0
    tail = t * _exp2(q - a * a)                                 # Phi(-|x|) = erfc(|x| / sqrt 2) / 2
    return a, tl.where(x < 0, tail, 1.0 - tail)


@triton.jit
def normal_cdf(x):
    """Phi(x), the standard normal CDF."""
    return _cdf_parts(x)[1]


@triton.jit
def gelu(x):
    return x * normal_cdf(x)


@triton.jit
def gelu_grad(x):
    """d GELU / dx = Phi(x) + x * phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi) = 2^(-a^2) / sqrt(2 pi)."""
    a, cdf = _cdf_parts(x)
    return cdf + x * _exp2(-a * a) * _INV_SQRT_2PI


@triton.jit
def sigmoid(x):
    return _recip(1.0 + _exp2(x * _NEG_LOG2E))


@triton.jit
def silu(x):
    return x * sigmoid(x)


@triton.jit
def silu_grad(x):
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))
