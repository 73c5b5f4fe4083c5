// The scan ops scan_fwd / scan_bwd on CUDA (the kernels: scan_kernels.cuh).
#include "scan_kernels.cuh"

namespace groupmamba {
namespace {

std::tuple<at::Tensor, at::Tensor> scan_fwd_cuda(const at::Tensor& u_, const at::Tensor& Wx_, const at::Tensor& Wdt_,
                                                 const at::Tensor& bias_, const at::Tensor& Alog_,
                                                 const at::Tensor& D_, int64_t chunk) {
  const ScanDims s = check_scan_inputs(u_, Wx_, Wdt_, bias_, Alog_, D_);
  check_cuda_inputs(u_, s, chunk);
  c10::cuda::CUDAGuard guard(u_.device());
  const at::Tensor u = u_.contiguous(), Wx = Wx_.contiguous(), Wdt = Wdt_.contiguous(), bias = bias_.contiguous(),
                   Alog = Alog_.contiguous(), D = D_.contiguous();
  const int64_t nch = num_chunks(s.L, chunk);
  at::Tensor y = at::empty_like(u);
  at::Tensor states = at::empty({s.B, kGroups, nch, s.d, s.N}, u.options().dtype(at::kFloat));
  if (s.B == 0 || s.L == 0) return {y, states};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const ParamPtrs prm = param_ptrs(Wx, Wdt, bias, Alog, D);
  const FastPlan pl = plan_fwd(s, chunk);
  dispatch_type(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* up = reinterpret_cast<const T*>(u.data_ptr());
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    if (pl.ok) {
      launch_fast_fwd<false>(pl, s, up, yp, states.data_ptr<float>(), prm, GateNorm<T>{}, u.options(), stream);
    } else {
      const int threads = generic_threads(s);
      const size_t smem = generic_fwd_smem(s);
      TORCH_CHECK(smem <= 200 * 1024, "groupmamba scan (CUDA): N*d too large for the generic kernel");
      auto kern = fwd_generic_kernel<T>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      kern<<<(unsigned)(s.B * kGroups), threads, smem, stream>>>(up, yp, states.data_ptr<float>(), prm, (int)s.B,
                                                                  (int)s.H, (int)s.W, (int)s.d, (int)s.R, (int)s.N,
                                                                  (int)chunk, (int)nch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {y, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd_cuda(
    const at::Tensor& dy_, const at::Tensor& u_, const at::Tensor& Wx_, const at::Tensor& Wdt_,
    const at::Tensor& bias_, const at::Tensor& Alog_, const at::Tensor& D_, const at::Tensor& states_,
    int64_t chunk) {
  const ScanDims s = check_scan_inputs(u_, Wx_, Wdt_, bias_, Alog_, D_);
  check_cuda_inputs(u_, s, chunk);
  TORCH_CHECK(dy_.sizes() == u_.sizes() && dy_.scalar_type() == u_.scalar_type() && dy_.device() == u_.device(),
              "groupmamba scan_bwd: grad_y must match u in shape, dtype and device (grad_y ", dy_.sizes(), " ",
              dy_.scalar_type(), ", u ", u_.sizes(), " ", u_.scalar_type(), ")");
  check_states(states_, u_, s, chunk);
  c10::cuda::CUDAGuard guard(u_.device());
  const at::Tensor u = u_.contiguous(), dy = dy_.contiguous(), Wx = Wx_.contiguous(), Wdt = Wdt_.contiguous(),
                   bias = bias_.contiguous(), Alog = Alog_.contiguous(), D = D_.contiguous(),
                   states = states_.contiguous();
  at::Tensor du = at::empty_like(u);
  if (s.B == 0 || s.L == 0)
    return {du, at::zeros_like(Wx), at::zeros_like(Wdt), at::zeros_like(bias), at::zeros_like(Alog), at::zeros_like(D)};
  // reduce_level2 writes every entry of these (E counts them all): no memsets
  at::Tensor dWx = at::empty_like(Wx), dWdt = at::empty_like(Wdt), dbias = at::empty_like(bias),
             dAlog = at::empty_like(Alog), dD = at::empty_like(D);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const ParamPtrs prm = param_ptrs(Wx, Wdt, bias, Alog, D);
  const int E = grad_entries(s);
  const FastPlan pl = plan_bwd(s, chunk);
  int nseg = 1;
  at::Tensor partial;
  dispatch_type(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* up = reinterpret_cast<const T*>(u.data_ptr());
    const T* dyp = reinterpret_cast<const T*>(dy.data_ptr());
    T* dup = reinterpret_cast<T*>(du.data_ptr());
    if (pl.ok) {
      nseg = pl.p.nseg;
      partial = at::empty({(int64_t)pl.nrec, E}, u.options().dtype(at::kFloat));
      launch_fast_bwd<false>(pl, s, dyp, up, dup, states.data_ptr<float>(), prm, GateNorm<T>{},
                             partial.data_ptr<float>(), u.options(), stream);
    } else {
      partial = at::empty({s.B * kGroups, E}, u.options().dtype(at::kFloat));
      at::Tensor hs = at::empty({s.B * kGroups * s.L * s.N * s.d}, u.options().dtype(at::kFloat));
      const int threads = generic_threads(s);
      const size_t smem = generic_bwd_smem(s);
      TORCH_CHECK(smem <= 200 * 1024, "groupmamba scan (CUDA): parameters too large for the generic kernel");
      auto kern = bwd_generic_kernel<T>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      kern<<<(unsigned)(s.B * kGroups), threads, smem, stream>>>(dyp, up, dup, prm, hs.data_ptr<float>(),
                                                                  partial.data_ptr<float>(), (int)s.B, (int)s.H,
                                                                  (int)s.W, (int)s.d, (int)s.R, (int)s.N, E);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  reduce_partials(partial, s, nseg, E, dWx, dWdt, dbias, dAlog, dD, stream);
  return {du, dWx, dWdt, dbias, dAlog, dD};
}

}  // namespace

TORCH_LIBRARY_IMPL(groupmamba, CUDA, m) {
  m.impl("scan_fwd", &scan_fwd_cuda);
  m.impl("scan_bwd", &scan_bwd_cuda);
}

}  // namespace groupmamba
