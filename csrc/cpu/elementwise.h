// Typed, vectorisable element loops shared by the CPU kernels: storage types, exact widening, one
// round-to-nearest-even narrowing (csrc/numerics.h), and the dispatch from a dtype code to a storage type.
#pragma once
#include <cstdint>

#include "../numerics.h"
#include "../philox.h"
#include "combine_cpu.h"

namespace fm {
namespace FM_ISA {

// Elements a CPU kernel handles at a time, per tensor and input. Measured on the 2-core AVX-512 dev
// machine, ViT-B/32 N = 8: chunks of 4096 reached 92 % (fp32) and 69 % (bf16) of the copy bandwidth,
// 256 reach ~100 % and ~90 %: short chunks keep the N input streams finely interleaved, which the
// hardware prefetchers follow best. A multiple of kElementsPerCall.
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

// The Philox words (csrc/philox.h) of elements [start, start + n) of one (model, tensor), n <= kChunk and
// start a multiple of 4. The rounds run over arrays of calls so that they vectorise, then interleave.
inline void philox_words(uint32_t* __restrict words, uint64_t key, int64_t start, int64_t n) {
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
  for (int r = 0; r < 10; ++r) {
    const uint32_t k0 = philox_key0(key, r), k1 = philox_key1(key, r);
    for (int64_t c = 0; c < calls; ++c) philox_round(c0[c], c1[c], c2[c], c3[c], k0, k1);
  }
  for (int64_t c = 0; c < calls; ++c) {
    words[4 * c] = c0[c];
    words[4 * c + 1] = c1[c];
    words[4 * c + 2] = c2[c];
    words[4 * c + 3] = c3[c];
  }
}

}  // namespace FM_ISA
}  // namespace fm
