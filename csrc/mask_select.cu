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

namespace mlmfast {
namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

template <typename IdT>
__global__ void __launch_bounds__(1024) mask_select_kernel(const __grid_constant__ MaskSelectParams p) {
  __shared__ unsigned hist[256];       // radix-select histogram
  __shared__ unsigned warp_count[32];  // per-warp counts for block reductions / scans
  __shared__ unsigned s_bin, s_before;

  const int64_t b = blockIdx.x;  // row
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int64_t L = p.L, P = p.P;
  const IdT* ids = reinterpret_cast<const IdT*>(p.input_ids) + b * L;  // (L,)
  const int64_t len = row_length(p, b);

  bool take_all = false, take_equal = false;
  uint64_t thr_key = 0, T = 0;  // selected <=> eligible && (take_all || key < thr_key || take_equal && key == T)
  if (!p.exact) {
    if (p.thr_select >= (1ull << 32)) take_all = true; else thr_key = p.thr_select << 32;
  } else {
    // 1a. n = number of eligible positions
    unsigned cnt = 0;
    for (int64_t l = tid; l < L; l += blockDim.x) cnt += eligible_at(p, b, l, len, static_cast<int64_t>(ids[l]));
    for (int o = 16; o > 0; o >>= 1) cnt += __shfl_down_sync(kFull, cnt, o);
    if (lane == 0) warp_count[warp] = cnt;
    __syncthreads();
    int64_t n = 0;
    for (int w = 0; w < nwarps; ++w) n += warp_count[w];
    __syncthreads();  // warp_count is reused below
    const int64_t r = exact_budget(p.p_select, n) + 1;
    if (r > n) {
      take_all = true;
    } else {
      // 1b. radix select of the r-th smallest key
      uint64_t prefix = 0;
      unsigned rr = static_cast<unsigned>(r), less = 0;
      for (int shift = 56; shift >= 0; shift -= 8) {
        const uint64_t hi_mask = shift == 56 ? 0ull : (~0ull << (shift + 8));  // digits already fixed
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int64_t l = tid; l < L; l += blockDim.x) {
          if (!eligible_at(p, b, l, len, static_cast<int64_t>(ids[l]))) continue;
          const uint64_t key = unit_key(p, b, l);
          if (((key ^ prefix) & hi_mask) == 0) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (warp == 0) {  // lane i owns bins [8i, 8i + 8); find the bin where the running count reaches rr
          unsigned c[8], sum = 0;
#pragma unroll
          for (int j = 0; j < 8; ++j) sum += (c[j] = hist[8 * lane + j]);
          unsigned incl = sum;
#pragma unroll
          for (int o = 1; o < 32; o <<= 1) {
            const unsigned v = __shfl_up_sync(kFull, incl, o);
            if (lane >= o) incl += v;
          }
          unsigned run = incl - sum;
          if (run < rr && rr <= incl) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (run + c[j] >= rr) {
                s_bin = 8 * lane + j;
                s_before = run;
                break;
              }
              run += c[j];
            }
          }
        }
        __syncthreads();
        prefix |= static_cast<uint64_t>(s_bin) << shift;
        rr -= s_before;
        less += s_before;
      }
      T = thr_key = prefix;
      take_equal = (less == 0);
    }
  }

  // 2. ordered pass: scan of the selected flags in position order
  IdT* out = reinterpret_cast<IdT*>(p.out_ids) + b * L;                         // (L,)
  int64_t* labels = reinterpret_cast<int64_t*>(p.labels) + b * L;               // (L,)
  int64_t* positions = reinterpret_cast<int64_t*>(p.positions) + b * P;         // (P,)
  int64_t* position_labels = reinterpret_cast<int64_t*>(p.position_labels) + b * P;  // (P,)
  int64_t base = 0;  // selected positions before this tile (the same value in every thread)
  for (int64_t t0 = 0; t0 < L; t0 += blockDim.x) {
    const int64_t l = t0 + tid;
    const bool in = l < L;
    const int64_t id = in ? static_cast<int64_t>(ids[l]) : 0;
    bool sel = false;
    if (in && eligible_at(p, b, l, len, id)) {
      const uint64_t key = unit_key(p, b, l);
      sel = take_all || key < thr_key || (take_equal && key == T);
    }
    const unsigned ballot = __ballot_sync(kFull, sel);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    unsigned before = __popc(ballot & lanemask_lt()), total = 0;
    for (int w = 0; w < nwarps; ++w) {
      const unsigned c = warp_count[w];
      before += (w < warp) ? c : 0u;
      total += c;
    }
    __syncthreads();  // warp_count is rewritten by the next tile
    const int64_t rank = base + before;
    if (in) {
      if (sel && rank < P) {
        out[l] = static_cast<IdT>(corrupted_id(p, b, l, id));
        labels[l] = id;
        positions[rank] = l;
        position_labels[rank] = id;
      } else {
        out[l] = static_cast<IdT>(id);
        labels[l] = kIgnoreIndex;
      }
    }
    base += total;
  }

  // 3. unused slots and counts
  const int64_t kept = base < P ? base : P;
  for (int64_t j = kept + tid; j < P; j += blockDim.x) {
    positions[j] = 0;
    position_labels[j] = kIgnoreIndex;
  }
  if (tid == 0) {
    reinterpret_cast<int64_t*>(p.num_selected)[b] = kept;
    reinterpret_cast<int64_t*>(p.num_dropped)[b] = base - kept;
  }
}

}  // namespace

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
