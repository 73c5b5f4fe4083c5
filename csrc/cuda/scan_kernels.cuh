#pragma once
// CUDA forward and backward of the four-direction grouped selective scan (contract: python/groupmamba/ops/scan.py).
//
// Fast path (N == 1, d <= 128, chunk % 4 == 0):
//   One launch covers every (batch, group, segment). A segment is a range of consecutive steps of one (b, g) scan
//   sequence: in the backward m whole chunks (it starts from a saved chunk state), in the forward any multiple of K
//   steps (it stores the state entering each chunk that starts inside it). Inside a block, a thread owns CPT = 4
//   channels and a "run" of K consecutive scan steps; the CVp (power of two) lanes that share a step sit next to each
//   other in one warp, so the per-step dots of x_proj (R + 2 rows over the d channels) are warp xor-shuffle
//   reductions. u is read straight from the (B, H, W, C) tensor at scan_position(g, t) (no reordering copies). Each
//   thread scans its run locally from a zero state; the run summaries (decay product P and end state H) are then
//   composed per channel in two levels in the forward (groups of about sqrt(runs) runs, then the groups: serial
//   chains of 32 runs instead of 122 at GroupMamba-T stage 1), and segments of one sequence are chained with a
//   look-back (a block publishes its aggregate, then takes its predecessor's inclusive prefix or, if only the
//   predecessor's aggregate is out, applies it to the inclusive before: one step at most, so the results are
//   bitwise the same from run to run; each value is published packed with its ready mark in one 64-bit word, so
//   no fences). The forward takes tickets
//   segment by segment (every block waits only on blocks that already run, and a predecessor has usually finished).
//   The backward does the same with the adjoint recurrence in reverse order, tickets image by image (the four
//   groups of an image read the same cache lines in different orders; run together, they share them in L2: DRAM
//   reads fell from 1.9x to 1.0x the bytes of u and dy), segments from the last down; the forward state entering a
//   segment comes from `states`. In the backward the run summaries are composed by a shuffle scan over the warp's
//   runs and the warps' totals in order. Parameter gradients: per-thread sums over the run -> shuffle sums over the
//   warp's runs -> one shared-memory row per warp, summed in a fixed order -> one partial row per block -> a
//   two-level deterministic reduction kernel. No floating-point atomics anywhere. GroupMamba's widths run instances
//   with d and R compiled in (pick_fwd / pick_bwd): no spills, and 13-28% faster than the runtime-d ones (H200).
// The fast kernels also come with each group's gated out_norm fused (NORM; the scan_norm ops, see GateNorm): the
//   forward normalizes y in registers (the d channels of a step are on its cvp lanes) and writes
//   LayerNorm_g(y) * SiLU(z) and the step's statistics; the backward composes the forward state first (the
//   norm's backward needs y), makes dy from the output's gradient, then runs the adjoint as without the norm.
// Generic path (any N, any d, any chunk): one block per (b, g), one thread per channel, sequential over
//   the L steps with shared-memory reductions. Slow but simple; used for N > 1, d > 128 or odd chunks.
//
// This header holds the kernels, their launch planning and the ops' shared launch helpers; scan_cuda.cu and
// scan_norm_cuda.cu define the ops (two translation units, compiled in parallel). With GROUPMAMBA_CUDA_EMULATION
// defined, only the kernels and their launch planning are compiled, without torch, for the CPU emulation that tests
// them on machines without a GPU (tests/cuda_emu).
#if !defined(GROUPMAMBA_CUDA_EMULATION)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "scan_common.h"
#else
#include "scan_shape.h"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <tuple>

namespace groupmamba {
namespace {

// Shared memory: the block's dynamic buffer as floats, and a block-wide variable (the emulation keeps both per
// block, since the blocks of a launch run interleaved there).
#if defined(GROUPMAMBA_CUDA_EMULATION)
#define GM_DYNAMIC_SMEM(name) float* name = ::emu::dynamic_smem<float>()
#define GM_SHARED(type, name) type& name = ::emu::block_static<type>(__LINE__)
#else
#define GM_DYNAMIC_SMEM(name) extern __shared__ float name[]
#define GM_SHARED(type, name) __shared__ type name
#endif

constexpr float kLog2e = 1.4426950408889634f;
// Parameter-gradient entries per group (the columns of the partial rows): Wx, Wdt, bias, A_log, D, and with the
// gated out_norm (NORM kernels) its weight and bias after them.
__host__ __device__ constexpr int grad_entries(int d, int R, int N, bool norm = false) {
  return (R + 2 * N) * d + d * R + d + d * N + d + (norm ? 2 * d : 0);
}
__host__ __device__ constexpr int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}
constexpr int kCPT = 4;        // channels per thread (fast path)
// Fast path: the lanes that share a scan step, kCPT channels each, rounded up to a power of two.
__host__ __device__ constexpr int lanes_per_step(int d) { return next_pow2((d + kCPT - 1) / kCPT); }
constexpr int kKF = 4;         // steps per thread, forward
constexpr int kKB = 4;         // steps per thread, backward
constexpr int kThreadsF = 256;  // forward blocks: at most 256 threads, 3 per SM (80 registers)
constexpr int kMinBlocksF = 3;
constexpr int kMaxThreadsB = 512;

// ---- element conversion and vector access -------------------------------------------------------
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

template <int BYTES> struct RawT;
template <> struct RawT<16> { using type = uint4; };
template <> struct RawT<8> { using type = uint2; };
template <> struct RawT<4> { using type = unsigned int; };
template <> struct RawT<2> { using type = unsigned short; };

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  using R = typename RawT<VEC * sizeof(T)>::type;
  R r = __ldg(reinterpret_cast<const R*>(p));
  T tmp[VEC];
  memcpy(tmp, &r, sizeof(R));
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f(tmp[i]);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float* v) {
  using R = typename RawT<VEC * sizeof(T)>::type;
  T tmp[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) tmp[i] = from_f<T>(v[i]);
  R r;
  memcpy(&r, tmp, sizeof(R));
  *reinterpret_cast<R*>(p) = r;
}

// ---- transcendental functions of the scan ---------------------------------------------------------
// libdevice's log1pf, exp2f and expm1f cost 44, 12 and 36 instructions; these cost 2-16 and stay within a few
// fp32 ulps where the result is used (relative error <= 2e-6 over z in [-30, 30], checked against float64).
__device__ __forceinline__ float ex2_approx(float x) {  // 2^x on the special-function unit (~2 ulp; 0 below 2^-126)
#if defined(GROUPMAMBA_CUDA_EMULATION)
  const float y = std::exp2(x);
  return y < 0x1p-126f ? 0.f : y;
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// softplus(z) = max(z, 0) + log1p(e), e = exp(-|z|) in (0, 1]. log1p(e) = 2 atanh(s) with s = e / (2 + e) <= 1/3,
// summed as 2 s (1 + s^2/3 + ... + s^14/15): accurate for small e, where log2(1 + e) on the SFU loses digits
// (the common case: softplus of dt_bias-initialised z is 0.001-0.1).
__device__ __forceinline__ float softplus_f(float z) {
  const float e = ex2_approx(-fabsf(z) * kLog2e);
  const float s = __fdividef(e, 2.f + e), s2 = s * s;
  float p = 1.f / 15.f;
  p = fmaf(p, s2, 1.f / 13.f);
  p = fmaf(p, s2, 1.f / 11.f);
  p = fmaf(p, s2, 1.f / 9.f);
  p = fmaf(p, s2, 1.f / 7.f);
  p = fmaf(p, s2, 1.f / 5.f);
  p = fmaf(p, s2, 1.f / 3.f);
  p = fmaf(p, s2, 1.f);
  return fmaxf(z, 0.f) + 2.f * s * p;
}

// d softplus / dz = sigmoid(z) = 1 - exp(-delta) for delta = softplus(z) >= 0: Taylor series below 0.5 (where
// 1 - exp would cancel), the SFU above.
__device__ __forceinline__ float softplus_grad(float delta) {
  float h = -1.f / 40320.f;
  h = fmaf(h, delta, 1.f / 5040.f);
  h = fmaf(h, delta, -1.f / 720.f);
  h = fmaf(h, delta, 1.f / 120.f);
  h = fmaf(h, delta, -1.f / 24.f);
  h = fmaf(h, delta, 1.f / 6.f);
  h = fmaf(h, delta, -0.5f);
  h = fmaf(h, delta, 1.f);
  return delta < 0.5f ? h * delta : 1.f - ex2_approx(-delta * kLog2e);
}

// Sums each of v[0..n) over the cvp lanes (a power of two <= 2^LV, lanes xor-adjacent) that share a scan
// step; every lane gets the sums. Level by level over all n values, so the n independent shuffle chains overlap;
// levels at or above cvp are skipped by a warp-uniform branch.
// (A runtime loop per value, as before, left each shuffle's latency exposed: short-scoreboard stalls.)
template <int LV, int n>
__device__ __forceinline__ void cv_reduce(float (&v)[n], int cvp) {
#pragma unroll
  for (int l = LV - 1; l >= 0; --l) {
    if ((1 << l) < cvp) {  // uniform: levels above cvp are skipped whole
      float t[n];
#pragma unroll
      for (int i = 0; i < n; ++i) t[i] = __shfl_xor_sync(0xffffffffu, v[i], 1 << l);
#pragma unroll
      for (int i = 0; i < n; ++i) v[i] += t[i];
    }
  }
}

// The gated out_norm's statistics of each of a thread's n steps over the step's d channels (CPT per lane,
// masked by cok): the mean, then 1 / sqrt(variance + eps) from the centred values (two passes over registers,
// as accurate as the Triton LayerNorm's). Every lane of the warp must call it.
template <int LV, int n, int CPT>
__device__ __forceinline__ void layer_norm_stats(const float (&v)[n][CPT], const bool (&cok)[CPT], int d, float eps,
                                                 int cvp, float (&mean)[n], float (&rstd)[n]) {
  const float inv_d = 1.f / (float)d;
#pragma unroll
  for (int i = 0; i < n; ++i) {
    mean[i] = 0.f;
#pragma unroll
    for (int j = 0; j < CPT; ++j) mean[i] += cok[j] ? v[i][j] : 0.f;
  }
  cv_reduce<LV>(mean, cvp);
#pragma unroll
  for (int i = 0; i < n; ++i) {
    mean[i] *= inv_d;
    rstd[i] = 0.f;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const float c = cok[j] ? v[i][j] - mean[i] : 0.f;
      rstd[i] = fmaf(c, c, rstd[i]);
    }
  }
  cv_reduce<LV>(rstd, cvp);
#pragma unroll
  for (int i = 0; i < n; ++i) rstd[i] = rsqrtf(fmaf(rstd[i], inv_d, eps));
}

