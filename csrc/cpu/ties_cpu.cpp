// TIES on the CPU (trim, elect sign, disjoint merge), compiled once per ISA level (namespace FM_ISA).
// The formula is fusedmerge/reference.py:ties_reference, in fp32, one rounding per operation.
//
// Selection (ties_select): the k-th largest |τ| of every (scope, model), without sorting. |τ| is handled
// as the bits of a non-negative float, which order like the values. A sample (1024 evenly spaced runs
// of 16 elements: short runs, as magnitudes correlate along a row of a low-rank task vector) brackets
// the answer in [lo, hi]; one streaming pass over the scope, all models at once, counts the magnitudes
// above hi and collects those inside the bracket; nth_element on the collected ones gives the exact
// answer. A missed bracket (rare) falls back to nth_element over the whole scope.
//
// Merge (ties_merge): one streaming pass, a chunk of 256 elements at a time with all N trimmed task
// vectors of the chunk in a small scratch (never N×P). With vote_tie = majority, a first pass sums the
// elected signs over the whole table (an exact integer, independent of the order).
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

#include "../numerics.h"
#include "../philox.h"
#include "combine_cpu.h"
#include "elementwise.h"
#include "ties_cpu.h"

namespace fm {
namespace FM_ISA {
namespace {

constexpr int64_t kRuns = 1024;
constexpr int64_t kRun = 16;

inline uint32_t magnitude_bits(float tau) { return bits_from_f32(tau) & 0x7FFFFFFFu; }

// τ of model m over elements [start, start + n) of a row.
void load_tau(const TableRow& row, int64_t m, int64_t start, int64_t n, const float* b, float* tau) {
  prefetch_next_chunk(row.input(m), row.input_dtype(m), start, row.numel());
  load_any(tau, row.input(m), row.input_dtype(m), start, n);
  for (int64_t j = 0; j < n; ++j) tau[j] = tau[j] - b[j];
}

void load_base(const TableRow& row, int64_t start, int64_t n, float* b) {
  load_any(b, row.base(), row.base_dtype(), start, n);
}

struct Scopes {
  // Scope s covers rows [first_row[s], first_row[s+1]); offsets[t] is row t's first index in its scope.
  std::vector<int64_t> first_row, offsets, sizes;
  bool model;
  Scopes(const int64_t* table, int64_t n_tensors, int64_t n_inputs, bool model_scope) : model(model_scope) {
    offsets.resize(n_tensors);
    if (model_scope) {
      first_row = {0, n_tensors};
      int64_t total = 0;
      for (int64_t t = 0; t < n_tensors; ++t) {
        offsets[t] = total;
        total += TableRow(table, n_inputs, t).numel();
      }
      sizes = {total};
    } else {
      for (int64_t t = 0; t <= n_tensors; ++t) first_row.push_back(t);
      for (int64_t t = 0; t < n_tensors; ++t) {
        offsets[t] = 0;
        sizes.push_back(TableRow(table, n_inputs, t).numel());
      }
    }
  }
  int64_t count() const { return static_cast<int64_t>(sizes.size()); }
  int64_t scope_of(int64_t t) const { return model ? 0 : t; }
  // The row of scope s holding scope index i.
  int64_t row_at(int64_t s, int64_t i) const {
    int64_t lo = first_row[s], hi = first_row[s + 1];
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (offsets[mid] <= i) lo = mid; else hi = mid;
    }
    return lo;
  }
};

// Magnitude bits of model m at scope indices [from, from + n) of scope s.
void fill_scope_bits(const int64_t* table, int64_t n_inputs, const Scopes& scopes, int64_t s, int64_t m,
                     int64_t from, int64_t n, uint32_t* out) {
  int64_t t = scopes.row_at(s, from);
  int64_t i = from;
  float b[kChunk], tau[kChunk];
  while (i < from + n) {
    const TableRow row(table, n_inputs, t);
    const int64_t start = i - scopes.offsets[t];
    const int64_t len = std::min({kChunk, row.numel() - start, from + n - i});
    if (len <= 0) { ++t; continue; }
    load_base(row, start, len, b);
    load_tau(row, m, start, len, b, tau);
    for (int64_t j = 0; j < len; ++j) out[i - from + j] = magnitude_bits(tau[j]);
    i += len;
  }
}

// Writes the magnitude bits of tau[0, n) that lie in [l, h] to out (room for n), returns how many.
size_t compact_bracket(const float* tau, int64_t n, uint32_t l, uint32_t h, uint32_t* out) {
  size_t c = 0;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512i vl = _mm512_set1_epi32(static_cast<int>(l)), vh = _mm512_set1_epi32(static_cast<int>(h));
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  for (; j + 16 <= n; j += 16) {
    const __m512i bits = _mm512_and_si512(_mm512_loadu_si512(tau + j), abs_mask);
    const __mmask16 k = _mm512_cmpge_epu32_mask(bits, vl) & _mm512_cmple_epu32_mask(bits, vh);
    _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi32(k, bits));  // c + 16 <= j + 16 <= n
    c += static_cast<size_t>(__builtin_popcount(k));
  }
#endif
  for (; j < n; ++j) {  // the serial dependency through c makes this ~5 cycles an element
    const uint32_t bits = magnitude_bits(tau[j]);
    out[c] = bits;
    c += (bits >= l) & (bits <= h);
  }
  return c;
}

// k-th largest (1-based) of v, destroying v's order.
uint32_t kth_largest(std::vector<uint32_t>& v, int64_t k) {
  std::nth_element(v.begin(), v.begin() + (k - 1), v.end(), std::greater<uint32_t>());
  return v[k - 1];
}

}  // namespace

