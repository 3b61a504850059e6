// Multi-tensor sums of products (the `dots` primitive; definition in fusedmerge/reductions.py), on the
// CPU, compiled once per ISA level (namespace FM_ISA).
//
// For chunk k = (table row t, first element s, length n ≤ kDotsChunk) and pair p = (a, c):
//     u_j[e] = x_j[s + e] − b[s + e]   in fp32 (fp64 when the row has an fp64 tensor); x_j alone without a base
//     q[e] = double(u_a[e]) · double(u_c[e]) for e < n, +0 up to the next power of two m ≥ n
//     partials[k, p] = tree(q):  for len = m, m/2, ..., 2:  q[i] = q[2i] + q[2i+1]  (i < len/2);  q[0]
// (the first level fused into the products, the others between two buffers so that they vectorise)
// an adjacent pairwise tree, each node one IEEE addition (built without FMA contraction), so the chunk sums
// equal Triton's and the reference's bit for bit. Chunks are independent: one parallel loop, no atomics.
#include "dots_cpu.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "elementwise.h"

namespace fm {
namespace FM_ISA {
namespace {

// The tree of the products ua[e]·uc[e], e < m (m a power of two; the u are zero-padded up to m): level one is
// fused into the products, q[i] = ua[2i]·uc[2i] + ua[2i+1]·uc[2i+1], then the levels alternate between q and r
// (distinct buffers, so the stride-2 loads vectorise).
template <typename Acc>
double pair_tree(const Acc* __restrict ua, const Acc* __restrict uc, int64_t m, double* __restrict q,
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

// u[j * kDotsChunk + e] for every input j (zero from n up to the power of two m ≥ n), then each pair's tree.
template <typename Acc>
void dots_chunk(const TableRow& row, int64_t n_inputs, int64_t start, int64_t n, const DotsParams& p, Acc* u, double* q,
                double* r, double* out) {
  alignas(64) Acc b[kDotsChunk];
  int64_t m = 1;
  while (m < n) m *= 2;
  const bool has_base = row.base() != nullptr;
  if (has_base) load_any(b, row.base(), row.base_dtype(), start, n);
  for (int64_t j = 0; j < n_inputs; ++j) {
    Acc* uj = u + j * kDotsChunk;
    load_any(uj, row.input(j), row.input_dtype(j), start, n);
    if (has_base)
      for (int64_t e = 0; e < n; ++e) uj[e] = uj[e] - b[e];
    std::fill(uj + n, uj + m, Acc(0));
  }
  for (int64_t k = 0; k < p.n_pairs; ++k)
    out[k] = n == 0 ? 0.0 : pair_tree(u + p.pairs[2 * k] * kDotsChunk, u + p.pairs[2 * k + 1] * kDotsChunk, m, q, r);
}

}  // namespace

void dots(const int64_t* table, int64_t /*n_tensors*/, int64_t n_inputs, const DotsParams& p) {
#pragma omp parallel
  {
    std::vector<double> u(n_inputs * kDotsChunk);  // as float for fp32 rows: the first half suffices
    std::vector<double> q(kDotsChunk / 2), r(kDotsChunk / 2);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < p.n_chunks; ++k) {
      const int64_t* c = p.chunks + 3 * k;
      const TableRow row(table, n_inputs, c[0]);
      double* out = p.partials + k * p.n_pairs;
      if (row.accumulates_in_f64(n_inputs))
        dots_chunk<double>(row, n_inputs, c[1], c[2], p, u.data(), q.data(), r.data(), out);
      else dots_chunk<float>(row, n_inputs, c[1], c[2], p, reinterpret_cast<float*>(u.data()), q.data(), r.data(), out);
    }
  }
}

}  // namespace FM_ISA
}  // namespace fm
