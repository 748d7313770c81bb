// csrc/cpu/quant_bf16.cpp -- the quantized linear layer on AVX512-BF16 dot products.
//
// quant_linear (quant.cpp) calls quant_linear_bf16dot first; it runs when the CPU
// has AVX512_BF16, the AVX-512 kernels are active and the case is one it handles
// (returns false otherwise, and the Vec float kernel of quant_kernel.h runs).
//
// When: int4 weights at M = 1 (any activation dtype), and every format at M > 1
// with bf16 activations. Elsewhere the float kernel is as fast or faster
// (measured): int8 at M = 1 is memory bound already, NF4 at M = 1 would need
// hi + lo parts of its non-bf16 code values, and float32 activations at M > 1
// would need two dot products per pair (below) where the FMA kernel needs one.
//
// Why: the float kernel decodes each weight code to a float32 lane (zero-extend,
// convert) and spends one FMA per 16 products, so it is compute bound at decode
// (M = 1, 4-bit) and FMA bound at M = 16..32. `vdpbf16ps` multiplies 32 bf16
// pairs per instruction with exact products and float32 sums, and weight codes
// are exact in bf16 (int4 codes, int8 codes -128..127), so the weights lose
// nothing: the per-group scale and zero point are applied in float32 afterwards,
//   sum_k x_k (q_k - z) s = s * sum_k x_k q_k  -  s * z * sum_k x_k.
// NF4 code values are not exact in bf16: each is split into hi + lo bf16 parts
// (hi*x + lo*x; error ~2^-17 of the value).
//
// Activations: bf16 activations are used as they are (exact). float32 (and
// float16, via float32) activations of the M = 1 int4 kernel are split into
// x = hi + lo, two bf16 parts (hi = bf16(x), lo = bf16(x - hi)), each multiplied
// with the weights: they then carry 16 significant bits instead of 24 (relative
// error <= 2^-17 per element, far below int4's own quantization error).
//
// 4-bit decode: 64 packed bytes (four 32-code packing runs, one per 128-bit
// lane) -> int4: each nibble shifted into the mantissa of a bf16 equal to 16 + q
// (decode4_int4: no lookups); NF4: `vpshufb` looks up the low and the high byte
// of each code's bf16 value in 16-entry tables -> `vpunpckl/hbw` interleaves the
// bytes into four vectors of 32 bf16 weights. Each 128-bit lane holds 8 codes of
// one packing run, so the activations are stored once per call in that order
// (xpos), and each float32 lane of a dot product stays inside one scale group:
// a vector of group scales (one per 128-bit lane) is applied by one FMA.
//
// M = 1 decodes in registers (each weight byte is used once). M > 1 decodes a
// block of channels into a small buffer (L1/L2 resident) once, in super-chunks
// of 4 groups (one group per 128-bit lane, so a lane sums G/8 products before
// its scale FMA), and reuses it for every row of x, 4 rows x 4 channels (4-bit)
// or 4 x 4 (int8) at a time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/quant.h"

