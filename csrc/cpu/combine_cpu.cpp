// Multi-tensor linear combination with optional random drop (DARE), on the CPU, compiled once per ISA
// level (namespace FM_ISA).
//
// For every tensor t of the table and every element j, with inputs x_0..x_{N-1}, optional base b,
// coefficients c_i and, when the row's drop threshold T > 0, keep_i[j] = U(key_i, j) >= T (csrc/common/philox.h):
//     d_i = x_i[j] - b[j]            (d_i = x_i[j] without a base)
//     e_i = keep_i[j] ? c_i*d_i : 0  (e_i = c_i*d_i without dropping)
//     acc = e_0;  acc = acc + e_i  for i = 1..N-1   (left fold, one rounding per operation)
//     out[j] = round(b[j] + acc)     (round(acc) without a base)
// in fp32 (fp64 when an input is fp64). Work is split into fixed chunks over all tensors, so mixed
// shapes balance across threads; each chunk keeps its accumulator in L1 and streams every input once.
// Short chunks keep the N input streams interleaved finely, which the hardware prefetchers follow best.
#include "combine_cpu.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "../common/numerics.h"
#include "../common/philox.h"
#include "elementwise.h"

namespace fm {
namespace FM_ISA {
namespace {

// acc (=|+=) keep ? c * (x - b) : 0
template <typename Acc, typename T, bool First, bool HasBase, bool Drop>
void fold(Acc* __restrict acc, const void* src, const Acc* __restrict b, Acc c, int64_t n,
          const uint32_t* __restrict words, uint32_t threshold) {
  const T* __restrict x = static_cast<const T*>(src);
  for (int64_t j = 0; j < n; ++j) {
    Acc v = static_cast<Acc>(widen(x[j]));
    if (HasBase) v = v - b[j];
    v = v * c;
    if (Drop) v = words[j] >= threshold ? v : Acc(0);
    acc[j] = First ? v : acc[j] + v;
  }
}

template <typename Acc, typename T>
void store(void* dst, const Acc* __restrict acc, const Acc* __restrict b, bool has_base, int64_t n) {
  T* o = static_cast<T*>(dst);
  if (has_base) {
    for (int64_t j = 0; j < n; ++j) narrow(b[j] + acc[j], o + j);
  } else {
    for (int64_t j = 0; j < n; ++j) narrow(acc[j], o + j);
  }
}

template <typename Acc, bool HasBase, bool Drop>
void fold_input(bool first, int64_t dt, Acc* acc, const void* x, const Acc* b, Acc c, int64_t n, const uint32_t* words,
                uint32_t threshold) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (first) fold<Acc, T, true, HasBase, Drop>(acc, x, b, c, n, words, threshold);
    else fold<Acc, T, false, HasBase, Drop>(acc, x, b, c, n, words, threshold);
  });
}

template <typename Acc>
void combine_chunk(const TableRow& row, int64_t n_inputs, int64_t start, int64_t n) {
  alignas(64) Acc acc[kChunk];
  alignas(64) Acc b[kChunk];
  alignas(64) uint32_t words[kChunk];
  const uint32_t threshold = row.drop_threshold();
  const bool has_base = row.base() != nullptr;
  if (has_base) load_any(b, row.base(), row.base_dtype(), start, n);
  for (int64_t i = 0; i < n_inputs; ++i) {
    const char* x = at(row.input(i), row.input_dtype(i), start);
    const Acc c = static_cast<Acc>(row.coeff(i));
    const int64_t dt = row.input_dtype(i);
    if (threshold != 0) {
      // Drawing is compute-bound: keep the memory busy meanwhile with the next chunk of this input.
      prefetch_next_chunk(row.input(i), dt, start, row.numel());
      uniform_words(words, row.key(i), row.first() + start, n, threshold);
      if (has_base) fold_input<Acc, true, true>(i == 0, dt, acc, x, b, c, n, words, threshold);
      else fold_input<Acc, false, true>(i == 0, dt, acc, x, b, c, n, words, threshold);
    } else if (has_base) {
      fold_input<Acc, true, false>(i == 0, dt, acc, x, b, c, n, words, threshold);
    } else {
      fold_input<Acc, false, false>(i == 0, dt, acc, x, b, c, n, words, threshold);
    }
  }
  char* o = static_cast<char*>(row.out()) + start * dtype_size(row.out_dtype());
  dispatch_dtype(row.out_dtype(), [&](auto tag) { store<Acc, typename decltype(tag)::type>(o, acc, b, has_base, n); });
}

}  // namespace

