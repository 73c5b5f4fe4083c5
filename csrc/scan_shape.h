// Shapes and scan orders of the four-direction grouped selective scan, without torch (the CUDA kernels'
// CPU emulation in tests/cuda_emu includes this too). scan_common.h adds the input checks.
#pragma once

#include <cstdint>

namespace groupmamba {

// Number of groups (scan directions). GroupMamba splits channels into exactly four.
constexpr int64_t kGroups = 4;

// Position (row-major index into the H x W map) visited at scan step t by group g.
//   g0: row-major            g1: column-major
//   g2: reversed row-major   g3: reversed column-major
// Usable from host and device code.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t scan_position(int64_t g, int64_t t, int64_t H, int64_t W) {
  const int64_t L = H * W;
  if (g >= 2) t = L - 1 - t;
  if (g & 1) return (t % H) * W + t / H;
  return t;
}

struct ScanDims {
  int64_t B, H, W, L, C, d, N, R;
};

inline int64_t num_chunks(int64_t L, int64_t chunk) { return (L + chunk - 1) / chunk; }

}  // namespace groupmamba
