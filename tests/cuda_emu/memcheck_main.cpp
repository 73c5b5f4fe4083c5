// The emulated scan kernels (also with the gated out_norm) over a few shapes with every buffer allocated at its
// exact size, built with
// AddressSanitizer and UBSan by tests/test_scan_emulated.py: an access past any buffer (global or shared
// memory) or undefined behaviour fails the run, as compute-sanitizer's memcheck would on the GPU.
// Usage: scan_memcheck (exit status 0 when every shape ran and wrote finite outputs).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "scan_emu.h"

namespace {

uint32_t seed = 12345;
float uniform() {  // in [-1, 1)
  seed = seed * 1664525u + 1013904223u;
  return (float)(seed >> 8) / 8388608.f - 1.f;
}

// Element storage of u-shaped tensors: float32 (dtype 0) or bfloat16 bits (dtype 1).
struct Elems {
  int dtype;
  std::vector<float> f;
  std::vector<uint16_t> h;
  Elems(int dt, size_t n, bool random) : dtype(dt) {
    if (dt == 0) f.resize(n); else h.resize(n);
    for (size_t i = 0; i < n; ++i) set(i, random ? uniform() : std::numeric_limits<float>::quiet_NaN());
  }
  void set(size_t i, float v) {
    if (dtype == 0) { f[i] = v; return; }
    uint32_t b;
    std::memcpy(&b, &v, 4);
    h[i] = (uint16_t)(b >> 16);
  }
  float get(size_t i) const {
    if (dtype == 0) return f[i];
    const uint32_t b = (uint32_t)h[i] << 16;
    float v;
    std::memcpy(&v, &b, 4);
    return v;
  }
  size_t size() const { return dtype == 0 ? f.size() : h.size(); }
  void* data() { return dtype == 0 ? (void*)f.data() : (void*)h.data(); }
};

std::vector<float> filled(size_t n, float v) { return std::vector<float>(n, v); }
std::vector<float> randoms(size_t n, float scale) {
  std::vector<float> v(n);
  for (float& x : v) x = scale * uniform();
  return v;
}
bool finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// The kernels with the gated out_norm (where the fast plan applies; -3 = the op composes there).
bool run_norm(int dtype, int64_t B, int64_t H, int64_t W, int64_t d, int64_t N, int64_t R, int64_t chunk,
              Elems& u, Elems& dout, const std::vector<float>& Wx, const std::vector<float>& Wdt,
              const std::vector<float>& bias, const std::vector<float>& Alog, const std::vector<float>& D) {
  const int64_t C = 4 * d, L = H * W, nch = (L + chunk - 1) / chunk, n = B * L * C;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Elems z(dtype, n, true), out(dtype, n, false), du(dtype, n, false), dz(dtype, n, false);
  const auto nw = randoms(4 * d, 1.f), nb = randoms(4 * d, 0.2f);
  auto states = filled(B * 4 * nch * d * N, nan), stats = filled(B * L * 4 * 2, nan);
  auto dWx = filled(Wx.size(), nan), dWdt = filled(Wdt.size(), nan), dbias = filled(bias.size(), nan),
       dAlog = filled(Alog.size(), nan), dD = filled(D.size(), nan), dnw = filled(nw.size(), nan),
       dnb = filled(nb.size(), nan);
  const int f = gm_emu_scan_norm_fwd(dtype, u.data(), z.data(), out.data(), states.data(), stats.data(), Wx.data(),
                                     Wdt.data(), bias.data(), Alog.data(), D.data(), nw.data(), nb.data(), 1e-5, B,
                                     H, W, C, N, R, chunk);
  const int b = f != 1 ? -3
                       : gm_emu_scan_norm_bwd(dtype, dout.data(), u.data(), z.data(), du.data(), dz.data(),
                                              states.data(), stats.data(), Wx.data(), Wdt.data(), bias.data(),
                                              Alog.data(), D.data(), nw.data(), nb.data(), 1e-5, dWx.data(),
                                              dWdt.data(), dbias.data(), dAlog.data(), dD.data(), dnw.data(),
                                              dnb.data(), B, H, W, C, N, R, chunk);
  bool ok = (f == 1 || f == -3) && (b == 1 || b == -3);
  for (size_t i = 0; ok && f == 1 && i < out.size(); ++i) ok = std::isfinite(out.get(i));
  ok = ok && (f != 1 || finite(stats));
  for (size_t i = 0; ok && b == 1 && i < du.size(); ++i) ok = std::isfinite(du.get(i)) && std::isfinite(dz.get(i));
  ok = ok && (b != 1 || (finite(dWx) && finite(dWdt) && finite(dbias) && finite(dAlog) && finite(dD) &&
                         finite(dnw) && finite(dnb)));
  std::printf("  with the out_norm: norm kernels %s/%s, %s%s\n", f == 1 ? "fast" : "none", b == 1 ? "fast" : "none",
              ok ? "ok" : "FAILED ", ok ? "" : gm_emu_error());
  return ok;
}

bool run(int dtype, int64_t B, int64_t H, int64_t W, int64_t d, int64_t N, int64_t chunk) {
  const int64_t C = 4 * d, L = H * W, R = (d + 15) / 16, nch = (L + chunk - 1) / chunk, n = B * L * C;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Elems u(dtype, n, true), dy(dtype, n, true), y(dtype, n, false), du(dtype, n, false);
  const auto Wx = randoms(4 * (R + 2 * N) * d, 0.3f), Wdt = randoms(4 * d * R, 1.f), D = randoms(4 * d, 1.f);
  const auto bias = filled(4 * d, -2.f), Alog = filled(4 * d * N, 0.f);
  auto states = filled(B * 4 * nch * d * N, nan);
  auto dWx = filled(Wx.size(), nan), dWdt = filled(Wdt.size(), nan), dbias = filled(bias.size(), nan),
       dAlog = filled(Alog.size(), nan), dD = filled(D.size(), nan);
  const int f = gm_emu_scan_fwd(dtype, u.data(), y.data(), states.data(), Wx.data(), Wdt.data(), bias.data(),
                                Alog.data(), D.data(), B, H, W, C, N, R, chunk);
  const int b = gm_emu_scan_bwd(dtype, dy.data(), u.data(), du.data(), states.data(), Wx.data(), Wdt.data(),
                                bias.data(), Alog.data(), D.data(), dWx.data(), dWdt.data(), dbias.data(),
                                dAlog.data(), dD.data(), B, H, W, C, N, R, chunk);
  bool ok = (f == 0 || f == 1) && (b == 0 || b == 1);
  for (size_t i = 0; ok && i < y.size(); ++i) ok = std::isfinite(y.get(i)) && std::isfinite(du.get(i));
  ok = ok && finite(states) && finite(dWx) && finite(dWdt) && finite(dbias) && finite(dAlog) && finite(dD);
  std::printf("dtype %d B%ld %ldx%ld d%ld N%ld chunk %ld: kernels %s/%s, %s%s\n", dtype, (long)B, (long)H, (long)W,
              (long)d, (long)N, (long)chunk, f == 1 ? "fast" : "generic", b == 1 ? "fast" : "generic",
              ok ? "ok" : "FAILED ", ok ? "" : gm_emu_error());
  return ok && run_norm(dtype, B, H, W, d, N, R, chunk, u, dy, Wx, Wdt, bias, Alog, D);
}

}  // namespace

int main() {
  // (dtype, B, H, W, d, N, chunk): several segments per sequence, every vector width, both kernel families.
  const int64_t cases[][7] = {
      {0, 1, 24, 24, 16, 1, 64}, {1, 2, 9, 11, 32, 1, 32}, {0, 1, 9, 9, 87, 1, 32}, {1, 1, 5, 6, 106, 1, 32},
      {0, 1, 4, 4, 128, 1, 64},  {0, 1, 4, 6, 3, 2, 64},  {1, 1, 5, 9, 16, 1, 3},  {0, 2, 1, 1, 16, 1, 64},
  };
  bool ok = true;
  for (const auto& c : cases) ok = run((int)c[0], c[1], c[2], c[3], c[4], c[5], c[6]) && ok;
  return ok ? 0 : 1;
}