void ties_select(const int64_t* table, int64_t n_tensors, int64_t n_inputs, bool model_scope, const int64_t* ks,
                 uint32_t* thresholds) {
  const Scopes scopes(table, n_tensors, n_inputs, model_scope);
  const int64_t n_scopes = scopes.count(), pairs = n_scopes * n_inputs;
  std::vector<uint32_t> lo(pairs, 0), hi(pairs, 0xFFFFFFFFu);
  // 1. Bracket each k-th largest with a sample.
#pragma omp parallel for schedule(dynamic)
  for (int64_t pm = 0; pm < pairs; ++pm) {
    const int64_t s = pm / n_inputs, m = pm % n_inputs, n = scopes.sizes[s], k = ks[pm];
    if (n <= kRuns * kRun) continue;  // small scope: every element is a candidate
    std::vector<uint32_t> sample(kRuns * kRun);
    for (int64_t r = 0; r < kRuns; ++r)
      fill_scope_bits(table, n_inputs, scopes, s, m, r * (n - kRun) / (kRuns - 1), kRun, sample.data() + r * kRun);
    const int64_t S = static_cast<int64_t>(sample.size());
    const double q = static_cast<double>(k) / n, margin = 6.0 * std::sqrt(S * q * (1.0 - q)) + 8.0;
    const int64_t r_hi = static_cast<int64_t>(std::floor(q * S - margin));
    const int64_t r_lo = static_cast<int64_t>(std::ceil(q * S + margin));
    hi[pm] = r_hi < 0 ? 0xFFFFFFFFu : kth_largest(sample, r_hi + 1);
    lo[pm] = r_lo >= S ? 0u : kth_largest(sample, r_lo + 1);
  }
  // 2. One pass: count above the bracket, collect inside it (per thread).
  const ChunkGrid chunks(table, n_tensors, n_inputs, kChunk);
  const int threads = omp_get_max_threads();
  std::vector<std::vector<int64_t>> above(threads, std::vector<int64_t>(pairs, 0));
  std::vector<std::vector<std::vector<uint32_t>>> inside(threads, std::vector<std::vector<uint32_t>>(pairs));
#pragma omp parallel
  {
    const int tid = omp_get_thread_num();
    float b[kChunk], tau[kChunk];
#pragma omp for schedule(static)
    for (int64_t g = 0; g < chunks.total(); ++g) {
      const ChunkGrid::Span c = chunks[g];
      const TableRow row(table, n_inputs, c.row);
      const int64_t n = c.n;
      load_base(row, c.start, n, b);
      for (int64_t m = 0; m < n_inputs; ++m) {
        const int64_t pm = scopes.scope_of(c.row) * n_inputs + m;
        load_tau(row, m, c.start, n, b, tau);
        const uint32_t l = lo[pm], h = hi[pm];
        int64_t count = 0, in = 0;
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t bits = magnitude_bits(tau[j]);
          count += bits > h;
          in += (bits >= l) & (bits <= h);
        }
        above[tid][pm] += count;
        if (in > 0) {  // branch-free compaction into the (thread, scope, model) buffer
          std::vector<uint32_t>& buf = inside[tid][pm];
          const size_t used = buf.size();
          buf.resize(used + n);
          buf.resize(used + compact_bracket(tau, n, l, h, buf.data() + used));
        }
      }
    }
  }
  // 3. Exact answer inside the bracket, or the whole scope when the bracket missed.