namespace minigpt::cpu {

// Tests turn the bf16 kernels off to check the AVX-512 float kernel too.
std::atomic<bool> g_quant_bf16_dot_enabled{true};

bool quant_linear_bf16dot(const at::Tensor& x, const at::Tensor& xf, const QuantWeightView& w, int fmt,
                          const float* bias, float* y, const float* codebook);

#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))

namespace {

constexpr int64_t kChunk = 128;           // 4-bit codes per 64-byte load
constexpr int64_t kPrefetchBytes = 1024;  // how far ahead each weight row is prefetched

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,bmi2")

// Activations as bf16 parts in the kernels' order, padded with zeros.
struct BfRows {
  int64_t m = 0, k = 0, kpad = 0, groups = 0;
  bool two = false;            // lo part present (float32 input)
  std::vector<uint16_t> hi;    // (m, kpad) bf16 bits
  std::vector<uint16_t> lo;    // (m, kpad) or empty
  std::vector<float> gsum;     // (m, groups): sum of (hi + lo) over each scale group (int4)
};

// Position of element e in the 4-bit decode order. The codes are taken in
// super-chunks of 4 scale groups (4 * layout codes); 128-bit lane r of every
// decoded vector holds 8 codes of group r of the super-chunk, vector u * 4 + j
// holds codes 32u + 8j .. 32u + 8j + 7 of each group (run u, j: which nibble and
// which half of the run's 16 bytes). layout = 32 gives 128-code chunks of four
// packing runs (the M = 1 kernel); layout = the group size keeps each float32
// lane of a dot product inside one group for G / 8 products (the M > 1 kernel).
inline int64_t xpos(int64_t e, int64_t layout) {
  const int64_t sc = e / (4 * layout), o = e % (4 * layout);
  const int64_t r = o / layout, w = o % layout, u = w / 32, p = w % 32;
  const int64_t j = (p / 16) * 2 + (p % 16) / 8;
  return sc * 4 * layout + (u * 4 + j) * 32 + r * 8 + p % 8;
}

// 16 float32 -> 16 bf16 (round to nearest even) and back, exactly.
inline __m256i to_bf16_bits(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
inline __m512 bf16_bits_to_f32(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// x (m, k) as bf16 hi (+ lo) parts. layout > 0: the 4-bit order (xpos), 0: natural.
// xb: bf16 input (used as is) or null; xf: float32 input otherwise.
BfRows prepare_rows(const BF16* xb, const float* xf, int64_t m, int64_t k, int64_t group, int64_t layout) {
  const bool order4 = layout > 0;
  BfRows r;
  r.m = m;
  r.k = k;
  const int64_t pad = order4 ? 4 * layout : kChunk;
  r.kpad = (k + pad - 1) / pad * pad;
  r.groups = group > 0 ? k / group : 0;
  r.two = xb == nullptr;
  r.hi.assign(size_t(m * r.kpad), 0);
  if (r.two) r.lo.assign(size_t(m * r.kpad), 0);
  r.gsum.assign(size_t(m * std::max<int64_t>(r.groups, 1)), 0.0f);
  for (int64_t i = 0; i < m; ++i) {
    uint16_t* hr = r.hi.data() + i * r.kpad;
    uint16_t* lr = r.two ? r.lo.data() + i * r.kpad : nullptr;
    float* gs = r.gsum.data() + i * std::max<int64_t>(r.groups, 1);
    for (int64_t j = 0; j < k; j += 16) {
      const int n = int(std::min<int64_t>(16, k - j));
      const __mmask16 mk = __mmask16(_bzhi_u32(~0u, unsigned(n)));
      __m256i h, l = _mm256_setzero_si256();
      __m512 used;
      if (xb) {
        h = _mm256_maskz_loadu_epi16(mk, xb + i * k + j);
        used = bf16_bits_to_f32(h);
      } else {
        const __m512 v = _mm512_maskz_loadu_ps(mk, xf + i * k + j);
        h = to_bf16_bits(v);
        const __m512 hf = bf16_bits_to_f32(h);
        l = to_bf16_bits(_mm512_sub_ps(v, hf));
        used = _mm512_add_ps(hf, bf16_bits_to_f32(l));
      }
      if (r.groups > 0) gs[j / group] += _mm512_reduce_add_ps(used);
      if (!order4) {
        _mm256_mask_storeu_epi16(hr + j, mk, h);
        if (lr) _mm256_mask_storeu_epi16(lr + j, mk, l);
        continue;
      }
      // 16 consecutive elements (j % 16 == 0) land as two runs of 8
      const int64_t d0 = xpos(j, layout), d1 = xpos(j + 8, layout);
      const __mmask8 m0 = __mmask8(_bzhi_u32(~0u, unsigned(std::min(n, 8))));
      const __mmask8 m1 = __mmask8(_bzhi_u32(~0u, unsigned(std::max(n - 8, 0))));
      _mm_mask_storeu_epi16(hr + d0, m0, _mm256_castsi256_si128(h));
      _mm_mask_storeu_epi16(hr + d1, m1, _mm256_extracti128_si256(h, 1));
      if (lr) {
        _mm_mask_storeu_epi16(lr + d0, m0, _mm256_castsi256_si128(l));
        _mm_mask_storeu_epi16(lr + d1, m1, _mm256_extracti128_si256(l, 1));
      }
    }
  }
  return r;
}

// bf16 value of each 4-bit code as two byte tables (one per byte of the bf16),
// each repeated in the four 128-bit lanes for vpshufb.
struct Lut {
  __m512i lo, hi;
};
inline Lut make_lut(const float* values, bool residual) {
  alignas(16) uint8_t lb[16], hb[16];
  for (int i = 0; i < 16; ++i) {
    uint16_t bits = to_bf16(values[i]).bits;
    if (residual) bits = to_bf16(values[i] - to_f32(BF16{bits})).bits;
    lb[i] = uint8_t(bits & 0xFF);
    hb[i] = uint8_t(bits >> 8);
  }
  return {_mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lb))),
          _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(hb)))};
}

