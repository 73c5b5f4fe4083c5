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

// Walks group g's scan order from step t onward: one division at the start, then only additions per step
// (the position of step t + 1 follows from that of step t). Equal to scan_position at every step of 0..L-1.
template <typename I>
struct ScanWalk {
  I pos;  // scan_position(g, t, H, W) of the current step t
  I row;  // column-major groups (g odd): pos / W
  I H, W;
  int g;
#if defined(__CUDACC__)
  __host__ __device__
#endif
  ScanWalk(int g_, I t, I H_, I W_) : pos(0), row(0), H(H_), W(W_), g(g_) {
    const I tt = g >= 2 ? H * W - 1 - t : t;  // index along the forward order of the group's pair
    if ((g & 1) && H > 0) { row = tt % H; pos = row * W + tt / H; }  // H = 0: an empty map, no steps
    else pos = tt;
  }
#if defined(__CUDACC__)
  __host__ __device__
#endif
  void next() {  // to step t + 1
    if (g == 0) ++pos;
    else if (g == 2) --pos;
    else if (g == 1) {  // down the column; from the last row to the top of the next column
      if (row + 1 < H) { ++row; pos += W; } else { row = 0; pos -= (H - 1) * W - 1; }
    } else {  // g == 3: up the column; from the first row to the bottom of the previous column
      if (row > 0) { --row; pos -= W; } else { row = H - 1; pos += (H - 1) * W - 1; }
    }
  }
};

struct ScanDims {
  int64_t B, H, W, L, C, d, N, R;
};

inline int64_t num_chunks(int64_t L, int64_t chunk) { return (L + chunk - 1) / chunk; }

}  // namespace groupmamba
