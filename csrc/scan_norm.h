// The scan with each group's gated out_norm applied to its output (contract: python/groupmamba/ops/scan_norm.py):
//   out = LayerNorm_g(scan(u)) * SiLU(z)
// scan_norm_fwd / scan_norm_bwd. The CUDA fast kernels compute it in the scan's own pass (GateNorm in
// cuda/scan_kernels.cuh, launched by cuda/scan_norm_cuda.cu); everywhere else, and for the shapes those kernels
// do not take, the composition below runs: the scan op, then the norm in ATen (the backward recomputes y with
// the scan's forward).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "scan_common.h"

namespace groupmamba {

// Validates z, norm_weight, norm_bias and eps against the scan's operands (checked first); returns the sizes.
ScanDims check_scan_norm_inputs(const at::Tensor& u, const at::Tensor& z, const at::Tensor& x_proj_weight,
                                const at::Tensor& dt_proj_weight, const at::Tensor& dt_bias, const at::Tensor& A_log,
                                const at::Tensor& D, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                double eps);

// (out, states, stats): stats (B, 4, L, 2) float32 (float64 for float64 u) holds each group's mean and
// 1 / sqrt(var + eps) per step of its scan order (the fused kernels' layout), which the backward normalizes the
// recomputed y with.
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_norm_fwd_composite(
    const at::Tensor& u, const at::Tensor& z, const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
    const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& D, const at::Tensor& norm_weight,
    const at::Tensor& norm_bias, double eps, int64_t chunk);

// (du, dz, dx_proj_weight, ddt_proj_weight, ddt_bias, dA_log, dD, dnorm_weight, dnorm_bias)
using ScanNormGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor>;
ScanNormGrads scan_norm_bwd_composite(const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& z,
                                      const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight,
                                      const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& D,
                                      const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
                                      const at::Tensor& states, const at::Tensor& stats, int64_t chunk);

// stats must be what scan_norm_fwd returned for u.
void check_norm_stats(const at::Tensor& stats, const at::Tensor& u, const ScanDims& s);

}  // namespace groupmamba
