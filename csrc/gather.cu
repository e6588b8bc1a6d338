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
#include "gather_kernel.cuh"

namespace mlmfast {
namespace {

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
