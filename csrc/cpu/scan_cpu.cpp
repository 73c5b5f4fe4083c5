// CPU kernels of the four-direction grouped selective scan (contract: python/groupmamba/ops/scan.py).
//
// One task = one (batch b, group g) pair; tasks are independent sequences of L steps, so they run
// in parallel with at::parallel_for. Within a task, every step t reads the d channels of group g at
// position p = scan_position(g, t, H, W) and
//
//   [dt_r, B_t, C_t] = Wx[g] @ x                     x = u[b, p, g*d : (g+1)*d]
//   z                = Wdt[g] @ dt_r + dt_bias[g]    delta = softplus(z)
//   h[i, n]          = exp(delta_i A[i, n]) h[i, n] + delta_i B_t[n] x_i
//   y_i              = sum_n h[i, n] C_t[n] + D_i x_i
//
// The forward saves the state entering every chunk of `chunk` steps. The backward walks chunks in
// reverse: it recomputes the chunk's forward from its saved state (keeping the chunk's h, decays
// and projections in small per-task buffers), then runs the adjoint recurrence through it.
//
// Arithmetic is in acc_t = float (double for float64 u); u/y/du may be float32, bfloat16, float16
// or float64. Parameter gradients accumulate in double, one buffer per task, and are summed over
// the batch in a fixed order at the end, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "scan_common.h"

namespace groupmamba {
namespace {

// softplus with torch's default threshold: above 20 it equals x to working precision, and
// log1p(exp(x)) would overflow for large x anyway. If `grad` is given it receives
// d softplus / dx = sigmoid(x) = e / (1 + e), reusing e = exp(x); above the threshold softplus is
// the identity, so the derivative is exactly 1 (as in torch). Very negative x give e = 0: delta = 0
// and derivative 0, the right limits.
template <typename T>
inline T softplus(T x, T* grad = nullptr) {
  if (x > T(20)) {
    if (grad) *grad = T(1);
    return x;
  }
  const T e = std::exp(x);
  if (grad) *grad = e / (T(1) + e);
  return std::log1p(e);
}

// Raw pointers to one group's parameters, plus A = -exp(A_log) precomputed in acc_t.
template <typename acc_t>
struct GroupParams {
  const acc_t* Wx;    // (R + 2N, d)
  const acc_t* Wdt;   // (d, R)
  const acc_t* bias;  // (d)
  const acc_t* D;     // (d)
  std::vector<acc_t> A;  // (d, N)

  GroupParams(const ScanDims& s, int64_t g, const acc_t* Wx_all, const acc_t* Wdt_all, const acc_t* bias_all,
              const acc_t* A_log_all, const acc_t* D_all)
      : Wx(Wx_all + g * (s.R + 2 * s.N) * s.d),
        Wdt(Wdt_all + g * s.d * s.R),
        bias(bias_all + g * s.d),
        D(D_all + g * s.d),
        A(s.d * s.N) {
    const acc_t* A_log = A_log_all + g * s.d * s.N;
    for (int64_t j = 0; j < s.d * s.N; ++j) A[j] = -std::exp(A_log[j]);
  }
};

// Projections of one step: x (d) in acc_t, x_dbl = Wx @ x (R + 2N), z = Wdt @ dt_r + bias and
// delta = softplus(z) (d each); with `ddelta_dz` non-null also softplus'(z) (d), for the backward.
// Shared by the forward and the backward's recompute so the two produce bit-identical values.
template <typename scalar_t, typename acc_t>
inline void project_step(const ScanDims& s, const GroupParams<acc_t>& P, const scalar_t* u_row, acc_t* x,
                         acc_t* x_dbl, acc_t* delta, acc_t* ddelta_dz) {
  const int64_t d = s.d, K = s.R + 2 * s.N;
  for (int64_t i = 0; i < d; ++i) x[i] = static_cast<acc_t>(u_row[i]);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* w = P.Wx + k * d;
    acc_t acc = 0;
    for (int64_t i = 0; i < d; ++i) acc += w[i] * x[i];
    x_dbl[k] = acc;
  }
  const acc_t* dt_r = x_dbl;  // first R entries
  for (int64_t i = 0; i < d; ++i) {
    const acc_t* w = P.Wdt + i * s.R;
    acc_t acc = P.bias[i];
    for (int64_t r = 0; r < s.R; ++r) acc += w[r] * dt_r[r];
    delta[i] = softplus(acc, ddelta_dz ? ddelta_dz + i : nullptr);
  }
}

// State update of one step: h <- decay * h + delta B x, with decay = exp(delta A) written to
// `decay` (may be null when the caller does not need it). Returns nothing; y is read off separately.
template <typename acc_t>
inline void state_step(const ScanDims& s, const GroupParams<acc_t>& P, const acc_t* x, const acc_t* x_dbl,
                       const acc_t* delta, acc_t* h, acc_t* decay) {
  const int64_t N = s.N;
  const acc_t* Bt = x_dbl + s.R;
  for (int64_t i = 0; i < s.d; ++i) {
    const acc_t dx = delta[i] * x[i];
    const acc_t* A = P.A.data() + i * N;
    acc_t* hi = h + i * N;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t a = std::exp(delta[i] * A[n]);
      hi[n] = a * hi[n] + dx * Bt[n];
      if (decay) decay[i * N + n] = a;
    }
  }
}

