// Runs CUDA kernels on the CPU, for tests on machines without a GPU (CI). Every CUDA thread is a fiber
// (ucontext) on one OS thread. A launch's blocks run together in waves (up to kWaveThreads threads), and a
// scheduler switches between fibers at __syncthreads, at warp shuffles and at every relaxed load of a
// look-back, so block barriers and warp-synchronous exchanges behave as on the GPU and a block can find its
// predecessor still running (the look-back's waiting paths run, not only the finished-predecessor one).
//
// What it checks: the kernels' indexing, masking, barriers (the live threads of a block waiting at different
// barriers, e.g. a full-mask shuffle that some lanes never reach, is reported as a deadlock), the look-back's
// protocol under the interleavings of the chosen schedule (see `schedule`), and the arithmetic. What it does
// not check: the GPU memory model (every access here is sequentially consistent), performance. Shared memory starts as NaN, so a read of an element
// no thread wrote shows up in the results.
//
// Include this before the kernel source, which must be compiled with GROUPMAMBA_CUDA_EMULATION defined.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

// (cuda_bf16.h defines these as compiler attributes; here they mean nothing)
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline Dim3 thread_idx, block_idx, block_dim, grid_dim;

// The first failure (a deadlock, an unsupported call, a look-back that never ends); launch() stops at it and
// the caller reports it. Empty while all is well.
inline std::string error;

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx{};
  State state = State::kRunnable;
  int block = 0;     // index in the wave
  unsigned tid = 0;  // linear thread index in its block
};

struct Block {
  Dim3 idx;
  std::vector<float> dynamic_smem;
  std::map<int, uint64_t> statics;  // GM_SHARED variables, by declaration line
  std::vector<uint64_t> warp_slots;  // 32 per warp: shuffle exchange
  long polls = 0;                    // relaxed loads (a look-back that never ends)
  bool sits_out = false;             // skips this pass (shuffled schedules)
};

struct Wave {
  std::vector<Fiber> fibers;  // block-major
  std::vector<Block> blocks;
  unsigned threads = 0;       // per block
  ucontext_t scheduler{};
  const std::function<void()>* body = nullptr;
  int current = -1;
};
inline Wave* wave = nullptr;
// The order the scheduler visits the fibers in on each pass: 0 first to last, 1 last to first, any other value
// a fresh random permutation per pass with that seed, in which each block also sits out half of the passes: the
// blocks then progress at uneven speeds, as on a GPU, and a look-back meets other mixes of finished and
// unfinished predecessors (in the fixed orders every block advances in step).
inline unsigned schedule = 0;

constexpr size_t kStackBytes = 64 * 1024;  // the scan kernels' frames take a few KB
constexpr unsigned kWaveThreads = 8192;

// One stack per fiber of a wave, allocated once (pages are touched only as the stacks grow).
inline char* stack_of(size_t f) {
  static char* pool = static_cast<char*>(std::malloc(kWaveThreads * kStackBytes));
  return pool + f * kStackBytes;
}

inline Fiber& me() { return wave->fibers[wave->current]; }
inline Block& my_block() { return wave->blocks[me().block]; }

inline void switch_out(State s) {
  Fiber& f = me();
  f.state = s;
  swapcontext(&f.ctx, &wave->scheduler);
}

// Called on a fiber: records the failure and leaves the fiber for good (the wave is abandoned).
inline void fail(const std::string& what) {
  if (error.empty()) error = what;
  switch_out(State::kDone);
  std::abort();  // never resumed
}

inline void fiber_main() {
  (*wave->body)();
  me().state = State::kDone;  // uc_link returns to the scheduler
}

// Releases the fibers waiting at a barrier once every live thread of its scope (warp or block) is there.
inline bool release_barriers() {
  bool released = false;
  const unsigned T = wave->threads;
  for (size_t b = 0; b < wave->blocks.size(); ++b) {
    Fiber* f = wave->fibers.data() + b * T;
    auto waiting_all = [&](unsigned lo, unsigned hi, State s) {
      bool any = false;
      for (unsigned t = lo; t < hi; ++t) {
        if (f[t].state == State::kDone) continue;
        if (f[t].state != s) return false;
        any = true;
      }
      return any;
    };
    auto release = [&](unsigned lo, unsigned hi, State s) {
      for (unsigned t = lo; t < hi; ++t)
        if (f[t].state == s) f[t].state = State::kRunnable;
      released = true;
    };
    for (unsigned w0 = 0; w0 < T; w0 += 32)
      if (waiting_all(w0, std::min(T, w0 + 32), State::kWarpBarrier)) release(w0, std::min(T, w0 + 32), State::kWarpBarrier);
    if (waiting_all(0, T, State::kBlockBarrier)) release(0, T, State::kBlockBarrier);
  }
  return released;
}

