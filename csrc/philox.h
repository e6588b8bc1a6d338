// Philox4x32-10 counter-based random numbers, shared by the C++ twin and the CUDA kernel.
//
// Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3" (SC'11). A pure function of a
// 128-bit counter and a 64-bit key: no state, so a result never depends on which thread computed it or when.
// Only integer operations (32x32 -> 64-bit multiplies, xor, add), so host and device agree bit for bit.
// Checked against Random123's known-answer vectors in tests/test_mask_select.py.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MLM_HD __host__ __device__ __forceinline__
#else
#define MLM_HD inline
#endif

namespace mlmfast {

struct Philox4 {
  uint32_t w[4];  // four independent uniform 32-bit words
};

MLM_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// ctr: 4 x 32-bit counter; key: 2 x 32-bit key. Returns 4 x 32-bit random words.
MLM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // multipliers
  const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // Weyl key increments (golden ratio, sqrt(3) - 1)
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = philox_mulhi(M0, c0), lo0 = M0 * c0;
    const uint32_t hi1 = philox_mulhi(M1, c2), lo1 = M1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  Philox4 r;
  r.w[0] = c0;
  r.w[1] = c1;
  r.w[2] = c2;
  r.w[3] = c3;
  return r;
}

}  // namespace mlmfast
