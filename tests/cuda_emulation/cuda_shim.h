// Host emulation of the CUDA features csrc's kernels use, so a kernel body (csrc/*_kernel.cuh) compiles with g++
// and runs on a CPU: one std::thread per CUDA thread, blocks one after another, __syncthreads = a barrier over
// the block, warp intrinsics (__ballot_sync, __shfl_*_sync) = two barriers over the warp's 32 threads with a
// shared exchange buffer (lockstep, as the hardware's converged warp). __shared__ becomes a function-static:
// one copy, shared by the block's threads. Only what the kernels use; a warp intrinsic reached by part of a warp
// deadlocks here, as it is undefined behaviour on the GPU (the pytest wrapper has a timeout).
#pragma once
#define MLMFAST_EMULATE_CUDA 1

#include <pthread.h>

#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __grid_constant__
#define __shared__ static
#define __restrict__

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

struct EmuWarp {
  pthread_barrier_t bar;
  uint64_t buf[32];
};
inline pthread_barrier_t emu_block_barrier;
inline std::vector<EmuWarp>* emu_warps = nullptr;

inline void __syncthreads() { pthread_barrier_wait(&emu_block_barrier); }

// Every lane publishes v, the warp meets, each lane reads what it needs, the warp meets again (so the buffer is
// not overwritten before everyone has read it).
template <typename T, typename F>
inline T emu_exchange(T v, F pick) {
  EmuWarp& w = (*emu_warps)[threadIdx.x >> 5];
  const int lane = threadIdx.x & 31;
  w.buf[lane] = static_cast<uint64_t>(v);
  pthread_barrier_wait(&w.bar);
  const T r = pick(w.buf, lane);
  pthread_barrier_wait(&w.bar);
  return r;
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, int o) {
  return emu_exchange(v, [&](const uint64_t* b, int lane) { return lane + o < 32 ? static_cast<T>(b[lane + o]) : v; });
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, int o) {
  return emu_exchange(v, [&](const uint64_t* b, int lane) { return lane - o >= 0 ? static_cast<T>(b[lane - o]) : v; });
}
inline unsigned __ballot_sync(unsigned, bool p) {
  return emu_exchange(static_cast<unsigned>(p), [](const uint64_t* b, int) {
    unsigned m = 0;
    for (int i = 0; i < 32; ++i) m |= (b[i] ? 1u : 0u) << i;
    return m;
  });
}
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

// kernel<<<grid, threads>>>(...) as emu_launch(grid, threads, [&] { kernel(...); }); threads: a multiple of 32.
inline void emu_launch(unsigned grid, unsigned threads, const std::function<void()>& body) {
  blockDim.x = threads;
  gridDim.x = grid;
  std::vector<EmuWarp> warps(threads / 32);
  for (auto& w : warps) pthread_barrier_init(&w.bar, nullptr, 32);
  emu_warps = &warps;
  pthread_barrier_init(&emu_block_barrier, nullptr, threads);
  for (unsigned b = 0; b < grid; ++b) {
    std::vector<std::thread> ts;
    ts.reserve(threads);
    for (unsigned t = 0; t < threads; ++t)
      ts.emplace_back([&body, t, b] {
        threadIdx.x = t;
        blockIdx.x = b;
        body();
      });
    for (auto& th : ts) th.join();
  }
  pthread_barrier_destroy(&emu_block_barrier);
  for (auto& w : warps) pthread_barrier_destroy(&w.bar);
  emu_warps = nullptr;
}
