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
// below them each part has its own tree. For L positions e0..e0+L-1 of every part, the L row vectors of
// products (one per part) are transposed by log₂L shuffle stages, each followed at once by its tree level
// (positions 2i and 2i+1 of a part are added), which leaves one vector whose lane ℓ is the subtree of
// part ℓ over those positions; the q/L such vectors are added by the tree vertically, the lanes last.
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
using VI = VecT<int64_t>;

// Stage h of the transpose: x holds parts [g, g+h), y parts [g+h, g+2h), each at L/h positions (lane
// pos·h + part); lo (hi) gathers the even (odd) positions of both, lane pos·2h + part, and lo + hi is the
// tree level that adds positions 2·pos and 2·pos+1 of each part.
template <int H, bool Odd, int... T>
constexpr VI stage_mask(std::integer_sequence<int, T...>) {
  return VI{((T % (2 * H) < H ? 0 : kLanes - H) + (2 * (T / (2 * H)) + Odd) * H + T % (2 * H))...};
}

template <int H>
VD stage(VD x, VD y) {
  constexpr auto lanes = std::make_integer_sequence<int, kLanes>();
  constexpr VI lo = stage_mask<H, false>(lanes), hi = stage_mask<H, true>(lanes);
  return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

// r[0..L/H): after the stages H, 2H, ..., L/2, r[0] lane ℓ = the subtree of part ℓ.
template <int H = 1>
VD stages(VD* r) {
  if constexpr (H == kLanes) {
    return r[0];
  } else {
    for (int i = 0; i < kLanes / (2 * H); ++i) r[i] = stage<H>(r[2 * i], r[2 * i + 1]);
    return stages<2 * H>(r);
  }
}

// L consecutive values, widened to fp64 (one instruction for fp32).
inline VD load_wide(const double* x) {
  VD v;
  __builtin_memcpy(&v, x, sizeof(v));
  return v;
}
inline VD load_wide(const float* x) {
#if defined(__AVX512F__)
  return reinterpret_cast<VD>(_mm512_cvtps_pd(_mm256_loadu_ps(x)));
#elif defined(__AVX__)
  return reinterpret_cast<VD>(_mm256_cvtps_pd(_mm_loadu_ps(x)));
#else
  return reinterpret_cast<VD>(_mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x)))));
#endif
}

// The tree of the products a[e]·c[e], e < m (m = L·q, q ≥ L): t holds q/L vectors.
template <typename A, typename C>
double lanes_tree(const A* __restrict a, const C* __restrict c, int64_t m, VD* __restrict t) {
  const int64_t q = m / kLanes;
  for (int64_t e0 = 0; e0 < q; e0 += kLanes) {
    VD r[kLanes];
    for (int l = 0; l < kLanes; ++l) r[l] = load_wide(a + l * q + e0) * load_wide(c + l * q + e0);
    t[e0 / kLanes] = stages(r);
  }
  for (int64_t len = q / kLanes; len > 1; len /= 2)
    for (int64_t i = 0; i < len / 2; ++i) t[i] = t[2 * i] + t[2 * i + 1];
  double w[kLanes];
  for (int l = 0; l < kLanes; ++l) w[l] = t[0][l];
  for (int len = kLanes; len > 1; len /= 2)
    for (int l = 0; l < len / 2; ++l) w[l] = w[2 * l] + w[2 * l + 1];
  return w[0];
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

// u[j * m + e] for every input j (zero from n up to the power of two m ≥ n), then each pair's tree. Inputs
// of fp32 rows in more than one pair (reused[j]) are widened to fp64 once, into wide[j * m + e].
template <typename A>
void dots_chunk(const TableRow& row, int64_t n_inputs, int64_t start, int64_t n, const DotsParams& p,
                const uint8_t* reused_inputs, A* u, double* wide, VD* t, double* q, double* r, double* out) {
  int64_t m = 1;
  while (m < n) m *= 2;
  A* b = u + n_inputs * m;
  const bool has_base = row.base() != nullptr;
  const bool lanes = m >= kLanes * kLanes;
  auto reused = [&](int64_t j) { return std::is_same_v<A, float> && lanes && reused_inputs[j] != 0; };
  if (has_base) load_any(b, row.base(), row.base_dtype(), start, n);
  for (int64_t j = 0; j < n_inputs; ++j) {
    A* uj = u + j * m;
    load_any(uj, row.input(j), row.input_dtype(j), start, n);
    if (has_base)
      for (int64_t e = 0; e < n; ++e) uj[e] = uj[e] - b[e];
    std::fill(uj + n, uj + m, A(0));
    if (reused(j))
      for (int64_t e = 0; e < m; ++e) wide[j * m + e] = static_cast<double>(uj[e]);
  }
  for (int64_t k = 0; k < p.n_pairs; ++k) {
    const int64_t ja = p.pairs[2 * k], jc = p.pairs[2 * k + 1];
    const A* ua = u + ja * m;
    const A* uc = u + jc * m;
    if (n == 0) out[k] = 0.0;
    else if (!lanes) out[k] = scalar_tree(ua, uc, m, q, r);
    else if (reused(ja) && reused(jc)) out[k] = lanes_tree(wide + ja * m, wide + jc * m, m, t);
    else if (reused(ja)) out[k] = lanes_tree(wide + ja * m, uc, m, t);
    else if (reused(jc)) out[k] = lanes_tree(wide + jc * m, ua, m, t);  // the same products
    else out[k] = lanes_tree(ua, uc, m, t);
  }
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
  std::vector<int64_t> uses(n_inputs, 0);
  for (int64_t k = 0; k < 2 * p.n_pairs; ++k) ++uses[p.pairs[k]];
  std::vector<uint8_t> reused(n_inputs);
  for (int64_t j = 0; j < n_inputs; ++j) reused[j] = uses[j] > 1;
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
    std::vector<VD> t(kDotsChunk / (kLanes * kLanes));
    std::vector<double> q(kLanes * kLanes / 2), r(kLanes * kLanes / 2);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t tr = owner(first_chunk, k), in_row = (k - first_chunk[tr]) % per_row[tr] * kDotsChunk;
      const int64_t start = (k - first_chunk[tr]) / per_row[tr] * cols[tr] + in_row;
      const int64_t n = std::min(kDotsChunk, cols[tr] - in_row);
      const TableRow row(table, n_inputs, tr);
      double* out = partials.get() + k * p.n_pairs;
      if (row.accumulates_in_f64(n_inputs))
        dots_chunk<double>(row, n_inputs, start, n, p, reused.data(), u.data(), wide.data(), t.data(), q.data(),
                           r.data(), out);
      else
        dots_chunk<float>(row, n_inputs, start, n, p, reused.data(), reinterpret_cast<float*>(u.data()), wide.data(),
                          t.data(), q.data(), r.data(), out);
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
