// CUDA mask-select: one block per row, one launch for the batch, no host synchronisation.
//
// The decisions are the __host__ __device__ functions of mask_select.h, shared with the C++ twin, so the
// outputs are bit-identical to mask_select_cpu.cpp. What differs is the parallel split of a row:
//
//  1. exact mode only: n = #eligible (block reduction), r = floor(n p + 0.5) + 1 (>= 2 when n > 0).
//     T = the r-th smallest 64-bit unit key over the eligible positions, by radix select: 8 passes of 8 bits
//     from the top; pass d histograms (shared memory, 256 bins) the keys whose higher digits equal the
//     prefix found so far, and one warp scans the histogram for the bin holding the r-th key. Keys are
//     recomputed each pass (Philox is a few dozen integer instructions; no L-sized scratch).
//  2. ordered pass over tiles of blockDim positions: selected flag -> block exclusive scan (warp ballots)
//     -> rank among selected positions in position order; rank < P is kept and written to slot `rank`;
//     the rest are dropped (id restored, label -100) and counted.
//  3. unused slots of positions / position_labels are filled (0 / -100), counts written by thread 0.
#include <cuda_runtime.h>

#include "cuda_api.h"
#include "cuda_utils.cuh"
#include "mask_select.h"
#include "mask_select_kernel.cuh"

namespace mlmfast {

std::string mask_select_cuda(const MaskSelectParams& p, int device, uint64_t stream) {
  if (p.B <= 0) return "";
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return cudaGetErrorString(guard.err);
  int threads = static_cast<int>(((p.L + 31) / 32) * 32);
  threads = threads < 32 ? 32 : (threads > 1024 ? 1024 : threads);
  const dim3 grid(static_cast<unsigned>(p.B));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (p.ids_size == 4) {
    mask_select_kernel<int32_t><<<grid, threads, 0, s>>>(p);
  } else {
    mask_select_kernel<int64_t><<<grid, threads, 0, s>>>(p);
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

std::string cuda_runtime_info() {
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  const cudaError_t e = cudaDriverGetVersion(&drv);
  std::string s = "CUDA runtime " + std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10);
  if (e != cudaSuccess || drv == 0) return s + ", no CUDA driver";
  return s + ", driver " + std::to_string(drv / 1000) + "." + std::to_string((drv % 1000) / 10);
}

}  // namespace mlmfast
