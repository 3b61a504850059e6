// TIES on the CPU (trim, elect sign, disjoint merge), compiled once per ISA level (namespace FM_ISA).
// The formula is fusedmerge/reference.py:ties_reference, in fp32, one rounding per operation.
//
// Selection (ties_select): the k-th largest |τ| of every (scope, model), without sorting. |τ| is handled
// as the bits of a non-negative float, which order like the values. A sample (evenly spaced runs of 16
// elements: short runs, as magnitudes correlate along a row of a low-rank task vector) brackets the answer
// in [lo, hi]; one streaming pass over the scope, all models at once, counts the magnitudes above hi and
// collects those inside the bracket; nth_element on the collected ones gives the exact answer. A missed
// bracket (rare) falls back to nth_element over the whole scope. The sample grows as n^(2/3): sampling
// costs ~S, the final selection ~n/sqrt(S) (the bracket's share of the scope).
//
// Merge (ties_merge): one streaming pass, a chunk of 256 elements at a time with all N trimmed task
// vectors of the chunk in a small scratch (never N×P). With vote_tie = majority, a first pass sums the
// elected signs over the whole table (an exact integer, independent of the order).
#include <omp.h>
#include <sys/mman.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cassert>
#include <cmath>
#include <new>
#include <utility>
#include <vector>

#include "../common/numerics.h"
#include "../common/philox.h"
#include "combine_cpu.h"
#include "elementwise.h"
#include "ties_cpu.h"