// Runs of one warp: lane = run_in_warp * cvp + lane_in_run (cvp a power of two <= 32). A run's summary per channel is
// (P, H): the product of its decays and its end state from a zero start; the summary of run r followed by run r' is
// (P P', P' H + H'). warp_scan_runs turns each lane's summary into the inclusive prefix over the warp's runs up to its
// own (Hillis-Steele over log2(32 / cvp) levels); to_exclusive then shifts it by one run (identity for the first).
// The *_rev versions do the same in reverse order, for the adjoint: (Q, O) of run r preceded (on the right) by run
// r' is (Q Q', Q O' + O), the same form; they are kept as written-out mirrors (shuffle down instead of up) because
// folding the pair into one template changed the backward's register allocation, and that code is what the GPU
// tests and benchmarks ran.
template <int n>
__device__ __forceinline__ void warp_scan_runs(float (&P)[n], float (&H)[n], int cvp, int lane) {
  for (int o = cvp; o < 32; o <<= 1) {
#pragma unroll
    for (int j = 0; j < n; ++j) {
      const float pp = __shfl_up_sync(0xffffffffu, P[j], o), hp = __shfl_up_sync(0xffffffffu, H[j], o);
      if (lane >= o) { H[j] = fmaf(P[j], hp, H[j]); P[j] *= pp; }
    }
  }
}
template <int n>
__device__ __forceinline__ void to_exclusive(float (&P)[n], float (&H)[n], int cvp, int lane) {
#pragma unroll
  for (int j = 0; j < n; ++j) {
    const float pp = __shfl_up_sync(0xffffffffu, P[j], cvp), hp = __shfl_up_sync(0xffffffffu, H[j], cvp);
    P[j] = lane >= cvp ? pp : 1.f;
    H[j] = lane >= cvp ? hp : 0.f;
  }
}
template <int n>
__device__ __forceinline__ void warp_scan_runs_rev(float (&Q)[n], float (&O)[n], int cvp, int lane) {
  for (int o = cvp; o < 32; o <<= 1) {
#pragma unroll
    for (int j = 0; j < n; ++j) {
      const float qn = __shfl_down_sync(0xffffffffu, Q[j], o), on = __shfl_down_sync(0xffffffffu, O[j], o);
      if (lane + o < 32) { O[j] = fmaf(Q[j], on, O[j]); Q[j] *= qn; }
    }
  }
}
template <int n>
__device__ __forceinline__ void to_exclusive_rev(float (&Q)[n], float (&O)[n], int cvp, int lane) {
#pragma unroll
  for (int j = 0; j < n; ++j) {
    const float qn = __shfl_down_sync(0xffffffffu, Q[j], cvp), on = __shfl_down_sync(0xffffffffu, O[j], cvp);
    Q[j] = lane + cvp < 32 ? qn : 1.f;
    O[j] = lane + cvp < 32 ? on : 0.f;
  }
}
// Sums each of v[0..n) over the warp's runs (lanes lane_in_run + k*cvp); every lane gets its channel group's sums.
template <int n>
__device__ __forceinline__ void warp_sum_runs(float (&v)[n], int cvp) {
  for (int o = cvp; o < 32; o <<= 1) {
#pragma unroll
    for (int j = 0; j < n; ++j) v[j] += __shfl_xor_sync(0xffffffffu, v[j], o);
  }
}

struct FastParams {
  int B, H, W, C, d, R, L, chunk, nch;
  int Ls, nseg, m;  // steps per segment, segments per sequence, chunks per segment (backward only)
  int cvp, NR;      // lanes per step, runs per segment
  int G, RG;        // forward: groups of runs composed in parallel, runs per group
  int E;            // backward: parameter-gradient entries per group
};

struct ParamPtrs {
  const float* Wx;    // (4, R+2N, d)
  const float* Wdt;   // (4, d, R)
  const float* bias;  // (4, d)
  const float* Alog;  // (4, d, N)
  const float* D;     // (4, d)
};

// The gated out_norm of a GroupMamba mixer, fused into the fast kernels when NORM is set: the forward writes
// LayerNorm_g(y) * SiLU(z) (each group's d channels normalized with its own weight row) instead of y, and each
// step's mean and 1 / sqrt(var + eps); the backward takes that output's gradient, recomputes y, normalizes it
// with the forward's statistics (no reductions for them, and fewer registers), and also writes dz and the norm's
// parameter gradients (two more rows of d entries per group in the partial sums). Unused (null) otherwise.
// The statistics are kept in each group's scan order, (B, 4, L, 2): a run's K steps are 32 contiguous bytes, so
// the forward writes and the backward reads whole sectors (by position, the four groups' pairs shared each
// sector and the forward's partial writes doubled its DRAM traffic: ncu, H200).
template <typename T>
struct GateNorm {
  const T* z;        // (B, H, W, C) like u: the gate
  T* dz;             // backward: the gate's gradient
  const float* w;    // (4, d)
  const float* b;    // (4, d)
  float* stats;      // (B, 4, L, 2): mean, rstd per group and scan step (forward writes, backward reads)
  float eps;
};
// SiLU's sigmoid. The forward divides fast (exact at both ends: 1 / (1 + inf) = 0); the backward keeps the
// correctly rounded reciprocal, whose out-of-line slow path happens to keep ptxas's schedule within the register
// cap: with the fast one the NORM backward spilled 148-368 bytes per thread instead of 52-68 (sm_90).
__device__ __forceinline__ float sigmoid_fast(float v) { return __fdividef(1.f, 1.f + __expf(-v)); }
__device__ __forceinline__ float sigmoid_rn(float v) { return 1.f / (1.f + __expf(-v)); }
// Channel c0 + j's norm weight or bias (p: gn.w or gn.b), 0 past d.
__device__ __forceinline__ float norm_param(const float* p, bool cok, int g, int d, int c0, int j) {
  return cok ? __ldg(p + g * d + c0 + j) : 0.f;
}
__host__ __device__ constexpr size_t align4(size_t n) { return (n + 3) & ~size_t(3); }
// The NORM kernels' staging area (after their other shared arrays, 16-byte aligned): the gate's values of each
// thread's K steps, K * threads * kCPT floats' room, raw T at [(i * threads + thread) * kCPT + channel]: loaded
// at the kernel's start next to u, so the output pass does not wait on a global load (it did: long-scoreboard
// stalls tripled, ncu).
template <typename T, int VEC, int K, int CPT>
__device__ __forceinline__ void stage_gate(const GateNorm<T>& gn, const size_t (&off)[K], const bool (&sok)[K],
                                           const bool (&cok)[CPT], T* sZ) {
  using Raw = typename RawT<VEC * sizeof(T)>::type;
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int q = 0; q < CPT; q += VEC) {
      const Raw r = sok[i] && cok[q] ? __ldg(reinterpret_cast<const Raw*>(gn.z + off[i] + q)) : Raw{};
      *reinterpret_cast<Raw*>(sZ + ((size_t)i * blockDim.x + threadIdx.x) * CPT + q) = r;
    }
}
// The staged gate of step i (zeros where stage_gate had none).
template <typename T, int VEC, int CPT>
__device__ __forceinline__ void staged_gate(const T* sZ, int i, float (&zg)[CPT]) {
  using Raw = typename RawT<VEC * sizeof(T)>::type;
#pragma unroll
  for (int q = 0; q < CPT; q += VEC) {
    const Raw r = *reinterpret_cast<const Raw*>(sZ + ((size_t)i * blockDim.x + threadIdx.x) * CPT + q);
    T tmp[VEC];
    memcpy(tmp, &r, sizeof(Raw));
#pragma unroll
    for (int v = 0; v < VEC; ++v) zg[q + v] = to_f(tmp[v]);
  }
}

// Look-back slots, one 64-bit word per (segment record, channel), each value packed with its own ready mark so
// that one single-copy-atomic store publishes it and one load reads it: no fences (a release store costs a memory
// round trip on the critical path of the block's single-warp phase). The workspace starts as all ones (empty).
//   agg:  low word the decay product's bits (never all ones: arithmetic NaNs are 0x7fffffff), high word the state
//   incl: low word 0 when ready, high word the inclusive state
struct LookBack {
  unsigned long long* agg;   // [rec][d]
  unsigned long long* incl;  // [rec][d]
  unsigned* ticket;          // starts at 0xffffffff: tickets are atomicAdd + 1
};
constexpr unsigned kEmpty = 0xffffffffu;

