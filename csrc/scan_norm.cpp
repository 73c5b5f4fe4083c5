// The composition behind scan_norm_fwd / scan_norm_bwd (see scan_norm.h): the CPU implementation, and the CUDA
// one for shapes the fused kernels do not take. Like the fused kernels, it keeps y and its gradient in float32
// (float64 for float64 inputs): 16-bit u runs the scan in float32, so neither y nor its gradient is rounded to
// u's dtype before the norm or the scan's backward.
#include "scan_norm.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace groupmamba {

ScanDims check_scan_norm_inputs(const at::Tensor& u, const at::Tensor& z, const at::Tensor& x_proj_weight,
                                const at::Tensor& dt_proj_weight, const at::Tensor& dt_bias, const at::Tensor& A_log,
                                const at::Tensor& D, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                double eps) {
  const ScanDims s = check_scan_inputs(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D);
  TORCH_CHECK(z.sizes() == u.sizes() && z.scalar_type() == u.scalar_type() && z.device() == u.device(),
              "groupmamba scan_norm: the gate z must match u in shape, dtype and device (z ", z.sizes(), " ",
              z.scalar_type(), " on ", z.device(), ", u ", u.sizes(), " ", u.scalar_type(), " on ", u.device(), ")");
  const at::Tensor* norm[] = {&norm_weight, &norm_bias};
  const char* names[] = {"norm_weight", "norm_bias"};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(norm[i]->dim() == 2 && norm[i]->size(0) == kGroups && norm[i]->size(1) == s.d,
                "groupmamba scan_norm: ", names[i], " must be (4, d=", s.d, "), got ", norm[i]->sizes());
    TORCH_CHECK(norm[i]->scalar_type() == x_proj_weight.scalar_type() && norm[i]->device() == u.device(),
                "groupmamba scan_norm: ", names[i], " must be ", x_proj_weight.scalar_type(), " on ", u.device(),
                " like the scan's parameters, got ", norm[i]->scalar_type(), " on ", norm[i]->device());
  }
  TORCH_CHECK(eps > 0, "groupmamba scan_norm: eps must be > 0, got ", eps);
  return s;
}

void check_norm_stats(const at::Tensor& stats, const at::Tensor& u, const ScanDims& s) {
  const auto st = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.dim() == 4 && stats.size(0) == s.B && stats.size(1) == kGroups && stats.size(2) == s.L &&
                  stats.size(3) == 2 && stats.scalar_type() == st && stats.device() == u.device(),
              "groupmamba scan_norm_bwd: stats must be ", st, " (B, 4, L=H*W, 2) as scan_norm_fwd returned it, got ",
              stats.sizes(), " ", stats.scalar_type(), " on ", stats.device());
}

namespace {

std::tuple<at::Tensor, at::Tensor> call_scan_fwd(const at::Tensor& u, const at::Tensor& Wx, const at::Tensor& Wdt,
                                                 const at::Tensor& bias, const at::Tensor& Alog, const at::Tensor& D,
                                                 int64_t chunk) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("groupmamba::scan_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(u, Wx, Wdt, bias, Alog, D, chunk);
}

using ScanGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
ScanGrads call_scan_bwd(const at::Tensor& dy, const at::Tensor& u, const at::Tensor& Wx, const at::Tensor& Wdt,
                        const at::Tensor& bias, const at::Tensor& Alog, const at::Tensor& D, const at::Tensor& states,
                        int64_t chunk) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("groupmamba::scan_bwd", "")
                       .typed<ScanGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        int64_t)>();
  return op.call(dy, u, Wx, Wdt, bias, Alog, D, states, chunk);
}

at::Tensor grouped(const at::Tensor& t, const ScanDims& s, at::ScalarType acc) {
  return t.to(acc).view({s.B, s.H, s.W, kGroups, s.d});
}

at::ScalarType norm_precision(const at::Tensor& u) { return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }
// u in the norm's precision (a copy only for 16-bit u): the scan then returns y in it and takes y's gradient in it.
at::Tensor widened(const at::Tensor& u) { return u.to(norm_precision(u)); }

