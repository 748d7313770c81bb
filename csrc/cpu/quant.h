// csrc/cpu/quant.h -- shared description of a quantized weight for the quant kernels.
//
// Byte layouts (documented in full in minigpt/kernels/reference/quant.py):
//   fmt 0 int8: q int8 (N, K); scale float32 (N,)
//   fmt 1 int4: q uint8 (N, K/2) split-halves nibbles; scale bf16 (N, K/G); zero uint8 (N, K/G)
//   fmt 2 nf4:  q uint8 (N, K/2) split-halves nibbles; absmax float32 (N, K/B)
#pragma once

#include <cstdint>

#include "cpu/dtype.h"

namespace minigpt::cpu {

enum QuantFormat : int { kQuantInt8 = 0, kQuantInt4 = 1, kQuantNF4 = 2 };

// Where a kernel finds one quantized weight matrix.
struct QuantWeightView {
  const void* q;         // int8 (N, K) or uint8 (N, K/2)
  const float* scale_f;  // int8: (N,) scales; nf4: (N, K/B) absmax
  const BF16* scale_bf;  // int4: (N, K/G) scales
  const uint8_t* zeros;  // int4: (N, K/G) zero points
  int64_t n, k, block;   // block = group size (int4) / block size (nf4)
};

// Layout facts the kernels rely on.
static_assert(sizeof(int8_t) == 1 && sizeof(uint8_t) == 1, "one code (int8) or two (4-bit) per byte");
static_assert(sizeof(BF16) == 2, "int4 scales are 2-byte bfloat16");
constexpr int kQuantPackRun = 32;  // 4-bit codes are packed in runs of 32 (16 bytes)
static_assert(kQuantPackRun / 2 == 16, "a packing run is one 16-byte load");

}  // namespace minigpt::cpu
