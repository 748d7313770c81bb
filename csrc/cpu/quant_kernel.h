// csrc/cpu/quant_kernel.h -- weight-only quantized matmul tiles, written once against Vec.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose).
// Computes y[m, n] = sum_k x[m, k] * dequant(W)[n, k] (+ bias[n]) for a tile of
// MB activation rows x NB output channels; quant.cpp splits the channels across
// threads. The byte layouts are documented in minigpt/kernels/reference/quant.py:
//
//   int8  q int8 (N, K), scale f32 (N,)              w = q * scale
//   int4  q u8 (N, K/2), scale bf16, zero u8 (N, K/G) w = (q - zero) * scale
//   nf4   q u8 (N, K/2), absmax f32 (N, K/B)          w = NF4[q] * absmax
//
// 4-bit codes come in runs of 32 elements stored in 16 bytes: low nibbles are
// elements 0..15 of the run, high nibbles elements 16..31, so one 16-byte load,
// an AND and a shift give two full vectors of codes in order.
//
// Each weight byte is read from memory once per call: the NB channels of a tile
// (a few KB) stay in L1 while the MB-row blocks of x stream past them. x is
// float32 here (quant.cpp converts bf16/fp16 activations once per call).

#if defined(MG_ISA_AVX512)

// 16 signed bytes -> 16 float lanes.
inline Vec load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load_i8_partial(const int8_t* p, int n) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(Vec::mask(n), p)));
}
struct Nf4Table {
  __m512 t;
  explicit Nf4Table(const float* code) : t(_mm512_loadu_ps(code)) {}
};
constexpr int kRunVecs = 2;  // Vecs per run of 32 codes
// One run of 32 4-bit codes (16 bytes) -> 2 Vecs of the codes as floats (or NF4 values).
template <bool NF4>
inline void load_run32(const uint8_t* p, Vec* out, const Nf4Table& tab) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i m = _mm_set1_epi8(0x0F);
  __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(b, m));
  __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m));
  if constexpr (NF4) {
    out[0] = _mm512_permutexvar_ps(lo, tab.t);
    out[1] = _mm512_permutexvar_ps(hi, tab.t);
  } else {
    out[0] = _mm512_cvtepi32_ps(lo);
    out[1] = _mm512_cvtepi32_ps(hi);
  }
}

#elif defined(MG_ISA_AVX2)

inline Vec load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load_i8_partial(const int8_t* p, int n) {
  alignas(16) int8_t buf[16] = {0};
  std::memcpy(buf, p, size_t(n < 8 ? n : 8));
  return load_i8(buf);
}
struct Nf4Table {
  __m256 lo, hi;
  explicit Nf4Table(const float* code) : lo(_mm256_loadu_ps(code)), hi(_mm256_loadu_ps(code + 8)) {}
};
constexpr int kRunVecs = 4;
inline Vec codes_to_vec(__m128i bytes8, const Nf4Table& tab, bool nf4) {
  __m256i idx = _mm256_cvtepu8_epi32(bytes8);
  if (!nf4) return _mm256_cvtepi32_ps(idx);
  // permutevar8x32 uses the low 3 index bits: look up both halves, pick by bit 3
  __m256 a = _mm256_permutevar8x32_ps(tab.lo, idx);
  __m256 b = _mm256_permutevar8x32_ps(tab.hi, idx);
  __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
  return _mm256_blendv_ps(a, b, upper);
}
template <bool NF4>
inline void load_run32(const uint8_t* p, Vec* out, const Nf4Table& tab) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i m = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(b, m);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  out[0] = codes_to_vec(lo, tab, NF4);
  out[1] = codes_to_vec(_mm_srli_si128(lo, 8), tab, NF4);
  out[2] = codes_to_vec(hi, tab, NF4);
  out[3] = codes_to_vec(_mm_srli_si128(hi, 8), tab, NF4);
}

#else  // scalar

inline Vec load_i8(const int8_t* p) { return float(*p); }
inline Vec load_i8_partial(const int8_t* p, int n) { return n > 0 ? float(*p) : 0.0f; }
struct Nf4Table {
  const float* t;
  explicit Nf4Table(const float* code) : t(code) {}
};
constexpr int kRunVecs = 32;
template <bool NF4>
inline void load_run32(const uint8_t* p, Vec* out, const Nf4Table& tab) {
  for (int j = 0; j < 16; ++j) {
    const int lo = p[j] & 0x0F, hi = p[j] >> 4;
    out[j] = NF4 ? tab.t[lo] : float(lo);
    out[16 + j] = NF4 ? tab.t[hi] : float(hi);
  }
}

#endif

static_assert(kRunVecs * Vec::N == 32, "a run of 4-bit codes is 32 elements");

