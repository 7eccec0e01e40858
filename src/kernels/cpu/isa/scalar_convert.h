// Scalar conversions between 16-bit floats and float32, TU-local (static) so that the per-ISA
// files can use them without sharing a symbol with the rest of the program.
#pragma once

#include <cstdint>

namespace moe::cpu::scalar {

// A 16-bit value from memory that may not be 2-byte aligned (a tensor of a mapped file).
static inline uint16_t load16(const uint16_t* p) {
  uint16_t v;
  __builtin_memcpy(&v, p, 2);
  return v;
}

static inline float bits_to_f32(uint32_t bits) {
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// float32 -> bf16, to nearest, ties to even; a NaN stays a NaN (made quiet).
static inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// IEEE binary16 -> binary32: zeros, subnormals (normalized), infinities and NaNs (payload kept).
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bits_to_f32(sign);
    uint32_t e = 0;  // shifts until the leading bit reaches the implicit position
    while ((man & 0x400u) == 0) {
      man <<= 1;
      ++e;
    }
    return bits_to_f32(sign | ((113u - e) << 23) | ((man & 0x3ffu) << 13));
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

}  // namespace moe::cpu::scalar
