// Bit-exact scalar conversions shared by the C++ CPU and the CUDA kernels.
//
// Each matches what torch does on CPU, so every backend rounds like the reference:
//   bf16 -> fp32 : exact (bits << 16)
//   fp16 -> fp32 : exact (IEEE half, subnormals included)
//   fp32 -> bf16 : round to nearest even, NaN -> 0x7FC0 (c10::round_to_nearest_even)
//   fp32 -> fp16 : round to nearest even (c10 fp16_ieee_from_fp32_value)
//   fp64 -> bf16/fp16 : through fp32, as torch's casts do.
// Nothing here may be compiled with fast-math or FMA contraction (-ffp-contract=off, nvcc -fmad=false).
#pragma once
#include <cstdint>
#include <cstring>

#include "hd.h"
#include "table.h"  // the dtype codes

namespace fm {

FM_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FM_HD uint32_t bits_from_f32(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FM_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

FM_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits_from_f32(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

FM_HD float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mag = two_w < (1u << 27) ? bits_from_f32(denormalized) : bits_from_f32(normalized);
  return f32_from_bits(sign | mag);
}

FM_HD uint16_t f32_to_f16(float f) {
  const uint32_t w = bits_from_f32(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  const float mag = (f32_from_bits(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bits = bits_from_f32(f32_from_bits((bias >> 1) + 0x07800000u) + mag);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Load element i of a tensor of dtype `dt` as the accumulation type Acc.
template <typename Acc>
FM_HD Acc load_as(const void* p, int64_t dt, int64_t i) {
  switch (dt) {
    case kF32: return static_cast<Acc>(static_cast<const float*>(p)[i]);
    case kF16: return static_cast<Acc>(f16_to_f32(static_cast<const uint16_t*>(p)[i]));
    case kBF16: return static_cast<Acc>(bf16_to_f32(static_cast<const uint16_t*>(p)[i]));
    default: return static_cast<Acc>(static_cast<const double*>(p)[i]);
  }
}

// Store an accumulator value with one round-to-nearest-even to dtype `dt`.
template <typename Acc>
FM_HD void store_as(void* p, int64_t dt, int64_t i, Acc v) {
  switch (dt) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case kF16: static_cast<uint16_t*>(p)[i] = f32_to_f16(static_cast<float>(v)); break;
    case kBF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(static_cast<float>(v)); break;
    default: static_cast<double*>(p)[i] = static_cast<double>(v); break;
  }
}

}  // namespace fm
