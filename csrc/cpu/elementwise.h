// Typed, vectorisable element loops shared by the CPU kernels: storage types, exact widening, one
// round-to-nearest-even narrowing (csrc/common/numerics.h), and the dispatch from a dtype code to a storage type.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../common/numerics.h"
#include "../common/philox.h"
#include "combine_cpu.h"
#include "parallel.h"

namespace fm {
namespace FM_ISA {

// Elements a CPU kernel handles at a time, per tensor and input. Measured on the 2-core AVX-512 dev
// machine, ViT-B/32 N = 8: chunks of 4096 reached 92 % (fp32) and 69 % (bf16) of the copy bandwidth,
// 256 reach ~100 % and ~90 %: short chunks keep the N input streams finely interleaved, which the
// hardware prefetchers follow best. A multiple of kGroup.
constexpr int64_t kChunk = 256;

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(bf16_t x) { return bf16_to_f32(x.bits); }
inline float widen(f16_t x) { return f16_to_f32(x.bits); }

inline void narrow(float v, float* o) { *o = v; }
inline void narrow(double v, float* o) { *o = static_cast<float>(v); }
inline void narrow(float v, double* o) { *o = v; }
inline void narrow(double v, double* o) { *o = v; }
template <typename Acc> inline void narrow(Acc v, bf16_t* o) { o->bits = f32_to_bf16(static_cast<float>(v)); }
template <typename Acc> inline void narrow(Acc v, f16_t* o) { o->bits = f32_to_f16(static_cast<float>(v)); }

template <typename Acc, typename T>
void load(Acc* dst, const void* src, int64_t n) {
  const T* x = static_cast<const T*>(src);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<Acc>(widen(x[j]));
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the storage type of dtype code dt.
template <typename F>
void dispatch_dtype(int64_t dt, F&& f) {
  switch (dt) {
    case kF32: f(Tag<float>{}); break;
    case kF16: f(Tag<f16_t>{}); break;
    case kBF16: f(Tag<bf16_t>{}); break;
    default: f(Tag<double>{}); break;
  }
}

// Address of element `start` of a tensor of dtype code dt.
inline const char* at(const void* p, int64_t dt, int64_t start) {
  return static_cast<const char*>(p) + start * dtype_size(dt);
}

// dst[0, n) = elements [start, start + n) of a tensor of dtype code dt, widened exactly.
template <typename Acc>
void load_any(Acc* dst, const void* p, int64_t dt, int64_t start, int64_t n) {
  dispatch_dtype(dt, [&](auto tag) { load<Acc, typename decltype(tag)::type>(dst, at(p, dt, start), n); });
}

// Elements [start, start + n) of a tensor of dtype code dt = v[0, n), rounded once.
template <typename Acc>
void store_any(void* p, int64_t dt, int64_t start, const Acc* v, int64_t n) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* o = reinterpret_cast<T*>(const_cast<char*>(at(p, dt, start)));
    for (int64_t j = 0; j < n; ++j) narrow(v[j], o + j);
  });
}

// Runs pieces of an OpenMP region and keeps the first exception for after it: an exception leaving an
// OpenMP region terminates the process (bad_alloc must reach Python as MemoryError).
class RegionErrors {
 public:
  template <typename F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
#pragma omp critical(fm_region_errors)
      if (!first_) first_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::exception_ptr first_;
};

static_assert(kChunk % kGroup == 0, "chunks hold whole Philox groups");

