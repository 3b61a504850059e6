// Philox4x32-10 (Random123), the stream of Triton's tl.randint4x, for C++ host and CUDA device code.
// Counter (c0, c1, c2, c3), key (k0, k1); ten rounds of
//   c0' = hi(B*c2) ^ c1 ^ k0;  c1' = lo(B*c2);  c2' = hi(A*c0) ^ c3 ^ k1;  c3' = lo(A*c0);
//   k0 += 0x9E3779B9;  k1 += 0xBB67AE85        (A = 0xD2511F53, B = 0xCD9E8D57)
// Drop masks (fusedmerge/philox.py): element j's 32-bit uniform is U = (A << 16) | B, two 16-bit halves
// from the streams s = 0 (A) and s = 1 (B). In group g = j / 128, r = j % 128, the half of stream s is
//     half (r / 16) % 2 of word r / 32 of the call with counter (n mod 2^32, n / 2^32, s, 0), n = 16 g + r % 16,
// so the 16 calls of a group, held as 16 SIMD lanes, give 16 consecutive elements per (word, half). j is
// dropped when U < T = floor(p * 2^32). B only matters when A == T >> 16 (probability 2^-16), so kernels
// draw stream 1 only for groups where that happens: one call serves 8 elements.
#pragma once
#include <cstdint>

#include "numerics.h"

namespace fm {

constexpr int64_t kElementsPerCall = 8;
constexpr int64_t kGroup = 128;  // elements of one group: 16 calls

struct Words4 { uint32_t w[4]; };

// One round on a counter, with the round's key.
FM_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
  const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
  const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(pb);
  c3 = static_cast<uint32_t>(pa);
  c0 = n0;
  c2 = n2;
}

FM_HD uint32_t philox_key0(uint64_t key, int round) { return static_cast<uint32_t>(key) + 0x9E3779B9u * round; }
FM_HD uint32_t philox_key1(uint64_t key, int round) { return static_cast<uint32_t>(key >> 32) + 0xBB67AE85u * round; }

FM_HD Words4 philox4x32_10(uint64_t call, uint64_t key, uint32_t stream = 0) {
  uint32_t c0 = static_cast<uint32_t>(call), c1 = static_cast<uint32_t>(call >> 32), c2 = stream, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) philox_round(c0, c1, c2, c3, philox_key0(key, r), philox_key1(key, r));
  return {{c0, c1, c2, c3}};
}

}  // namespace fm