namespace fm {
namespace FM_ISA {
namespace {

constexpr int64_t kRun = 16;

// Sample runs for a scope of n elements: S = n^(2/3) elements, from 256 to 65536 runs; 0 (every element
// a candidate) when the scope is not much larger than that.
int64_t sample_runs(int64_t n) {
  const int64_t runs = std::clamp<int64_t>(static_cast<int64_t>(std::cbrt(double(n) * double(n))) / kRun, 256, 65536);
  return n <= 4 * runs * kRun ? 0 : runs;
}

// A growable buffer of magnitude bits. Big ones are mapped and populated by one call: faulting tens of MB in
// page by page costs more than the pass that fills them.
class Candidates {
 public:
  Candidates() = default;
  Candidates(Candidates&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        capacity_(std::exchange(o.capacity_, 0)) {}
  Candidates(const Candidates&) = delete;
  Candidates& operator=(const Candidates&) = delete;
  ~Candidates() { release(); }
  uint32_t* begin() const { return data_; }
  uint32_t* end() const { return data_ + size_; }
  size_t size() const { return size_; }
  size_t capacity() const { return capacity_; }
  void reserve(size_t n) {
    if (n <= capacity_) return;
    uint32_t* p = nullptr;
    if (n * sizeof(uint32_t) < kMapped) {
      p = new uint32_t[n];
    } else {
      void* m =
          mmap(nullptr, n * sizeof(uint32_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | kPopulate, -1, 0);
      if (m == MAP_FAILED) throw std::bad_alloc();
      p = static_cast<uint32_t*>(m);
    }
    std::copy(begin(), end(), p);
    const size_t size = size_;
    release();
    data_ = p;
    size_ = size;
    capacity_ = n;
  }
  uint32_t* room(size_t n) {  // space for n more, at end(); grown by doubling
    if (size_ + n > capacity_) reserve(std::max({2 * capacity_, size_ + n, size_t(1) << 14}));
    return end();
  }
  void grow(size_t n) { size_ += n; }
  void append(const Candidates& o) {
    std::copy(o.begin(), o.end(), room(o.size()));
    size_ += o.size();
  }
  void release() {
    if (data_ != nullptr && capacity_ * sizeof(uint32_t) < kMapped) delete[] data_;
    else if (data_ != nullptr) munmap(data_, capacity_ * sizeof(uint32_t));
    data_ = nullptr;
    size_ = capacity_ = 0;
  }

 private:
  static constexpr size_t kMapped = size_t(1) << 16;  // buffers from this size on are mapped, smaller from the heap
#if defined(MAP_POPULATE)
  static constexpr int kPopulate = MAP_POPULATE;
#else
  static constexpr int kPopulate = 0;
#endif
  uint32_t* data_ = nullptr;
  size_t size_ = 0, capacity_ = 0;
};

inline uint32_t magnitude_bits(float tau) { return bits_from_f32(tau) & 0x7FFFFFFFu; }

// τ of model m over elements [start, start + n) of a row.
void load_tau(const TableRow& row, int64_t m, int64_t start, int64_t n, const float* b, float* tau) {
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
      if (offsets[mid] <= i) lo = mid;
      else hi = mid;
    }
    return lo;
  }
};

// Magnitude bits of model m at scope indices [from, from + n) of scope s.
void fill_scope_bits(const int64_t* table, int64_t n_inputs, const Scopes& scopes, int64_t s, int64_t m, int64_t from,
                     int64_t n, uint32_t* out) {
  int64_t t = scopes.row_at(s, from);
  int64_t i = from;
  float b[kChunk], tau[kChunk];
  while (i < from + n) {
    const TableRow row(table, n_inputs, t);
    const int64_t start = i - scopes.offsets[t];
    const int64_t len = std::min({kChunk, row.numel() - start, from + n - i});
    if (len <= 0) {
      ++t;
      continue;
    }
    load_base(row, start, len, b);
    load_tau(row, m, start, len, b, tau);
    for (int64_t j = 0; j < len; ++j) out[i - from + j] = magnitude_bits(tau[j]);
    i += len;
  }
}

// Counts the magnitudes of τ = x - b (model m, elements [start, start + n) of a row) above h and appends those
// in [l, h] to `inside`; returns the count. fp32 and bf16 inputs go straight from memory to the compare
// (AVX-512); others through load_tau. `tau` is scratch for kChunk floats.
int64_t count_and_collect(const TableRow& row, int64_t m, int64_t start, int64_t n, const float* __restrict b,
                          uint32_t l, uint32_t h, Candidates& inside, float* __restrict tau) {
  uint32_t* out = inside.room(n);
  size_t c = 0;
  int64_t above = 0, j = 0;
  const int64_t dt = row.input_dtype(m);
#if defined(__AVX512F__)
  if (dt == kF32 || dt == kBF16) {
    const char* x = at(row.input(m), dt, start);
    const auto load = [&](int64_t i) {  // 16 elements from i, widened exactly
      if (dt == kF32) return _mm512_loadu_ps(reinterpret_cast<const float*>(x) + i);
      const __m256i raw =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(x) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    };
    // Four vectors at a time, so the store offsets depend on one running count per 64 elements, not per 16.
    const __m512i vl = _mm512_set1_epi32(static_cast<int>(l)), vh = _mm512_set1_epi32(static_cast<int>(h));
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
    for (; j + 64 <= n; j += 64) {
      __m512i bits[4];
      __mmask16 in[4];
      int count[4];
      for (int v = 0; v < 4; ++v) {
        const __m512 t = _mm512_sub_ps(load(j + 16 * v), _mm512_loadu_ps(b + j + 16 * v));
        bits[v] = _mm512_and_si512(_mm512_castps_si512(t), abs_mask);
        const __mmask16 gt = _mm512_cmpgt_epu32_mask(bits[v], vh);
        in[v] = _mm512_mask_cmpge_epu32_mask(_knot_mask16(gt), bits[v], vl);
        above += __builtin_popcount(gt);
        count[v] = __builtin_popcount(in[v]);
      }
      // branch-free, compressed in a register (compress to memory is slow); c + 64 <= j + 64 <= n
      _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi32(in[0], bits[0]));
      _mm512_storeu_si512(out + c + count[0], _mm512_maskz_compress_epi32(in[1], bits[1]));
      _mm512_storeu_si512(out + c + count[0] + count[1], _mm512_maskz_compress_epi32(in[2], bits[2]));
      _mm512_storeu_si512(out + c + count[0] + count[1] + count[2], _mm512_maskz_compress_epi32(in[3], bits[3]));
      c += static_cast<size_t>(count[0] + count[1] + count[2] + count[3]);
    }
  }
#endif
  if (j < n) load_tau(row, m, start + j, n - j, b + j, tau);
  // branch-free compaction; the dependency through c makes it ~5 cycles an element
  for (int64_t i = 0; j < n; ++j, ++i) {
    const uint32_t bits = magnitude_bits(tau[i]);
    above += bits > h;
    out[c] = bits;
    c += (bits >= l) & (bits <= h);
  }
  inside.grow(c);
  return above;
}

// k-th largest (1-based) of v, destroying v's order.
uint32_t kth_largest(std::vector<uint32_t>& v, int64_t k) {
  std::nth_element(v.begin(), v.begin() + (k - 1), v.end(), std::greater<uint32_t>());
  return v[k - 1];
}

// k-th largest (1-based, 1 <= k <= n) of v[0, n), all in [l, h], destroying v: a histogram of 4096 buckets over [l, h]
// finds the bucket holding it, nth_element runs on that bucket's elements only (nth_element alone costs
// ~10 ns an element on unpredictable branches, the histogram ~1).
uint32_t kth_largest_in(uint32_t* v, size_t n, int64_t k, uint32_t l, uint32_t h) {
  assert(1 <= k && k <= static_cast<int64_t>(n) && l <= h);
  constexpr int kBits = 12;
  const uint32_t span = h - l;
  int shift = 0;
  while ((span >> shift) >= (1u << kBits)) ++shift;
  std::vector<int64_t> counts(size_t(1) << kBits, 0);
  for (size_t i = 0; i < n; ++i) ++counts[(v[i] - l) >> shift];
  int64_t above = 0;
  uint32_t bucket = (span >> shift) + 1;
  do {
    --bucket;
    above += counts[bucket];
  } while (above < k);
  above -= counts[bucket];
  size_t m = 0;
  for (size_t i = 0; i < n; ++i) {  // branch-free compaction of the bucket to the front
    const uint32_t x = v[i];
    v[m] = x;
    m += ((x - l) >> shift) == bucket;
  }
  uint32_t* kth = v + (k - above - 1);
  std::nth_element(v, kth, v + m, std::greater<uint32_t>());
  return *kth;
}

}  // namespace

void ties_select(const int64_t* table, int64_t n_tensors, int64_t n_inputs, bool model_scope, const int64_t* ks,
                 uint32_t* thresholds) {
  const Scopes scopes(table, n_tensors, n_inputs, model_scope);
  const int64_t n_scopes = scopes.count(), pairs = n_scopes * n_inputs;
  std::vector<uint32_t> lo(pairs, 0), hi(pairs, 0xFFFFFFFFu);
  std::vector<size_t> expected(pairs);  // candidates a thread is expected to collect for a pair
  const int threads = omp_get_max_threads();
  RegionErrors errors;
  const ChunkGrid chunks(table, n_tensors, n_inputs, kChunk);
  const bool team = worth_threads(chunks.total() * kChunk * n_inputs);
  // 1. Bracket each k-th largest with a sample.
#pragma omp parallel for schedule(dynamic) if (team)
  for (int64_t pm = 0; pm < pairs; ++pm)
    errors.run([&] {
      const int64_t s = pm / n_inputs, m = pm % n_inputs, n = scopes.sizes[s], k = ks[pm], runs = sample_runs(n);
      if (runs == 0) {  // small scope: every element is a candidate
        expected[pm] = static_cast<size_t>(n);
        return;
      }
      std::vector<uint32_t> sample(runs * kRun);
      const auto run_start = [&](int64_t r) { return r * (n - kRun) / (runs - 1); };
      const auto prefetch_run = [&](int64_t r) {  // runs are cache misses: keep kAhead of them in flight
        const int64_t i = run_start(r), t = scopes.row_at(s, i);
        const TableRow row(table, n_inputs, t);
        __builtin_prefetch(at(row.base(), row.base_dtype(), i - scopes.offsets[t]), 0, 2);
        __builtin_prefetch(at(row.input(m), row.input_dtype(m), i - scopes.offsets[t]), 0, 2);
      };
      constexpr int64_t kAhead = 32;
      for (int64_t r = 0; r < std::min(runs, kAhead); ++r) prefetch_run(r);
      for (int64_t r = 0; r < runs; ++r) {
        if (r + kAhead < runs) prefetch_run(r + kAhead);
        fill_scope_bits(table, n_inputs, scopes, s, m, run_start(r), kRun, sample.data() + r * kRun);
      }
      const int64_t S = static_cast<int64_t>(sample.size());
      const double q = static_cast<double>(k) / n, margin = 6.0 * std::sqrt(S * q * (1.0 - q)) + 8.0;
      const int64_t r_hi = static_cast<int64_t>(std::floor(q * S - margin));
      const int64_t r_lo = static_cast<int64_t>(std::ceil(q * S + margin));
      const auto [smallest, largest] = std::minmax_element(sample.begin(), sample.end());
      const uint32_t l = *smallest, h = *largest;
      if (r_hi >= 0) {
        std::vector<uint32_t> copy(sample);
        hi[pm] = kth_largest_in(copy.data(), copy.size(), r_hi + 1, l, h);
      }
      if (r_lo < S) lo[pm] = kth_largest_in(sample.data(), sample.size(), r_lo + 1, l, h);
      // a row (tensor scope) is mostly one thread's; the whole state dict (model scope) is split evenly
      const double share = (std::min(r_lo, S) - std::max<int64_t>(r_hi, 0) + 16.0) / S * n;
      expected[pm] = static_cast<size_t>(1.2 * share / (model_scope ? threads : 1)) + 1024;
    });
  errors.rethrow();
  // 2. One pass: count above the bracket, collect inside it (per thread).
  std::vector<std::vector<int64_t>> above(threads, std::vector<int64_t>(pairs, 0));
  std::vector<std::vector<Candidates>> inside(threads);
  for (std::vector<Candidates>& per_thread : inside) per_thread.resize(pairs);
#pragma omp parallel if (team)
  {
    const int tid = omp_get_thread_num();
    float b[kChunk], tau[kChunk];
#pragma omp for schedule(static)
    for (int64_t g = 0; g < chunks.total(); ++g)
      errors.run([&] {
        const ChunkGrid::Span c = chunks[g];
        const TableRow row(table, n_inputs, c.row);
        const int64_t n = c.n;
        load_base(row, c.start, n, b);
        for (int64_t m = 0; m < n_inputs; ++m) {
          const int64_t pm = scopes.scope_of(c.row) * n_inputs + m;
          inside[tid][pm].reserve(expected[pm]);
          above[tid][pm] += count_and_collect(row, m, c.start, n, b, lo[pm], hi[pm], inside[tid][pm], tau);
        }
      });
  }
  errors.rethrow();
  // 3. Exact answer inside the bracket, or the whole scope when the bracket missed.
#pragma omp parallel for schedule(dynamic) if (team)
  for (int64_t pm = 0; pm < pairs; ++pm)
    errors.run([&] {
      const int64_t k = ks[pm];
      int64_t gt = 0;
      size_t total = 0;
      int widest = 0;
      for (int th = 0; th < threads; ++th) {
        gt += above[th][pm];
        total += inside[th][pm].size();
        if (inside[th][pm].capacity() > inside[widest][pm].capacity()) widest = th;
      }
      Candidates& cand = inside[widest][pm];  // all in the widest buffer
      cand.reserve(total);
      for (int th = 0; th < threads; ++th) {
        if (th != widest) {
          cand.append(inside[th][pm]);
          inside[th][pm].release();
        }
      }
      if (gt < k && k <= gt + static_cast<int64_t>(cand.size())) {
        thresholds[pm] = kth_largest_in(cand.begin(), cand.size(), k - gt, lo[pm], hi[pm]);
        cand.release();
      } else {
        cand.release();
        const int64_t s = pm / n_inputs, m = pm % n_inputs;
        std::vector<uint32_t> all(scopes.sizes[s]);
        fill_scope_bits(table, n_inputs, scopes, s, m, 0, scopes.sizes[s], all.data());
        thresholds[pm] = kth_largest(all, k);
      }
    });
  errors.rethrow();
}

namespace {

inline float sign_of(float v) { return static_cast<float>(v > 0.0f) - static_cast<float>(v < 0.0f); }

// The vote of one trimmed task vector: s[j] = (First ? 0 : s[j]) + f(v), v = weighted ? τ̂·w : τ̂,
// f = sign (elect by count) or identity (by mass); the first term is assigned, not added to 0.
struct Vote {
  float w;
  bool weighted, count;
  template <bool First>
  void add(float* __restrict s, int64_t j, float tr) const {
    const float v = weighted ? tr * w : tr;
    const float e = count ? sign_of(v) : v;
    s[j] = First ? e : s[j] + e;
  }
};

// tr[j] = τ̂ = |τ| ≥ t ? τ : 0 for τ = x[j] - b[j], and its vote, in one loop.
template <typename T, bool First>
void trim_and_vote_input(const void* src, const float* __restrict b, uint32_t t, int64_t n, float* __restrict tr,
                         float* __restrict s, const Vote& vote) {
  const T* __restrict x = static_cast<const T*>(src);
  for (int64_t j = 0; j < n; ++j) {
    const float tau = static_cast<float>(widen(x[j])) - b[j];
    tr[j] = magnitude_bits(tau) >= t ? tau : 0.0f;
    vote.add<First>(s, j, tr[j]);
  }
}

// Trim and vote for one chunk: trimmed[m][j] = τ̂ of model m, s[j] = the elected sum (or count).
void trim_and_vote(const TableRow& row, int64_t n_inputs, const TiesParams& p, const uint32_t* thr, int64_t start,
                   int64_t n, const float* __restrict b, float* __restrict trimmed, float* __restrict s,
                   uint32_t* __restrict words) {
  for (int64_t m = 0; m < n_inputs; ++m) {
    float* __restrict tr = trimmed + m * kChunk;
    const int64_t dt = row.input_dtype(m);
    const Vote vote{p.weighted_vote ? static_cast<float>(row.coeff(m)) : 1.0f, p.weighted_vote, p.elect_count};
    if (row.drop_threshold() != 0) {
      const uint32_t T = row.drop_threshold();
      const float r = static_cast<float>(p.drop_rescale);
      const bool scale = p.drop_rescale != 1.0;
      prefetch_next_chunk(row.input(m), dt, start, row.numel());  // drawing is compute-bound
      load_any(tr, row.input(m), dt, start, n);
      uniform_words(words, row.key(m), row.first() + start, n, T);
      for (int64_t j = 0; j < n; ++j) {
        const float tau = tr[j] - b[j];
        const float scaled = scale ? tau * r : tau;
        tr[j] = words[j] >= T ? scaled : 0.0f;
        if (m == 0) vote.add<true>(s, j, tr[j]);
        else vote.add<false>(s, j, tr[j]);
      }
    } else {
      dispatch_dtype(dt, [&](auto tag) {
        using T = typename decltype(tag)::type;
        const void* x = at(row.input(m), dt, start);
        if (m == 0) trim_and_vote_input<T, true>(x, b, thr[m], n, tr, s, vote);
        else trim_and_vote_input<T, false>(x, b, thr[m], n, tr, s, vote);
      });
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
  // per-thread scratch allocated before the region: an exception may not leave it
  std::vector<std::vector<float>> scratches(omp_get_max_threads(), std::vector<float>(kChunk * (n_inputs + 2)));
#pragma omp parallel if (worth_threads(chunks.total() * kChunk * n_inputs))
  {
    alignas(64) uint32_t words[kChunk];
    float* b = scratches[omp_get_thread_num()].data();
    float* s = b + kChunk;
    float* trimmed = s + kChunk;
#pragma omp for schedule(dynamic, 256)
    for (int64_t g = 0; g < chunks.total(); ++g) {
      const ChunkGrid::Span c = chunks[g];
      const TableRow row(table, n_inputs, c.row);
      load_base(row, c.start, c.n, b);
      trim_and_vote(row, n_inputs, p, thresholds + scopes.scope_of(c.row) * n_inputs, c.start, c.n, b, trimmed, s,
                    words);
      f(omp_get_thread_num(), row, c.start, c.n, b, s, trimmed);
    }
  }
}

}  // namespace

int64_t ties_sign_sum(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const TiesParams& p,
                      const uint32_t* thresholds) {
  std::vector<int64_t> partial(omp_get_max_threads(), 0);
  for_each_voted_chunk(table, n_tensors, n_inputs, p, thresholds,
                       [&](int tid, const TableRow&, int64_t, int64_t n, const float*, const float* s, const float*) {
                         for (int64_t j = 0; j < n; ++j) partial[tid] += static_cast<int64_t>(sign_of(s[j]));
                       });
  int64_t total = 0;
  for (int64_t x : partial) total += x;
  return total;
}

namespace {

// s[j] = sign of s[j], or tie_sign where it is 0 (or NaN).
void elect(float* __restrict s, int64_t n, float tie_sign) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = s[j];
    s[j] = v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : tie_sign);
  }
}

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
  for_each_voted_chunk(
      table, n_tensors, n_inputs, p, thresholds,
      [&](int, const TableRow& row, int64_t start, int64_t n, const float* b, float* s, const float* trimmed) {
        elect(s, n, tie_sign);  // s now holds the elected sign σ
        if (p.merge == kMergeMax) merge_chunk<kMergeMax>(row, n_inputs, p, start, n, b, s, trimmed);
        else if (p.merge == kMergeMean) merge_chunk<kMergeMean>(row, n_inputs, p, start, n, b, s, trimmed);
        else merge_chunk<kMergeSum>(row, n_inputs, p, start, n, b, s, trimmed);
      });
}

}  // namespace FM_ISA
}  // namespace fm