// 64 packed bytes -> four vectors of 32 bf16 weights (4-bit chunk order).
inline void decode4(__m512i nl, __m512i nh, const Lut& t, __m512i v[4]) {
  __m512i a = _mm512_shuffle_epi8(t.lo, nl), b = _mm512_shuffle_epi8(t.hi, nl);
  v[0] = _mm512_unpacklo_epi8(a, b);
  v[1] = _mm512_unpackhi_epi8(a, b);
  a = _mm512_shuffle_epi8(t.lo, nh);
  b = _mm512_shuffle_epi8(t.hi, nh);
  v[2] = _mm512_unpacklo_epi8(a, b);
  v[3] = _mm512_unpackhi_epi8(a, b);
}
// int4 without table lookups: a bf16 whose high byte is 0x41 and low byte 0x80 | q << 3
// is exactly 16 + q (exponent 2^4, q in the top 4 of the 7 mantissa bits). Each
// nibble is shifted into place and masked in one vpternlogd; the zero-point
// correction then uses 16 + z in place of z.
inline void decode4_int4(__m512i b, __m512i v[4]) {
  const __m512i m78 = _mm512_set1_epi8(0x78), m80 = _mm512_set1_epi8(char(0x80));
  const __m512i h41 = _mm512_set1_epi8(0x41);
  // (A & B) | C  ->  truth table 0xEA
  const __m512i lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(b, 3), m78, m80, 0xEA);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(b, 1), m78, m80, 0xEA);
  v[0] = _mm512_unpacklo_epi8(lo, h41);
  v[1] = _mm512_unpackhi_epi8(lo, h41);
  v[2] = _mm512_unpacklo_epi8(hi, h41);
  v[3] = _mm512_unpackhi_epi8(hi, h41);
}
constexpr float kInt4CodeOffset = 16.0f;  // decode4_int4 yields 16 + q

inline void nibbles(__m512i b, __m512i& nl, __m512i& nh) {
  const __m512i m = _mm512_set1_epi8(0x0F);
  nl = _mm512_and_si512(b, m);
  nh = _mm512_and_si512(_mm512_srli_epi16(b, 4), m);
}

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// What the 4-bit kernels need to know about one weight matrix.
struct Q4 {
  const QuantWeightView* w;
  bool nf4;
  int64_t groups;  // scale entries per channel
  __m512i gidx;    // float32 lane -> scale entry offset within a chunk
  __m512i widx;    // the same for 16-bit words (odd words: the high half of each lane)
  Lut lut, lut_lo;
};

