// Multi-tensor sums of products (the `dots` primitive; definition in fusedmerge/reductions.py), on the
// CPU, compiled once per ISA level (namespace FM_ISA).
//
// Each row of cols elements is cut into aligned chunks of kDotsChunk (the last one short; an empty row is one
// empty chunk). For chunk k = (table row t, first element s, length n ≤ kDotsChunk) and pair p = (a, c):
//     u_j[e] = x_j[s + e] − b[s + e]   in fp32 (fp64 when the row has an fp64 tensor); x_j alone without a base
//     q[e] = double(u_a[e]) · double(u_c[e]) for e < n, +0 up to the next power of two m ≥ n
//     partials[k, p] = tree(q):  for len = m, m/2, ..., 2:  q[i] = q[2i] + q[2i+1]  (i < len/2);  q[0]
// then per row, over its chunks' partials v[0..c) zero-padded to a power of two, the same tree, and
//     sums[row, p] = tree(v) + 0   (a zero as +0)
// an adjacent pairwise tree, each node one IEEE addition (built without FMA contraction), so the sums equal
// Triton's and the reference's bit for bit. Chunks are independent: one parallel loop, no atomics; then one
// parallel loop over the rows' trees.
//
// How the tree vectorises: its top log₂L levels add the chunk's L contiguous parts of q = m/L elements
// (L = fp64 lanes of a vector: 2, 4 with AVX2, 8 with AVX-512), ((P0 + P1) + (P2 + P3)) for L = 4, and
// below them each part has its own tree. Each input's chunk is transposed once (vector pos = position pos of
// every part, widened to fp64), so that for every pair all levels below the top log₂L are vertical vector
// additions (lane ℓ: part ℓ's subtree), the first fused with the products; the lanes are added last.
// Chunks with m < L·L take the scalar tree.
#include "dots_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "elementwise.h"

namespace fm {
namespace FM_ISA {
namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 8;
#elif defined(__AVX__)
constexpr int kLanes = 4;
#else
constexpr int kLanes = 2;
#endif

template <typename A>
struct Vec {
  typedef A type __attribute__((vector_size(kLanes * sizeof(A))));
};
template <typename A>
using VecT = typename Vec<A>::type;
using VD = VecT<double>;

inline VD load_vec(const double* x) {
  VD v;
  __builtin_memcpy(&v, x, sizeof(v));
  return v;
}

// L consecutive values, widened to fp64 (one instruction for fp32).
inline VD load_wide(const double* x) { return load_vec(x); }
inline VD load_wide(const float* x) {
#if defined(__AVX512F__)
  return reinterpret_cast<VD>(_mm512_cvtps_pd(_mm256_loadu_ps(x)));
#elif defined(__AVX__)
  return reinterpret_cast<VD>(_mm256_cvtps_pd(_mm_loadu_ps(x)));
#else
  return reinterpret_cast<VD>(_mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x)))));
#endif
}

// Stores the L×L block in[ℓ][pos] transposed: w[pos·L + ℓ] = in[ℓ][pos].
inline void store_transposed(const VD* in, double* w) {
#if defined(__AVX512F__)
  // Pairs of rows interleaved (row 2k at even, 2k + 1 at odd positions), then pairs of those by 128-bit
  // lanes, then halves: 24 shuffles for the 8×8 block.
  __m512d t[8], s[8];
  for (int k = 0; k < 4; ++k) {
    const __m512d a = reinterpret_cast<__m512d>(in[2 * k]), b = reinterpret_cast<__m512d>(in[2 * k + 1]);
    t[2 * k] = _mm512_unpacklo_pd(a, b);      // a0 b0 a2 b2 a4 b4 a6 b6
    t[2 * k + 1] = _mm512_unpackhi_pd(a, b);  // a1 b1 a3 b3 a5 b5 a7 b7
  }
  const __m512i even = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), odd = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int h = 0; h < 2; ++h)      // rows 4h..4h+3
    for (int o = 0; o < 2; ++o) {  // even (o = 0) or odd positions
      const __m512d x = t[4 * h + o], y = t[4 * h + 2 + o];
      s[4 * h + o] = _mm512_permutex2var_pd(x, even, y);     // positions 0 + o and 4 + o of 4 rows
      s[4 * h + 2 + o] = _mm512_permutex2var_pd(x, odd, y);  // positions 2 + o and 6 + o
    }
  for (int pos = 0; pos < 4; ++pos) {  // s[pos]: positions pos and pos + 4 of rows 0-3, s[pos + 4] of rows 4-7
    _mm512_storeu_pd(w + pos * 8, _mm512_shuffle_f64x2(s[pos], s[pos + 4], 0x44));
    _mm512_storeu_pd(w + (pos + 4) * 8, _mm512_shuffle_f64x2(s[pos], s[pos + 4], 0xEE));
  }
