// Shared definitions of the four-direction grouped selective scan (see python/groupmamba/ops/scan.py
// for the full contract). Every backend includes this so shapes, scan orders and input checks live
// in one place.
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "scan_shape.h"

namespace groupmamba {

// Validates the operands of scan_fwd/scan_bwd and returns their sizes. Errors name the problem.
inline ScanDims check_scan_inputs(const at::Tensor& u, const at::Tensor& x_proj_weight,
                                  const at::Tensor& dt_proj_weight, const at::Tensor& dt_bias,
                                  const at::Tensor& A_log, const at::Tensor& D) {
  TORCH_CHECK(u.dim() == 4, "groupmamba scan: u must be (B, H, W, C), got ", u.dim(), " dims ", u.sizes());
  TORCH_CHECK(u.is_floating_point(), "groupmamba scan: u must be floating point, got ", u.scalar_type());
  ScanDims s{};
  s.B = u.size(0); s.H = u.size(1); s.W = u.size(2); s.C = u.size(3); s.L = s.H * s.W;
  TORCH_CHECK(s.C % kGroups == 0, "groupmamba scan: channel count C=", s.C, " is not divisible by 4");
  s.d = s.C / kGroups;
  TORCH_CHECK(A_log.dim() == 3 && A_log.size(0) == kGroups && A_log.size(1) == s.d,
              "groupmamba scan: A_log must be (4, d=", s.d, ", N), got ", A_log.sizes());
  s.N = A_log.size(2);
  TORCH_CHECK(s.N >= 1, "groupmamba scan: d_state N must be >= 1");
  TORCH_CHECK(x_proj_weight.dim() == 3 && x_proj_weight.size(0) == kGroups && x_proj_weight.size(2) == s.d,
              "groupmamba scan: x_proj_weight must be (4, R+2N, d=", s.d, "), got ", x_proj_weight.sizes());
  s.R = x_proj_weight.size(1) - 2 * s.N;
  TORCH_CHECK(s.R >= 1, "groupmamba scan: x_proj_weight has ", x_proj_weight.size(1),
              " rows, needs R + 2N with R >= 1 (N=", s.N, ")");
  TORCH_CHECK(dt_proj_weight.dim() == 3 && dt_proj_weight.size(0) == kGroups &&
                  dt_proj_weight.size(1) == s.d && dt_proj_weight.size(2) == s.R,
              "groupmamba scan: dt_proj_weight must be (4, d=", s.d, ", R=", s.R, "), got ", dt_proj_weight.sizes());
  TORCH_CHECK(dt_bias.dim() == 2 && dt_bias.size(0) == kGroups && dt_bias.size(1) == s.d,
              "groupmamba scan: dt_bias must be (4, d=", s.d, "), got ", dt_bias.sizes());
  TORCH_CHECK(D.dim() == 2 && D.size(0) == kGroups && D.size(1) == s.d,
              "groupmamba scan: D must be (4, d=", s.d, "), got ", D.sizes());
  const at::Tensor* params[] = {&x_proj_weight, &dt_proj_weight, &dt_bias, &A_log, &D};
  const char* names[] = {"x_proj_weight", "dt_proj_weight", "dt_bias", "A_log", "D"};
  for (int i = 0; i < 5; ++i) {
    TORCH_CHECK(params[i]->device() == u.device(), "groupmamba scan: ", names[i], " is on ",
                params[i]->device(), " but u is on ", u.device());
    TORCH_CHECK(params[i]->scalar_type() == x_proj_weight.scalar_type(), "groupmamba scan: ", names[i],
                " has dtype ", params[i]->scalar_type(), " but x_proj_weight has ", x_proj_weight.scalar_type(),
                "; all parameters must share one dtype");
  }
  const auto pt = x_proj_weight.scalar_type();
  TORCH_CHECK(pt == at::kFloat || pt == at::kDouble,
              "groupmamba scan: parameters must be float32 or float64, got ", pt);
  TORCH_CHECK((u.scalar_type() == at::kDouble) == (pt == at::kDouble),
              "groupmamba scan: float64 u needs float64 parameters and vice versa (u ", u.scalar_type(),
              ", parameters ", pt, ")");
  return s;
}

}  // namespace groupmamba