// Where a 128-code chunk starts and how much of it is real (computed once per
// chunk, shared by every channel).
struct ChunkPos {
  int64_t i, g0;      // first code, its scale group
  __mmask16 smask;    // scale entries to load (up to 4)
  __mmask64 bmask;    // packed bytes to load
  bool full;          // all 128 codes inside the row
};
inline ChunkPos chunk_pos(const Q4& q, int64_t i) {
  ChunkPos c;
  c.i = i;
  c.g0 = i / q.w->block;
  c.smask = __mmask16(_bzhi_u32(~0u, unsigned(std::min<int64_t>(4, q.groups - c.g0))));
  const int64_t here = std::min<int64_t>(kChunk, q.w->k - i);
  c.full = here == kChunk;
  c.bmask = _bzhi_u64(~0ULL, unsigned(here / 2));
  return c;
}

// Scale vector of channel n for a chunk: one group scale per 128-bit lane (packing run).
template <bool NF4>
inline __m512 chunk_scales(const Q4& q, int64_t n, const ChunkPos& c) {
  __m512 s;
  if constexpr (NF4) {
    s = _mm512_maskz_loadu_ps(c.smask, q.w->scale_f + n * q.groups + c.g0);
    return _mm512_permutexvar_ps(q.gidx, s);
  } else {
    // bf16 scale -> high half of each float32 lane, low half zero: one vpermw
    const __m512i raw = _mm512_castsi128_si512(
        _mm_maskz_loadu_epi16(__mmask8(c.smask), q.w->scale_bf + n * q.groups + c.g0));
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, q.widx, raw));
  }
}

// Packed bytes of a chunk of channel n (masked at the row's end).
inline __m512i chunk_bytes(const Q4& q, int64_t n, const ChunkPos& c) {
  const uint8_t* p = static_cast<const uint8_t*>(q.w->q) + n * (q.w->k / 2) + c.i / 2;
  return c.full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(c.bmask, p);
}

// Zero points: sum_g s_g * z_g * gsum_g of channel n and row `row` (int4 only).
inline float zero_correction(const Q4& q, const BfRows& xr, int64_t row, int64_t n) {
  const BF16* sp = q.w->scale_bf + n * q.groups;
  const uint8_t* zp = q.w->zeros + n * q.groups;
  const float* gs = xr.gsum.data() + row * xr.groups;
  __m512 corr = _mm512_setzero_ps();
  for (int64_t g = 0; g < q.groups; g += 16) {
    const __mmask16 mk = __mmask16(_bzhi_u32(~0u, unsigned(std::min<int64_t>(16, q.groups - g))));
    const __m512 s = bf16_bits_to_f32(_mm256_maskz_loadu_epi16(mk, sp + g));
    const __m512 z = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, zp + g))),
                                   _mm512_set1_ps(kInt4CodeOffset));
    corr = _mm512_fmadd_ps(_mm512_mul_ps(s, z), _mm512_maskz_loadu_ps(mk, gs + g), corr);
  }
  return _mm512_reduce_add_ps(corr);
}

inline void store_q4(const Q4& q, const BfRows& xr, int64_t row, int64_t n, float dot, const float* bias,
                     float* y) {
  if (!q.nf4) dot -= zero_correction(q, xr, row, n);
  y[row * q.w->n + n] = dot + (bias ? bias[n] : 0.0f);
}

// ---- M = 1: decode in registers --------------------------------------------------

template <int NB, bool XLO>
void q4_gemv_block(const Q4& q, const BfRows& xr, int64_t n0, const float* bias, float* y) {
  const uint16_t* xh = xr.hi.data();
  const uint16_t* xl = XLO ? xr.lo.data() : nullptr;
  __m512 acc[NB];
  for (int c = 0; c < NB; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < q.w->k; i += kChunk) {
    const ChunkPos pos = chunk_pos(q, i);
    __m512i vx[4], vxl[4];
    for (int j = 0; j < 4; ++j) {
      vx[j] = _mm512_loadu_si512(xh + i + 32 * j);
      if constexpr (XLO) vxl[j] = _mm512_loadu_si512(xl + i + 32 * j);
    }
    for (int c = 0; c < NB; ++c) {
      const uint8_t* p = static_cast<const uint8_t*>(q.w->q) + (n0 + c) * (q.w->k / 2) + i / 2;
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
      __m512i v[4];
      decode4_int4(chunk_bytes(q, n0 + c, pos), v);
      // short independent chains (vdpbf16ps has a 6-cycle latency)
      const __m512 z = _mm512_setzero_ps();
      __m512 a = _mm512_add_ps(dp(dp(z, v[0], vx[0]), v[1], vx[1]), dp(dp(z, v[2], vx[2]), v[3], vx[3]));
      if constexpr (XLO)
        a = _mm512_add_ps(a, _mm512_add_ps(dp(dp(z, v[0], vxl[0]), v[1], vxl[1]),
                                           dp(dp(z, v[2], vxl[2]), v[3], vxl[3])));
      acc[c] = _mm512_fmadd_ps(a, chunk_scales<false>(q, n0 + c, pos), acc[c]);
    }
  }
  for (int c = 0; c < NB; ++c) store_q4(q, xr, 0, n0 + c, _mm512_reduce_add_ps(acc[c]), bias, y);
}