// The statistics' layout (B, 4, L, 2), each group's steps in its scan order (the fused kernels' layout, see
// GateNorm), from and to (B, H, W, 4, 2) by position: groups 0 and 2 walk the rows, 1 and 3 the columns, 2 and 3
// backwards.
at::Tensor stats_to_scan_order(const at::Tensor& by_pos, const ScanDims& s) {
  std::vector<at::Tensor> g;
  for (int64_t k = 0; k < kGroups; ++k) {
    at::Tensor t = by_pos.select(3, k);  // (B, H, W, 2)
    if (k & 1) t = t.transpose(1, 2);
    t = t.reshape({s.B, s.L, 2});
    g.push_back(k >= 2 ? t.flip(1) : t);
  }
  return at::stack(g, 1);
}
at::Tensor stats_by_position(const at::Tensor& scan_order, const ScanDims& s) {
  std::vector<at::Tensor> g;
  for (int64_t k = 0; k < kGroups; ++k) {
    at::Tensor t = scan_order.select(1, k);  // (B, L, 2)
    if (k >= 2) t = t.flip(1);
    g.push_back(k & 1 ? t.reshape({s.B, s.W, s.H, 2}).transpose(1, 2) : t.reshape({s.B, s.H, s.W, 2}));
  }
  return at::stack(g, 3);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_norm_fwd_composite(
    const at::Tensor& u, const at::Tensor& z, const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
    const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& D, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, double eps, int64_t chunk) {
  const ScanDims s = check_scan_norm_inputs(u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight,
                                            norm_bias, eps);
  auto [y, states] = call_scan_fwd(widened(u), x_proj_weight, dt_proj_weight, dt_bias, A_log, D, chunk);
  const at::ScalarType acc = norm_precision(u);
  const at::Tensor yf = grouped(y, s, acc), zf = grouped(z, s, acc);
  const at::Tensor mean = yf.mean(-1, true), c = yf - mean;
  const at::Tensor rstd = ((c * c).mean(-1, true) + eps).rsqrt();
  const at::Tensor out = (c * rstd * norm_weight.to(acc) + norm_bias.to(acc)) * (zf * zf.sigmoid());
  return {out.view(u.sizes()).to(u.scalar_type()), states, stats_to_scan_order(at::cat({mean, rstd}, -1), s)};
}

ScanNormGrads scan_norm_bwd_composite(const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& z,
                                      const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                      const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& D,
                                      const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
                                      const at::Tensor& states, const at::Tensor& stats, int64_t chunk) {
  const ScanDims s = check_scan_norm_inputs(u, z, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, norm_weight,
                                            norm_bias, eps);
  TORCH_CHECK(grad_out.sizes() == u.sizes() && grad_out.scalar_type() == u.scalar_type() &&
                  grad_out.device() == u.device(),
              "groupmamba scan_norm_bwd: grad_out must match u in shape, dtype and device (grad_out ",
              grad_out.sizes(), " ", grad_out.scalar_type(), ", u ", u.sizes(), " ", u.scalar_type(), ")");
  check_norm_stats(stats, u, s);
  const at::ScalarType acc = norm_precision(u);
  const at::Tensor uw = widened(u);
  const at::Tensor y = std::get<0>(call_scan_fwd(uw, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, chunk));
  const at::Tensor st = stats_by_position(stats, s);
  const at::Tensor rstd = st.narrow(-1, 1, 1);
  const at::Tensor yh = (grouped(y, s, acc) - st.narrow(-1, 0, 1)) * rstd;
  const at::Tensor zf = grouped(z, s, acc), go = grouped(grad_out, s, acc);
  const at::Tensor w = norm_weight.to(acc), sg = zf.sigmoid();
  const at::Tensor gl = go * zf * sg;  // gradient of the normalized value times weight plus bias
  const at::Tensor dz = go * (yh * w + norm_bias.to(acc)) * sg * (1 + zf * (1 - sg));
  const at::Tensor dnw = (gl * yh).sum({0, 1, 2}), dnb = gl.sum({0, 1, 2});
  const at::Tensor gh = gl * w;        // gradient of the normalized value
  const at::Tensor dy = rstd * (gh - gh.mean(-1, true) - yh * (gh * yh).mean(-1, true));
  auto [du, dWx, dWdt, dbias, dAlog, dD] = call_scan_bwd(dy.view(u.sizes()), uw, x_proj_weight, dt_proj_weight,
                                                         dt_bias, A_log, D, states, chunk);
  const auto pt = norm_weight.scalar_type();
  return {du.to(u.scalar_type()), dz.view(u.sizes()).to(u.scalar_type()), dWx, dWdt, dbias, dAlog, dD, dnw.to(pt),
          dnb.to(pt)};
}

TORCH_LIBRARY_IMPL(groupmamba, CPU, m) {
  m.impl("scan_norm_fwd", &scan_norm_fwd_composite);
  m.impl("scan_norm_bwd", &scan_norm_bwd_composite);
}

}  // namespace groupmamba
