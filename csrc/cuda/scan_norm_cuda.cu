// The scan with each group's gated out_norm on CUDA, scan_norm_fwd / scan_norm_bwd (scan_norm.h): the NORM
// instances of the fast kernels (scan_kernels.cuh) where the fast plan applies, else the composition of
// scan_norm.cpp. A translation unit of its own so that it compiles next to scan_cuda.cu.
#include "scan_kernels.cuh"
#include "scan_norm.h"

namespace groupmamba {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_norm_fwd_cuda(const at::Tensor& u_, const at::Tensor& z_,
                                                      const at::Tensor& Wx_, const at::Tensor& Wdt_,
                                                      const at::Tensor& bias_, const at::Tensor& Alog_,
                                                      const at::Tensor& D_, const at::Tensor& nw_,
                                                      const at::Tensor& nb_, double eps, int64_t chunk) {
  const ScanDims s = check_scan_norm_inputs(u_, z_, Wx_, Wdt_, bias_, Alog_, D_, nw_, nb_, eps);
  check_cuda_inputs(u_, s, chunk);
  const FastPlan pl = plan_fwd(s, chunk, true);
  if (!pl.ok || s.B == 0 || s.L == 0) return scan_norm_fwd_composite(u_, z_, Wx_, Wdt_, bias_, Alog_, D_, nw_, nb_,
                                                                     eps, chunk);
  c10::cuda::CUDAGuard guard(u_.device());
  const at::Tensor u = u_.contiguous(), z = z_.contiguous(), Wx = Wx_.contiguous(), Wdt = Wdt_.contiguous(),
                   bias = bias_.contiguous(), Alog = Alog_.contiguous(), D = D_.contiguous(), nw = nw_.contiguous(),
                   nb = nb_.contiguous();
  at::Tensor out = at::empty_like(u);
  at::Tensor states = at::empty({s.B, kGroups, num_chunks(s.L, chunk), s.d, s.N}, u.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({s.B, kGroups, s.L, 2}, u.options().dtype(at::kFloat));
  const ParamPtrs prm = param_ptrs(Wx, Wdt, bias, Alog, D);
  dispatch_type(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const GateNorm<T> gn{reinterpret_cast<const T*>(z.data_ptr()), nullptr, nw.data_ptr<float>(),
                         nb.data_ptr<float>(), stats.data_ptr<float>(), (float)eps};
    launch_fast_fwd<true>(pl, s, reinterpret_cast<const T*>(u.data_ptr()), reinterpret_cast<T*>(out.data_ptr()),
                          states.data_ptr<float>(), prm, gn, u.options(), c10::cuda::getCurrentCUDAStream());
  });
  return {out, states, stats};
}

ScanNormGrads scan_norm_bwd_cuda(const at::Tensor& dout_, const at::Tensor& u_, const at::Tensor& z_,
                                 const at::Tensor& Wx_, const at::Tensor& Wdt_, const at::Tensor& bias_,
                                 const at::Tensor& Alog_, const at::Tensor& D_, const at::Tensor& nw_,
                                 const at::Tensor& nb_, double eps, const at::Tensor& states_,
                                 const at::Tensor& stats_, int64_t chunk) {
  const ScanDims s = check_scan_norm_inputs(u_, z_, Wx_, Wdt_, bias_, Alog_, D_, nw_, nb_, eps);
  check_cuda_inputs(u_, s, chunk);
  const FastPlan pl = plan_bwd(s, chunk, true);
  if (!pl.ok || s.B == 0 || s.L == 0)
    return scan_norm_bwd_composite(dout_, u_, z_, Wx_, Wdt_, bias_, Alog_, D_, nw_, nb_, eps, states_, stats_,
                                   chunk);
  TORCH_CHECK(dout_.sizes() == u_.sizes() && dout_.scalar_type() == u_.scalar_type() && dout_.device() == u_.device(),
              "groupmamba scan_norm_bwd: grad_out must match u in shape, dtype and device (grad_out ", dout_.sizes(),
              " ", dout_.scalar_type(), ", u ", u_.sizes(), " ", u_.scalar_type(), ")");
  check_states(states_, u_, s, chunk);
  check_norm_stats(stats_, u_, s);
  c10::cuda::CUDAGuard guard(u_.device());
  const at::Tensor u = u_.contiguous(), z = z_.contiguous(), dout = dout_.contiguous(), Wx = Wx_.contiguous(),
                   Wdt = Wdt_.contiguous(), bias = bias_.contiguous(), Alog = Alog_.contiguous(),
                   D = D_.contiguous(), nw = nw_.contiguous(), nb = nb_.contiguous(), states = states_.contiguous();
  // the kernels read each (mean, rstd) pair as one 8-byte load
  const bool aligned = reinterpret_cast<uintptr_t>(stats_.data_ptr()) % 8 == 0;
  const at::Tensor stats = aligned ? stats_.contiguous() : stats_.clone(at::MemoryFormat::Contiguous);
  at::Tensor du = at::empty_like(u), dz = at::empty_like(u);
  at::Tensor dWx = at::empty_like(Wx), dWdt = at::empty_like(Wdt), dbias = at::empty_like(bias),
             dAlog = at::empty_like(Alog), dD = at::empty_like(D), dnw = at::empty_like(nw), dnb = at::empty_like(nb);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial = at::empty({(int64_t)pl.nrec, pl.p.E}, u.options().dtype(at::kFloat));
  dispatch_type(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const GateNorm<T> gn{reinterpret_cast<const T*>(z.data_ptr()), reinterpret_cast<T*>(dz.data_ptr()),
                         nw.data_ptr<float>(), nb.data_ptr<float>(), stats.data_ptr<float>(), (float)eps};
    launch_fast_bwd<true>(pl, s, reinterpret_cast<const T*>(dout.data_ptr()), reinterpret_cast<const T*>(u.data_ptr()),
                          reinterpret_cast<T*>(du.data_ptr()), states.data_ptr<float>(),
                          param_ptrs(Wx, Wdt, bias, Alog, D), gn, partial.data_ptr<float>(), u.options(), stream);
  });
  reduce_partials(partial, s, pl.p.nseg, pl.p.E, dWx, dWdt, dbias, dAlog, dD, stream, dnw.data_ptr<float>(),
                  dnb.data_ptr<float>());
  return {du, dz, dWx, dWdt, dbias, dAlog, dD, dnw, dnb};
}

}  // namespace

TORCH_LIBRARY_IMPL(groupmamba, CUDA, m) {
  m.impl("scan_norm_fwd", &scan_norm_fwd_cuda);
  m.impl("scan_norm_bwd", &scan_norm_bwd_cuda);
}

}  // namespace groupmamba