// int8 tile: MB rows of x (row stride k) against NB channels starting at n0.
template <int MB, int NB>
void int8_tile(const float* x, const QuantWeightView& w, int64_t n0, const float* bias, float* y,
               int64_t y_stride) {
  const int64_t k = w.k;
  const int8_t* wr[NB];
  for (int c = 0; c < NB; ++c) wr[c] = static_cast<const int8_t*>(w.q) + (n0 + c) * k;
  Vec acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int c = 0; c < NB; ++c) acc[m][c] = Vec::zero();
  int64_t i = 0;
  for (; i + Vec::N <= k; i += Vec::N) {
    Vec wv[NB];
    for (int c = 0; c < NB; ++c) wv[c] = load_i8(wr[c] + i);
    for (int m = 0; m < MB; ++m) {
      const Vec xv = Vec::load(x + m * k + i);
      for (int c = 0; c < NB; ++c) acc[m][c] = fmadd(xv, wv[c], acc[m][c]);
    }
  }
  if (i < k) {
    const int tail = int(k - i);
    Vec wv[NB];
    for (int c = 0; c < NB; ++c) wv[c] = load_i8_partial(wr[c] + i, tail);
    for (int m = 0; m < MB; ++m) {
      const Vec xv = Vec::load_partial(x + m * k + i, tail);
      for (int c = 0; c < NB; ++c) acc[m][c] = fmadd(xv, wv[c], acc[m][c]);
    }
  }
  for (int c = 0; c < NB; ++c) {
    const float s = w.scale_f[n0 + c], b = bias ? bias[n0 + c] : 0.0f;
    for (int m = 0; m < MB; ++m) y[m * y_stride + n0 + c] = acc[m][c].reduce_add() * s + b;
  }
}

// 4-bit tile (int4 when !NF4, nf4 when NF4). K is a multiple of the block size,
// which is a multiple of 32, so there is no tail.
template <int MB, int NB, bool NF4>
void q4_tile(const float* x, const QuantWeightView& w, int64_t n0, const float* bias, float* y,
             int64_t y_stride, const float* codebook) {
  const int64_t k = w.k, blocks = k / w.block;
  const Nf4Table tab(codebook);
  const uint8_t* wr[NB];
  for (int c = 0; c < NB; ++c) wr[c] = static_cast<const uint8_t*>(w.q) + (n0 + c) * (k / 2);
  Vec acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int c = 0; c < NB; ++c) acc[m][c] = Vec::zero();
  for (int64_t g = 0; g < blocks; ++g) {
    // per-block affine map code -> weight: w = code * s + o
    Vec s[NB], o[NB];
    for (int c = 0; c < NB; ++c) {
      const int64_t idx = (n0 + c) * blocks + g;
      if constexpr (NF4) {
        s[c] = Vec::set1(w.scale_f[idx]);
        o[c] = Vec::zero();
      } else {
        const float sc = to_f32(w.scale_bf[idx]);
        s[c] = Vec::set1(sc);
        o[c] = Vec::set1(-float(w.zeros[idx]) * sc);
      }
    }
    if constexpr (MB == 1) {
      // Decode (one row): sum x * code over the group first and apply the
      // group's affine map once at the end: sum x*(q*s + o) = s*sum(x*q) + o*sum(x).
      // This drops the per-weight dequantize FMA from the inner loop.
      Vec part[NB], xsum = Vec::zero();
      for (int c = 0; c < NB; ++c) part[c] = Vec::zero();
      for (int64_t r = g * w.block; r < (g + 1) * w.block; r += 32) {
        Vec codes[NB][kRunVecs];
        for (int c = 0; c < NB; ++c) load_run32<NF4>(wr[c] + r / 2, codes[c], tab);
        for (int j = 0; j < kRunVecs; ++j) {
          const Vec xv = Vec::load(x + r + j * Vec::N);
          if constexpr (!NF4) xsum = xsum + xv;
          for (int c = 0; c < NB; ++c) part[c] = fmadd(xv, codes[c][j], part[c]);
        }
      }
      for (int c = 0; c < NB; ++c) {
        acc[0][c] = fmadd(part[c], s[c], acc[0][c]);
        if constexpr (!NF4) acc[0][c] = fmadd(xsum, o[c], acc[0][c]);
      }
      continue;
    }
    for (int64_t r = g * w.block; r < (g + 1) * w.block; r += 32) {
      Vec codes[NB][kRunVecs];
      for (int c = 0; c < NB; ++c) load_run32<NF4>(wr[c] + r / 2, codes[c], tab);
      for (int j = 0; j < kRunVecs; ++j) {
        Vec wv[NB];
        for (int c = 0; c < NB; ++c)
          wv[c] = NF4 ? codes[c][j] * s[c] : fmadd(codes[c][j], s[c], o[c]);
        for (int m = 0; m < MB; ++m) {
          const Vec xv = Vec::load(x + m * k + r + j * Vec::N);
          for (int c = 0; c < NB; ++c) acc[m][c] = fmadd(xv, wv[c], acc[m][c]);
        }
      }
    }
  }
  for (int c = 0; c < NB; ++c) {
    const float b = bias ? bias[n0 + c] : 0.0f;
    for (int m = 0; m < MB; ++m) y[m * y_stride + n0 + c] = acc[m][c].reduce_add() + b;
  }
}