#pragma omp parallel for schedule(dynamic)
  for (int64_t pm = 0; pm < pairs; ++pm) {
    const int64_t k = ks[pm];
    int64_t gt = 0;
    std::vector<uint32_t> cand;
    for (int th = 0; th < threads; ++th) {
      gt += above[th][pm];
      cand.insert(cand.end(), inside[th][pm].begin(), inside[th][pm].end());
      std::vector<uint32_t>().swap(inside[th][pm]);
    }
    if (gt < k && k <= gt + static_cast<int64_t>(cand.size())) {
      thresholds[pm] = kth_largest(cand, k - gt);
    } else {
      const int64_t s = pm / n_inputs, m = pm % n_inputs;
      std::vector<uint32_t> all(scopes.sizes[s]);
      fill_scope_bits(table, n_inputs, scopes, s, m, 0, scopes.sizes[s], all.data());
      thresholds[pm] = kth_largest(all, k);
    }
  }
}

namespace {

inline float sign_of(float v) { return static_cast<float>(v > 0.0f) - static_cast<float>(v < 0.0f); }

// Trim and vote for one chunk; fills trimmed[m][j] and v[m][j], returns the elected sums in s[j].
void trim_and_vote(const TableRow& row, int64_t n_inputs, const TiesParams& p, const uint32_t* thr,
                   int64_t start, int64_t n, const float* __restrict b, float* __restrict trimmed,
                   float* __restrict s, uint32_t* __restrict words) {
  for (int64_t m = 0; m < n_inputs; ++m) {
    float* __restrict tr = trimmed + m * kChunk;
    prefetch_next_chunk(row.input(m), row.input_dtype(m), start, row.numel());
    load_any(tr, row.input(m), row.input_dtype(m), start, n);
    if (row.drop_threshold() != 0) {
      const uint32_t T = row.drop_threshold();
      const float r = static_cast<float>(p.drop_rescale);
      const bool scale = p.drop_rescale != 1.0;
      uniform_words(words, row.key(m), start, n, T);
      for (int64_t j = 0; j < n; ++j) {
        const float tau = tr[j] - b[j];
        const float scaled = scale ? tau * r : tau;
        tr[j] = words[j] >= T ? scaled : 0.0f;
      }
    } else {
      const uint32_t t = thr[m];
      for (int64_t j = 0; j < n; ++j) {
        const float tau = tr[j] - b[j];
        tr[j] = magnitude_bits(tau) >= t ? tau : 0.0f;
      }
    }
    const float w = p.weighted_vote ? static_cast<float>(row.coeff(m)) : 1.0f;
    const bool count = p.elect_count, weighted = p.weighted_vote;
    if (m == 0) {
      for (int64_t j = 0; j < n; ++j) {
        const float v = weighted ? tr[j] * w : tr[j];
        s[j] = count ? sign_of(v) : v;
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const float v = weighted ? tr[j] * w : tr[j];
        s[j] = s[j] + (count ? sign_of(v) : v);
      }
    }
  }
}

// f(thread, row, start, n, b, s, trimmed) for every chunk, after trimming (trimmed[m][j] = τ̂) and voting
// (s[j] = the elected sum or count).
template <typename F>
void for_each_voted_chunk(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,
                          const uint32_t* thresholds, F&& f) {
  const ChunkGrid chunks(table, n_tensors, n_inputs, kChunk);
  const Scopes scopes(table, n_tensors, n_inputs, p.model_scope);
#pragma omp parallel
  {
    std::vector<float> scratch(kChunk * (n_inputs + 2));
    std::vector<uint32_t> words(kChunk);
    float* b = scratch.data();
    float* s = b + kChunk;
    float* trimmed = s + kChunk;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < chunks.total(); ++g) {
      const ChunkGrid::Span c = chunks[g];
      const TableRow row(table, n_inputs, c.row);
      load_base(row, c.start, c.n, b);
      trim_and_vote(row, n_inputs, p, thresholds + scopes.scope_of(c.row) * n_inputs, c.start, c.n, b, trimmed, s,
                    words.data());
      f(omp_get_thread_num(), row, c.start, c.n, b, s, trimmed);
    }
  }
}

}  // namespace

