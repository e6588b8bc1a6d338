// csrc/gather_kernel.cuh (float32) run on the CPU (cuda_shim.h) against plain loops: the forward gather and the
// scatter-add backward, with duplicate positions (summed in ascending slot order in float32: exactly the loop's
// order, so the comparison is exact), positions -1 and L (zero rows, no gradient), the 16-byte vector path
// (H % 4 == 0) and the scalar one, int32 and int64 positions, P larger than L. Outputs start poisoned (gather)
// or zeroed (scatter: gather.cu memsets first, as here). Exit 1 on a mismatch.
//   gather_emu SEED CASES
#include "cuda_shim.h"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "gather_kernel.cuh"

template <typename PosT>
static bool one_case(std::mt19937& rng, int64_t B, int64_t L, int64_t P, int64_t H, bool vec) {
  std::vector<float> hidden(B * L * H), out(B * P * H, 777.f), grad(B * P * H), grad_hidden(B * L * H, 0.f);
  std::vector<PosT> pos(B * P);
  for (auto& x : hidden) x = static_cast<float>(rng() % 2000) / 7.f - 100.f;
  for (auto& x : grad) x = static_cast<float>(rng() % 2000) / 13.f - 70.f;
  for (auto& x : pos) {
    const int r = rng() % 10;
    x = static_cast<PosT>(r == 0 ? -1 : (r == 1 ? L : (r < 4 ? 0 : static_cast<int64_t>(rng() % L))));
  }
  const int64_t chunks = (P + mlmfast::kWarpsPerBlock - 1) / mlmfast::kWarpsPerBlock;  // as gather.cu launches
  const unsigned grid = static_cast<unsigned>(B * chunks), threads = 32 * mlmfast::kWarpsPerBlock;
  emu_launch(grid, threads, [&] {
    if (vec) mlmfast::gather_rows_kernel<float, 4, PosT>(hidden.data(), pos.data(), out.data(), L, P, H, chunks);
    else mlmfast::gather_rows_kernel<float, 1, PosT>(hidden.data(), pos.data(), out.data(), L, P, H, chunks);
  });
  emu_launch(grid, threads, [&] {
    if (vec) mlmfast::scatter_rows_kernel<float, 4, PosT>(grad.data(), pos.data(), grad_hidden.data(), L, P, H, chunks);
    else mlmfast::scatter_rows_kernel<float, 1, PosT>(grad.data(), pos.data(), grad_hidden.data(), L, P, H, chunks);
  });
  std::vector<float> want_out(B * P * H, 0.f), want_grad(B * L * H, 0.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < P; ++j) {
      const int64_t l = static_cast<int64_t>(pos[b * P + j]);
      if (l < 0 || l >= L) continue;
      for (int64_t h = 0; h < H; ++h) {
        want_out[(b * P + j) * H + h] = hidden[(b * L + l) * H + h];
        want_grad[(b * L + l) * H + h] += grad[(b * P + j) * H + h];
      }
    }
  return out == want_out && grad_hidden == want_grad;
}

int main(int argc, char** argv) {
  const unsigned seed = argc > 1 ? static_cast<unsigned>(atoi(argv[1])) : 1;
  const int cases = argc > 2 ? atoi(argv[2]) : 60;
  std::mt19937 rng(seed);
  int mismatches = 0;
  for (int c = 0; c < cases; ++c) {
    const int64_t B = 1 + rng() % 3, L = 1 + rng() % 40, P = 1 + rng() % 45;
    const int64_t H = (rng() % 2) ? 4 * (1 + rng() % 24) : 1 + rng() % 50;
    const bool vec = H % 4 == 0 && (rng() & 1), i32 = rng() & 1;
    const bool ok = i32 ? one_case<int32_t>(rng, B, L, P, H, vec) : one_case<int64_t>(rng, B, L, P, H, vec);
    if (!ok) {
      ++mismatches;
      printf("MISMATCH case %d: B=%lld L=%lld P=%lld H=%lld vec=%d int32=%d\n", c, (long long)B, (long long)L,
             (long long)P, (long long)H, vec, i32);
    }
  }
  printf("cases %d mismatches %d\n", cases, mismatches);
  return mismatches ? 1 : 0;
}
