// C interface of the emulated scan kernels (scan_emu.cpp): what tests/test_scan_emulated.py loads with ctypes
// and memcheck_main.cpp links against.
#pragma once

#include <cstdint>

extern "C" {

// The emulator's first failure since the last call of either entry point ("" if none).
const char* gm_emu_error();

// The fibers run first to last (0), last to first (1) or shuffled with that seed (any other value); see cuda_emu.h.
void gm_emu_set_schedule(unsigned schedule);

// dtype: 0 float32, 1 bfloat16, 2 float16 (u, y, dy, du); the parameters, states and gradients are float32.
// Outputs are allocated by the caller: y and du like u; states (B, 4, ceil(L / chunk), d, N).
// Returns 1 when the fast kernel ran, 0 for the generic one, -1 for an unknown dtype, -2 when the emulator failed
// (gm_emu_error says why).
int gm_emu_scan_fwd(int dtype, const void* u, void* y, float* states, const float* Wx, const float* Wdt,
                    const float* bias, const float* Alog, const float* D, int64_t B, int64_t H, int64_t W, int64_t C,
                    int64_t N, int64_t R, int64_t chunk);
int gm_emu_scan_bwd(int dtype, const void* dy, const void* u, void* du, const float* states, const float* Wx,
                    const float* Wdt, const float* bias, const float* Alog, const float* D, float* dWx, float* dWdt,
                    float* dbias, float* dAlog, float* dD, int64_t B, int64_t H, int64_t W, int64_t C, int64_t N,
                    int64_t R, int64_t chunk);

// The same with the gated out_norm fused (GateNorm in csrc/cuda/scan_kernels.cuh): the forward writes
// LayerNorm_g(y) * SiLU(z) into out and each position's and group's mean and rstd into stats (B, H, W, 4, 2);
// the backward takes the output's gradient dout and those stats and also writes dz (like u) and the norm's
// weight and bias gradients (4, d). norm_w, norm_b: (4, d) float32. Returns -3 where the fast kernels do not
// apply (the op composes the unfused scan and norm there).
int gm_emu_scan_norm_fwd(int dtype, const void* u, const void* z, void* out, float* states, float* stats,
                         const float* Wx, const float* Wdt, const float* bias, const float* Alog, const float* D,
                         const float* norm_w, const float* norm_b, double eps, int64_t B, int64_t H, int64_t W,
                         int64_t C, int64_t N, int64_t R, int64_t chunk);
int gm_emu_scan_norm_bwd(int dtype, const void* dout, const void* u, const void* z, void* du, void* dz,
                         const float* states, float* stats, const float* Wx, const float* Wdt, const float* bias,
                         const float* Alog,
                         const float* D, const float* norm_w, const float* norm_b, double eps, float* dWx,
                         float* dWdt, float* dbias, float* dAlog, float* dD, float* dnorm_w, float* dnorm_b,
                         int64_t B, int64_t H, int64_t W, int64_t C, int64_t N, int64_t R, int64_t chunk);
}