#if defined(GROUPMAMBA_CUDA_EMULATION)  // one thread runs at a time
inline unsigned long long ld_relaxed64(const unsigned long long* p) {
  ::emu::poll();  // other blocks run meanwhile
  return *p;
}
inline void st_relaxed64(unsigned long long* p, unsigned long long v) { *p = v; }
#else
__device__ __forceinline__ unsigned long long ld_relaxed64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed64(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
#endif
__device__ __forceinline__ unsigned long long pack(unsigned lo, float hi) {
  return (unsigned long long)lo | ((unsigned long long)__float_as_uint(hi) << 32);
}
__device__ __forceinline__ void publish_aggregate(const LookBack& lb, size_t fi, float P, float H) {
  unsigned pb = __float_as_uint(P);
  if (pb == kEmpty) pb = 0x7fffffffu;
  st_relaxed64(lb.agg + fi, pack(pb, H));
}
__device__ __forceinline__ void publish_inclusive(const LookBack& lb, size_t fi, float H) {
  st_relaxed64(lb.incl + fi, pack(0u, H));
}

// The carry entering segment `s` (direction dir = -1 forward, +1 backward), per channel c: the predecessor's
// inclusive prefix or, when only its aggregate (P, H) is out, fmaf(P, inclusive before it, H). That is the very
// fmaf the predecessor's own inclusive is made of (its carry being the inclusive before it), so the result is
// bitwise the same either way and does not depend on timing. A longer walk composing several aggregates (P1 *
// P2, fmaf(P1, H2, H1)) rounds differently: seen as run-to-run differences on an H200. Both words of the
// predecessor's record are read together. (This shape of the loops kept the compiled-in widths' kernels free of
// new spills; a walk-then-fold version spilled 50-100 bytes.)
__device__ __forceinline__ float look_back(const LookBack& lb, int bg, int nseg, int s, int dir, int d, int c) {
  const size_t f1 = (size_t)(bg * nseg + s + dir) * d + c;
  while (true) {
    const unsigned long long iv = ld_relaxed64(lb.incl + f1), av = ld_relaxed64(lb.agg + f1);
    if ((unsigned)iv == 0u) return __uint_as_float((unsigned)(iv >> 32));
    if ((unsigned)av == kEmpty) continue;  // nothing published yet
    // the one before has started earlier (tickets) and waits only on its own predecessors
    const unsigned long long* incl2 = lb.incl + f1 + dir * d;
    unsigned long long iv2;
    while ((unsigned)(iv2 = ld_relaxed64(incl2)) != 0u) {}
    return fmaf(__uint_as_float((unsigned)av), __uint_as_float((unsigned)(iv2 >> 32)),
                __uint_as_float((unsigned)(av >> 32)));
  }
}

__device__ __forceinline__ int scan_pos_i(int g, int t, int H, int W, int L) {
  if (g >= 2) t = L - 1 - t;
  return (g & 1) ? (t % H) * W + t / H : t;
}

// ================================ fast forward ===================================================
// DS, RS: d and R as compile-time constants (GroupMamba's widths, see pick_fwd), or 0 to read them from p.
template <typename T, int VEC, int K, int LV, int DS = 0, int RS = 0, bool NORM = false>
__global__ void __launch_bounds__(kThreadsF, kMinBlocksF) fwd_fast_kernel(FastParams p, const T* __restrict__ u,
                                                                  T* __restrict__ y, float* __restrict__ states,
                                                                  ParamPtrs prm, LookBack lb, GateNorm<T> gn) {
  constexpr int CPT = kCPT;
  GM_DYNAMIC_SMEM(smem);
  GM_SHARED(unsigned, s_ticket);
  const int d = DS ? DS : p.d, R = RS ? RS : p.R, RK = R + 2, C = DS ? kGroups * DS : p.C, tid = threadIdx.x;
  if (tid == 0) s_ticket = atomicAdd(lb.ticket, 1u) + 1u;
  __syncthreads();
  const int nbg = p.B * kGroups;
  const int s = (int)(s_ticket / nbg), bg = (int)(s_ticket % nbg), b = bg / kGroups, g = bg % kGroups;
  const int rec = bg * p.nseg + s;

  float* sWx = smem;            // RK*d
  float* sWdt = sWx + RK * d;   // d*R
  float* sBias = sWdt + d * R;  // d
  float* sA2 = sBias + d;       // d   A * log2(e)
  float* sD = sA2 + d;          // d
  float* sP = sD + d;           // NR*d
  float* sH = sP + p.NR * d;    // NR*d
  float* sGP = sH + p.NR * d;   // G*d   run groups: decay product, then (phase B on) unused
  float* sGH = sGP + p.G * d;   // G*d   run groups: end state, then the carry entering the group
  T* sZ = reinterpret_cast<T*>(smem + align4(sGH + p.G * d - smem));  // NORM: the staged gate (stage_gate)
  for (int i = tid; i < RK * d; i += blockDim.x) sWx[i] = prm.Wx[(size_t)g * RK * d + i];
  for (int i = tid; i < d * R; i += blockDim.x) sWdt[i] = prm.Wdt[(size_t)g * d * R + i];
  for (int i = tid; i < d; i += blockDim.x) {
    sBias[i] = prm.bias[g * d + i];
    sA2[i] = -__expf(prm.Alog[g * d + i]) * kLog2e;
    sD[i] = prm.D[g * d + i];
  }

  const int cvp = DS ? lanes_per_step(DS) : p.cvp, cv = tid & (cvp - 1), run = tid / cvp, c0 = cv * CPT;
  const bool run_ok = run < p.NR;
  const int t0 = s * p.Ls + run * K;
  bool cok[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) cok[j] = c0 + j < d;
  bool sok[K];
  const T* src[K];
  ScanWalk<int> walk(g, t0, p.H, p.W);  // one division for the run's K positions
#pragma unroll
  for (int i = 0; i < K; ++i, walk.next()) {
    sok[i] = run_ok && t0 + i < p.L;
    const int pos = sok[i] ? walk.pos : 0;
    src[i] = u + ((size_t)b * p.L + pos) * C + (size_t)g * d + c0;
  }
  float x[K][CPT];
#pragma unroll
  for (int i = 0; i < K; ++i) {
#pragma unroll
    for (int q = 0; q < CPT; q += VEC) {
      if (sok[i] && cok[q]) load_vec<T, VEC>(src[i] + q, &x[i][q]);
      else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) x[i][q + v] = 0.f;
      }
    }
  }
  if constexpr (NORM) {
    size_t off[K];
#pragma unroll
    for (int i = 0; i < K; ++i) off[i] = src[i] - u;
    stage_gate<T, VEC, K, CPT>(gn, off, sok, cok, sZ);
  }
  __syncthreads();  // parameters in shared memory

  // x_proj: dt rows folded straight into z = dt_proj @ dt_r + bias; B and C kept per step.
  float z[K][CPT], Bv[K], Cv[K];
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const float bj = cok[j] ? sBias[c0 + j] : 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) z[i][j] = bj;
  }
  for (int k = 0; k < RK; ++k) {
    float w[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) w[j] = cok[j] ? sWx[k * d + c0 + j] : 0.f;
    float sk[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      sk[i] = 0.f;
#pragma unroll
      for (int j = 0; j < CPT; ++j) sk[i] = fmaf(w[j], x[i][j], sk[i]);
    }
    cv_reduce<LV>(sk, cvp);
    if (k < R) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const float wd = cok[j] ? sWdt[(c0 + j) * R + k] : 0.f;
#pragma unroll
        for (int i = 0; i < K; ++i) z[i][j] = fmaf(wd, sk[i], z[i][j]);
      }
    } else if (k == R) {
#pragma unroll
      for (int i = 0; i < K; ++i) Bv[i] = sk[i];
    } else {
#pragma unroll
      for (int i = 0; i < K; ++i) Cv[i] = sk[i];
    }
  }

  // Local scan of the run from a zero state: y_i = yl_i + pc_i * carry.
  float A2[CPT], Dv[CPT], hl[CPT], P[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    A2[j] = cok[j] ? sA2[c0 + j] : 0.f;
    Dv[j] = cok[j] ? sD[c0 + j] : 0.f;
    hl[j] = 0.f;
    P[j] = 1.f;
  }
  float yl[K][CPT], pc[K][CPT];
#pragma unroll
  for (int i = 0; i < K; ++i) {
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const float delta = softplus_f(z[i][j]);
      float a = ex2_approx(delta * A2[j]);
      float bb = delta * Bv[i] * x[i][j];
      if (!sok[i]) { a = 1.f; bb = 0.f; }
      hl[j] = fmaf(a, hl[j], bb);
      P[j] *= a;
      yl[i][j] = fmaf(Cv[i], hl[j], Dv[j] * x[i][j]);
      pc[i][j] = Cv[i] * P[j];
    }
  }
  if (run_ok) {
#pragma unroll
    for (int j = 0; j < CPT; ++j)
      if (cok[j]) { sP[run * d + c0 + j] = P[j]; sH[run * d + c0 + j] = hl[j]; }
  }
  __syncthreads();

  // Per channel, in two levels, so that the serial chains are RG + G + G + RG runs long instead of 2 NR:
  // (A) threads (group, channel) compose their group's runs; (B) one thread per channel composes the groups,
  // chains the segments (look-back) and hands each group the carry entering it; (C) threads (group, channel)
  // hand each run its carry and write the chunk states.
  const int gd = p.G * d;
  for (int e = tid; e < gd; e += blockDim.x) {
    const int c = e % d, r0 = (e / d) * p.RG, r1 = min(p.NR, r0 + p.RG);
    float Pg = 1.f, Hg = 0.f;
    for (int r = r0; r < r1; ++r) {
      const float pr = sP[r * d + c];
      Hg = fmaf(pr, Hg, sH[r * d + c]);
      Pg *= pr;
    }
    sGP[e] = Pg;
    sGH[e] = Hg;
  }
  __syncthreads();
  for (int c = tid; c < d; c += blockDim.x) {
    float Pt = 1.f, Ht = 0.f;
    for (int q = 0; q < p.G; ++q) {
      const float pg = sGP[q * d + c];
      Ht = fmaf(pg, Ht, sGH[q * d + c]);
      Pt *= pg;
    }
    const size_t fi = (size_t)rec * d + c;
    float Hin = 0.f;
    if (s > 0) {
      publish_aggregate(lb, fi, Pt, Ht);
      Hin = look_back(lb, bg, p.nseg, s, -1, d, c);
    }
    publish_inclusive(lb, fi, fmaf(Pt, Hin, Ht));
    float hc = Hin;
    for (int q = 0; q < p.G; ++q) {
      const float pg = sGP[q * d + c], hg = sGH[q * d + c];
      sGH[q * d + c] = hc;
      hc = fmaf(pg, hc, hg);
    }
  }
  __syncthreads();
  const int t_begin = s * p.Ls, t_end = min(t_begin + p.Ls, p.L);
  for (int e = tid; e < gd; e += blockDim.x) {
    const int c = e % d, r0 = (e / d) * p.RG, r1 = min(p.NR, r0 + p.RG);
    // the first chunk start at or after the group's first step (chunk starts are multiples of K)
    int kg = (t_begin + r0 * K + p.chunk - 1) / p.chunk;
    int rs = (kg * p.chunk - t_begin) / K;
    const int run_step = p.chunk / K;
    float hc = sGH[e];
    for (int r = r0; r < r1; ++r) {
      const float pr = sP[r * d + c], hr = sH[r * d + c];
      sH[r * d + c] = hc;
      if (r == rs) {
        if (kg * p.chunk < t_end) states[((size_t)bg * p.nch + kg) * d + c] = hc;
        ++kg;
        rs += run_step;
      }
      hc = fmaf(pr, hc, hr);
    }
  }
  __syncthreads();

  if constexpr (NORM) {
    // y into yl (zero on lanes past the segment, channels past d and steps past the end); every lane takes
    // part: the LayerNorm's sums over a step's d channels are shuffles over its cvp lanes
    float carry[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) carry[j] = run_ok && cok[j] ? sH[run * d + c0 + j] : 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i)