// Words w of the 16 calls of Philox group `group` in stream `stream` (csrc/common/philox.h): words[w][lane].
inline void group_words(uint32_t (&words)[4][16], uint64_t key, uint64_t group, uint32_t stream) {
  const uint64_t first = group * 16;  // a multiple of 16: the low counter words of first + lane never carry
#if defined(__AVX512F__)
  // Two vectors of 8 calls, each word in the low half of a 64-bit lane: one vpmuludq gives a round's whole
  // product (low word in place, high word by a shift); the high halves of the lanes hold garbage that
  // vpmuludq ignores and the final narrowing drops.
  const __m512i ma = _mm512_set1_epi64(0xD2511F53), mb = _mm512_set1_epi64(0xCD9E8D57);
  __m512i c0[2], c1[2], c2[2], c3[2];
  for (int h = 0; h < 2; ++h) {
    c0[h] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<uint32_t>(first) + 8 * h),
                             _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    c1[h] = _mm512_set1_epi64(static_cast<uint32_t>(first >> 32));
    c2[h] = _mm512_set1_epi64(stream);
    c3[h] = _mm512_setzero_si512();
  }
  for (int r = 0; r < 10; ++r) {
    const __m512i k0 = _mm512_set1_epi64(philox_key0(key, r)), k1 = _mm512_set1_epi64(philox_key1(key, r));
    for (int h = 0; h < 2; ++h) {
      const __m512i pb = _mm512_mul_epu32(c2[h], mb), pa = _mm512_mul_epu32(c0[h], ma);
      c0[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[h], k0, 0x96);  // three-way xor
      c2[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[h], k1, 0x96);
      c1[h] = pb;
      c3[h] = pa;
    }
  }
  const __m512i* out[4] = {c0, c1, c2, c3};
  for (int w = 0; w < 4; ++w) {
    const __m256i lo = _mm512_cvtepi64_epi32(out[w][0]), hi = _mm512_cvtepi64_epi32(out[w][1]);
    _mm512_store_si512(words[w], _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
  }
#else
  uint32_t (&c0)[16] = words[0];
  uint32_t (&c1)[16] = words[1];
  uint32_t (&c2)[16] = words[2];
  uint32_t (&c3)[16] = words[3];
  for (int l = 0; l < 16; ++l) {
    c0[l] = static_cast<uint32_t>(first) + static_cast<uint32_t>(l);
    c1[l] = static_cast<uint32_t>(first >> 32);
    c2[l] = stream;
    c3[l] = 0;
  }
  for (int r = 0; r < 10; ++r) {
    const uint32_t k0 = philox_key0(key, r), k1 = philox_key1(key, r);
    for (int l = 0; l < 16; ++l) philox_round(c0[l], c1[l], c2[l], c3[l], k0, k1);
  }
#endif
}

// 32-bit uniforms u[0, n) of elements [start, start + n) of one (model, tensor), for comparison with
// `threshold` (csrc/common/philox.h); start a multiple of kGroup, n <= kChunk. Writes u up to the end of the last
// group, n rounded up to a multiple of kGroup (<= kChunk). The low halves (stream 1) are drawn
// only in groups where some high half equals threshold >> 16; elsewhere they are left 0, which cannot
// change a comparison with the threshold.
inline void uniform_words(uint32_t* __restrict u, uint64_t key, int64_t start, int64_t n, uint32_t threshold) {
  const uint32_t tie = threshold >> 16;
  for (int64_t g0 = 0; g0 < n; g0 += kGroup) {
    uint32_t* __restrict ug = u + g0;
    const uint64_t group = static_cast<uint64_t>(start + g0) / kGroup;
    alignas(64) uint32_t words[4][16];
    group_words(words, key, group, 0);
    // ug[32 w + 16 h + l] = half h of words[w][l], shifted up; any half equal to `tie`?
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m512i ties16 = _mm512_set1_epi16(static_cast<int16_t>(tie));
    __mmask32 ties = 0;
    for (int w = 0; w < 4; ++w) {
      const __m512i x = _mm512_load_si512(words[w]);
      _mm512_storeu_si512(ug + 32 * w, _mm512_slli_epi32(x, 16));
      _mm512_storeu_si512(ug + 32 * w + 16, _mm512_and_si512(x, high));
      ties |= _mm512_cmpeq_epi16_mask(x, ties16);
    }
#else
    uint32_t ties = 0;
    for (int w = 0; w < 4; ++w) {
      for (int l = 0; l < 16; ++l) {
        const uint32_t x = words[w][l];
        ug[32 * w + l] = x << 16;
        ug[32 * w + 16 + l] = x & 0xFFFF0000u;
        ties |= static_cast<uint32_t>((x & 0xFFFFu) == tie) | static_cast<uint32_t>((x >> 16) == tie);
      }
    }
#endif
    if (ties == 0) continue;
    group_words(words, key, group, 1);
    for (int w = 0; w < 4; ++w) {
      for (int l = 0; l < 16; ++l) {
        ug[32 * w + l] |= words[w][l] & 0xFFFFu;
        ug[32 * w + 16 + l] |= words[w][l] >> 16;
      }
    }
  }
}

// Prefetches the chunk after the one at `start` of a tensor (dtype code dt, numel elements) into the caches.
// Compute-bound loops call it between their compute phases, which leave the hardware prefetchers idle.
inline void prefetch_next_chunk(const void* p, int64_t dt, int64_t start, int64_t numel) {
  const int64_t next = start + kChunk;
  if (next >= numel) return;
  const char* a = at(p, dt, next);
  const int64_t bytes = std::min(kChunk, numel - next) * dtype_size(dt);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(a + b, 0, 3);
}

}  // namespace FM_ISA
}  // namespace fm
