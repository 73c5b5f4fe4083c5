// The CUDA scan kernels (csrc/cuda/scan_kernels.cuh) compiled for the CPU emulation in cuda_emu.h, with the same
// launch planning as the op, behind the C interface of scan_emu.h.
// Mirrors scan_fwd_cuda / scan_bwd_cuda: plan, workspace, kernel choice, launch, the gradient reduction.
#include "scan_emu.h"

#include <type_traits>

#include "cuda_emu.h"
#include "cuda/scan_kernels.cuh"

namespace groupmamba {
namespace {

ScanDims dims(int64_t B, int64_t H, int64_t W, int64_t C, int64_t N, int64_t R) {
  return ScanDims{B, H, W, H * W, C, C / kGroups, N, R};
}
unsigned u32(int64_t v) { return static_cast<unsigned>(v); }

// With gn (the gated out_norm, fast kernels only), y receives its output; -3 where the fast kernels do not apply.
template <typename T>
int fwd(const ScanDims& s, int64_t chunk, const T* u, T* y, float* states, ParamPtrs prm,
        const GateNorm<T>* gn = nullptr) {
  const int64_t nch = num_chunks(s.L, chunk);
  const FastPlan pl = plan_fwd(s, chunk, gn != nullptr);
  if (pl.ok) {
    std::vector<int64_t> ws(look_back_words((int64_t)pl.nrec * s.d), -1);
    const LookBack lb = look_back_view(ws.data(), (int64_t)pl.nrec * s.d);
    const GateNorm<T> g = gn ? *gn : GateNorm<T>{};
    auto run = [&](auto norm) {  // norm: std::bool_constant, the kernel family
      auto kern = pick_fwd<T, decltype(norm)::value>(vector_width<T>(s.d, {u, y, g.z}), pl.p.cvp > 8, pl.p.d, pl.p.R);
      emu::launch({u32(pl.nrec)}, {u32(pl.threads)}, pl.smem, [&] { kern(pl.p, u, y, states, prm, lb, g); });
    };
    gn ? run(std::true_type{}) : run(std::false_type{});
    return 1;
  }
  if (gn) return -3;
  emu::launch({u32(s.B * kGroups)}, {u32(generic_threads(s))}, generic_fwd_smem(s), [&] {
    fwd_generic_kernel<T>(u, y, states, prm, (int)s.B, (int)s.H, (int)s.W, (int)s.d, (int)s.R, (int)s.N, (int)chunk,
                          (int)nch);
  });
  return 0;
}

// With gn, dy is the gated out_norm's output gradient; gn->dz, dnw and dnb receive the gate's and the norm's
// gradients. -3 where the fast kernels do not apply.
template <typename T>
int bwd(const ScanDims& s, int64_t chunk, const T* dy, const T* u, T* du, const float* states, ParamPtrs prm,
        float* dWx, float* dWdt, float* dbias, float* dAlog, float* dD, const GateNorm<T>* gn = nullptr,
        float* dnw = nullptr, float* dnb = nullptr) {
  const int E = grad_entries(s, gn != nullptr);
  const FastPlan pl = plan_bwd(s, chunk, gn != nullptr);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  int nseg = 1;
  std::vector<float> partial;
  if (pl.ok) {
    nseg = pl.p.nseg;
    partial.assign((size_t)pl.nrec * E, nan);
    std::vector<int64_t> ws(look_back_words((int64_t)pl.nrec * s.d), -1);
    const LookBack lb = look_back_view(ws.data(), (int64_t)pl.nrec * s.d);
    const GateNorm<T> g = gn ? *gn : GateNorm<T>{};
    auto run = [&](auto norm) {  // norm: std::bool_constant, the kernel family
      auto kern = pick_bwd<T, decltype(norm)::value>(vector_width<T>(s.d, {u, dy, du, g.z, g.dz}), pl.p.cvp > 8,
                                                     pl.p.d, pl.p.R);
      emu::launch({u32(pl.nrec)}, {u32(pl.threads)}, pl.smem,
                  [&] { kern(pl.p, dy, u, du, states, prm, lb, partial.data(), g); });
    };
    gn ? run(std::true_type{}) : run(std::false_type{});
  } else if (gn) {
    return -3;
  } else {
    partial.assign((size_t)s.B * kGroups * E, nan);
    std::vector<float> hs((size_t)s.B * kGroups * s.L * s.N * s.d, nan);
    emu::launch({u32(s.B * kGroups)}, {u32(generic_threads(s))}, generic_bwd_smem(s), [&] {
      bwd_generic_kernel<T>(dy, u, du, prm, hs.data(), partial.data(), (int)s.B, (int)s.H, (int)s.W, (int)s.d,
                            (int)s.R, (int)s.N, E);
    });
  }
  const int rows = (int)s.B * nseg, nsl = reduce_slices(rows);
  std::vector<float> l1((size_t)kGroups * nsl * E, nan);
  emu::launch({u32((E + kRedThreads - 1) / kRedThreads), u32(nsl), u32(kGroups)}, {u32(kRedThreads)}, 0,
              [&] { reduce_level1(partial.data(), l1.data(), (int)s.B, nseg, E, nsl); });
  emu::launch({u32((E + 255) / 256), u32(kGroups)}, {256}, 0, [&] {
    reduce_level2(l1.data(), nsl, E, (int)s.d, (int)s.R, (int)s.N, dWx, dWdt, dbias, dAlog, dD, dnw, dnb);
  });
  return pl.ok ? 1 : 0;
}

template <typename Fn>
int dispatch(int dtype, Fn&& fn) {
  switch (dtype) {
    case 0: return fn(float{});
    case 1: return fn(__nv_bfloat16{});
    case 2: return fn(__half{});
    default: return -1;
  }
}

}  // namespace
}  // namespace groupmamba