#elif defined(__AVX2__)
  const __m256d a = reinterpret_cast<__m256d>(in[0]), b = reinterpret_cast<__m256d>(in[1]);
  const __m256d c = reinterpret_cast<__m256d>(in[2]), d = reinterpret_cast<__m256d>(in[3]);
  const __m256d ab0 = _mm256_unpacklo_pd(a, b), ab1 = _mm256_unpackhi_pd(a, b);  // a0 b0 a2 b2, a1 b1 a3 b3
  const __m256d cd0 = _mm256_unpacklo_pd(c, d), cd1 = _mm256_unpackhi_pd(c, d);
  _mm256_storeu_pd(w, _mm256_permute2f128_pd(ab0, cd0, 0x20));
  _mm256_storeu_pd(w + 4, _mm256_permute2f128_pd(ab1, cd1, 0x20));
  _mm256_storeu_pd(w + 8, _mm256_permute2f128_pd(ab0, cd0, 0x31));
  _mm256_storeu_pd(w + 12, _mm256_permute2f128_pd(ab1, cd1, 0x31));
#else
  for (int pos = 0; pos < kLanes; ++pos) {
    VD o;
    for (int l = 0; l < kLanes; ++l) o[l] = in[l][pos];
    __builtin_memcpy(w + pos * kLanes, &o, sizeof(o));
  }
#endif
}

// W[pos·L + ℓ] = u[ℓ·q + pos] in fp64, pos < q = m/L (q ≥ L): the chunk's L contiguous parts side by side in
// the lanes, so that vector pos holds position pos of every part.
template <typename A>
void transposed_wide(const A* __restrict u, int64_t m, double* __restrict w) {
  const int64_t q = m / kLanes;
  for (int64_t p0 = 0; p0 < q; p0 += kLanes) {
    VD in[kLanes];
    for (int l = 0; l < kLanes; ++l) in[l] = load_wide(u + l * q + p0);
    store_transposed(in, w + p0 * kLanes);
  }
}

// The subtree of the products wa·wc over B consecutive positions of the transposed layout, in registers.
template <int B>
VD block_tree(const double* __restrict wa, const double* __restrict wc) {
  if constexpr (B == 1) return load_vec(wa) * load_vec(wc);
  else return block_tree<B / 2>(wa, wc) + block_tree<B / 2>(wa + B / 2 * kLanes, wc + B / 2 * kLanes);
}

// Every pair's tree of one chunk in the transposed layout (q = m/L ≥ B positions): blocks of B positions are
// added in registers, the q/B block sums by a binary counter (stack[k·kLevels + level] holds pair k's pending
// left sibling at that level, so each addition is the tree's), each lane holding one part's subtree; the
// lanes are added last.
constexpr int kLevels = 64;
template <int B>
void pair_trees(const double* wide, int64_t m, const int64_t* pairs, int64_t n_pairs, VD* stack, double* out) {
  const int64_t q = m / kLanes, blocks = q / B;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int64_t k = 0; k < n_pairs; ++k) {
      const int64_t first = blk * B * kLanes;
      VD v = block_tree<B>(wide + pairs[2 * k] * m + first, wide + pairs[2 * k + 1] * m + first);
      int level = 0;
      for (int64_t c = blk; c & 1; c >>= 1, ++level) v = stack[k * kLevels + level] + v;
      stack[k * kLevels + level] = v;
    }
  }
  int top = 0;
  while ((int64_t{1} << top) < blocks) ++top;
  for (int64_t k = 0; k < n_pairs; ++k) {
    double w[kLanes];
    for (int l = 0; l < kLanes; ++l) w[l] = stack[k * kLevels + top][l];
    for (int len = kLanes; len > 1; len /= 2)
      for (int l = 0; l < len / 2; ++l) w[l] = w[2 * l] + w[2 * l + 1];
    out[k] = w[0];
  }
}

