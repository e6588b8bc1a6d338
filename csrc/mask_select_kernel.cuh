// The mask-select kernel body, included by mask_select.cu (nvcc) and by the host emulation in
// tests/cuda_emulation (g++ with a thread-per-CUDA-thread shim, so CI checks the kernel's parallel logic against
// the C++ twin without a GPU). Launch code and the CUDA runtime stay in mask_select.cu.
#pragma once

#include "mask_select.h"

namespace mlmfast {
namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ unsigned lanemask_lt() {
#if defined(MLMFAST_EMULATE_CUDA)
  return (1u << (threadIdx.x & 31)) - 1u;  // the host emulation (tests/cuda_emulation)
#else
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
#endif
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
}  // namespace mlmfast
