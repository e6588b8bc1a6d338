// mask_select: the algorithm shared by the C++ twin (mask_select_cpu.cpp) and the CUDA kernel (mask_select.cu).
//
// Everything that decides an output lives here as __host__ __device__ functions on integers, so the two
// implementations are bit-identical by construction; they differ only in how a row's work is split
// (one CPU thread per row / one CUDA block per row).
//
// Semantics: those of mlmfast.masking.mask_tokens (see its docstring), with a counter-based random stream:
//   eligible(b, l) = valid(b, l) & !special(b, l)
//       valid:   l < lengths[b] (if given) and attention_mask[b, l] != 0 (if given)
//       special: input_ids[b, l] in special_ids, or special_tokens_mask[b, l] != 0 (if given)
//   unit(b, l)    = the word word_ids[b, l] when word_ids is given and >= 0, else the position itself
//   Random words (Philox4x32-10, key = seed, counter = (index, row, offset_lo, offset_hi | stream << 31)),
//   row = r(b) = row_offset + b: the row's index in the global batch, so a batch split across data-parallel
//   ranks (rank k masks rows [k * B, (k + 1) * B) with row_offset = k * B) draws the same bits as one call:
//       D(b, l) = philox(l, r(b), offset, stream 0) -> w0: unit draw of a position unit, w1: action, w2: token
//       W(b, w) = philox(w, r(b), offset, stream 1) -> w0: unit draw of word w
//   unit word u(b, l) = W(b, word_ids[b, l]).w0 for a word, D(b, l).w0 for a position unit
//   unit key  K(b, l) = u << 32 | tag, tag = 2^31 | word id (word) or l (position): unique per unit, and
//                       ties of u are broken by the tag (for position units: by position)
//   bernoulli: selected = eligible & (u < thr_select)                                  thr = floor(p * 2^32)
//   exact:     n = #eligible, k = floor(n * p + 0.5) (>= 1 when n > 0), r = k + 1. Every eligible position
//              carries its unit's key, so a unit of s eligible pieces weighs s. T = the r-th smallest key
//              over eligible positions (none when r > n: everything is selected);
//              selected = eligible & (K < T), or K == T when nothing is below T (the first unit alone is
//              larger than k: it is taken anyway, as in the reference). Without word_ids: the k smallest
//              keys, i.e. k positions without replacement in a uniformly random order.
//   capacity:  the P lowest selected positions are kept, the rest un-selected and counted in num_dropped.
//   action of a kept position (one word a = D.w1): a < thr_mask -> mask_token_id;
//              a < thr_mask_random -> allowed[(D.w2 * n_allowed) >> 32]; else the original id.
//              allowed = ids of [0, vocab_size) not in special_ids, ascending (never materialised: the
//              r-th allowed id is found by stepping over the sorted special ids).
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace mlmfast {

constexpr int kMaxSpecialIds = 64;    // special ids travel inside the kernel's parameter block
constexpr int64_t kIgnoreIndex = -100;

// Every input and output is a contiguous tensor given by its address (0 = absent) and element size.
struct MaskSelectParams {
  // ---- inputs
  uint64_t input_ids = 0;        // (B, L) int32 / int64 token ids
  int32_t ids_size = 8;          // 4 or 8 bytes
  uint64_t attention_mask = 0;   // (B, L) any integer or bool dtype: 0 = padding
  int32_t attention_mask_size = 0;
  uint64_t lengths = 0;          // (B,) int32 / int64: positions l >= lengths[b] are padding
  int32_t lengths_size = 0;
  uint64_t special_mask = 0;     // (B, L) any integer or bool dtype: != 0 = never select
  int32_t special_mask_size = 0;
  uint64_t word_ids = 0;         // (B, L) int32 / int64: whole-word unit, < 0 = a unit of its own
  int32_t word_ids_size = 0;
  // ---- outputs
  uint64_t out_ids = 0;          // (B, L) dtype of input_ids: masked copy
  uint64_t labels = 0;           // (B, L) int64: original id where selected, -100 elsewhere
  uint64_t positions = 0;        // (B, P) int64: selected positions ascending, unused slots 0
  uint64_t position_labels = 0;  // (B, P) int64: original ids at positions, unused slots -100
  uint64_t num_selected = 0;     // (B,) int64: selected positions after the capacity cut
  uint64_t num_dropped = 0;      // (B,) int64: positions un-selected by the capacity cut
  // ---- sizes
  int64_t B = 0, L = 0, P = 1;
  // ---- vocabulary
  int64_t special_ids[kMaxSpecialIds] = {};  // sorted ascending, unique
  int32_t n_special = 0;
  int64_t mask_token_id = 0;
  int64_t vocab_size = 1;
  int64_t n_allowed = 1;                     // vocab_size - #(special ids inside [0, vocab_size))
  // ---- probabilities as thresholds on a uniform 32-bit word: event <=> word < threshold (<= 2^32)
  uint64_t thr_select = 0;
  uint64_t thr_mask = 0;
  uint64_t thr_mask_random = 0;
  double p_select = 0.15;                    // exact mode: k = floor(n * p + 0.5)
  int32_t exact = 0;
  // ---- random stream
  uint64_t seed = 0;
  uint64_t offset = 0;                       // < 2^63: successive batches use successive offsets
  uint64_t row_offset = 0;                   // <= 2^32 - B: row b draws from counter row row_offset + b
};

// ---- small helpers -------------------------------------------------------------------------------------
MLM_HD int64_t load_int(uint64_t base, int32_t size, int64_t i) {  // signed integer element i
  switch (size) {
    case 1: return reinterpret_cast<const int8_t*>(base)[i];
    case 2: return reinterpret_cast<const int16_t*>(base)[i];
    case 4: return reinterpret_cast<const int32_t*>(base)[i];
    default: return reinterpret_cast<const int64_t*>(base)[i];
  }
}

MLM_HD bool is_special_id(const MaskSelectParams& p, int64_t id) {  // binary search in the sorted set
  int lo = 0, hi = p.n_special;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (p.special_ids[mid] < id) lo = mid + 1; else hi = mid;
  }
  return lo < p.n_special && p.special_ids[lo] == id;
}