// The tree of the products ua[e]·uc[e], e < m (m a power of two; the u are zero-padded up to m): level one is
// fused into the products, q[i] = ua[2i]·uc[2i] + ua[2i+1]·uc[2i+1], then the levels alternate between q and r
// (distinct buffers, so the stride-2 loads vectorise).
template <typename A>
double scalar_tree(const A* __restrict ua, const A* __restrict uc, int64_t m, double* __restrict q,
                   double* __restrict r) {
  if (m == 1) return static_cast<double>(ua[0]) * static_cast<double>(uc[0]);
  for (int64_t i = 0; i < m / 2; ++i)
    q[i] = static_cast<double>(ua[2 * i]) * static_cast<double>(uc[2 * i]) +
           static_cast<double>(ua[2 * i + 1]) * static_cast<double>(uc[2 * i + 1]);
  for (int64_t len = m / 2; len > 1; len /= 2) {
    for (int64_t i = 0; i < len / 2; ++i) r[i] = q[2 * i] + q[2 * i + 1];
    std::swap(q, r);
  }
  return q[0];
}

// dst[e] = x[start + e] − b[e] for e < n: x (dtype code dt) widened exactly to A, one subtraction in A.
template <typename A>
void load_diff(A* __restrict dst, const void* x, int64_t dt, int64_t start, int64_t n, const A* __restrict b) {
  dispatch_dtype(dt, [&](auto tag) {
    const auto* p = reinterpret_cast<const typename decltype(tag)::type*>(at(x, dt, start));
    for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<A>(widen(p[e])) - b[e];
  });
}

// u[j * m + e] for every input j in a pair (used[j]; zero from n up to the power of two m ≥ n), then each
// pair's tree; in chunks that fill the lanes, each used input is first transposed and widened once, into
// wide[j * m ...] (transposed_wide).
template <typename A>
void dots_chunk(const TableRow& row, int64_t n_inputs, int64_t start, int64_t n, const DotsParams& p,
                const uint8_t* used, A* u, double* wide, VD* stack, double* q, double* r, double* out) {
  int64_t m = 1;
  while (m < n) m *= 2;
  A* b = u + n_inputs * m;
  const bool has_base = row.base() != nullptr;
  const bool lanes = m >= kLanes * kLanes;
  if (has_base) load_any(b, row.base(), row.base_dtype(), start, n);
  for (int64_t j = 0; j < n_inputs; ++j) {
    if (!used[j]) continue;
    A* uj = lanes ? u : u + j * m;  // transposed at once: one scratch row suffices
    if (has_base) load_diff(uj, row.input(j), row.input_dtype(j), start, n, b);
    else load_any(uj, row.input(j), row.input_dtype(j), start, n);
    std::fill(uj + n, uj + m, A(0));
    if (lanes) transposed_wide(uj, m, wide + j * m);
  }
  if (n > 0 && lanes) {
    const int64_t positions = m / kLanes;
    if (positions >= 16) pair_trees<16>(wide, m, p.pairs, p.n_pairs, stack, out);  // 16: measured best
    else if (positions == 8) pair_trees<8>(wide, m, p.pairs, p.n_pairs, stack, out);
    else if (positions == 4) pair_trees<4>(wide, m, p.pairs, p.n_pairs, stack, out);
    else pair_trees<2>(wide, m, p.pairs, p.n_pairs, stack, out);
    return;
  }
  for (int64_t k = 0; k < p.n_pairs; ++k)
    out[k] = n == 0 ? 0.0 : scalar_tree(u + p.pairs[2 * k] * m, u + p.pairs[2 * k + 1] * m, m, q, r);
}