#pragma unroll
      for (int j = 0; j < CPT; ++j) yl[i][j] = fmaf(pc[i][j], carry[j], yl[i][j]);
    float mean[K], rstd[K];
    layer_norm_stats<LV, K, CPT>(yl, cok, d, gn.eps, cvp, mean, rstd);
    if (cv == 0) {
      float2* st = reinterpret_cast<float2*>(gn.stats) + (size_t)bg * p.L + t0;  // scan order (GateNorm)
#pragma unroll
      for (int i = 0; i < K; ++i)
        if (sok[i]) st[i] = make_float2(mean[i], rstd[i]);
    }
    float nw[CPT], nb[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      nw[j] = norm_param(gn.w, cok[j], g, d, c0, j);
      nb[j] = norm_param(gn.b, cok[j], g, d, c0, j);
    }
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (!sok[i]) continue;
      const size_t o = src[i] - u;
      float zg[CPT], out[CPT];
      staged_gate<T, VEC, CPT>(sZ, i, zg);
#pragma unroll
      for (int j = 0; j < CPT; ++j)
        out[j] = fmaf((yl[i][j] - mean[i]) * rstd[i], nw[j], nb[j]) * (zg[j] * sigmoid_fast(zg[j]));
#pragma unroll
      for (int q = 0; q < CPT; q += VEC)
        if (cok[q]) store_vec<T, VEC>(y + o + q, &out[q]);
    }
  } else if (run_ok) {
    float carry[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) carry[j] = cok[j] ? sH[run * d + c0 + j] : 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (!sok[i]) continue;
      float out[CPT];
#pragma unroll
      for (int j = 0; j < CPT; ++j) out[j] = fmaf(pc[i][j], carry[j], yl[i][j]);
      T* dst = y + (src[i] - u);
#pragma unroll
      for (int q = 0; q < CPT; q += VEC)
        if (cok[q]) store_vec<T, VEC>(dst + q, &out[q]);
    }
  }
}

// ================================ fast backward ==================================================
// The backward's block-level compositions, per channel c, over the block's warps (sPw: each warp's decay
// product). Forward: from the saved chunk state through the warps left to right; sHw[w] goes from warp w's end
// state to the state entering it.
__device__ __forceinline__ void chain_forward_over_warps(const float* __restrict__ states, const FastParams& p,
                                                         int bg, int s, int nw, int d, int c, const float* sPw,
                                                         float* sHw) {
  float hc = states[((size_t)bg * p.nch + (size_t)s * p.m) * d + c];
  for (int w = 0; w < nw; ++w) {
    const float pw = sPw[w * d + c], hw = sHw[w * d + c];
    sHw[w * d + c] = hc;
    hc = fmaf(pw, hc, hw);
  }
}
// Adjoint: compose the warps right to left, chain the segments right to left (look-back); sOw[w] goes from warp
// w's adjoint total to the adjoint entering it from the right.
__device__ __forceinline__ void chain_adjoint_over_warps(const LookBack& lb, const FastParams& p, int bg, int s,
                                                         int rec, int nw, int d, int c, const float* sPw,
                                                         float* sOw) {
  float Qt = 1.f, Ot = 0.f;
  for (int w = nw - 1; w >= 0; --w) {
    const float q = sPw[w * d + c];
    Ot = fmaf(q, Ot, sOw[w * d + c]);
    Qt *= q;
  }
  const size_t fi = (size_t)rec * d + c;
  float Gin = 0.f;
  if (s < p.nseg - 1) {
    publish_aggregate(lb, fi, Qt, Ot);
    Gin = look_back(lb, bg, p.nseg, s, +1, d, c);
  }
  publish_inclusive(lb, fi, fmaf(Qt, Gin, Ot));
  float G = Gin;
  for (int w = nw - 1; w >= 0; --w) {
    const float q = sPw[w * d + c], o = sOw[w * d + c];
    sOw[w * d + c] = G;
    G = fmaf(q, G, o);
  }
}

// The gated out_norm's backward for a thread's K steps (NORM kernels), in two passes over the steps, each from
// h, the state entering the run (advanced in place). Both recompute y (a few fmas per step) and read the staged z
// rather than keep them: registers, not arithmetic, bound this kernel. dy holds the gradient of LN(y) * SiLU(z)
// (0 past the end and past d). sSt: the run's K (mean, rstd) pairs, staged in shared memory. Every lane of the
// warp must call them.
// Pass 1, gate_norm_sums: per step, the sums over its channels of the normalized value's gradient g and of g times
// the normalized value.
// Pass 2, gate_norm_grads: the gate's gradient (stored), the norm weight's and bias's gradients summed over the
// warp's runs (the warp's first run writes them to `norm_row`: d weight entries, then d bias entries), and y's
// gradient into dy (0 past the end and past d, as the adjoint summaries need).
template <typename T, int VEC, int K, int LV, int CPT>
__device__ __forceinline__ void gate_norm_sums(const GateNorm<T>& gn, const float (&x)[K][CPT],
                                               const float (&delta)[K][CPT], const float (&a)[K][CPT],
                                               const float (&Bv)[K], const float (&Cv)[K], const float (&Dv)[CPT],
                                               float (&h)[CPT], const float (&dy)[K][CPT], const bool (&sok)[K],
                                               const bool (&cok)[CPT], const T* sZ, const float2* sSt, int g, int d,
                                               int cvp, float (&sums)[2 * K]) {
  const int c0 = (threadIdx.x & (cvp - 1)) * CPT;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float2 ms = sok[i] ? sSt[i] : make_float2(0.f, 0.f);
    float zg[CPT];
    staged_gate<T, VEC, CPT>(sZ, i, zg);
    sums[i] = 0.f;
    sums[K + i] = 0.f;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      // y's next step, normalized; written out in both passes (a shared helper cost the fp32 d = 87 kernel 28 more
      // bytes of spill)
      h[j] = fmaf(a[i][j], h[j], sok[i] ? delta[i][j] * Bv[i] * x[i][j] : 0.f);
      const float yh = (fmaf(Cv[i], h[j], Dv[j] * x[i][j]) - ms.x) * ms.y;
      const float nw = norm_param(gn.w, cok[j], g, d, c0, j);
      const float gh = dy[i][j] * zg[j] * sigmoid_rn(zg[j]) * nw;
      sums[i] += gh;
      sums[K + i] = fmaf(gh, yh, sums[K + i]);
    }
  }
  cv_reduce<LV>(sums, cvp);
}

template <typename T, int VEC, int K, int CPT>
__device__ __forceinline__ void gate_norm_grads(const GateNorm<T>& gn, const float (&x)[K][CPT],
                                                const float (&delta)[K][CPT], const float (&a)[K][CPT],
                                                const float (&Bv)[K], const float (&Cv)[K], const float (&Dv)[CPT],
                                                float (&h)[CPT], float (&dy)[K][CPT], const bool (&sok)[K],
                                                const bool (&cok)[CPT], const size_t (&off)[K], const T* sZ,
                                                const float2* sSt, int g, int d, int cvp, const float (&sums)[2 * K],
                                                float* norm_row, bool writer) {
  const int c0 = (threadIdx.x & (cvp - 1)) * CPT;
  const float inv_d = 1.f / (float)d;
  float dw[CPT], db[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) { dw[j] = 0.f; db[j] = 0.f; }
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float2 ms = sok[i] ? sSt[i] : make_float2(0.f, 0.f);
    const float m1 = sums[i] * inv_d, m2 = sums[K + i] * inv_d;
    float zg[CPT];
    staged_gate<T, VEC, CPT>(sZ, i, zg);
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      h[j] = fmaf(a[i][j], h[j], sok[i] ? delta[i][j] * Bv[i] * x[i][j] : 0.f);
      const float yh = (fmaf(Cv[i], h[j], Dv[j] * x[i][j]) - ms.x) * ms.y;
      const float nw = norm_param(gn.w, cok[j], g, d, c0, j), nb = norm_param(gn.b, cok[j], g, d, c0, j);
      const float sg = sigmoid_rn(zg[j]), go = dy[i][j];
      const float gl = go * zg[j] * sg;  // gradient of the normalized affine value
      dw[j] = fmaf(gl, yh, dw[j]);
      db[j] += gl;
      dy[i][j] = sok[i] && cok[j] ? ms.y * (gl * nw - m1 - yh * m2) : 0.f;
      zg[j] = go * fmaf(yh, nw, nb) * sg * fmaf(zg[j], 1.f - sg, 1.f);  // now the gate's gradient
    }
    if (sok[i]) {
#pragma unroll
      for (int q = 0; q < CPT; q += VEC)
        if (cok[q]) store_vec<T, VEC>(gn.dz + off[i] + q, &zg[q]);
    }
  }
  warp_sum_runs<CPT>(dw, cvp);
  warp_sum_runs<CPT>(db, cvp);
  if (writer) {
#pragma unroll
    for (int j = 0; j < CPT; ++j)
      if (cok[j]) { norm_row[c0 + j] = dw[j]; norm_row[d + c0 + j] = db[j]; }
  }
}

