// Row gather for the sparse MLM head, and its backward (a deterministic scatter-add).
//
//   forward:  out[b*P + j, :] = hidden[b, positions[b, j], :]                       (B*P, H)
//   backward: grad_hidden[b, l, :] = sum_{j : positions[b, j] == l} grad[b*P + j, :]  (B, L, H)
//
// One warp per slot j; its lanes stride over the row in 16-byte packs (8 x fp16/bf16, 4 x fp32) when the
// row size and the base addresses allow it, else element by element. A position outside [0, L) reads as a
// zero row and receives no gradient (no out-of-bounds access; the kernels cannot raise without a sync).
//
// Backward without atomics: slot j is the owner of its position l when no slot j' < j points to l; the
// owner sums all slots j' >= j with position l in ascending j', in float32, and writes the row once. Slots
// pointing to the same row are rare (in mlmfast: only the unused slots, which all point to position 0), so
// the common case is a plain copy. Finding owners scans the row's P positions per slot: O(P^2 / 32) per row,
// meant for P up to a few thousand. Rows no slot points to are zeroed by a memset first.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_api.h"
#include "cuda_utils.cuh"

namespace mlmfast {
namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

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
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x / chunks_per_row;
  const int64_t j = (blockIdx.x % chunks_per_row) * kWarpsPerBlock + warp;  // slot
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
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x / chunks_per_row;
  const int64_t j = (blockIdx.x % chunks_per_row) * kWarpsPerBlock + warp;  // slot
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

template <typename T, typename PosT>
void launch_gather(bool backward, bool vec, uint64_t src, uint64_t pos, uint64_t dst, int64_t B, int64_t L,
                   int64_t P, int64_t H, cudaStream_t s) {
  const int64_t chunks = (P + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const dim3 grid(static_cast<unsigned>(B * chunks)), block(32 * kWarpsPerBlock);
  const auto* p = reinterpret_cast<const PosT*>(pos);
  constexpr int NV = static_cast<int>(16 / sizeof(T));
  if (!backward) {
    if (vec)
      gather_rows_kernel<T, NV, PosT><<<grid, block, 0, s>>>(reinterpret_cast<const T*>(src), p,
                                                              reinterpret_cast<T*>(dst), L, P, H, chunks);
    else
      gather_rows_kernel<T, 1, PosT><<<grid, block, 0, s>>>(reinterpret_cast<const T*>(src), p,
                                                             reinterpret_cast<T*>(dst), L, P, H, chunks);
  } else {
    if (vec)
      scatter_rows_kernel<T, NV, PosT><<<grid, block, 0, s>>>(reinterpret_cast<const T*>(src), p,
                                                               reinterpret_cast<T*>(dst), L, P, H, chunks);
    else
      scatter_rows_kernel<T, 1, PosT><<<grid, block, 0, s>>>(reinterpret_cast<const T*>(src), p,
                                                              reinterpret_cast<T*>(dst), L, P, H, chunks);
  }
}

template <typename T>
void dispatch_pos(int pos_size, bool backward, bool vec, uint64_t src, uint64_t pos, uint64_t dst, int64_t B,
                  int64_t L, int64_t P, int64_t H, cudaStream_t s) {
  if (pos_size == 4)
    launch_gather<T, int32_t>(backward, vec, src, pos, dst, B, L, P, H, s);
  else
    launch_gather<T, int64_t>(backward, vec, src, pos, dst, B, L, P, H, s);
}

std::string run(bool backward, uint64_t src, uint64_t pos, uint64_t dst, int64_t B, int64_t L, int64_t P,
                int64_t H, int dtype, int pos_size, int device, uint64_t stream) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return cudaGetErrorString(guard.err);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t esize = dtype == 0 ? 4 : 2;
  if (backward && B * L * H > 0) {
    const cudaError_t e = cudaMemsetAsync(reinterpret_cast<void*>(dst), 0, B * L * H * esize, s);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  if (B * P == 0 || H == 0) return "";
  const bool vec = (H * esize) % 16 == 0 && src % 16 == 0 && dst % 16 == 0;
  switch (dtype) {
    case 0: dispatch_pos<float>(pos_size, backward, vec, src, pos, dst, B, L, P, H, s); break;
    case 1: dispatch_pos<__half>(pos_size, backward, vec, src, pos, dst, B, L, P, H, s); break;
    default: dispatch_pos<__nv_bfloat16>(pos_size, backward, vec, src, pos, dst, B, L, P, H, s); break;
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

}  // namespace

std::string gather_rows_cuda(uint64_t hidden, uint64_t positions, uint64_t out, int64_t B, int64_t L, int64_t P,
                             int64_t H, int dtype, int pos_size, int device, uint64_t stream) {
  return run(false, hidden, positions, out, B, L, P, H, dtype, pos_size, device, stream);
}

std::string scatter_rows_cuda(uint64_t grad, uint64_t positions, uint64_t grad_hidden, int64_t B, int64_t L,
                              int64_t P, int64_t H, int dtype, int pos_size, int device, uint64_t stream) {
  return run(true, grad, positions, grad_hidden, B, L, P, H, dtype, pos_size, device, stream);
}

}  // namespace mlmfast