// ---- forward --------------------------------------------------------------------------------------

// One (b, g) sequence: writes y for group g's channels at every position and the chunk states.
template <typename scalar_t, typename acc_t>
void forward_task(const ScanDims& s, int64_t b, int64_t g, int64_t chunk, const scalar_t* u, scalar_t* y,
                  acc_t* states, const GroupParams<acc_t>& P) {
  const int64_t d = s.d, N = s.N, K = s.R + 2 * s.N, n_chunks = num_chunks(s.L, chunk);
  std::vector<acc_t> x(d), x_dbl(K), delta(d), h(d * N, acc_t(0));
  const scalar_t* u_b = u + b * s.L * s.C + g * d;
  scalar_t* y_b = y + b * s.L * s.C + g * d;
  acc_t* states_bg = states + (b * kGroups + g) * n_chunks * d * N;

  ScanWalk<int64_t> walk(static_cast<int>(g), 0, s.H, s.W);
  for (int64_t t = 0; t < s.L; ++t, walk.next()) {
    if (t % chunk == 0) std::copy(h.begin(), h.end(), states_bg + (t / chunk) * d * N);
    const int64_t p = walk.pos;
    project_step(s, P, u_b + p * s.C, x.data(), x_dbl.data(), delta.data(), static_cast<acc_t*>(nullptr));
    state_step(s, P, x.data(), x_dbl.data(), delta.data(), h.data(), static_cast<acc_t*>(nullptr));
    const acc_t* Ct = x_dbl.data() + s.R + N;
    for (int64_t i = 0; i < d; ++i) {
      acc_t acc = P.D[i] * x[i];
      for (int64_t n = 0; n < N; ++n) acc += h[i * N + n] * Ct[n];
      y_b[p * s.C + i] = static_cast<scalar_t>(acc);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> scan_fwd_cpu(const at::Tensor& u_in, const at::Tensor& Wx_in,
                                               const at::Tensor& Wdt_in, const at::Tensor& bias_in,
                                               const at::Tensor& A_log_in, const at::Tensor& D_in,
                                               int64_t chunk) {
  const ScanDims s = check_scan_inputs(u_in, Wx_in, Wdt_in, bias_in, A_log_in, D_in);
  TORCH_CHECK(chunk >= 1, "groupmamba scan: chunk must be >= 1, got ", chunk);
  TORCH_CHECK(u_in.device().is_cpu(), "groupmamba scan (CPU kernel): u must be a CPU tensor, got ", u_in.device());
  const at::Tensor u = u_in.contiguous(), Wx = Wx_in.contiguous(), Wdt = Wdt_in.contiguous(),
                   bias = bias_in.contiguous(), A_log = A_log_in.contiguous(), D = D_in.contiguous();
  const int64_t n_chunks = num_chunks(s.L, chunk);
  at::Tensor y = at::empty_like(u, at::MemoryFormat::Contiguous);
  at::Tensor states = at::empty({s.B, kGroups, n_chunks, s.d, s.N}, Wx.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "groupmamba_scan_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    acc_t* st_ptr = states.mutable_data_ptr<acc_t>();
    at::parallel_for(0, s.B * kGroups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / kGroups, g = task % kGroups;
        GroupParams<acc_t> P(s, g, Wx.const_data_ptr<acc_t>(), Wdt.const_data_ptr<acc_t>(),
                             bias.const_data_ptr<acc_t>(), A_log.const_data_ptr<acc_t>(), D.const_data_ptr<acc_t>());
        forward_task<scalar_t, acc_t>(s, b, g, chunk, u_ptr, y_ptr, st_ptr, P);
      }
    });
  });
  return {y, states};
}

