// Multi-tensor linear combination with optional random drop (DARE), on the CPU, compiled once per ISA
// level (namespace FM_ISA).
//
// For every tensor t of the table and every element j, with inputs x_0..x_{N-1}, optional base b,
// coefficients c_i and, when the row's drop threshold T > 0, keep_i[j] = philox word of (key_i, j) >= T:
//     d_i = x_i[j] - b[j]            (d_i = x_i[j] without a base)
//     e_i = keep_i[j] ? c_i*d_i : 0  (e_i = c_i*d_i without dropping)
//     acc = e_0;  acc = acc + e_i  for i = 1..N-1   (left fold, one rounding per operation)
//     out[j] = round(b[j] + acc)     (round(acc) without a base)
// in fp32 (fp64 when an input is fp64). Work is split into fixed chunks over all tensors, so mixed
// shapes balance across threads; each chunk keeps its accumulator in L1 and streams every input once.
// Short chunks keep the N input streams interleaved finely, which the hardware prefetchers follow best.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "../numerics.h"
#include "../philox.h"
#include "combine_cpu.h"
#include "elementwise.h"

namespace fm {
namespace FM_ISA {
namespace {

// Measured on the 2-core AVX-512 dev machine, ViT-B/32 N = 8: chunks of 4096 reached 92 % (fp32) and
// 69 % (bf16) of the copy bandwidth, 256 reach ~100 % and ~90 %.
constexpr int64_t kChunk = 256;

// The Philox words of elements [start, start + n) of one (model, tensor); start is a multiple of 4.
// Rounds run on arrays of calls (structure of arrays) so that they vectorise, then interleave.
void philox_words(uint32_t* __restrict words, uint64_t key, int64_t start, int64_t n) {
  constexpr int64_t kCalls = kChunk / kElementsPerCall;
  alignas(64) uint32_t c0[kCalls], c1[kCalls], c2[kCalls], c3[kCalls];
  const uint64_t first_call = static_cast<uint64_t>(start / kElementsPerCall);
  const int64_t calls = (n + kElementsPerCall - 1) / kElementsPerCall;
  for (int64_t c = 0; c < calls; ++c) {
    const uint64_t ctr = first_call + static_cast<uint64_t>(c);
    c0[c] = static_cast<uint32_t>(ctr);
    c1[c] = static_cast<uint32_t>(ctr >> 32);
    c2[c] = 0;
    c3[c] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int r = 0; r < 10; ++r) {
    for (int64_t c = 0; c < calls; ++c) {
      const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2[c];
      const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0[c];
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[c] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[c] ^ k1;
      c1[c] = static_cast<uint32_t>(pb);
      c3[c] = static_cast<uint32_t>(pa);
      c0[c] = n0;
      c2[c] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int64_t c = 0; c < calls; ++c) {
    words[4 * c] = c0[c];
    words[4 * c + 1] = c1[c];
    words[4 * c + 2] = c2[c];
    words[4 * c + 3] = c3[c];
  }
}

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
void fold_input(bool first, int64_t dt, Acc* acc, const void* x, const Acc* b, Acc c, int64_t n,
                const uint32_t* words, uint32_t threshold) {
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
      philox_words(words, row.key(i), start, n);
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
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < chunks.total(); ++g) {
    const ChunkGrid::Span c = chunks[g];
    const TableRow row(table, n_inputs, c.row);
    if (row.accumulates_in_f64(n_inputs)) combine_chunk<double>(row, n_inputs, c.start, c.n);
    else combine_chunk<float>(row, n_inputs, c.start, c.n);
  }
}

}  // namespace FM_ISA
}  // namespace fm
