// The C++ twin of the CUDA mask-select kernel: same algorithm (mask_select.h), one row per OpenMP thread.
//
// Per row:
//  1. eligibility and unit keys K(b, l) of every position                                  O(L)
//  2. selection: bernoulli compares the unit word with a threshold; exact finds the r-th smallest key of
//     the eligible positions with nth_element                                           O(L) expected
//  3. one ordered pass writes masked ids, labels and the compact positions, applying the capacity P.
#include <algorithm>
#include <vector>

#include "mask_select.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mlmfast {
namespace {

struct RowScratch {
  std::vector<uint64_t> key;     // (L,) unit key of each eligible position
  std::vector<uint8_t> elig;     // (L,)
  std::vector<uint64_t> sorted;  // (n,) eligible keys, for nth_element
};

template <typename IdT>
void mask_select_row(const MaskSelectParams& p, int64_t b, RowScratch& s) {
  const int64_t L = p.L, P = p.P;
  const IdT* ids = reinterpret_cast<const IdT*>(p.input_ids) + b * L;
  IdT* out = reinterpret_cast<IdT*>(p.out_ids) + b * L;
  int64_t* labels = reinterpret_cast<int64_t*>(p.labels) + b * L;
  int64_t* positions = reinterpret_cast<int64_t*>(p.positions) + b * P;
  int64_t* position_labels = reinterpret_cast<int64_t*>(p.position_labels) + b * P;

  // 1. eligibility and unit keys
  s.key.resize(L);
  s.elig.resize(L);
  const int64_t len = row_length(p, b);
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l) {
    const bool e = eligible_at(p, b, l, len, static_cast<int64_t>(ids[l]));
    s.elig[l] = e;
    if (e) {
      s.key[l] = unit_key(p, b, l);
      ++n;
    }
  }

  // 2. selection rule: selected(l) = elig(l) && key(l) < thr_key, or key == T when take_equal
  uint64_t thr_key = 0;        // bernoulli: u < thr_select  <=>  key < thr_select << 32
  bool take_all = false, take_equal = false;
  uint64_t T = 0;
  if (!p.exact) {
    if (p.thr_select >= (1ull << 32)) take_all = true; else thr_key = p.thr_select << 32;
  } else {
    const int64_t r = exact_budget(p.p_select, n) + 1;  // T = the r-th smallest key
    if (r > n) {
      take_all = true;
    } else {
      s.sorted.clear();
      for (int64_t l = 0; l < L; ++l)
        if (s.elig[l]) s.sorted.push_back(s.key[l]);
      std::nth_element(s.sorted.begin(), s.sorted.begin() + (r - 1), s.sorted.end());
      T = s.sorted[r - 1];
      int64_t less = 0;
      for (uint64_t k : s.sorted) less += (k < T);
      thr_key = T;
      take_equal = (less == 0);  // the first unit alone exceeds the budget: take it anyway
    }
  }

  // 3. ordered pass: capacity cut, corruption, labels, compact positions
  int64_t count = 0;  // selected so far (before the cut)
  for (int64_t l = 0; l < L; ++l) {
    const int64_t id = static_cast<int64_t>(ids[l]);
    bool sel = false;
    if (s.elig[l]) {
      const uint64_t k = s.key[l];
      sel = take_all || k < thr_key || (take_equal && k == T);
    }
    if (sel && count < P) {
      out[l] = static_cast<IdT>(corrupted_id(p, b, l, id));
      labels[l] = id;
      positions[count] = l;
      position_labels[count] = id;
    } else {
      out[l] = ids[l];
      labels[l] = kIgnoreIndex;
    }
    count += sel;
  }
  const int64_t kept = count < P ? count : P;
  for (int64_t j = kept; j < P; ++j) {
    positions[j] = 0;
    position_labels[j] = kIgnoreIndex;
  }
  reinterpret_cast<int64_t*>(p.num_selected)[b] = kept;
  reinterpret_cast<int64_t*>(p.num_dropped)[b] = count - kept;
}

template <typename IdT>
void mask_select_rows(const MaskSelectParams& p) {
  const int64_t B = p.B;
#if defined(_OPENMP)
  // One thread handles ~60 M positions/s, so a typical batch (64 x 128) takes ~0.15 ms: less than what a
  // parallel region can cost on a loaded machine (a descheduled team thread stalls the barrier for a
  // scheduler slice). So: one thread per kPositionsPerThread positions, at most OMP_NUM_THREADS.
  constexpr int64_t kPositionsPerThread = 1 << 16;
  const int64_t want = (B * p.L) / kPositionsPerThread;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, omp_get_max_threads())));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    RowScratch s;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) mask_select_row<IdT>(p, b, s);
  }
#else
  RowScratch s;
  for (int64_t b = 0; b < B; ++b) mask_select_row<IdT>(p, b, s);
#endif
}

}  // namespace

void mask_select_cpu(const MaskSelectParams& p) {
  if (p.ids_size == 4) mask_select_rows<int32_t>(p); else mask_select_rows<int64_t>(p);
}

int mask_select_cpu_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace mlmfast