// ---- backward -------------------------------------------------------------------------------------

// Offsets of each parameter's gradient inside one task's double buffer (one group's parameters).
struct GradLayout {
  int64_t Wx, Wdt, bias, A, D, size;
  explicit GradLayout(const ScanDims& s) {
    Wx = 0;
    Wdt = Wx + (s.R + 2 * s.N) * s.d;
    bias = Wdt + s.d * s.R;
    A = bias + s.d;
    D = A + s.d * s.N;
    size = D + s.d;
  }
};

// Everything the forward produced inside one chunk, recomputed from the chunk's entering state.
template <typename acc_t>
struct ChunkBuffers {
  std::vector<acc_t> x, x_dbl, delta, ddelta_dz;  // per step: d, R+2N, d, d
  std::vector<acc_t> h;                   // (len + 1) x d x N: h[0] = entering state, h[j+1] = after step j
  std::vector<acc_t> decay;               // len x d x N
  ChunkBuffers(const ScanDims& s, int64_t max_len)
      : x(max_len * s.d), x_dbl(max_len * (s.R + 2 * s.N)), delta(max_len * s.d), ddelta_dz(max_len * s.d),
        h((max_len + 1) * s.d * s.N), decay(max_len * s.d * s.N) {}
};

// Recomputes steps [t0, t0 + len) of the forward starting from the saved state `h0`.
template <typename scalar_t, typename acc_t>
void recompute_chunk(const ScanDims& s, int64_t g, int64_t t0, int64_t len, const scalar_t* u_b, const acc_t* h0,
                     const GroupParams<acc_t>& P, ChunkBuffers<acc_t>& cb) {
  const int64_t d = s.d, dN = s.d * s.N, K = s.R + 2 * s.N;
  std::copy(h0, h0 + dN, cb.h.begin());
  ScanWalk<int64_t> walk(static_cast<int>(g), t0, s.H, s.W);
  for (int64_t j = 0; j < len; ++j, walk.next()) {
    const int64_t p = walk.pos;
    acc_t* x = cb.x.data() + j * d;
    acc_t* x_dbl = cb.x_dbl.data() + j * K;
    acc_t* delta = cb.delta.data() + j * d;
    project_step(s, P, u_b + p * s.C, x, x_dbl, delta, cb.ddelta_dz.data() + j * d);
    acc_t* h = cb.h.data() + (j + 1) * dN;
    std::copy(h - dN, h, h);  // state_step updates in place: start from the previous state
    state_step(s, P, x, x_dbl, delta, h, cb.decay.data() + j * dN);
  }
}