void combine(const int64_t* table, int64_t n_tensors, int64_t n_inputs) {
  const ChunkGrid chunks(table, n_tensors, n_inputs, kChunk);
#pragma omp parallel for schedule(dynamic, 256) if (worth_threads(chunks.total() * kChunk * n_inputs))
  for (int64_t g = 0; g < chunks.total(); ++g) {
    const ChunkGrid::Span c = chunks[g];
    const TableRow row(table, n_inputs, c.row);
    if (row.accumulates_in_f64(n_inputs)) combine_chunk<double>(row, n_inputs, c.start, c.n);
    else combine_chunk<float>(row, n_inputs, c.start, c.n);
  }
}

void l1_buckets(const int64_t* table, int64_t n_tensors, int64_t n_inputs, int64_t* buckets) {
  // Exact L1 norms of τ = x - b (fp32) per (row, input): Σ|τ| and Σ keep·|τ| as integer mantissa sums per
  // exponent, buckets[((t * n_inputs + i) * 2 + {0: all, 1: kept}) * 256 + exponent]. Integer sums do not
  // depend on the order, so every backend gets the same norms.
  const ChunkGrid chunks(table, n_tensors, n_inputs, kChunk);
  const int64_t size = n_tensors * n_inputs * 2 * 256;
  const int threads = omp_get_max_threads();
  std::vector<std::vector<int64_t>> partial(threads, std::vector<int64_t>(size, 0));  // allocated outside the region
#pragma omp parallel if (worth_threads(chunks.total() * kChunk * n_inputs))
  {
    std::vector<int64_t>& mine = partial[omp_get_thread_num()];
    alignas(64) float b[kChunk];
    alignas(64) float tau[kChunk];
    alignas(64) uint32_t words[kChunk];
#pragma omp for schedule(dynamic, 256)
    for (int64_t g = 0; g < chunks.total(); ++g) {
      const ChunkGrid::Span c = chunks[g];
      const TableRow row(table, n_inputs, c.row);
      if (row.base() != nullptr) load_any(b, row.base(), row.base_dtype(), c.start, c.n);
      else std::fill(b, b + c.n, 0.0f);
      for (int64_t i = 0; i < n_inputs; ++i) {
        load_any(tau, row.input(i), row.input_dtype(i), c.start, c.n);
        const uint32_t threshold = row.drop_threshold();
        if (threshold != 0) uniform_words(words, row.key(i), row.first() + c.start, c.n, threshold);
        int64_t* all = mine.data() + ((c.row * n_inputs + i) * 2) * 256;
        int64_t* kept = all + 256;
        for (int64_t j = 0; j < c.n; ++j) {
          const uint32_t bits = bits_from_f32(tau[j] - b[j]) & 0x7FFFFFFFu;
          const uint32_t e = bits >> 23;
          const int64_t mant = (bits & 0x7FFFFFu) | (e != 0 ? 0x800000u : 0u);
          all[e] += mant;
          if (threshold == 0 || words[j] >= threshold) kept[e] += mant;
        }
      }
    }
  }
  std::fill(buckets, buckets + size, 0);
  for (const std::vector<int64_t>& p : partial)
    for (int64_t k = 0; k < size; ++k) buckets[k] += p[k];
}

}  // namespace FM_ISA
}  // namespace fm