template <typename T, int VEC, int K, int LV, int DS = 0, int RS = 0, bool NORM = false>
__global__ void __launch_bounds__(kMaxThreadsB) bwd_fast_kernel(FastParams p, const T* __restrict__ dy_,
                                                                  const T* __restrict__ u, T* __restrict__ du,
                                                                  const float* __restrict__ states, ParamPtrs prm,
                                                                  LookBack lb, float* __restrict__ partial,
                                                                  GateNorm<T> gn) {
  constexpr int CPT = kCPT;
  GM_DYNAMIC_SMEM(smem);
  GM_SHARED(unsigned, s_ticket);
  const int d = DS ? DS : p.d, R = RS ? RS : p.R, RK = R + 2, C = DS ? kGroups * DS : p.C, tid = threadIdx.x;
  const int E = DS && RS ? grad_entries(DS, RS, 1, NORM) : p.E;
  if (tid == 0) s_ticket = atomicAdd(lb.ticket, 1u) + 1u;
  __syncthreads();
  // Tickets image by image (see the top of the file), the segments of a sequence from the last down.
  const int per_b = kGroups * p.nseg, b = (int)(s_ticket / per_b), g = (int)(s_ticket % kGroups);
  const int s = p.nseg - 1 - (int)(s_ticket % per_b) / kGroups, bg = b * kGroups + g;
  const int rec = bg * p.nseg + s;

  float* sWx = smem;              // RK*d
  float* sWdt = sWx + RK * d;     // d*R
  float* sBias = sWdt + d * R;    // d
  float* sA = sBias + d;          // d  (A = -exp(A_log))
  float* sD = sA + d;             // d
  const int nw = blockDim.x >> 5;
  float* sPw = sD + d;              // warps*d  warp decay product
  float* sHw = sPw + nw * d;    // warps*d  warp forward end state -> forward state entering the warp
  float* sOw = sHw + nw * d;    // warps*d  warp adjoint out -> adjoint entering the warp (from the right)
  float* sDtr = sOw + nw * d;   // Ls*R     x_proj's dt rows per step
  float* sRed = sDtr + p.Ls * R;    // warps*E  parameter-gradient sums per warp
  float* sEx = sRed + nw * E;   // 4*NR*d   each run's exclusive prefixes in its warp (P, H forward; P, O adjoint)
  // NORM: the staged gate (stage_gate), then the segment's (mean, rstd) pairs by step
  T* sZ = reinterpret_cast<T*>(smem + align4(sEx + 4 * p.NR * d - smem));
  float2* sSt = reinterpret_cast<float2*>(reinterpret_cast<float*>(sZ) + (size_t)K * blockDim.x * CPT);
  for (int i = tid; i < RK * d; i += blockDim.x) sWx[i] = prm.Wx[(size_t)g * RK * d + i];
  for (int i = tid; i < d * R; i += blockDim.x) sWdt[i] = prm.Wdt[(size_t)g * d * R + i];
  for (int i = tid; i < d; i += blockDim.x) {
    sBias[i] = prm.bias[g * d + i];
    sA[i] = -__expf(prm.Alog[g * d + i]);
    sD[i] = prm.D[g * d + i];
  }

  const int cvp = DS ? lanes_per_step(DS) : p.cvp, cv = tid & (cvp - 1), run = tid / cvp, c0 = cv * CPT;
  const bool run_ok = run < p.NR;
  const int t0 = s * p.Ls + run * K;
  bool cok[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) cok[j] = c0 + j < d;
  bool sok[K];
  size_t off[K];
  ScanWalk<int> walk(g, t0, p.H, p.W);  // one division for the run's K positions
#pragma unroll
  for (int i = 0; i < K; ++i, walk.next()) {
    sok[i] = run_ok && t0 + i < p.L;
    const int pos = sok[i] ? walk.pos : 0;
    off[i] = ((size_t)b * p.L + pos) * C + (size_t)g * d + c0;
  }
  float x[K][CPT], dy[K][CPT];
#pragma unroll
  for (int i = 0; i < K; ++i) {
#pragma unroll
    for (int q = 0; q < CPT; q += VEC) {
      if (sok[i] && cok[q]) {
        load_vec<T, VEC>(u + off[i] + q, &x[i][q]);
        load_vec<T, VEC>(dy_ + off[i] + q, &dy[i][q]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) { x[i][q + v] = 0.f; dy[i][q + v] = 0.f; }
      }
    }
  }
  if constexpr (NORM) {
    stage_gate<T, VEC, K, CPT>(gn, off, sok, cok, sZ);
    if (cv == 0) {
      const float2* st = reinterpret_cast<const float2*>(gn.stats) + (size_t)bg * p.L + t0;  // scan order
#pragma unroll
      for (int i = 0; i < K; ++i)
        if (sok[i]) sSt[run * K + i] = __ldg(st + i);
    }
  }
  __syncthreads();

  float z[K][CPT], Bv[K], Cv[K];
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const float bj = cok[j] ? sBias[c0 + j] : 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) z[i][j] = bj;
  }
  for (int k = 0; k < RK; ++k) {
    float w[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) w[j] = cok[j] ? sWx[k * d + c0 + j] : 0.f;
    float sk[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      sk[i] = 0.f;
#pragma unroll
      for (int j = 0; j < CPT; ++j) sk[i] = fmaf(w[j], x[i][j], sk[i]);
    }
    cv_reduce<LV>(sk, cvp);
    if (k < R) {
      if (cv == 0 && run_ok) {
#pragma unroll
        for (int i = 0; i < K; ++i) sDtr[(run * K + i) * R + k] = sk[i];
      }
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const float wd = cok[j] ? sWdt[(c0 + j) * R + k] : 0.f;
#pragma unroll
        for (int i = 0; i < K; ++i) z[i][j] = fmaf(wd, sk[i], z[i][j]);
      }
    } else if (k == R) {
#pragma unroll
      for (int i = 0; i < K; ++i) Bv[i] = sk[i];
    } else {
#pragma unroll
      for (int i = 0; i < K; ++i) Cv[i] = sk[i];
    }
  }

  float Av[CPT], Av2[CPT], Dv[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    Av[j] = cok[j] ? sA[c0 + j] : 0.f;
    Av2[j] = Av[j] * kLog2e;
    Dv[j] = cok[j] ? sD[c0 + j] : 0.f;
  }
  // delta (in z) and decay a; local forward and adjoint summaries of the run.
  float a[K][CPT];
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      z[i][j] = softplus_f(z[i][j]);
      a[i][j] = sok[i] ? ex2_approx(z[i][j] * Av2[j]) : 1.f;
    }
  // Run summaries, forward (P, hl) and adjoint (P, cont), scanned over the warp's runs (runs past the segment end
  // have identity summaries: a = 1, no input, dy = 0).
  const int lane = tid & 31, wid = tid >> 5;
  float Pf[CPT], Hf[CPT], Qb[CPT], Ob[CPT];
  if constexpr (NORM) {
    // dy needs y, and y the forward state entering the run: the forward composition finishes first, then
    // the norm's backward makes dy, then the adjoint's summaries and composition follow.
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      float hl = 0.f, P = 1.f;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        hl = fmaf(a[i][j], hl, sok[i] ? z[i][j] * Bv[i] * x[i][j] : 0.f);
        P *= a[i][j];
      }
      Pf[j] = P; Hf[j] = hl;
    }
    warp_scan_runs<CPT>(Pf, Hf, cvp, lane);
    if (lane + cvp >= 32) {
#pragma unroll
      for (int j = 0; j < CPT; ++j)
        if (cok[j]) { sPw[wid * d + c0 + j] = Pf[j]; sHw[wid * d + c0 + j] = Hf[j]; }
    }
    to_exclusive<CPT>(Pf, Hf, cvp, lane);
    if (run_ok) {
#pragma unroll
      for (int j = 0; j < CPT; ++j)
        if (cok[j]) { sEx[run * d + c0 + j] = Pf[j]; sEx[run * d + c0 + j + p.NR * d] = Hf[j]; }
    }
    __syncthreads();
    for (int c = tid; c < d; c += blockDim.x) chain_forward_over_warps(states, p, bg, s, nw, d, c, sPw, sHw);
    __syncthreads();
    // the forward state entering the run (read again for the second pass: fewer live registers)
    auto entering = [&](float (&h)[CPT]) {
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int e = run * d + c0 + j;
        h[j] = run_ok && cok[j] ? fmaf(sEx[e], sHw[wid * d + c0 + j], sEx[e + p.NR * d]) : 0.f;
      }
    };
    float h[CPT], sums[2 * K];
    entering(h);
    gate_norm_sums<T, VEC, K, LV, CPT>(gn, x, z, a, Bv, Cv, Dv, h, dy, sok, cok, sZ, sSt + run * K, g, d, cvp,
                                       sums);
    entering(h);
    gate_norm_grads<T, VEC, K, CPT>(gn, x, z, a, Bv, Cv, Dv, h, dy, sok, cok, off, sZ, sSt + run * K, g, d, cvp,
                                    sums, sRed + (size_t)wid * E + grad_entries(d, R, 1), lane < cvp);
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      float cont = 0.f, P = 1.f;
#pragma unroll
      for (int i = K - 1; i >= 0; --i) {
        cont = a[i][j] * fmaf(Cv[i], dy[i][j], cont);
        P *= a[i][j];
      }
      Qb[j] = P; Ob[j] = cont;
    }
    warp_scan_runs_rev<CPT>(Qb, Ob, cvp, lane);
    if (lane < cvp) {
#pragma unroll
      for (int j = 0; j < CPT; ++j)
        if (cok[j]) sOw[wid * d + c0 + j] = Ob[j];
    }
    to_exclusive_rev<CPT>(Qb, Ob, cvp, lane);
    if (run_ok) {
#pragma unroll
      for (int j = 0; j < CPT; ++j)
        if (cok[j]) { sEx[run * d + c0 + j + 2 * p.NR * d] = Qb[j]; sEx[run * d + c0 + j + 3 * p.NR * d] = Ob[j]; }
    }
    __syncthreads();
    for (int c = tid; c < d; c += blockDim.x) chain_adjoint_over_warps(lb, p, bg, s, rec, nw, d, c, sPw, sOw);
    __syncthreads();
  } else {
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      float hl = 0.f, P = 1.f, cont = 0.f;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const float bb = sok[i] ? z[i][j] * Bv[i] * x[i][j] : 0.f;
        hl = fmaf(a[i][j], hl, bb);
        P *= a[i][j];
      }
