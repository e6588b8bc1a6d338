// The gather / scatter kernel bodies, included by gather.cu (nvcc) and by the host emulation in
// tests/cuda_emulation (g++ with a thread-per-CUDA-thread shim; float32 only there). Launch code in gather.cu.
#pragma once

#include <cstdint>
#if !defined(MLMFAST_EMULATE_CUDA)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace mlmfast {
namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
#if !defined(MLMFAST_EMULATE_CUDA)  // the host emulation runs float32 only
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
#endif

// The launch: B * chunks_per_row blocks of kWarpsPerBlock warps; warp w of block c of row b owns slot
// j = (c % chunks_per_row) * kWarpsPerBlock + w of that row.
__device__ __forceinline__ int64_t batch_row(int64_t chunks_per_row) { return blockIdx.x / chunks_per_row; }
__device__ __forceinline__ int64_t warp_slot(int64_t chunks_per_row) {
  return (blockIdx.x % chunks_per_row) * kWarpsPerBlock + (threadIdx.x >> 5);
}

// N elements of T moved as one aligned unit (N * sizeof(T) = 16 bytes for the vector path).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N, typename PosT>
__global__ void gather_rows_kernel(const T* __restrict__ hidden,   // (B, L, H)
                                   const PosT* __restrict__ pos,   // (B, P)
                                   T* __restrict__ out,            // (B*P, H)
                                   int64_t L, int64_t P, int64_t H, int64_t chunks_per_row) {
  using PackT = Pack<T, N>;
  const int lane = threadIdx.x & 31;
  const int64_t b = batch_row(chunks_per_row), j = warp_slot(chunks_per_row);
  if (j >= P) return;
  const int64_t l = static_cast<int64_t>(pos[b * P + j]);
  const bool ok = 0 <= l && l < L;
  const int64_t np = H / N;  // packs per row
  const PackT* src = reinterpret_cast<const PackT*>(hidden + (b * L + (ok ? l : 0)) * H);
  PackT* dst = reinterpret_cast<PackT*>(out + (b * P + j) * H);
  PackT zero;
#pragma unroll
  for (int e = 0; e < N; ++e) zero.v[e] = from_float<T>(0.f);
  for (int64_t v = lane; v < np; v += 32) dst[v] = ok ? src[v] : zero;
}

template <typename T, int N, typename PosT>
__global__ void scatter_rows_kernel(const T* __restrict__ grad,     // (B*P, H)
                                    const PosT* __restrict__ pos,   // (B, P)
                                    T* __restrict__ grad_hidden,    // (B, L, H), zeroed
                                    int64_t L, int64_t P, int64_t H, int64_t chunks_per_row) {
  using PackT = Pack<T, N>;
  const int lane = threadIdx.x & 31;
  const int64_t b = batch_row(chunks_per_row), j = warp_slot(chunks_per_row);
  if (j >= P) return;
  const PosT* row_pos = pos + b * P;  // (P,)
  const int64_t l = static_cast<int64_t>(row_pos[j]);
  if (l < 0 || l >= L) return;

  // 1. owner test and duplicate count: one ballot per 32 slots
  bool has_dup = false;
  for (int64_t q0 = 0; q0 < P; q0 += 32) {
    const int64_t q = q0 + lane;
    const unsigned m = __ballot_sync(kFull, q < P && q != j && static_cast<int64_t>(row_pos[q]) == l);
    const unsigned below = (j - q0 >= 32) ? kFull : (j - q0 <= 0 ? 0u : ((1u << (j - q0)) - 1u));
    if (m & below) return;  // an earlier slot owns row l (warp-uniform)
    has_dup |= (m != 0);
  }
  const int64_t np = H / N;
  PackT* dst = reinterpret_cast<PackT*>(grad_hidden + (b * L + l) * H);
  if (!has_dup) {  // 2a. the common case: a copy
    const PackT* src = reinterpret_cast<const PackT*>(grad + (b * P + j) * H);
    for (int64_t v = lane; v < np; v += 32) dst[v] = src[v];
    return;
  }
  // 2b. several slots point to row l: float32 sum in ascending slot order, rounded once
  for (int64_t v0 = 0; v0 < np; v0 += 32) {
    const int64_t v = v0 + lane;
    float acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = 0.f;
    for (int64_t q0 = j; q0 < P; q0 += 32) {
      const int64_t q = q0 + lane;
      unsigned m = __ballot_sync(kFull, q < P && static_cast<int64_t>(row_pos[q]) == l);
      while (m) {
        const int bit = __ffs(m) - 1;
        m &= m - 1;
        if (v < np) {
          const PackT g = reinterpret_cast<const PackT*>(grad + (b * P + q0 + bit) * H)[v];
#pragma unroll
          for (int e = 0; e < N; ++e) acc[e] += to_float(g.v[e]);
        }
      }
    }
    if (v < np) {
      PackT r;
#pragma unroll
      for (int e = 0; e < N; ++e) r.v[e] = from_float<T>(acc[e]);
      dst[v] = r;
    }
  }
}

}  // namespace
}  // namespace mlmfast