// Adjoint of one step. `gh` holds dLoss/dh_t coming from later steps (already multiplied by the
// later step's decay); on return it holds the same for h_{t-1}. Writes du for this step's
// channels and adds parameter gradients into the task's double buffer `gp`.
template <typename scalar_t, typename acc_t>
void backward_step(const ScanDims& s, const GradLayout& lay, const GroupParams<acc_t>& P, const ChunkBuffers<acc_t>& cb,
                   int64_t j, const scalar_t* dy_row, scalar_t* du_row, acc_t* gh, acc_t* dy, acc_t* dx,
                   acc_t* dz, acc_t* dx_dbl, double* gp) {
  const int64_t d = s.d, N = s.N, R = s.R, K = s.R + 2 * s.N, dN = d * N;
  const acc_t* x = cb.x.data() + j * d;
  const acc_t* x_dbl = cb.x_dbl.data() + j * K;
  const acc_t* ddelta_dz = cb.ddelta_dz.data() + j * d;
  const acc_t* delta = cb.delta.data() + j * d;
  const acc_t* h_prev = cb.h.data() + j * dN;
  const acc_t* h_cur = h_prev + dN;
  const acc_t* decay = cb.decay.data() + j * dN;
  const acc_t* Bt = x_dbl + R;
  const acc_t* Ct = Bt + N;
  acc_t* dBt = dx_dbl + R;
  acc_t* dCt = dBt + N;
  double* gA = gp + lay.A;
  double* gD = gp + lay.D;

  for (int64_t k = 0; k < K; ++k) dx_dbl[k] = 0;
  for (int64_t i = 0; i < d; ++i) {
    dy[i] = static_cast<acc_t>(dy_row[i]);
    // y_i = ... + D_i x_i
    dx[i] = dy[i] * P.D[i];
    gD[i] += static_cast<double>(dy[i]) * x[i];
  }
  for (int64_t i = 0; i < d; ++i) {
    const acc_t* A = P.A.data() + i * N;
    const acc_t dxi = delta[i] * x[i];
    acc_t d_delta = 0, d_xdrive = 0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t in = i * N + n;
      // y_i = sum_n h_t[i,n] C_t[n]: both h_t and C_t receive gradient.
      const acc_t g = gh[in] + dy[i] * Ct[n];
      dCt[n] += dy[i] * h_cur[in];
      // h_t = a h_{t-1} + delta_i B_n x_i with a = exp(delta_i A_in): da = g h_{t-1}, and
      // d(delta_i A_in) = da * a feeds both delta_i (times A) and A (times delta_i).
      const acc_t d_arg = g * h_prev[in] * decay[in];
      d_delta += d_arg * A[n] + g * Bt[n] * x[i];
      gA[in] += static_cast<double>(d_arg) * delta[i];
      dBt[n] += g * dxi;
      d_xdrive += g * Bt[n];
      gh[in] = g * decay[in];  // carried to h_{t-1}
    }
    dx[i] += d_xdrive * delta[i];
    dz[i] = d_delta * ddelta_dz[i];
  }
  // z = Wdt @ dt_r + bias
  double* gWdt = gp + lay.Wdt;
  double* gbias = gp + lay.bias;
  acc_t* d_dtr = dx_dbl;  // first R entries
  for (int64_t i = 0; i < d; ++i) {
    gbias[i] += dz[i];
    const acc_t* w = P.Wdt + i * R;
    for (int64_t r = 0; r < R; ++r) {
      gWdt[i * R + r] += static_cast<double>(dz[i]) * x_dbl[r];
      d_dtr[r] += dz[i] * w[r];
    }
  }
  // x_dbl = Wx @ x
  double* gWx = gp + lay.Wx;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* w = P.Wx + k * d;
    const acc_t dk = dx_dbl[k];
    double* gw = gWx + k * d;
    for (int64_t i = 0; i < d; ++i) {
      gw[i] += static_cast<double>(dk) * x[i];
      dx[i] += dk * w[i];
    }
  }
  for (int64_t i = 0; i < d; ++i) du_row[i] = static_cast<scalar_t>(dx[i]);
}