template <bool XLO>
void q4_gemv(const Q4& q, const BfRows& xr, int64_t nb, int64_t ne, const float* bias, float* y) {
  int64_t n = nb;
  for (; n + 4 <= ne; n += 4) q4_gemv_block<4, XLO>(q, xr, n, bias, y);
  for (; n < ne; ++n) q4_gemv_block<1, XLO>(q, xr, n, bias, y);
}

// ---- M > 1: decode a block of channels once, reuse it for every row ---------------

// Decoded 4-bit channel, per super-chunk of 4 groups: G/32 runs x (4, or 8 with
// the lo parts) vectors of 32 bf16, then the 4 group scales spread over the
// 16 float32 lanes (one per 128-bit lane): slots uint16 values in all.
inline int64_t q4_sc_slots(int64_t group, bool wlo) { return (group / 32) * (wlo ? 8 : 4) * 32 + 32; }

void q4_decode_channel(const Q4& q, int64_t n, uint16_t* out) {
  const int64_t G = q.w->block, runs = G / 32, slots = q4_sc_slots(G, q.nf4);
  const uint8_t* row = static_cast<const uint8_t*>(q.w->q) + n * (q.w->k / 2);
  const __m512i quad = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2);
  for (int64_t g0 = 0, sc = 0; g0 < q.groups; g0 += 4, ++sc) {
    uint16_t* o = out + sc * slots;
    const int ng = int(std::min<int64_t>(4, q.groups - g0));
    for (int64_t u = 0; u < runs; ++u) {
      // 128-bit lane r <- packing run u of group g0 + r
      const uint8_t* p0 = row + g0 * (G / 2) + u * 16;
      __m512i b;
      if (ng == 4) {
        const auto ld = [&](int r) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + r * (G / 2))); };
        b = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(ld(0)), ld(1), 1), ld(2), 2), ld(3), 3);
      } else {
        alignas(64) uint8_t tmp[64] = {0};
        for (int r = 0; r < ng; ++r) std::memcpy(tmp + 16 * r, p0 + r * (G / 2), 16);
        b = _mm512_load_si512(tmp);
      }
      __m512i nl, nh, v[4];
      uint16_t* ov = o + u * (q.nf4 ? 8 : 4) * 32;
      if (q.nf4) {
        nibbles(b, nl, nh);
        decode4(nl, nh, q.lut, v);
        for (int j = 0; j < 4; ++j) _mm512_storeu_si512(ov + 32 * j, v[j]);
        decode4(nl, nh, q.lut_lo, v);
        for (int j = 0; j < 4; ++j) _mm512_storeu_si512(ov + 128 + 32 * j, v[j]);
      } else {
        decode4_int4(b, v);
        for (int j = 0; j < 4; ++j) _mm512_storeu_si512(ov + 32 * j, v[j]);
      }
    }
    const __mmask16 mk = __mmask16(_bzhi_u32(~0u, unsigned(ng)));
    const __m512 s4 = q.nf4 ? _mm512_maskz_loadu_ps(mk, q.w->scale_f + n * q.groups + g0)
                            : bf16_bits_to_f32(_mm256_castsi128_si256(
                                  _mm_maskz_loadu_epi16(__mmask8(mk), q.w->scale_bf + n * q.groups + g0)));
    _mm512_storeu_ps(reinterpret_cast<float*>(o + slots - 32), _mm512_permutexvar_ps(quad, s4));
  }
}

