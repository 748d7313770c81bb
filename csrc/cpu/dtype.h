// csrc/cpu/dtype.h -- 16-bit float storage types and their scalar conversions.
//
// The SIMD kernels are written without ATen types so that the same kernel text
// can be compiled once per instruction set (see isa_expand.h). BF16 and F16 are
// plain 16-bit containers, bit-compatible with c10::BFloat16 / c10::Half, and
// every kernel converts to float32 on load and back on store: all arithmetic is
// done in float32.
#pragma once

#include <cstdint>
#include <cstring>

namespace minigpt::cpu {

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
static_assert(sizeof(BF16) == 2 && sizeof(F16) == 2, "16-bit float containers must be 2 bytes");

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// bfloat16 is the top half of a float32: widening is a shift.
inline float to_f32(BF16 h) { return bits_to_f32(uint32_t(h.bits) << 16); }

// Narrowing rounds to nearest, ties to even (the same as torch), and keeps NaN a NaN.
inline BF16 to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BF16{uint16_t(u >> 16)};
}

// IEEE half: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline float to_f32(F16 h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_f32(sign);  // signed zero
    // subnormal: value = man * 2^-24, exact in float32
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

inline F16 to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return F16{uint16_t(sign | 0x7e00u)};  // nan
  if (u >= 0x477ff000u) return F16{uint16_t(sign | 0x7c00u)};  // rounds to inf (>= 65520)
  if (u < 0x38800000u) {
    // result is subnormal or zero: round(|f| * 2^24) to nearest even, done in float
    // arithmetic by adding 0.5 (the magic constant pushes the bits into place).
    float v = bits_to_f32(u) + 0.5f;
    return F16{uint16_t(sign | uint16_t(f32_to_bits(v) - 0x3f000000u))};
  }
  // normal: rebias exponent, round mantissa (13 dropped bits) to nearest even
  uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xc8000fffu + mant_odd;  // (-112 << 23) + rounding bias
  return F16{uint16_t(sign | uint16_t(u >> 13))};
}

inline float to_f32(float f) { return f; }

template <typename T>
inline T from_f32(float f);
template <>
inline float from_f32<float>(float f) { return f; }
template <>
inline BF16 from_f32<BF16>(float f) { return to_bf16(f); }
template <>
inline F16 from_f32<F16>(float f) { return to_f16(f); }

}  // namespace minigpt::cpu