// One (b, g) sequence, chunks in reverse order.
template <typename scalar_t, typename acc_t>
void backward_task(const ScanDims& s, const GradLayout& lay, int64_t b, int64_t g, int64_t chunk, const scalar_t* dy,
                   const scalar_t* u, const acc_t* states, scalar_t* du, double* gp, const GroupParams<acc_t>& P) {
  const int64_t d = s.d, dN = s.d * s.N, K = s.R + 2 * s.N, n_chunks = num_chunks(s.L, chunk);
  ChunkBuffers<acc_t> cb(s, std::min(chunk, s.L));
  std::vector<acc_t> gh(dN, acc_t(0)), dyv(d), dx(d), dz(d), dx_dbl(K);
  const int64_t off = b * s.L * s.C + g * d;
  const acc_t* states_bg = states + (b * kGroups + g) * n_chunks * dN;

  for (int64_t k = n_chunks - 1; k >= 0; --k) {
    const int64_t t0 = k * chunk, len = std::min(chunk, s.L - t0);
    recompute_chunk(s, g, t0, len, u + off, states_bg + k * dN, P, cb);
    for (int64_t j = len - 1; j >= 0; --j) {
      const int64_t p = scan_position(g, t0 + j, s.H, s.W);
      backward_step(s, lay, P, cb, j, dy + off + p * s.C, du + off + p * s.C, gh.data(), dyv.data(), dx.data(),
                    dz.data(), dx_dbl.data(), gp);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& u_in, const at::Tensor& Wx_in, const at::Tensor& Wdt_in,
    const at::Tensor& bias_in, const at::Tensor& A_log_in, const at::Tensor& D_in, const at::Tensor& states_in,
    int64_t chunk) {
  const ScanDims s = check_scan_inputs(u_in, Wx_in, Wdt_in, bias_in, A_log_in, D_in);
  TORCH_CHECK(chunk >= 1, "groupmamba scan: chunk must be >= 1, got ", chunk);
  TORCH_CHECK(u_in.device().is_cpu(), "groupmamba scan (CPU kernel): u must be a CPU tensor, got ", u_in.device());
  TORCH_CHECK(grad_y_in.sizes() == u_in.sizes(), "groupmamba scan_bwd: grad_y must have u's shape ", u_in.sizes(),
              ", got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.device() == u_in.device() && states_in.device() == u_in.device(),
              "groupmamba scan_bwd: grad_y and states must be on u's device ", u_in.device());
  const int64_t n_chunks = num_chunks(s.L, chunk);
  TORCH_CHECK(states_in.dim() == 5 && states_in.size(0) == s.B && states_in.size(1) == kGroups &&
                  states_in.size(2) == n_chunks && states_in.size(3) == s.d && states_in.size(4) == s.N,
              "groupmamba scan_bwd: states must be (B, 4, ceil(L/chunk)=", n_chunks, ", d, N) for chunk=", chunk,
              ", got ", states_in.sizes());
  TORCH_CHECK(states_in.scalar_type() == Wx_in.scalar_type(), "groupmamba scan_bwd: states must have the parameter dtype ",
              Wx_in.scalar_type(), ", got ", states_in.scalar_type());

  const at::Tensor u = u_in.contiguous(), Wx = Wx_in.contiguous(), Wdt = Wdt_in.contiguous(),
                   bias = bias_in.contiguous(), A_log = A_log_in.contiguous(), D = D_in.contiguous(),
                   states = states_in.contiguous();
  const at::Tensor grad_y = grad_y_in.to(u.scalar_type()).contiguous();
  at::Tensor du = at::empty_like(u, at::MemoryFormat::Contiguous);
  const GradLayout lay(s);
  // Per-task gradient buffers: (B, 4, lay.size) doubles, reduced over b afterwards.
  std::vector<double> task_grads(static_cast<size_t>(s.B * kGroups * lay.size), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "groupmamba_scan_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy_ptr = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const acc_t* st_ptr = states.const_data_ptr<acc_t>();
    scalar_t* du_ptr = du.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.B * kGroups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / kGroups, g = task % kGroups;
        GroupParams<acc_t> P(s, g, Wx.const_data_ptr<acc_t>(), Wdt.const_data_ptr<acc_t>(),
                             bias.const_data_ptr<acc_t>(), A_log.const_data_ptr<acc_t>(), D.const_data_ptr<acc_t>());
        backward_task<scalar_t, acc_t>(s, lay, b, g, chunk, dy_ptr, u_ptr, st_ptr, du_ptr,
                                       task_grads.data() + task * lay.size, P);
      }
    });
  });

  // Deterministic reduction over the batch (fixed order b = 0..B-1), then dA_log = dA * A.
  at::Tensor grads = at::zeros({kGroups, lay.size}, at::TensorOptions().dtype(at::kDouble));
  double* gsum = grads.mutable_data_ptr<double>();
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t e = 0; e < kGroups * lay.size; ++e) gsum[e] += task_grads[b * kGroups * lay.size + e];
  const at::Tensor A = -A_log.to(at::kDouble).exp();  // (4, d, N)
  // Each gradient gets its own fresh tensor (never a view of `grads`: outputs must not alias).
  auto part = [&](int64_t begin, int64_t end, const at::Tensor& like) {
    return at::empty(like.sizes(), like.options()).copy_(grads.slice(1, begin, end).reshape(like.sizes()));
  };
  at::Tensor dWx = part(lay.Wx, lay.Wdt, Wx);
  at::Tensor dWdt = part(lay.Wdt, lay.bias, Wdt);
  at::Tensor dbias = part(lay.bias, lay.A, bias);
  at::Tensor dA_log = at::empty(A_log.sizes(), A_log.options())
                          .copy_(grads.slice(1, lay.A, lay.D).reshape(A_log.sizes()) * A);
  at::Tensor dD = part(lay.D, lay.size, D);
  return {du, dWx, dWdt, dbias, dA_log, dD};
}

}  // namespace

TORCH_LIBRARY_IMPL(groupmamba, CPU, m) {
  m.impl("scan_fwd", &scan_fwd_cpu);
  m.impl("scan_bwd", &scan_bwd_cpu);
}

}  // namespace groupmamba