// The tree over the c ≥ 1 partials v[i * n_pairs + p] of one row, in place (node i of a level overwrites
// node i of the level below after its children 2i, 2i + 1 ≥ i are read); a missing right child is +0.
void row_tree(double* v, int64_t c, int64_t n_pairs, double* out) {
  for (; c > 1; c = (c + 1) / 2)
    for (int64_t i = 0; i < (c + 1) / 2; ++i)
      for (int64_t k = 0; k < n_pairs; ++k)
        v[i * n_pairs + k] = v[2 * i * n_pairs + k] + (2 * i + 1 < c ? v[(2 * i + 1) * n_pairs + k] : 0.0);
  for (int64_t k = 0; k < n_pairs; ++k) out[k] = v[k] + 0.0;
}

}  // namespace

void dots(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const DotsParams& p) {
  static_assert(kDotsChunk >= kLanes * kLanes, "a chunk fills the lanes");
  std::vector<uint8_t> used(n_inputs, 0);
  for (int64_t k = 0; k < 2 * p.n_pairs; ++k) used[p.pairs[k]] = 1;
  // Per table row: elements per row, chunks per row, and the first chunk and first output row (prefix sums).
  std::vector<int64_t> cols(n_tensors), per_row(n_tensors), first_chunk(n_tensors + 1, 0), first_row(n_tensors + 1, 0);
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t rows = p.rows[t];
    cols[t] = rows ? TableRow(table, n_inputs, t).numel() / rows : 0;
    per_row[t] = std::max<int64_t>(1, (cols[t] + kDotsChunk - 1) / kDotsChunk);
    first_chunk[t + 1] = first_chunk[t] + rows * per_row[t];
    first_row[t + 1] = first_row[t] + rows;
  }
  const int64_t n_chunks = first_chunk[n_tensors], n_rows = first_row[n_tensors];
  // The table row holding chunk (row) k: the last t with first[t] ≤ k.
  auto owner = [](const std::vector<int64_t>& first, int64_t k) {
    return static_cast<int64_t>(std::upper_bound(first.begin(), first.end(), k) - first.begin()) - 1;
  };
  std::unique_ptr<double[]> partials(new double[n_chunks * p.n_pairs]);
#pragma omp parallel if (worth_threads(n_chunks * kDotsChunk * n_inputs))
  {
    std::vector<double> u((n_inputs + 1) * kDotsChunk);  // as float for fp32 rows: the first half suffices
    std::vector<double> wide(n_inputs * kDotsChunk);
    std::vector<VD> stack(p.n_pairs * kLevels);
    std::vector<double> q(kLanes * kLanes / 2), r(kLanes * kLanes / 2);
#pragma omp for schedule(dynamic, 64)
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t tr = owner(first_chunk, k), in_row = (k - first_chunk[tr]) % per_row[tr] * kDotsChunk;
      const int64_t start = (k - first_chunk[tr]) / per_row[tr] * cols[tr] + in_row;
      const int64_t n = std::min(kDotsChunk, cols[tr] - in_row);
      const TableRow row(table, n_inputs, tr);
      double* out = partials.get() + k * p.n_pairs;
      if (row.accumulates_in_f64(n_inputs))
        dots_chunk<double>(row, n_inputs, start, n, p, used.data(), u.data(), wide.data(), stack.data(), q.data(),
                           r.data(), out);
      else
        dots_chunk<float>(row, n_inputs, start, n, p, used.data(), reinterpret_cast<float*>(u.data()), wide.data(),
                          stack.data(), q.data(), r.data(), out);
    }
#pragma omp for schedule(static)
    for (int64_t g = 0; g < n_rows; ++g) {
      const int64_t tr = owner(first_row, g);
      const int64_t first = first_chunk[tr] + (g - first_row[tr]) * per_row[tr];
      row_tree(partials.get() + first * p.n_pairs, per_row[tr], p.n_pairs, p.sums + g * p.n_pairs);
    }
  }
}

}  // namespace FM_ISA
}  // namespace fm
