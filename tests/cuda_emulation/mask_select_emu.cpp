// csrc/mask_select_kernel.cuh run on the CPU (cuda_shim.h) against the C++ twin (mask_select_cpu.cpp): random
// batches over both modes, whole-word units, int32 / int64 ids, lengths, attention and special-token masks,
// all-padding and mostly-special rows, L from 1 to > 1024 (several tiles), capacities from 1 to past L
// (overflow), the extreme row_offset. Every output is pre-filled with a poison value, so a slot the kernel
// forgets to write differs from the twin's. Prints one line per mismatch and a summary; exit 1 on a mismatch.
//   mask_select_emu SEED CASES
#include "cuda_shim.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "mask_select_kernel.cuh"

using mlmfast::MaskSelectParams;

static void run_kernel(const MaskSelectParams& p) {  // the launch configuration of mask_select.cu
  if (p.B <= 0) return;
  int threads = static_cast<int>(((p.L + 31) / 32) * 32);
  threads = threads < 32 ? 32 : (threads > 1024 ? 1024 : threads);
  if (p.ids_size == 4)
    emu_launch(static_cast<unsigned>(p.B), threads, [&] { mlmfast::mask_select_kernel<int32_t>(p); });
  else
    emu_launch(static_cast<unsigned>(p.B), threads, [&] { mlmfast::mask_select_kernel<int64_t>(p); });
}

int main(int argc, char** argv) {
  const unsigned seed = argc > 1 ? static_cast<unsigned>(atoi(argv[1])) : 1;
  const int cases = argc > 2 ? atoi(argv[2]) : 100;
  std::mt19937_64 rng(seed);
  const int64_t lens_choice[] = {1, 2, 17, 31, 32, 33, 64, 127, 129, 250, 513, 1100};
  const double probs[] = {0.15, 0.5, 0.01, 0.999, 0.3};
  int mismatches = 0;
  int64_t selected = 0, dropped = 0;
  for (int c = 0; c < cases; ++c) {
    const int64_t B = 1 + rng() % 3, L = lens_choice[rng() % 12];
    const bool i32 = rng() & 1, exact = rng() & 1, whole_word = rng() % 3 == 0, use_len = rng() & 1,
               use_attn = rng() & 1, use_smask = rng() % 4 == 0;
    const int kind = rng() % 4;  // 0, 3: ordinary rows; 1: mostly special ids; 2: all padding (attention mask)
    const int64_t vocab = 50 + rng() % 1000;
    int64_t P = 1 + rng() % (L + 2);
    if (rng() % 3 == 0) P = std::max<int64_t>(1, L / 20);  // a tight capacity: overflow
    std::vector<int64_t> ids64(B * L), wid(B * L), lens(B);
    std::vector<int32_t> ids32(B * L);
    std::vector<uint8_t> attn(B * L), smask(B * L);
    for (int64_t b = 0; b < B; ++b) {
      lens[b] = static_cast<int64_t>(rng() % (L + 3)) - 1;  // -1 .. L + 1
      int64_t w = -1;
      for (int64_t l = 0; l < L; ++l) {
        int64_t id = rng() % vocab;
        if (kind == 1 && rng() % 2) id = rng() % 5;
        ids64[b * L + l] = id;
        ids32[b * L + l] = static_cast<int32_t>(id);
        attn[b * L + l] = kind == 2 ? 0 : (rng() % 8 != 0);
        smask[b * L + l] = rng() % 10 == 0;
        if (rng() % 3 != 0) ++w;
        wid[b * L + l] = rng() % 10 == 0 ? -1 : w;
      }
    }
    const double p_sel = probs[rng() % 5];
    std::vector<int64_t> out[2][5];
    std::vector<int64_t> oid64[2];
    std::vector<int32_t> oid32[2];
    for (int impl = 0; impl < 2; ++impl) {
      const int64_t poison = 0x5A5A5A5A;
      oid64[impl].assign(B * L, poison);
      oid32[impl].assign(B * L, static_cast<int32_t>(poison));
      out[impl][0].assign(B * L, poison);
      out[impl][1].assign(B * P, poison);
      out[impl][2].assign(B * P, poison);
      out[impl][3].assign(B, poison);
      out[impl][4].assign(B, poison);
      MaskSelectParams p;
      p.input_ids = i32 ? reinterpret_cast<uint64_t>(ids32.data()) : reinterpret_cast<uint64_t>(ids64.data());
      p.ids_size = i32 ? 4 : 8;
      if (use_attn || kind == 2) { p.attention_mask = reinterpret_cast<uint64_t>(attn.data()); p.attention_mask_size = 1; }
      if (use_len) { p.lengths = reinterpret_cast<uint64_t>(lens.data()); p.lengths_size = 8; }
      if (use_smask) { p.special_mask = reinterpret_cast<uint64_t>(smask.data()); p.special_mask_size = 1; }
      if (whole_word) { p.word_ids = reinterpret_cast<uint64_t>(wid.data()); p.word_ids_size = 8; }
      p.out_ids = i32 ? reinterpret_cast<uint64_t>(oid32[impl].data()) : reinterpret_cast<uint64_t>(oid64[impl].data());
      p.labels = reinterpret_cast<uint64_t>(out[impl][0].data());
      p.positions = reinterpret_cast<uint64_t>(out[impl][1].data());
      p.position_labels = reinterpret_cast<uint64_t>(out[impl][2].data());
      p.num_selected = reinterpret_cast<uint64_t>(out[impl][3].data());
      p.num_dropped = reinterpret_cast<uint64_t>(out[impl][4].data());
      p.B = B; p.L = L; p.P = P;
      for (int s = 0; s < 4; ++s) p.special_ids[s] = s;  // [CLS]-like ids 0..2 and [MASK] = 3
      p.n_special = 4;
      p.mask_token_id = 3; p.vocab_size = vocab; p.n_allowed = vocab - 4;
      p.thr_select = static_cast<uint64_t>(p_sel * 4294967296.0);
      p.thr_mask = static_cast<uint64_t>(0.8 * 4294967296.0);
      p.thr_mask_random = static_cast<uint64_t>(0.9 * 4294967296.0);
      p.p_select = p_sel; p.exact = exact;
      p.seed = c * 1234567ull + seed; p.offset = c; p.row_offset = c % 2 ? 4294967296ull - B : 7;
      if (impl == 0) mlmfast::mask_select_cpu(p); else run_kernel(p);
    }
    bool same = oid64[0] == oid64[1] && oid32[0] == oid32[1];
    for (int k = 0; k < 5; ++k) same = same && out[0][k] == out[1][k];
    for (int64_t b = 0; b < B; ++b) { selected += out[0][3][b]; dropped += out[0][4][b]; }
    if (!same) {
      ++mismatches;
      printf("MISMATCH case %d: B=%lld L=%lld P=%lld int32=%d exact=%d whole_word=%d lengths=%d attn=%d kind=%d p=%g\n",
             c, (long long)B, (long long)L, (long long)P, i32, exact, whole_word, use_len, use_attn, kind, p_sel);
    }
  }
  printf("cases %d mismatches %d selected %lld dropped %lld\n", cases, mismatches, (long long)selected,
         (long long)dropped);
  return mismatches ? 1 : 0;
}