#pragma unroll
      for (int i = K - 1; i >= 0; --i) cont = a[i][j] * fmaf(Cv[i], dy[i][j], cont);
      Pf[j] = P; Hf[j] = hl; Qb[j] = P; Ob[j] = cont;
    }
    warp_scan_runs<CPT>(Pf, Hf, cvp, lane);
    warp_scan_runs_rev<CPT>(Qb, Ob, cvp, lane);
    if (lane + cvp >= 32) {  // the warp's last run: the warp's forward total (its decay product serves both ways)
#pragma unroll
      for (int j = 0; j < CPT; ++j)
        if (cok[j]) { sPw[wid * d + c0 + j] = Pf[j]; sHw[wid * d + c0 + j] = Hf[j]; }
    }
    if (lane < cvp) {  // the warp's first run: the warp's adjoint total
#pragma unroll
      for (int j = 0; j < CPT; ++j)
        if (cok[j]) sOw[wid * d + c0 + j] = Ob[j];
    }
    to_exclusive<CPT>(Pf, Hf, cvp, lane);
    to_exclusive_rev<CPT>(Qb, Ob, cvp, lane);
    if (run_ok) {  // parked in shared memory: registers are short here
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        if (!cok[j]) continue;
        const int e = run * d + c0 + j;
        sEx[e] = Pf[j]; sEx[e + p.NR * d] = Hf[j]; sEx[e + 2 * p.NR * d] = Qb[j]; sEx[e + 3 * p.NR * d] = Ob[j];
      }
    }
    __syncthreads();
    for (int c = tid; c < d; c += blockDim.x) {
      chain_forward_over_warps(states, p, bg, s, nw, d, c, sPw, sHw);
      chain_adjoint_over_warps(lb, p, bg, s, rec, nw, d, c, sPw, sOw);
    }
    __syncthreads();
  }

  // A per channel for the final pass: the NORM kernels read it again from shared memory (a register less
  // through their norm passes, where they spill).
  auto Aj = [&](int j) { return NORM ? (cok[j] ? sA[c0 + j] : 0.f) : Av[j]; };
  // Final: adjoint per step (reverse walk), then a forward walk producing every gradient.
  float hprev[CPT], dA[CPT], dD[CPT], db[CPT];
  float dBp[K], dCp[K];
  float gsv[K][CPT];  // adjoint g, then dz
  float dx[K][CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    hprev[j] = 0.f;
    float cont = 0.f;
    if (run_ok && cok[j]) {
      const int e = run * d + c0 + j;
      hprev[j] = fmaf(sEx[e], sHw[wid * d + c0 + j], sEx[e + p.NR * d]);
      cont = fmaf(sEx[e + 2 * p.NR * d], sOw[wid * d + c0 + j], sEx[e + 3 * p.NR * d]);
    }
#pragma unroll
    for (int i = K - 1; i >= 0; --i) {
      const float gg = fmaf(Cv[i], dy[i][j], cont);
      gsv[i][j] = gg;
      cont = a[i][j] * gg;
    }
    dA[j] = 0.f; dD[j] = 0.f; db[j] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < K; ++i) {
    float sB = 0.f, sC = 0.f;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const float delta = z[i][j], xi = x[i][j], gg = gsv[i][j], ai = a[i][j];
      const float h = fmaf(ai, hprev[j], delta * Bv[i] * xi);
      float dzv = 0.f;
      if (sok[i]) {
        sC = fmaf(dy[i][j], h, sC);
        sB = fmaf(gg * delta, xi, sB);
        const float ha = hprev[j] * ai;
        const float ddelta = gg * fmaf(Bv[i], xi, ha * Aj(j));
        dA[j] = fmaf(gg * ha, delta, dA[j]);
        dD[j] = fmaf(dy[i][j], xi, dD[j]);
        dzv = ddelta * softplus_grad(delta);
        db[j] += dzv;
      }
      dx[i][j] = fmaf(dy[i][j], Dv[j], gg * delta * Bv[i]);
      gsv[i][j] = dzv;
      hprev[j] = h;
    }
    dBp[i] = sB;
    dCp[i] = sC;
  }
  // Gradient of the x_proj outputs per step (reduced over the channels), into dx; parameter gradients summed over
  // the warp's runs (shuffles) into the warp's row of sRed, whose rows are summed in order at the end.
  float* row = sRed + (size_t)wid * E;
  const bool writer = lane < cvp;  // the warp's first run writes the warp's sums
  for (int k = 0; k < RK; ++k) {
    float wd[CPT], w[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      wd[j] = (k < R && cok[j]) ? sWdt[(c0 + j) * R + k] : 0.f;
      w[j] = cok[j] ? sWx[k * d + c0 + j] : 0.f;
    }
    float sk[K];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (k < R) {
        sk[i] = 0.f;
#pragma unroll
        for (int j = 0; j < CPT; ++j) sk[i] = fmaf(wd[j], gsv[i][j], sk[i]);
      } else {
        sk[i] = (k == R) ? dBp[i] : dCp[i];
      }
    }
    cv_reduce<LV>(sk, cvp);
    float acc[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      acc[j] = 0.f;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        dx[i][j] = fmaf(w[j], sk[i], dx[i][j]);
        acc[j] = fmaf(sk[i], x[i][j], acc[j]);  // x = 0 on steps past the end
      }
    }
    warp_sum_runs<CPT>(acc, cvp);
    if (writer) {
#pragma unroll
      for (int j = 0; j < CPT; ++j)
        if (cok[j]) row[k * d + c0 + j] = acc[j];
    }
  }
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (!sok[i]) continue;
#pragma unroll
    for (int q = 0; q < CPT; q += VEC)
      if (cok[q]) store_vec<T, VEC>(du + off[i] + q, &dx[i][q]);
  }
  for (int r = 0; r < R; ++r) {
    float dt[K];
#pragma unroll
    for (int i = 0; i < K; ++i) dt[i] = run_ok ? sDtr[(run * K + i) * R + r] : 0.f;
    float acc[CPT];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      acc[j] = 0.f;
#pragma unroll
      for (int i = 0; i < K; ++i) acc[j] = fmaf(gsv[i][j], dt[i], acc[j]);
    }
    warp_sum_runs<CPT>(acc, cvp);
    if (writer) {
#pragma unroll
      for (int j = 0; j < CPT; ++j)
        if (cok[j]) row[RK * d + (c0 + j) * R + r] = acc[j];
    }
  }
#pragma unroll
  for (int j = 0; j < CPT; ++j) dA[j] *= Aj(j);
  warp_sum_runs<CPT>(db, cvp);
  warp_sum_runs<CPT>(dA, cvp);
  warp_sum_runs<CPT>(dD, cvp);
  if (writer) {
    const int ob = (RK + R) * d;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      if (!cok[j]) continue;
      const int c = c0 + j;
      row[ob + c] = db[j];
      row[ob + d + c] = dA[j];
      row[ob + 2 * d + c] = dD[j];
    }
  }
  __syncthreads();
  for (int e = tid; e < E; e += blockDim.x) {
    float acc = 0.f;
    for (int w = 0; w < nw; ++w) acc += sRed[(size_t)w * E + e];
    partial[(size_t)rec * E + e] = acc;
  }
}