// Dispatch the compile-time tile shape. fmt: 0 int8, 1 int4, 2 nf4.
template <int MB, int NB>
void tile_fmt(int fmt, const float* x, const QuantWeightView& w, int64_t n0, const float* bias,
              float* y, int64_t y_stride, const float* codebook) {
  if (fmt == 0)
    int8_tile<MB, NB>(x, w, n0, bias, y, y_stride);
  else if (fmt == 1)
    q4_tile<MB, NB, false>(x, w, n0, bias, y, y_stride, codebook);
  else
    q4_tile<MB, NB, true>(x, w, n0, bias, y, y_stride, codebook);
}

constexpr int kTileRows = 4;      // MB: activation rows per tile
constexpr int kTileChannels = 4;  // NB: output channels per tile

// All m rows of x against the NB output channels starting at c0.
template <int NB>
void quant_linear_rows(int fmt, const float* x, int64_t m, const QuantWeightView& w, int64_t c0,
                       const float* bias, float* y, const float* codebook) {
  const int64_t ys = w.n, k = w.k;
  int64_t m0 = 0;
  for (; m0 + kTileRows <= m; m0 += kTileRows)
    tile_fmt<kTileRows, NB>(fmt, x + m0 * k, w, c0, bias, y + m0 * ys, ys, codebook);
  switch (m - m0) {
    case 3: tile_fmt<3, NB>(fmt, x + m0 * k, w, c0, bias, y + m0 * ys, ys, codebook); break;
    case 2: tile_fmt<2, NB>(fmt, x + m0 * k, w, c0, bias, y + m0 * ys, ys, codebook); break;
    case 1: tile_fmt<1, NB>(fmt, x + m0 * k, w, c0, bias, y + m0 * ys, ys, codebook); break;
    default: break;
  }
}

// y[0:m, n_begin:n_end] for all m rows of x (m may be any size). No lambdas here:
// GCC does not give a lambda the enclosing `#pragma GCC target`, which would
// keep the SIMD helpers from inlining.
inline void quant_linear_channels(int fmt, const float* x, int64_t m, const QuantWeightView& w,
                                  int64_t n_begin, int64_t n_end, const float* bias, float* y,
                                  const float* codebook) {
  int64_t n0 = n_begin;
  for (; n0 + kTileChannels <= n_end; n0 += kTileChannels)
    quant_linear_rows<kTileChannels>(fmt, x, m, w, n0, bias, y, codebook);
  for (; n0 < n_end; ++n0) quant_linear_rows<1>(fmt, x, m, w, n0, bias, y, codebook);
}

// Dequantize output channels [n_begin, n_end) into rows of `out` (type T, row
// stride K; channel n goes to row n - out_row0): the prefill path (many
// activation rows) multiplies them with a float GEMM.
template <typename T>
void dequantize_channels(int fmt, const QuantWeightView& w, int64_t n_begin, int64_t n_end, T* out,
                         int64_t out_row0, const float* codebook) {
  const int64_t k = w.k;
  const Nf4Table tab(codebook);
  for (int64_t n = n_begin; n < n_end; ++n) {
    T* o = out + (n - out_row0) * k;
    if (fmt == 0) {
      const int8_t* q = static_cast<const int8_t*>(w.q) + n * k;
      const Vec s = Vec::set1(w.scale_f[n]);
      int64_t i = 0;
      for (; i + Vec::N <= k; i += Vec::N) (load_i8(q + i) * s).store(o + i);
      if (i < k) (load_i8_partial(q + i, int(k - i)) * s).store_partial(o + i, int(k - i));
      continue;
    }
    const uint8_t* q = static_cast<const uint8_t*>(w.q) + n * (k / 2);
    const int64_t blocks = k / w.block;
    for (int64_t g = 0; g < blocks; ++g) {
      Vec s, off;
      if (fmt == 1) {
        const float sc = to_f32(w.scale_bf[n * blocks + g]);
        s = Vec::set1(sc);
        off = Vec::set1(-float(w.zeros[n * blocks + g]) * sc);
      } else {
        s = Vec::set1(w.scale_f[n * blocks + g]);
        off = Vec::zero();
      }
      for (int64_t r = g * w.block; r < (g + 1) * w.block; r += 32) {
        Vec codes[kRunVecs];
        if (fmt == 1)
          load_run32<false>(q + r / 2, codes, tab);
        else
          load_run32<true>(q + r / 2, codes, tab);
        for (int j = 0; j < kRunVecs; ++j) fmadd(codes[j], s, off).store(o + r + j * Vec::N);
      }
    }
  }
}