// MB rows starting at row0 x NB decoded channels (buffers dec[c]) starting at n0.
template <int MB, int NB, bool WLO>
void q4_rows_tile(const Q4& q, const BfRows& xr, int64_t row0, int64_t n0, const uint16_t* const* dec,
                  const float* bias, float* y) {
  const int64_t G = q.w->block, runs = G / 32, slots = q4_sc_slots(G, WLO), kp = xr.kpad;
  constexpr int kVecsPerRun = WLO ? 8 : 4;
  const uint16_t* xh = xr.hi.data() + row0 * kp;
  __m512 acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t g0 = 0, sc = 0; g0 < q.groups; g0 += 4, ++sc) {
    __m512 part[MB][NB];
    for (int r = 0; r < MB; ++r)
      for (int c = 0; c < NB; ++c) part[r][c] = _mm512_setzero_ps();
    const int64_t xoff = sc * 4 * G;
    for (int64_t u = 0; u < runs; ++u) {
      for (int j = 0; j < 4; ++j) {
        const int64_t woff = sc * slots + (u * kVecsPerRun + j) * 32, xo = xoff + (u * 4 + j) * 32;
        __m512i v[NB];
        for (int c = 0; c < NB; ++c) v[c] = _mm512_loadu_si512(dec[c] + woff);
        for (int r = 0; r < MB; ++r) {
          const __m512i a = _mm512_loadu_si512(xh + r * kp + xo);
          for (int c = 0; c < NB; ++c) part[r][c] = dp(part[r][c], v[c], a);
        }
        if constexpr (WLO) {
          for (int c = 0; c < NB; ++c) v[c] = _mm512_loadu_si512(dec[c] + woff + 128);
          for (int r = 0; r < MB; ++r) {
            const __m512i a = _mm512_loadu_si512(xh + r * kp + xo);
            for (int c = 0; c < NB; ++c) part[r][c] = dp(part[r][c], v[c], a);
          }
        }
      }
    }
    for (int c = 0; c < NB; ++c) {
      const __m512 s = _mm512_loadu_ps(reinterpret_cast<const float*>(dec[c] + sc * slots + slots - 32));
      for (int r = 0; r < MB; ++r) acc[r][c] = _mm512_fmadd_ps(part[r][c], s, acc[r][c]);
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NB; ++c)
      store_q4(q, xr, row0 + r, n0 + c, _mm512_reduce_add_ps(acc[r][c]), bias, y);
}

template <int NB, bool WLO>
void q4_rows(const Q4& q, const BfRows& xr, int64_t n0, const uint16_t* const* dec, const float* bias,
             float* y) {
  int64_t r = 0;
  for (; r + 4 <= xr.m; r += 4) q4_rows_tile<4, NB, WLO>(q, xr, r, n0, dec, bias, y);
  switch (xr.m - r) {
    case 3: q4_rows_tile<3, NB, WLO>(q, xr, r, n0, dec, bias, y); break;
    case 2: q4_rows_tile<2, NB, WLO>(q, xr, r, n0, dec, bias, y); break;
    case 1: q4_rows_tile<1, NB, WLO>(q, xr, r, n0, dec, bias, y); break;
    default: break;
  }
}

// Channels decoded per block (4-bit, M > 1): 4 beat 2 and 3 at M = 16/32 (measured).
constexpr int kQ4GemmChannels = 4;