// The r-th (0-based) id of [0, vocab_size) that is not special: step over the sorted special ids.
MLM_HD int64_t allowed_id(const MaskSelectParams& p, int64_t r) {
  int64_t id = r;
  for (int i = 0; i < p.n_special; ++i) {
    const int64_t s = p.special_ids[i];
    if (s < 0) continue;
    if (s <= id) ++id; else break;
  }
  return id;
}

// Counter row of local row b: its index in the global batch (mod 2^32; the host keeps it below 2^32).
MLM_HD uint32_t counter_row(const MaskSelectParams& p, int64_t b) {
  return static_cast<uint32_t>(p.row_offset + static_cast<uint64_t>(b));
}

MLM_HD Philox4 position_draw(const MaskSelectParams& p, int64_t b, int64_t l) {
  return philox4x32_10(static_cast<uint32_t>(l), counter_row(p, b), static_cast<uint32_t>(p.offset),
                       static_cast<uint32_t>(p.offset >> 32) & 0x7FFFFFFFu, static_cast<uint32_t>(p.seed),
                       static_cast<uint32_t>(p.seed >> 32));
}

MLM_HD uint32_t word_draw(const MaskSelectParams& p, int64_t b, int64_t word) {
  return philox4x32_10(static_cast<uint32_t>(word), counter_row(p, b), static_cast<uint32_t>(p.offset),
                       (static_cast<uint32_t>(p.offset >> 32) & 0x7FFFFFFFu) | 0x80000000u,
                       static_cast<uint32_t>(p.seed), static_cast<uint32_t>(p.seed >> 32))
      .w[0];
}

// Is position l of row b eligible? `len` = lengths[b] (or L), `id` = input_ids[b, l].
MLM_HD bool eligible_at(const MaskSelectParams& p, int64_t b, int64_t l, int64_t len, int64_t id) {
  if (l >= len) return false;
  const int64_t i = b * p.L + l;
  if (p.attention_mask && load_int(p.attention_mask, p.attention_mask_size, i) == 0) return false;
  if (p.special_mask && load_int(p.special_mask, p.special_mask_size, i) != 0) return false;
  return !is_special_id(p, id);
}

// Unit key K(b, l) of an eligible position (see the header comment). The high 32 bits are the unit's
// random word u.
MLM_HD uint64_t unit_key(const MaskSelectParams& p, int64_t b, int64_t l) {
  if (p.word_ids) {
    const int64_t w = load_int(p.word_ids, p.word_ids_size, b * p.L + l);
    if (w >= 0) {
      const uint64_t tag = 0x80000000ull | (static_cast<uint64_t>(w) & 0x7FFFFFFFull);
      return (static_cast<uint64_t>(word_draw(p, b, w)) << 32) | tag;
    }
  }
  return (static_cast<uint64_t>(position_draw(p, b, l).w[0]) << 32) | static_cast<uint64_t>(l);
}

// Exact mode: number of positions to select among n eligible ones; floor(n * p + 0.5) in IEEE double with
// no fused multiply-add (the reference computes n.double() * p + 0.5), at least 1 when n > 0.
MLM_HD int64_t exact_budget(double p_select, int64_t n) {
#if defined(__CUDA_ARCH__)
  const double x = __dadd_rn(__dmul_rn(static_cast<double>(n), p_select), 0.5);
#else
  const double x = static_cast<double>(n) * p_select + 0.5;  // built with -ffp-contract=off
#endif
  int64_t k = static_cast<int64_t>(floor(x));
  if (n > 0 && k < 1) k = 1;
  if (k > n) k = n;
  return k;
}

// The id written at a kept position (80/10/10 with the default probabilities).
MLM_HD int64_t corrupted_id(const MaskSelectParams& p, int64_t b, int64_t l, int64_t id) {
  const Philox4 d = position_draw(p, b, l);
  const uint64_t a = d.w[1];
  if (a < p.thr_mask) return p.mask_token_id;
  if (a < p.thr_mask_random) {
    const uint64_t r = (static_cast<uint64_t>(d.w[2]) * static_cast<uint64_t>(p.n_allowed)) >> 32;
    return allowed_id(p, static_cast<int64_t>(r));
  }
  return id;
}

MLM_HD int64_t row_length(const MaskSelectParams& p, int64_t b) {
  if (!p.lengths) return p.L;
  const int64_t len = load_int(p.lengths, p.lengths_size, b);
  return len < 0 ? 0 : (len > p.L ? p.L : len);
}

// ---- entry points --------------------------------------------------------------------------------------
void mask_select_cpu(const MaskSelectParams& p);  // mask_select_cpu.cpp; OpenMP over rows when available
int mask_select_cpu_threads();                     // threads the CPU twin may use (1 without OpenMP)

}  // namespace mlmfast
