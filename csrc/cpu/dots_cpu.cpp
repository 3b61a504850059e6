// Multi-tensor sums of products (the `dots` primitive; definition in fusedmerge/reductions.py), on the
// CPU, compiled once per ISA level (namespace FM_ISA).
//
// For chunk k = (table row t, first element s, length n ≤ kDotsChunk) and pair p = (a, c):
//     u_j[e] = x_j[s + e] − b[s + e]   in fp32 (fp64 when the row has an fp64 tensor); x_j alone without a base
//     q[e] = double(u_a[e]) · double(u_c[e]) for e < n, +0 up to the next power of two m ≥ n
//     partials[k, p] = tree(q):  for len = m, m/2, ..., 2:  q[i] = q[2i] + q[2i+1]  (i < len/2);  q[0]
// an adjacent pairwise tree, each node one IEEE addition (built without FMA contraction), so the chunk sums
// equal Triton's and the reference's bit for bit. Chunks are independent: one parallel loop, no atomics.
#include "dots_cpu.h"

#include <vector>

#include "elementwise.h"

namespace fm {
namespace FM_ISA {
namespace {

double tree(double* __restrict q, int64_t n) {
  int64_t m = 1;
  while (m < n) m *= 2;
  for (int64_t e = n; e < m; ++e) q[e] = 0.0;
  for (int64_t len = m; len > 1; len /= 2)
    for (int64_t i = 0; i < len / 2; ++i) q[i] = q[2 * i] + q[2 * i + 1];
  return n == 0 ? 0.0 : q[0];
}

// u[j * kDotsChunk + e] for every input j, then the tree of each pair's products.
template <typename Acc>
void dots_chunk(const TableRow& row, int64_t n_inputs, int64_t start, int64_t n, const DotsParams& p, Acc* u, double* q,
                double* out) {
  alignas(64) Acc b[kDotsChunk];
  const bool has_base = row.base() != nullptr;
  if (has_base) load_any(b, row.base(), row.base_dtype(), start, n);
  for (int64_t j = 0; j < n_inputs; ++j) {
    Acc* uj = u + j * kDotsChunk;
    load_any(uj, row.input(j), row.input_dtype(j), start, n);
    if (has_base)
      for (int64_t e = 0; e < n; ++e) uj[e] = uj[e] - b[e];
  }
  for (int64_t k = 0; k < p.n_pairs; ++k) {
    const Acc* __restrict ua = u + p.pairs[2 * k] * kDotsChunk;
    const Acc* __restrict uc = u + p.pairs[2 * k + 1] * kDotsChunk;
    for (int64_t e = 0; e < n; ++e) q[e] = static_cast<double>(ua[e]) * static_cast<double>(uc[e]);
    out[k] = tree(q, n);
  }
}

}  // namespace

void dots(const int64_t* table, int64_t /*n_tensors*/, int64_t n_inputs, const DotsParams& p) {
#pragma omp parallel
  {
    std::vector<double> u(n_inputs * kDotsChunk);  // as float for fp32 rows: the first half suffices
    std::vector<double> q(kDotsChunk);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < p.n_chunks; ++k) {
      const int64_t* c = p.chunks + 3 * k;
      const TableRow row(table, n_inputs, c[0]);
      double* out = p.partials + k * p.n_pairs;
      if (row.accumulates_in_f64(n_inputs)) dots_chunk<double>(row, n_inputs, c[1], c[2], p, u.data(), q.data(), out);
      else dots_chunk<float>(row, n_inputs, c[1], c[2], p, reinterpret_cast<float*>(u.data()), q.data(), out);
    }
  }
}

}  // namespace FM_ISA
}  // namespace fm