template <bool WLO>
void q4_gemm(const Q4& q, const BfRows& xr, int64_t nb, int64_t ne, const float* bias, float* y) {
  constexpr int NB = kQ4GemmChannels;
  const int64_t per = (q.groups + 3) / 4 * q4_sc_slots(q.w->block, WLO);
  std::vector<uint16_t> buf(size_t(NB * per));
  const uint16_t* dec[NB];
  for (int c = 0; c < NB; ++c) dec[c] = buf.data() + c * per;
  int64_t n = nb;
  for (; n + NB <= ne; n += NB) {
    for (int c = 0; c < NB; ++c) q4_decode_channel(q, n + c, buf.data() + c * per);
    q4_rows<NB, WLO>(q, xr, n, dec, bias, y);
  }
  for (; n < ne; ++n) {
    q4_decode_channel(q, n, buf.data());
    q4_rows<1, WLO>(q, xr, n, dec, bias, y);
  }
}

// ---- int8 weights, M > 1 ------------------------------------------------------------

// Channel n's int8 codes as bf16 (exact), natural order, zero-padded to kpad.
void i8_decode_channel(const QuantWeightView& w, int64_t n, int64_t kpad, uint16_t* out) {
  const int8_t* p = static_cast<const int8_t*>(w.q) + n * w.k;
  for (int64_t i = 0; i < kpad; i += 32) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(32, w.k - i));
    const __m256i b = _mm256_maskz_loadu_epi8(_bzhi_u32(~0u, unsigned(left)), p + i);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

template <int MB, int NB>
void i8_rows_tile(const QuantWeightView& w, const BfRows& xr, int64_t row0, int64_t n0,
                  const uint16_t* const* dec, const float* bias, float* y) {
  const int64_t kp = xr.kpad;
  const uint16_t* xh = xr.hi.data() + row0 * kp;
  __m512 acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < w.k; i += 32) {
    __m512i v[NB];
    for (int c = 0; c < NB; ++c) v[c] = _mm512_loadu_si512(dec[c] + i);
    for (int r = 0; r < MB; ++r) {
      const __m512i a = _mm512_loadu_si512(xh + r * kp + i);
      for (int c = 0; c < NB; ++c) acc[r][c] = dp(acc[r][c], v[c], a);
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NB; ++c) {
      const int64_t n = n0 + c;
      y[(row0 + r) * w.n + n] = _mm512_reduce_add_ps(acc[r][c]) * w.scale_f[n] + (bias ? bias[n] : 0.0f);
    }
}

template <int NB>
void i8_rows(const QuantWeightView& w, const BfRows& xr, int64_t n0, const uint16_t* const* dec,
             const float* bias, float* y) {
  int64_t r = 0;
  for (; r + 4 <= xr.m; r += 4) i8_rows_tile<4, NB>(w, xr, r, n0, dec, bias, y);
  switch (xr.m - r) {
    case 3: i8_rows_tile<3, NB>(w, xr, r, n0, dec, bias, y); break;
    case 2: i8_rows_tile<2, NB>(w, xr, r, n0, dec, bias, y); break;
    case 1: i8_rows_tile<1, NB>(w, xr, r, n0, dec, bias, y); break;
    default: break;
  }
}

void i8_gemm(const QuantWeightView& w, const BfRows& xr, int64_t nb, int64_t ne, const float* bias,
             float* y) {
  constexpr int NB = 4;
  const int64_t per = xr.kpad;
  std::vector<uint16_t> buf(size_t(NB * per));
  const uint16_t* dec[NB] = {buf.data(), buf.data() + per, buf.data() + 2 * per, buf.data() + 3 * per};
  int64_t n = nb;
  for (; n + NB <= ne; n += NB) {
    for (int c = 0; c < NB; ++c) i8_decode_channel(w, n + c, per, buf.data() + c * per);
    i8_rows<NB>(w, xr, n, dec, bias, y);
  }
  for (; n < ne; ++n) {
    i8_decode_channel(w, n, per, buf.data());
    i8_rows<1>(w, xr, n, dec, bias, y);
  }
}