int64_t ties_sign_sum(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,
                      const uint32_t* thresholds) {
  std::vector<int64_t> partial(omp_get_max_threads(), 0);
  for_each_voted_chunk(table, n_tensors, n_inputs, p, thresholds,
                       [&](int tid, const TableRow&, int64_t, int64_t n, const float*, const float* s,
                           const float*) {
                         for (int64_t j = 0; j < n; ++j) partial[tid] += static_cast<int64_t>(sign_of(s[j]));
                       });
  int64_t total = 0;
  for (int64_t x : partial) total += x;
  return total;
}

namespace {

// m = Σ agree·u (Sum), with den = Σ agree·w (Mean), or max agree·|u| (Max); then out = b + λ·m.
template <int64_t Mode>
void merge_chunk(const TableRow& row, int64_t n_inputs, const TiesParams& p, int64_t start, int64_t n,
                 const float* __restrict b, const float* __restrict sigma, const float* __restrict trimmed) {
  alignas(64) float merged[kChunk];
  alignas(64) float den[kChunk];
  for (int64_t m = 0; m < n_inputs; ++m) {
    const float w = static_cast<float>(row.coeff(m));
    const float* __restrict tr = trimmed + m * kChunk;
    const bool weighted = p.weighted_vote;
    for (int64_t j = 0; j < n; ++j) {
      const float u = tr[j] * w;
      const float v = weighted ? u : tr[j];  // the voted value
      const bool agree = ((v > 0.0f) & (sigma[j] > 0.0f)) | ((v < 0.0f) & (sigma[j] < 0.0f));
      if (Mode == kMergeMax) {
        const float mag = agree ? std::fabs(u) : 0.0f;
        const float cur = merged[j];
        const float big = cur > mag ? cur : mag;
        merged[j] = m == 0 ? mag : ((cur != cur) | (mag != mag) ? cur + mag : big);  // NaN propagates
      } else {
        const float term = agree ? u : 0.0f;
        merged[j] = m == 0 ? term : merged[j] + term;
        if (Mode == kMergeMean) {
          const float dw = agree ? w : 0.0f;
          den[j] = m == 0 ? dw : den[j] + dw;
        }
      }
    }
  }
  const float lam = static_cast<float>(p.scaling);
  for (int64_t j = 0; j < n; ++j) {
    float mj = merged[j];
    if (Mode == kMergeMax) mj = sigma[j] * mj;
    if (Mode == kMergeMean) mj = den[j] != 0.0f ? mj / den[j] : 0.0f;
    merged[j] = b[j] + mj * lam;
  }
  store_any(row.out(), row.out_dtype(), start, merged, n);
}

}  // namespace

void ties_merge(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,
                const uint32_t* thresholds, float tie_sign) {
  for_each_voted_chunk(table, n_tensors, n_inputs, p, thresholds,
                       [&](int, const TableRow& row, int64_t start, int64_t n, const float* b, float* s,
                           const float* trimmed) {
    for (int64_t j = 0; j < n; ++j) {
      const float sg = sign_of(s[j]);
      s[j] = sg == 0.0f ? tie_sign : sg;  // s now holds the elected sign σ
    }
    if (p.merge == kMergeMax) merge_chunk<kMergeMax>(row, n_inputs, p, start, n, b, s, trimmed);
    else if (p.merge == kMergeMean) merge_chunk<kMergeMean>(row, n_inputs, p, start, n, b, s, trimmed);
    else merge_chunk<kMergeSum>(row, n_inputs, p, start, n, b, s, trimmed);
  });
}

}  // namespace FM_ISA
}  // namespace fm