using namespace groupmamba;

extern "C" const char* gm_emu_error() { return emu::error.c_str(); }

extern "C" void gm_emu_set_schedule(unsigned schedule) { emu::schedule = schedule; }

extern "C" int gm_emu_scan_fwd(int dtype, const void* u, void* y, float* states, const float* Wx, const float* Wdt,
                               const float* bias, const float* Alog, const float* D, int64_t B, int64_t H, int64_t W,
                               int64_t C, int64_t N, int64_t R, int64_t chunk) {
  const ScanDims s = dims(B, H, W, C, N, R);
  emu::error.clear();
  const int rc = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return fwd<T>(s, chunk, static_cast<const T*>(u), static_cast<T*>(y), states, ParamPtrs{Wx, Wdt, bias, Alog, D});
  });
  return emu::error.empty() ? rc : -2;
}

extern "C" int gm_emu_scan_bwd(int dtype, const void* dy, const void* u, void* du, const float* states, const float* Wx,
                               const float* Wdt, const float* bias, const float* Alog, const float* D, float* dWx,
                               float* dWdt, float* dbias, float* dAlog, float* dD, int64_t B, int64_t H, int64_t W,
                               int64_t C, int64_t N, int64_t R, int64_t chunk) {
  const ScanDims s = dims(B, H, W, C, N, R);
  emu::error.clear();
  const int rc = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return bwd<T>(s, chunk, static_cast<const T*>(dy), static_cast<const T*>(u), static_cast<T*>(du), states,
                  ParamPtrs{Wx, Wdt, bias, Alog, D}, dWx, dWdt, dbias, dAlog, dD);
  });
  return emu::error.empty() ? rc : -2;
}

extern "C" int gm_emu_scan_norm_fwd(int dtype, const void* u, const void* z, void* out, float* states, float* stats,
                                    const float* Wx, const float* Wdt, const float* bias, const float* Alog,
                                    const float* D, const float* norm_w, const float* norm_b, double eps, int64_t B,
                                    int64_t H, int64_t W, int64_t C, int64_t N, int64_t R, int64_t chunk) {
  const ScanDims s = dims(B, H, W, C, N, R);
  emu::error.clear();
  const int rc = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const GateNorm<T> gn{static_cast<const T*>(z), nullptr, norm_w, norm_b, stats, (float)eps};
    return fwd<T>(s, chunk, static_cast<const T*>(u), static_cast<T*>(out), states,
                  ParamPtrs{Wx, Wdt, bias, Alog, D}, &gn);
  });
  return emu::error.empty() ? rc : -2;
}

extern "C" int gm_emu_scan_norm_bwd(int dtype, const void* dout, const void* u, const void* z, void* du, void* dz,
                                    const float* states, float* stats, const float* Wx, const float* Wdt,
                                    const float* bias,
                                    const float* Alog, const float* D, const float* norm_w, const float* norm_b,
                                    double eps, float* dWx, float* dWdt, float* dbias, float* dAlog, float* dD,
                                    float* dnorm_w, float* dnorm_b, int64_t B, int64_t H, int64_t W, int64_t C,
                                    int64_t N, int64_t R, int64_t chunk) {
  const ScanDims s = dims(B, H, W, C, N, R);
  emu::error.clear();
  const int rc = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const GateNorm<T> gn{static_cast<const T*>(z), static_cast<T*>(dz), norm_w, norm_b, stats, (float)eps};
    return bwd<T>(s, chunk, static_cast<const T*>(dout), static_cast<const T*>(u), static_cast<T*>(du), states,
                  ParamPtrs{Wx, Wdt, bias, Alog, D}, dWx, dWdt, dbias, dAlog, dD, &gn, dnorm_w, dnorm_b);
  });
  return emu::error.empty() ? rc : -2;
}