// Fibers run in the schedule's order, each until it waits, yields or ends; then barriers whose threads
// have all arrived open. With shared memory starting as NaN, a missing barrier between a write and a read by a
// thread that runs earlier shows up in the results.
inline void run_wave(const std::vector<Dim3>& idx, unsigned threads, size_t smem_bytes,
                     const std::function<void()>& body) {
  Wave w;
  w.threads = threads;
  w.body = &body;
  w.blocks.resize(idx.size());
  for (size_t b = 0; b < idx.size(); ++b) {
    w.blocks[b].idx = idx[b];
    w.blocks[b].dynamic_smem.assign((smem_bytes + 3) / 4, std::numeric_limits<float>::quiet_NaN());
    w.blocks[b].warp_slots.assign((threads + 31) / 32 * 32, 0);
  }
  w.fibers.resize(idx.size() * threads);
  wave = &w;
  for (size_t i = 0; i < w.fibers.size(); ++i) {
    Fiber& f = w.fibers[i];
    f.block = (int)(i / threads);
    f.tid = (unsigned)(i % threads);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_of(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &w.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  const size_t n = w.fibers.size();
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = schedule == 1 ? n - 1 - i : i;
  std::mt19937 rng(schedule);
  while (error.empty()) {
    bool ran = false;
    if (schedule > 1) {
      std::shuffle(order.begin(), order.end(), rng);
      for (auto& b : w.blocks) b.sits_out = rng() & 1;
    }
    for (size_t i = 0; i < n && error.empty(); ++i) {
      const size_t k = order[i];
      Fiber& f = w.fibers[k];
      if (f.state != State::kRunnable) continue;
      if (w.blocks[f.block].sits_out) {
        ran = true;  // sits this pass out: still runnable, so no barrier check
        continue;
      }
      w.current = (int)k;
      thread_idx = Dim3{f.tid % block_dim.x, (f.tid / block_dim.x) % block_dim.y, f.tid / (block_dim.x * block_dim.y)};
      block_idx = w.blocks[f.block].idx;
      swapcontext(&w.scheduler, &f.ctx);
      ran = true;
    }
    if (ran) continue;
    if (std::all_of(w.fibers.begin(), w.fibers.end(), [](const Fiber& f) { return f.state == State::kDone; })) break;
    if (!release_barriers())
      error = "deadlock: the live threads of a block wait at different barriers (a __syncthreads or a full-mask "
              "shuffle that some threads never reach)";
  }
  wave = nullptr;
}

// kernel<<<grid, threads, smem>>>(...) becomes emu::launch(grid, threads, smem, [&] { kernel(...); }).
inline void launch(Dim3 grid, Dim3 threads, size_t smem_bytes, const std::function<void()>& body) {
  grid_dim = grid;
  block_dim = threads;
  const unsigned n = threads.x * threads.y * threads.z;
  if (n == 0 || n > 1024) {
    if (error.empty()) error = "launch: 1..1024 threads per block, got " + std::to_string(n);
    return;
  }
  std::vector<Dim3> all;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) all.push_back(Dim3{x, y, z});
  const size_t per_wave = std::max(1u, kWaveThreads / n);
  for (size_t b0 = 0; b0 < all.size() && error.empty(); b0 += per_wave) {
    const std::vector<Dim3> idx(all.begin() + b0, all.begin() + std::min(all.size(), b0 + per_wave));
    run_wave(idx, n, smem_bytes, body);
  }
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(my_block().dynamic_smem.data());
}

// A statically sized __shared__ variable: one per block (keyed by its declaration's line).
template <typename T>
T& block_static(int key) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  return *reinterpret_cast<T*>(&my_block().statics[key]);
}

// A relaxed load of a look-back: lets the other fibers run (the value may come from a block in the same wave),
// and fails a block that keeps polling for a value nobody publishes.
inline void poll() {
  if (++my_block().polls > (1L << 22)) fail("a block polls forever (a look-back waits for a value nobody publishes)");
  switch_out(State::kRunnable);
}

inline int lane() { return (int)(me().tid % 32); }

// Every lane of the warp deposits its value, then reads lane `src` (its own value when src is out of range).
template <typename T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  std::vector<uint64_t>& slots = my_block().warp_slots;
  const unsigned t = me().tid, w0 = t - t % 32;
  std::memcpy(&slots[t], &v, sizeof(T));
  switch_out(State::kWarpBarrier);
  T r = v;
  if (src >= 0 && src < 32 && w0 + src < wave->threads) std::memcpy(&r, &slots[w0 + src], sizeof(T));
  switch_out(State::kWarpBarrier);  // nobody overwrites a slot before every lane has read
  return r;
}

inline void require_full_warp(unsigned mask, int width) {
  if (mask != 0xffffffffu || width != 32) fail("only full-warp shuffles of width 32 are emulated");
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { ::emu::switch_out(::emu::State::kBlockBarrier); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  ::emu::require_full_warp(mask, width);
  return ::emu::exchange(v, ::emu::lane() ^ lane_mask);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  ::emu::require_full_warp(mask, width);
  const int src = ::emu::lane() - (int)delta;
  return ::emu::exchange(v, src < 0 ? -1 : src);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  ::emu::require_full_warp(mask, width);
  const int src = ::emu::lane() + (int)delta;
  return ::emu::exchange(v, src >= 32 ? -1 : src);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {  // one fiber runs at a time
  const unsigned old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
using std::max;
using std::min;