// ================================ generic (slow) path ============================================
template <typename T>
__global__ void fwd_generic_kernel(const T* __restrict__ u, T* __restrict__ y, float* __restrict__ states,
                                   ParamPtrs prm, int B, int H, int W, int d, int R, int N, int chunk, int nch) {
  GM_DYNAMIC_SMEM(smem);
  const int L = H * W, C = kGroups * d, RK = R + 2 * N, tid = threadIdx.x;
  const int bg = blockIdx.x, b = bg / kGroups, g = bg % kGroups;
  float* sx = smem;          // d
  float* srow = sx + d;      // RK
  float* sh = srow + RK;     // N*d  (thread c owns sh[n*d+c])
  const float* Wx = prm.Wx + (size_t)g * RK * d;
  const bool act = tid < d;
  const int c = tid;
  float bias = 0.f, Dc = 0.f;
  if (act) {
    bias = prm.bias[g * d + c];
    Dc = prm.D[g * d + c];
    for (int n = 0; n < N; ++n) sh[n * d + c] = 0.f;
  }
  for (int t = 0; t < L; ++t) {
    const int pos = scan_pos_i(g, t, H, W, L);
    const size_t o = ((size_t)b * L + pos) * C + (size_t)g * d + c;
    float xc = 0.f;
    if (act) {
      if (t % chunk == 0)
        for (int n = 0; n < N; ++n) states[(((size_t)bg * nch + t / chunk) * d + c) * N + n] = sh[n * d + c];
      xc = to_f(u[o]);
      sx[c] = xc;
    }
    __syncthreads();
    for (int k = tid; k < RK; k += blockDim.x) {
      float acc = 0.f;
      for (int cc = 0; cc < d; ++cc) acc = fmaf(Wx[k * d + cc], sx[cc], acc);
      srow[k] = acc;
    }
    __syncthreads();
    if (act) {
      float zz = bias;
      for (int r = 0; r < R; ++r) zz = fmaf(prm.Wdt[((size_t)g * d + c) * R + r], srow[r], zz);
      const float delta = softplus_f(zz);
      float yv = Dc * xc;
      for (int n = 0; n < N; ++n) {
        const float A = -__expf(prm.Alog[((size_t)g * d + c) * N + n]);
        const float h = fmaf(__expf(delta * A), sh[n * d + c], delta * srow[R + n] * xc);
        sh[n * d + c] = h;
        yv = fmaf(srow[R + N + n], h, yv);
      }
      y[o] = from_f<T>(yv);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void bwd_generic_kernel(const T* __restrict__ dy_, const T* __restrict__ u, T* __restrict__ du,
                                   ParamPtrs prm, float* __restrict__ hs, float* __restrict__ partial, int B, int H,
                                   int W, int d, int R, int N, int E) {
  GM_DYNAMIC_SMEM(smem);
  const int L = H * W, C = kGroups * d, RK = R + 2 * N, tid = threadIdx.x;
  const int bg = blockIdx.x, b = bg / kGroups, g = bg % kGroups;
  float* sx = smem;             // d
  float* srow = sx + d;         // RK
  float* sdx = srow + RK;       // RK
  float* sred = sdx + RK;       // RK*d
  float* sacc = sred + RK * d;  // E (thread c owns its entries)
  float* sg = sacc + E;         // N*d adjoint continuation
  float* hrow = hs + (size_t)bg * L * N * d;
  const float* Wx = prm.Wx + (size_t)g * RK * d;
  const bool act = tid < d;
  const int c = tid;
  for (int e = tid; e < E; e += blockDim.x) sacc[e] = 0.f;
  float bias = 0.f, Dc = 0.f;
  if (act) {
    bias = prm.bias[g * d + c];
    Dc = prm.D[g * d + c];
    for (int n = 0; n < N; ++n) sg[n * d + c] = 0.f;
  }
  __syncthreads();
  auto project = [&](int t, float& xc, size_t& o) {
    const int pos = scan_pos_i(g, t, H, W, L);
    o = ((size_t)b * L + pos) * C + (size_t)g * d + c;
    xc = act ? to_f(u[o]) : 0.f;
    if (act) sx[c] = xc;
    __syncthreads();
    for (int k = tid; k < RK; k += blockDim.x) {
      float acc = 0.f;
      for (int cc = 0; cc < d; ++cc) acc = fmaf(Wx[k * d + cc], sx[cc], acc);
      srow[k] = acc;
    }
    __syncthreads();
  };
  // pass 1: forward states after each step
  for (int t = 0; t < L; ++t) {
    float xc;
    size_t o;
    project(t, xc, o);
    if (act) {
      float zz = bias;
      for (int r = 0; r < R; ++r) zz = fmaf(prm.Wdt[((size_t)g * d + c) * R + r], srow[r], zz);
      const float delta = softplus_f(zz);
      for (int n = 0; n < N; ++n) {
        const float A = -__expf(prm.Alog[((size_t)g * d + c) * N + n]);
        const float hp = t > 0 ? hrow[((size_t)(t - 1) * N + n) * d + c] : 0.f;
        hrow[((size_t)t * N + n) * d + c] = fmaf(__expf(delta * A), hp, delta * srow[R + n] * xc);
      }
    }
    __syncthreads();
  }
  // pass 2: reverse
  for (int t = L - 1; t >= 0; --t) {
    float xc;
    size_t o;
    project(t, xc, o);
    float dxv = 0.f, dzv = 0.f, delta = 0.f;
    if (act) {
      const float dyv = to_f(dy_[o]);
      float zz = bias;
      for (int r = 0; r < R; ++r) zz = fmaf(prm.Wdt[((size_t)g * d + c) * R + r], srow[r], zz);
      delta = softplus_f(zz);
      float ddelta = 0.f;
      for (int n = 0; n < N; ++n) {
        const float A = -__expf(prm.Alog[((size_t)g * d + c) * N + n]);
        const float a = __expf(delta * A);
        const float hp = t > 0 ? hrow[((size_t)(t - 1) * N + n) * d + c] : 0.f;
        const float h = hrow[((size_t)t * N + n) * d + c];
        const float gg = fmaf(srow[R + N + n], dyv, sg[n * d + c]);
        ddelta += gg * fmaf(srow[R + n], xc, hp * a * A);
        sacc[(RK + R + 1) * d + c * N + n] += gg * hp * a * delta * A;  // dA_log = dA * A
        dxv = fmaf(gg * delta, srow[R + n], dxv);
        sred[(R + n) * d + c] = gg * delta * xc;
        sred[(R + N + n) * d + c] = dyv * h;
        sg[n * d + c] = a * gg;
      }
      dxv = fmaf(dyv, Dc, dxv);
      sacc[(RK + R + 1 + N) * d + c] += dyv * xc;  // dD
      dzv = ddelta * softplus_grad(delta);
      sacc[(RK + R) * d + c] += dzv;  // dbias
      for (int r = 0; r < R; ++r) {
        sred[r * d + c] = prm.Wdt[((size_t)g * d + c) * R + r] * dzv;
        sacc[RK * d + c * R + r] += dzv * srow[r];  // dWdt
      }
    }
    __syncthreads();
    for (int k = tid; k < RK; k += blockDim.x) {
      float acc = 0.f;
      for (int cc = 0; cc < d; ++cc) acc += sred[k * d + cc];
      sdx[k] = acc;
    }
    __syncthreads();
    if (act) {
      for (int k = 0; k < RK; ++k) {
        dxv = fmaf(Wx[k * d + c], sdx[k], dxv);
        sacc[k * d + c] += sdx[k] * xc;
      }
      du[o] = from_f<T>(dxv);
    }
    __syncthreads();
  }
  for (int e = tid; e < E; e += blockDim.x) partial[(size_t)bg * E + e] = sacc[e];
}

// ================================ parameter-gradient reduction ===================================
// partial: (B*4*nseg, E) rows, row (b*4+g)*nseg + s. Level 1: block (x, y, z) sums slice y (`kSlice` rows
// of group z) for the 256 entries x*256 ...; every thread's loads are independent, so they overlap. (One block
// per slice looping over all E entries, as before, was 112 blocks at GroupMamba-B stage 3 and took 45 us.)
constexpr int kSlice = 32;
constexpr int kRedThreads = 256;
__global__ void __launch_bounds__(kRedThreads) reduce_level1(const float* __restrict__ partial,
                                                             float* __restrict__ out, int B, int nseg, int E,
                                                             int nsl) {
  const int g = blockIdx.z, sl = blockIdx.y, e = blockIdx.x * kRedThreads + threadIdx.x, rows = B * nseg;
  if (e >= E) return;
  const int r0 = sl * kSlice, r1 = min(rows, r0 + kSlice);
  float acc = 0.f;
#pragma unroll 8
  for (int r = r0; r < r1; ++r) {
    const int bb = r / nseg, s = r % nseg;
    acc += __ldg(partial + ((size_t)(bb * kGroups + g) * nseg + s) * E + e);
  }
  out[((size_t)g * nsl + sl) * E + e] = acc;
}

__global__ void reduce_level2(const float* __restrict__ l1, int nsl, int E, int d, int R, int N, float* dWx,
                              float* dWdt, float* dbias, float* dAlog, float* dD, float* dnw = nullptr,
                              float* dnb = nullptr) {
  const int g = blockIdx.y, e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  float acc = 0.f;
  for (int sl = 0; sl < nsl; ++sl) acc += l1[((size_t)g * nsl + sl) * E + e];
  const int RK = R + 2 * N;
  int o = e;
  if (o < RK * d) { dWx[(size_t)g * RK * d + o] = acc; return; }
  o -= RK * d;
  if (o < d * R) { dWdt[(size_t)g * d * R + o] = acc; return; }
  o -= d * R;
  if (o < d) { dbias[g * d + o] = acc; return; }
  o -= d;
  if (o < d * N) { dAlog[(size_t)g * d * N + o] = acc; return; }
  o -= d * N;
  if (o < d) { dD[g * d + o] = acc; return; }
  o -= d;  // the gated out_norm's entries (NORM kernels)
  if (o < d) { dnw[g * d + o] = acc; return; }
  dnb[g * d + o - d] = acc;
}

// ================================ host side ======================================================

struct FastPlan {
  bool ok = false;
  FastParams p{};
  int threads = 0;
  size_t smem = 0;
  int nrec = 0;
};

// Threads = runs * cvp rounded up to whole warps. Backward segment = m whole chunks; forward segment = the
// sequence split evenly into as few segments of at most max_threads / cvp runs as possible.
// The backward's per-warp parameter rows (warps x (2R+5)d floats) put d = 128 with 64-step chunks (16 warps) over
// the shared-memory cap: that case runs the generic kernel (the default chunk for d > 64 is 32).
FastPlan plan_fast(const ScanDims& s, int64_t chunk, int K, int max_threads, bool backward, bool norm) {
  FastPlan pl;
  if (s.N != 1 || s.d > 32 * kCPT || chunk % 4 != 0 || chunk > (int64_t)1 << 20) return pl;
  FastParams& p = pl.p;
  p.B = (int)s.B; p.H = (int)s.H; p.W = (int)s.W; p.C = (int)s.C; p.d = (int)s.d; p.R = (int)s.R;
  p.L = (int)s.L; p.chunk = (int)chunk; p.nch = (int)num_chunks(s.L, chunk);
  p.cvp = lanes_per_step(p.d);
  const int max_steps = (max_threads / p.cvp) * K;
  if (backward) {
    if (p.chunk > max_steps) return pl;
    const int m_max = max_steps / p.chunk;
    p.nseg = (p.nch + m_max - 1) / m_max;
    p.m = (p.nch + p.nseg - 1) / p.nseg;
    p.nseg = (p.nch + p.m - 1) / p.m;
    p.Ls = p.m * p.chunk;
  } else {
    if (max_steps < K) return pl;
    p.nseg = (p.L + max_steps - 1) / max_steps;
    p.Ls = (p.L + p.nseg - 1) / p.nseg;
    p.Ls = (p.Ls + K - 1) / K * K;
    p.nseg = (p.L + p.Ls - 1) / p.Ls;
  }
  p.NR = p.Ls / K;
  // forward run groups: about sqrt(NR) of them (a power of two), at most one per thread and channel
  p.G = 1;
  while (p.G * p.G < p.NR && 2 * p.G * p.d <= max_threads) p.G *= 2;
  p.RG = (p.NR + p.G - 1) / p.G;
  p.G = (p.NR + p.RG - 1) / p.RG;
  pl.threads = ((p.NR * p.cvp + 31) / 32) * 32;
  const int d = p.d, R = p.R, RK = R + 2;
  size_t fl = (size_t)RK * d + (size_t)d * R + 3 * d;
  if (!backward) {
    fl += 2 * (size_t)p.NR * d + 2 * (size_t)p.G * d;
  } else {
    const size_t nw = pl.threads / 32;  // the backward's per-warp arrays
    p.E = grad_entries(d, R, 1, norm);
    fl += 3 * nw * d + (size_t)p.Ls * R + nw * p.E + 4 * (size_t)p.NR * d;
  }
  // NORM: the staged gate (stage_gate), and in the backward the segment's statistics
  if (norm) fl = align4(fl) + (size_t)K * pl.threads * kCPT + (backward ? 2 * (size_t)p.Ls : 0);
  pl.smem = fl * sizeof(float);
  if (pl.smem > 200 * 1024) return pl;
  pl.nrec = p.B * kGroups * p.nseg;
  pl.ok = true;
  return pl;
}
FastPlan plan_fwd(const ScanDims& s, int64_t chunk, bool norm = false) {
  return plan_fast(s, chunk, kKF, kThreadsF, false, norm);
}
// 256-thread blocks where the chunk allows, else up to 512
FastPlan plan_bwd(const ScanDims& s, int64_t chunk, bool norm = false) {
  const FastPlan pl = plan_fast(s, chunk, kKB, 256, true, norm);
  return pl.ok ? pl : plan_fast(s, chunk, kKB, kMaxThreadsB, true, norm);
}

int grad_entries(const ScanDims& s, bool norm = false) { return grad_entries((int)s.d, (int)s.R, (int)s.N, norm); }
// The generic kernels: one thread per channel, one block per (b, g) sequence.
int generic_threads(const ScanDims& s) { return (int)((s.d + 31) / 32 * 32); }
size_t generic_fwd_smem(const ScanDims& s) { return (s.d + (s.R + 2 * s.N) + s.N * s.d) * sizeof(float); }
size_t generic_bwd_smem(const ScanDims& s) {
  const int64_t RK = s.R + 2 * s.N;
  return (s.d + 2 * RK + RK * s.d + grad_entries(s) + s.N * s.d) * sizeof(float);
}
// Row slices of reduce_level1 for `rows` = B * segments rows per group.
int reduce_slices(int rows) { return (rows + kSlice - 1) / kSlice; }

// The look-back over a workspace of look_back_words(slots) int64 words set to all ones (empty slots; the ticket
// counter wraps to 0 on its first increment): aggregates, inclusives, then the ticket.
int64_t look_back_words(int64_t slots) { return 2 * slots + 1; }
LookBack look_back_view(int64_t* ws, int64_t slots) {
  auto* w = reinterpret_cast<unsigned long long*>(ws);
  return LookBack{w, w + slots, reinterpret_cast<unsigned*>(w + 2 * slots)};
}

// Widest vector (4, 2 or 1 elements) for the fast kernels' accesses at (position, g*d + c0 + q): every offset is a
// multiple of it when d is, and each pointer must be aligned to it. d = 106 (GroupMamba-B stage 3) takes pairs:
// 4-byte bf16 loads instead of 2-byte ones.
template <typename T>
int vector_width(int64_t d, std::initializer_list<const void*> ptrs) {
  for (int v : {kCPT, 2}) {
    bool ok = d % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (v * sizeof(T)) == 0;
    if (ok) return v;
  }
  return 1;
}

// The fast kernels' instantiation for a vector width and the lanes per step (LV 5: up to 32 lanes, else 8). GroupMamba's
// widths (T/S: d = 16, 32, 87, 112 and S's 128; B: 24, 48, 106, 128; each with its R = ceil(d / 16)) have d and R
// compiled in: fewer index instructions, and the backward does not spill (the runtime-d instances spill up to
// 160 bytes at 32 lanes per step). One table for both directions; Kn::get<VEC, LV, DS, RS>() names the kernel.
template <typename Kn>
auto pick_kernel(int vec, bool wide, int d, int R) {
  if (vec == kCPT) {
    if (d == 16 && R == 1) return Kn::template get<kCPT, 3, 16, 1>();
    if (d == 24 && R == 2) return Kn::template get<kCPT, 3, 24, 2>();
    if (d == 32 && R == 2) return Kn::template get<kCPT, 3, 32, 2>();
    if (d == 48 && R == 3) return Kn::template get<kCPT, 5, 48, 3>();
    if (d == 112 && R == 7) return Kn::template get<kCPT, 5, 112, 7>();
    if (d == 128 && R == 8) return Kn::template get<kCPT, 5, 128, 8>();
    return wide ? Kn::template get<kCPT, 5>() : Kn::template get<kCPT, 3>();
  }
  if (vec == 2) {
    if (d == 106 && R == 7) return Kn::template get<2, 5, 106, 7>();
    return wide ? Kn::template get<2, 5>() : Kn::template get<2, 3>();
  }
  if (d == 87 && R == 6) return Kn::template get<1, 5, 87, 6>();
  return wide ? Kn::template get<1, 5>() : Kn::template get<1, 3>();
}
template <typename T, bool NORM>
struct FwdKernels {
  template <int VEC, int LV, int DS = 0, int RS = 0>
  static auto get() { return fwd_fast_kernel<T, VEC, kKF, LV, DS, RS, NORM>; }
};
template <typename T, bool NORM>
struct BwdKernels {
  template <int VEC, int LV, int DS = 0, int RS = 0>
  static auto get() { return bwd_fast_kernel<T, VEC, kKB, LV, DS, RS, NORM>; }
};
template <typename T, bool NORM = false>
auto pick_fwd(int vec, bool wide, int d, int R) { return pick_kernel<FwdKernels<T, NORM>>(vec, wide, d, R); }
template <typename T, bool NORM = false>
auto pick_bwd(int vec, bool wide, int d, int R) { return pick_kernel<BwdKernels<T, NORM>>(vec, wide, d, R); }

#if !defined(GROUPMAMBA_CUDA_EMULATION)
// The look-back workspace as a tensor (`ws` keeps it alive).
LookBack look_back_workspace(at::Tensor& ws, int64_t slots, const at::TensorOptions& opts) {
  ws = at::full({look_back_words(slots)}, -1, opts.dtype(at::kLong));
  return look_back_view(ws.data_ptr<int64_t>(), slots);
}
template <typename Fn>
void dispatch_type(at::ScalarType st, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(__nv_bfloat16{}); break;
    case at::kHalf: fn(__half{}); break;
    default: TORCH_CHECK(false, "groupmamba scan (CUDA): u must be float32, bfloat16 or float16, got ", st);
  }
}

ParamPtrs param_ptrs(const at::Tensor& Wx, const at::Tensor& Wdt, const at::Tensor& bias, const at::Tensor& Alog,
                     const at::Tensor& D) {
  return ParamPtrs{Wx.data_ptr<float>(), Wdt.data_ptr<float>(), bias.data_ptr<float>(), Alog.data_ptr<float>(),
                   D.data_ptr<float>()};
}

void check_cuda_inputs(const at::Tensor& u, const ScanDims& s, int64_t chunk) {
  TORCH_CHECK(u.is_cuda(), "groupmamba scan (CUDA): u must be a CUDA tensor");
  TORCH_CHECK(u.scalar_type() != at::kDouble,
              "groupmamba scan (CUDA): float64 is not supported on CUDA; use float32, bfloat16 or float16 "
              "(the float64 reference runs on CPU)");
  TORCH_CHECK(chunk >= 1, "groupmamba scan: chunk must be >= 1, got ", chunk);
  TORCH_CHECK(s.d <= 1024, "groupmamba scan (CUDA): d = C/4 must be <= 1024, got ", s.d);
  TORCH_CHECK(s.B * s.L * s.C < ((int64_t)1 << 31) * 8, "groupmamba scan (CUDA): tensor too large");
}

// The fast forward's launch; NORM: y receives the gated out_norm's output (gn).
template <bool NORM, typename T>
void launch_fast_fwd(const FastPlan& pl, const ScanDims& s, const T* up, T* yp, float* states, const ParamPtrs& prm,
                     const GateNorm<T>& gn, const at::TensorOptions& opts, cudaStream_t stream) {
  at::Tensor ws;
  const LookBack lb = look_back_workspace(ws, pl.nrec * s.d, opts);
  auto kern = pick_fwd<T, NORM>(vector_width<T>(s.d, {up, yp, gn.z}), pl.p.cvp > 8, pl.p.d, pl.p.R);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)pl.smem));
  kern<<<pl.nrec, pl.threads, pl.smem, stream>>>(pl.p, up, yp, states, prm, lb, gn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_states(const at::Tensor& states, const at::Tensor& u, const ScanDims& s, int64_t chunk) {
  const int64_t nch = num_chunks(s.L, chunk);
  TORCH_CHECK(states.dim() == 5 && states.size(0) == s.B && states.size(1) == kGroups && states.size(2) == nch &&
                  states.size(3) == s.d && states.size(4) == s.N && states.scalar_type() == at::kFloat &&
                  states.device() == u.device(),
              "groupmamba scan_bwd: states must be float32 (B, 4, ceil(L/chunk)=", nch, ", d, N), got ",
              states.sizes(), " ", states.scalar_type());
}

// The fast backward's launch into `partial` (one row of pl.p.E entries per block); NORM: dy is the gated
// out_norm's output gradient, and gn.dz receives the gate's.
template <bool NORM, typename T>
void launch_fast_bwd(const FastPlan& pl, const ScanDims& s, const T* dyp, const T* up, T* dup, const float* states,
                     const ParamPtrs& prm, const GateNorm<T>& gn, float* partial, const at::TensorOptions& opts,
                     cudaStream_t stream) {
  at::Tensor ws;
  const LookBack lb = look_back_workspace(ws, pl.nrec * s.d, opts);
  auto kern = pick_bwd<T, NORM>(vector_width<T>(s.d, {up, dyp, dup, gn.z, gn.dz}), pl.p.cvp > 8, pl.p.d, pl.p.R);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)pl.smem));
  kern<<<pl.nrec, pl.threads, pl.smem, stream>>>(pl.p, dyp, up, dup, states, prm, lb, partial, gn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The parameter gradients from the blocks' partial rows ((B * 4 * nseg, E), E = grad_entries, plus the gated
// out_norm's 2d when dnw / dnb are given): two deterministic levels.
void reduce_partials(const at::Tensor& partial, const ScanDims& s, int nseg, int E, at::Tensor& dWx, at::Tensor& dWdt,
                     at::Tensor& dbias, at::Tensor& dAlog, at::Tensor& dD, cudaStream_t stream,
                     float* dnw = nullptr, float* dnb = nullptr) {
  const int rows = (int)s.B * nseg;
  const int nsl = reduce_slices(rows);
  at::Tensor l1 = at::empty({kGroups, nsl, E}, partial.options());
  reduce_level1<<<dim3((E + kRedThreads - 1) / kRedThreads, nsl, kGroups), kRedThreads, 0, stream>>>(
      partial.data_ptr<float>(), l1.data_ptr<float>(), (int)s.B, nseg, E, nsl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_level2<<<dim3((E + 255) / 256, kGroups), 256, 0, stream>>>(
      l1.data_ptr<float>(), nsl, E, (int)s.d, (int)s.R, (int)s.N, dWx.data_ptr<float>(), dWdt.data_ptr<float>(),
      dbias.data_ptr<float>(), dAlog.data_ptr<float>(), dD.data_ptr<float>(), dnw, dnb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif  // !GROUPMAMBA_CUDA_EMULATION

}  // namespace
}  // namespace groupmamba