// Channels [nb, ne) for every row: picks the kernel for the format and M.
void run_channels(int fmt, const Q4& q, const BfRows& xr, int64_t nb, int64_t ne, const float* bias,
                  float* y) {
  if (xr.m == 1) {  // int4 only (see quant_linear_bf16dot)
    if (xr.two)
      q4_gemv<true>(q, xr, nb, ne, bias, y);
    else
      q4_gemv<false>(q, xr, nb, ne, bias, y);
  } else if (fmt == kQuantInt8) {  // M > 1: bf16 activations only
    i8_gemm(*q.w, xr, nb, ne, bias, y);
  } else if (q.nf4) {
    q4_gemm<true>(q, xr, nb, ne, bias, y);
  } else {
    q4_gemm<false>(q, xr, nb, ne, bias, y);
  }
}

void make_q4(Q4& q, const QuantWeightView& w, int fmt, const float* codebook) {
  q.w = &w;
  q.nf4 = fmt == kQuantNF4;
  q.groups = fmt == kQuantInt8 ? 0 : w.k / w.block;
  if (fmt == kQuantInt8) return;
  // lane d of a dot product sums codes of packing run d / 4, in group (32 * run) / block
  const int sh = w.block == 32 ? 0 : w.block == 64 ? 1 : 2;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  q.gidx = _mm512_srli_epi32(_mm512_srli_epi32(lane, 2), unsigned(sh));
  q.widx = _mm512_slli_epi32(q.gidx, 16);  // word 2d+1 <- scale entry gidx[d]
  float values[16];
  for (int i = 0; i < 16; ++i) values[i] = q.nf4 ? codebook[i] : float(i);
  q.lut = make_lut(values, false);
  q.lut_lo = make_lut(values, true);
}

#pragma GCC pop_options

}  // namespace

bool quant_linear_bf16dot(const at::Tensor& x, const at::Tensor& xf, const QuantWeightView& w, int fmt,
                          const float* bias, float* y, const float* codebook) {
  if (!g_quant_bf16_dot_enabled.load(std::memory_order_relaxed)) return false;
  if (active_isa() != Isa::AVX512 || !cpu_has_avx512_bf16()) return false;
  const int64_t m = x.size(0);
  if (m == 1) {
    // int8 and NF4 stay on the float kernel (int8: memory bound already; NF4: the
    // hi + lo bf16 products cost more than its lookups); the int4 chunk kernel
    // needs groups that tile a 128-code chunk (32, 64 or a multiple of 128).
    if (fmt != kQuantInt4 || !(w.block == 32 || w.block == 64 || w.block % 128 == 0)) return false;
  } else if (x.scalar_type() != at::kBFloat16) {
    // M > 1 with float32 / float16 activations: the hi + lo dot products cost more
    // than the float kernel's FMAs (measured), so that kernel runs
    return false;
  }
  const BF16* xb = x.scalar_type() == at::kBFloat16 ? ptr<const BF16>(x) : nullptr;
  const BfRows xr = prepare_rows(xb, xb ? nullptr : ptr<const float>(xf), m, w.k,
                                 fmt == kQuantInt4 ? w.block : 0,
                                 fmt == kQuantInt8 ? 0 : m == 1 ? 32 : w.block);
  Q4 q;
  make_q4(q, w, fmt, codebook);
  const int64_t step = fmt == kQuantInt8 ? 4 : m == 1 ? 4 : kQ4GemmChannels;
  const int64_t blocks = (w.n + step - 1) / step;
  // one contiguous, equal share of channel blocks per thread
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    run_channels(fmt, q, xr, b * step, std::min(e * step, w.n), bias, y);
  });
  return true;
}

#else

bool quant_linear_bf16dot(const at::Tensor&, const at::Tensor&, const QuantWeightView&, int, const float*,
                          float*, const float*) {
  return false;
}

#endif

namespace {
bool set_quant_bf16_dot(bool enable) { return g_quant_bf16_dot_enabled.exchange(enable); }
}  // namespace

}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  // Test hook: turn the AVX512-BF16 quant kernels on/off; returns the previous setting.
  m.def("quant_set_bf16_dot(bool enable) -> bool", &minigpt::cpu::set_quant_bf16_dot);
}
