// Segmented rank: per row, an LSD radix sort of the 31 magnitude bits (|v| as the bits of a non-negative
// float, which order like the values; NaN above inf) carrying the column index, then out[column] = position.
// Formula: fusedmerge/reference.py:row_rank_reference. Radix rather than a comparison sort: three stable
// passes of 11 + 11 + 9 bits cost O(n) per row (a pass whose digit is the same for the whole row is
// skipped), against O(n log n) comparisons for std::sort of (bits, column) pairs; stability gives the
// column-order tie break for free. Rows are independent: OpenMP over rows, scratch per thread.
//
// Uniforms (uniforms): U_j = (A << 16) | B of element j, both streams drawn for every group of 128 (a
// per-element threshold leaves no group where B cannot matter), groups split over OpenMP threads.
#include "rank_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/philox.h"
#include "parallel.h"

namespace fm {
namespace {

constexpr int kPasses = 3;
constexpr int kShift[kPasses] = {0, 11, 22};
constexpr uint32_t kMask[kPasses] = {0x7FF, 0x7FF, 0x1FF};

void rank_row(const float* v, int64_t n, int32_t* out, std::vector<uint32_t>& scratch) {
  scratch.resize(4 * static_cast<size_t>(n));
  uint32_t* key = scratch.data();
  uint32_t* idx = key + n;
  uint32_t* key2 = idx + n;
  uint32_t* idx2 = key2 + n;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, v + j, sizeof bits);
    key[j] = bits & 0x7FFFFFFFu;
    idx[j] = static_cast<uint32_t>(j);
  }
  uint32_t count[2048];
  for (int p = 0; p < kPasses; ++p) {
    std::fill(count, count + kMask[p] + 1, 0u);
    for (int64_t j = 0; j < n; ++j) ++count[(key[j] >> kShift[p]) & kMask[p]];
    if (n > 0 && count[(key[0] >> kShift[p]) & kMask[p]] == static_cast<uint32_t>(n)) continue;  // one digit
    uint32_t sum = 0;
    for (uint32_t d = 0; d <= kMask[p]; ++d) {
      const uint32_t c = count[d];
      count[d] = sum;
      sum += c;
    }
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t at = count[(key[j] >> kShift[p]) & kMask[p]]++;
      key2[at] = key[j];
      idx2[at] = idx[j];
    }
    std::swap(key, key2);
    std::swap(idx, idx2);
  }
  for (int64_t p = 0; p < n; ++p) out[idx[p]] = static_cast<int32_t>(p);
}

}  // namespace

void cpu_uniforms(uint64_t key, int64_t numel, int64_t first, int32_t* out) {
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  const int64_t g0 = first / kGroup;
#pragma omp parallel for schedule(static) if (worth_threads(numel))
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t halves[2][kGroup];
    for (uint32_t s = 0; s < 2; ++s) {
      for (int64_t lane = 0; lane < 16; ++lane) {
        const Words4 w = philox4x32_10(static_cast<uint64_t>(16 * (g0 + g) + lane), key, s);
        for (int word = 0; word < 4; ++word) {
          halves[s][word * 32 + lane] = w.w[word] & 0xFFFFu;
          halves[s][word * 32 + 16 + lane] = w.w[word] >> 16;
        }
      }
    }
    const int64_t n = std::min<int64_t>(kGroup, numel - kGroup * g);
    for (int64_t r = 0; r < n; ++r) out[kGroup * g + r] = static_cast<int32_t>((halves[0][r] << 16) | halves[1][r]);
  }
}

void cpu_row_rank(const float* values, int64_t rows, int64_t n, int32_t* out) {
#pragma omp parallel if (worth_threads(rows * n))
  {
    std::vector<uint32_t> scratch;
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) rank_row(values + r * n, n, out + r * n, scratch);
  }
}

}  // namespace fm
