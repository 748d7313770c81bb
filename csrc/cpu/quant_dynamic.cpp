// csrc/cpu/quant_dynamic.cpp -- quantized linear with dynamically int8-quantized activations.
//
//   torch.ops.minigpt.quant_linear_dynamic(x, qweight, scales, zeros?, bias?, fmt, block) -> y
//
// Same weights and layouts as quant_linear (quant.h; fmt 0 int8 or 1 int4), but
// each activation row is first rounded to int8 with one symmetric scale per row,
//   xs = max|x_row| / 127,  xq = round(x / xs) in [-127, 127],
// and the dot products run on integers with AVX512-VNNI `vpdpbusd` (64 u8 x s8
// products summed into 16 int32 lanes per instruction). The result equals
//   y = (xq * xs) @ dequantize(W)^T (+ bias)
// up to float32 rounding of the final scaling (the integer sums are exact).
//
// vpdpbusd multiplies an UNSIGNED byte by a SIGNED byte, so:
//   int8: the weight is made unsigned with w ^ 0x80 = w + 128 (one XOR per 64
//         weights), and  sum(w * xq) = sum((w + 128) * xq) - 128 * sum(xq).
//   int4: codes q in [0, 15] are unsigned already; the zero point is applied
//         after the integer sum:  sum_g (q - z) xq = sum_g q xq - z * sum_g xq.
// 4-bit weights are read 64 bytes (128 codes, four packing runs) at a time:
// one AND gives the four runs' low nibbles and a shift + AND their high
// nibbles, i.e. two vectors of 64 codes in the orders
//   lo = [run0 0:16 | run1 0:16 | run2 0:16 | run3 0:16]   (elements r*32 + 0..15)
//   hi = [run0 16:32 | ...                  | run3 16:32]  (elements r*32 + 16..31)
// and two vpdpbusd finish 128 weights. The activation row is stored once in
// that order (each 128-chunk as its "lo" 64 bytes then its "hi" 64 bytes)
// instead of shuffling every weight chunk. The per-group scale becomes a
// vector with one value per 128-bit lane (one packing run).
//
// Without AVX512-VNNI (or when a lower ISA is forced), the op falls back to the
// float kernel on the fake-quantized activations (xq * xs): the same result,
// without the integer speed-up.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/quant.h"

namespace minigpt::cpu {

// Declared in quant.cpp: the float kernel (used as the fallback).
at::Tensor quant_linear_float(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                              int64_t fmt, int64_t block);

namespace {

constexpr int64_t kChunk = 64;    // int8: weights per vpdpbusd
constexpr int64_t kChunk4 = 128;  // 4-bit: weights per 64 packed bytes (two vpdpbusd)
// Software prefetch distance along each weight row: the hardware prefetcher
// alone leaves a single thread waiting on DRAM between chunks. (A prefetch
// past the end of a row is harmless: it never faults.)
constexpr int64_t kPrefetchBytes = 1024;

// Per-row int8 activations, padded with zeros to a multiple of kChunk4.
struct QuantizedRows {
  int64_t m = 0, kpad = 0, groups = 0;
  std::vector<int8_t> q;       // (m, kpad)
  std::vector<float> scale;    // (m,)   xs
  std::vector<float> gsum;     // (m, groups) sum of xq over each group (int4) / row (int8)
};

// Zeroed buffers for m quantized rows of length k (padded to whole 128-code chunks).
QuantizedRows empty_rows(int64_t m, int64_t k, int64_t group) {
  QuantizedRows r;
  r.m = m;
  r.kpad = (k + kChunk4 - 1) / kChunk4 * kChunk4;
  r.groups = k / group;
  r.q.assign(size_t(m * r.kpad), 0);
  r.scale.resize(size_t(m));
  r.gsum.assign(size_t(m * r.groups), 0.0f);
  return r;
}

// Round each row of x (float32, (m, k)) to int8. permute4: store every 128-chunk
// in the 4-bit unpack order (see top of file). group: elements per gsum entry.
QuantizedRows quantize_rows(const float* x, int64_t m, int64_t k, int64_t group, bool permute4) {
  QuantizedRows r = empty_rows(m, k, group);
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * k;
    float amax = 0.0f;
    for (int64_t j = 0; j < k; ++j) amax = std::max(amax, std::fabs(xr[j]));
    const float xs = amax > 0.0f ? amax / 127.0f : 1.0f;
    r.scale[size_t(i)] = xs;
    int8_t* qr = r.q.data() + i * r.kpad;
    float* gs = r.gsum.data() + i * r.groups;
    for (int64_t j = 0; j < k; ++j) {
      const float v = std::nearbyint(xr[j] / xs);
      const int iv = int(std::min(127.0f, std::max(-127.0f, v)));
      int64_t dst = j;
      if (permute4) {  // element o of a 128-chunk: run o/32, half (o%32)/16, position o%16
        const int64_t c0 = j / kChunk4 * kChunk4, o = j - c0;
        dst = c0 + ((o % 32) / 16) * 64 + (o / 32) * 16 + o % 16;
      }
      qr[dst] = int8_t(iv);
      gs[j / group] += float(iv);
    }
  }
  return r;
}

#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
#define MG_HAVE_VNNI_KERNEL 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,bmi2")

inline int hsum_epi32(__m512i v) { return _mm512_reduce_add_epi32(v); }

// AVX-512 version of quantize_rows (same rounding: cvtps_epi32 rounds to nearest
// even, like nearbyint in the default rounding mode). Blocks of 16 elements move
// as a unit in the 4-bit order, and group sizes are multiples of 16.
QuantizedRows quantize_rows_avx512(const float* x, int64_t m, int64_t k, int64_t group, bool permute4) {
  QuantizedRows r = empty_rows(m, k, group);
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * k;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
      const __mmask16 mk = __mmask16(_bzhi_u32(~0u, unsigned(std::min<int64_t>(16, k - j))));
      vmax = _mm512_max_ps(vmax, _mm512_and_ps(_mm512_maskz_loadu_ps(mk, xr + j), sign));
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const float xs = amax > 0.0f ? amax / 127.0f : 1.0f;
    const __m512 vxs = _mm512_set1_ps(xs);
    const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
    r.scale[size_t(i)] = xs;
    int8_t* qr = r.q.data() + i * r.kpad;
    float* gs = r.gsum.data() + i * r.groups;
    for (int64_t j = 0; j < k; j += 16) {
      const __mmask16 mk = __mmask16(_bzhi_u32(~0u, unsigned(std::min<int64_t>(16, k - j))));
      __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(mk, xr + j), vxs));
      v = _mm512_max_epi32(_mm512_min_epi32(v, lim), nlim);
      int64_t dst = j;
      if (permute4) {
        const int64_t c0 = j / kChunk4 * kChunk4, o = j - c0;
        dst = c0 + ((o % 32) / 16) * 64 + (o / 32) * 16;
      }
      _mm_mask_storeu_epi8(qr + dst, mk, _mm512_cvtsepi32_epi8(v));
      if (r.groups > 0) gs[j / group] += float(hsum_epi32(v));
    }
  }
  return r;
}

// int8 weights: MB rows x NB channels starting at n0.
template <int MB, int NB>
void int8_tile_vnni(const QuantizedRows& xr, int64_t row0, const QuantWeightView& w, int64_t n0,
                    const float* bias, float* y) {
  const int64_t k = w.k;
  const int8_t* wr[NB];
  for (int c = 0; c < NB; ++c) wr[c] = static_cast<const int8_t*>(w.q) + (n0 + c) * k;
  const int8_t* xq[MB];
  for (int r = 0; r < MB; ++r) xq[r] = xr.q.data() + (row0 + r) * xr.kpad;
  __m512i acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  int64_t i = 0;
  for (; i + kChunk <= k; i += kChunk) {
    __m512i wu[NB];
    for (int c = 0; c < NB; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wr[c] + i) + kPrefetchBytes, _MM_HINT_T0);
      wu[c] = _mm512_xor_si512(_mm512_loadu_si512(wr[c] + i), flip);
    }
    for (int r = 0; r < MB; ++r) {
      const __m512i xv = _mm512_loadu_si512(xq[r] + i);
      for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wu[c], xv);
    }
  }
  if (i < k) {  // masked weight load; x is zero-padded, so the padding adds 0
    const __mmask64 mk = _bzhi_u64(~0ULL, unsigned(k - i));
    __m512i wu[NB];
    for (int c = 0; c < NB; ++c) wu[c] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, wr[c] + i), flip);
    for (int r = 0; r < MB; ++r) {
      const __m512i xv = _mm512_loadu_si512(xq[r] + i);
      for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], wu[c], xv);
    }
  }
  for (int r = 0; r < MB; ++r) {
    const int64_t row = row0 + r;
    const float xs = xr.scale[size_t(row)];
    const int64_t corr = 128 * int64_t(xr.gsum[size_t(row)]);
    for (int c = 0; c < NB; ++c) {
      const int64_t dot = int64_t(hsum_epi32(acc[r][c])) - corr;
      const float b = bias ? bias[n0 + c] : 0.0f;
      y[row * w.n + n0 + c] = float(dot) * (xs * w.scale_f[n0 + c]) + b;
    }
  }
}

// int4 weights: MB rows x NB channels. Per 128-chunk: integer sums of q * xq in
// 16 lanes (4 per packing run), converted to float and multiplied by the run's
// group scale; the zero points are subtracted at the end as
// sum_g s_g z_g gsum_g (vectorized over 16 groups at a time).
template <int MB, int NB>
void int4_tile_vnni(const QuantizedRows& xr, int64_t row0, const QuantWeightView& w, int64_t n0,
                    const float* bias, float* y) {
  const int64_t k = w.k, G = w.block, groups = k / G;
  const uint8_t* wr[NB];
  for (int c = 0; c < NB; ++c) wr[c] = static_cast<const uint8_t*>(w.q) + (n0 + c) * (k / 2);
  const int8_t* xq[MB];
  for (int r = 0; r < MB; ++r) xq[r] = xr.q.data() + (row0 + r) * xr.kpad;
  // dword lane l lies in packing run l/4, whose group is (32 * run) / G within the chunk
  const int shift = G == 32 ? 2 : G == 64 ? 3 : 4;  // lane -> group offset: l >> shift
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i gidx = _mm512_srli_epi32(lane, unsigned(shift));
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 facc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NB; ++c) facc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += kChunk4) {
    const int64_t here = std::min<int64_t>(kChunk4, k - i);  // 32, 64, 96 or 128 codes
    const __mmask64 bmask = _bzhi_u64(~0ULL, unsigned(here / 2));
    const int64_t g0 = i / G, ng = std::max<int64_t>(1, here / G);
    const __mmask8 smask = __mmask8(_bzhi_u32(~0u, unsigned(ng)));
    __m512i lo[NB], hi[NB];
    __m512 sv[NB];
    for (int c = 0; c < NB; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wr[c] + i / 2) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i b = here == kChunk4 ? _mm512_loadu_si512(wr[c] + i / 2)
                                        : _mm512_maskz_loadu_epi8(bmask, wr[c] + i / 2);
      lo[c] = _mm512_and_si512(b, nib);
      hi[c] = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
      const __m128i raw = _mm_maskz_loadu_epi16(smask, w.scale_bf + (n0 + c) * groups + g0);
      const __m512 s4 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_castsi128_si256(raw)), 16));
      sv[c] = _mm512_permutexvar_ps(gidx, s4);
    }
    for (int r = 0; r < MB; ++r) {
      const __m512i xlo = _mm512_loadu_si512(xq[r] + i), xhi = _mm512_loadu_si512(xq[r] + i + 64);
      for (int c = 0; c < NB; ++c) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[c], xlo), hi[c], xhi);
        facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv[c], facc[r][c]);
      }
    }
  }
  // zero points: corr[r][c] = sum_g s[c,g] * z[c,g] * gsum[r,g]
  for (int c = 0; c < NB; ++c) {
    const BF16* sp = w.scale_bf + (n0 + c) * groups;
    const uint8_t* zp = w.zeros + (n0 + c) * groups;
    __m512 corr[MB];
    for (int r = 0; r < MB; ++r) corr[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 mk = __mmask16(_bzhi_u32(~0u, unsigned(std::min<int64_t>(16, groups - g))));
      const __m512 s = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, sp + g)), 16));
      const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, zp + g)));
      const __m512 sz = _mm512_mul_ps(s, z);
      for (int r = 0; r < MB; ++r) {
        const __m512 gs = _mm512_maskz_loadu_ps(mk, xr.gsum.data() + (row0 + r) * groups + g);
        corr[r] = _mm512_fmadd_ps(sz, gs, corr[r]);
      }
    }
    const float b = bias ? bias[n0 + c] : 0.0f;
    for (int r = 0; r < MB; ++r) {
      const int64_t row = row0 + r;
      const float dot = _mm512_reduce_add_ps(facc[r][c]) - _mm512_reduce_add_ps(corr[r]);
      y[row * w.n + n0 + c] = dot * xr.scale[size_t(row)] + b;
    }
  }
}

template <int MB, int NB>
inline void tile_vnni(int fmt, const QuantizedRows& xr, int64_t row0, const QuantWeightView& w,
                      int64_t n0, const float* bias, float* y) {
  if (fmt == kQuantInt8)
    int8_tile_vnni<MB, NB>(xr, row0, w, n0, bias, y);
  else
    int4_tile_vnni<MB, NB>(xr, row0, w, n0, bias, y);
}

// All rows against NB channels at n0.
template <int NB>
void rows_vnni(int fmt, const QuantizedRows& xr, const QuantWeightView& w, int64_t n0,
               const float* bias, float* y) {
  int64_t r = 0;
  for (; r + 4 <= xr.m; r += 4) tile_vnni<4, NB>(fmt, xr, r, w, n0, bias, y);
  switch (xr.m - r) {
    case 3: tile_vnni<3, NB>(fmt, xr, r, w, n0, bias, y); break;
    case 2: tile_vnni<2, NB>(fmt, xr, r, w, n0, bias, y); break;
    case 1: tile_vnni<1, NB>(fmt, xr, r, w, n0, bias, y); break;
    default: break;
  }
}

void channels_vnni(int fmt, const QuantizedRows& xr, const QuantWeightView& w, int64_t n_begin,
                   int64_t n_end, const float* bias, float* y) {
  int64_t n0 = n_begin;
  for (; n0 + 4 <= n_end; n0 += 4) rows_vnni<4>(fmt, xr, w, n0, bias, y);
  for (; n0 < n_end; ++n0) rows_vnni<1>(fmt, xr, w, n0, bias, y);
}

#pragma GCC pop_options
#endif  // x86

// x with each row replaced by its int8 approximation xq * xs (the fallback's input).
at::Tensor fake_quantize_rows(const at::Tensor& xf) {
  const int64_t m = xf.size(0), k = xf.size(1);
  const QuantizedRows r = quantize_rows(ptr<const float>(xf), m, k, std::max<int64_t>(k, 1), false);
  at::Tensor out = at::empty({m, k}, xf.options());
  float* o = ptr<float>(out);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) o[i * k + j] = float(r.q[size_t(i * r.kpad + j)]) * r.scale[size_t(i)];
  return out;
}

at::Tensor quant_linear_dynamic(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros,
                                const std::optional<at::Tensor>& bias, int64_t fmt, int64_t block) {
  TORCH_CHECK(fmt == kQuantInt8 || fmt == kQuantInt4,
              "quant_linear_dynamic: fmt must be 0 (int8) or 1 (int4); nf4 has no integer path");
  check_cpu_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 2, "quant_linear_dynamic: x must be 2-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "quant_linear_dynamic: x must be float32, bfloat16 or float16");
  at::Tensor xf = (x.scalar_type() == at::kFloat ? x : x.to(at::kFloat)).contiguous();
#ifdef MG_HAVE_VNNI_KERNEL
  const bool use_vnni = cpu_has_avx512_vnni() && active_isa() == Isa::AVX512;
#else
  const bool use_vnni = false;
#endif
  if (!use_vnni) {
    at::Tensor y = quant_linear_float(fake_quantize_rows(xf), qweight, scales, zeros, bias, fmt, block);
    return y.to(x.scalar_type());
  }
#ifdef MG_HAVE_VNNI_KERNEL
  // The float op checks every argument; run it on an empty batch to reuse those checks.
  quant_linear_float(xf.narrow(0, 0, 0), qweight, scales, zeros, bias, fmt, block);
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  at::Tensor yf = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return yf.to(x.scalar_type());
  if (k == 0) {
    yf.zero_();
    if (bias.has_value() && bias->defined()) yf.add_(bias->to(at::kFloat));
    return yf.to(x.scalar_type());
  }
  QuantWeightView w{qweight.data_ptr(), nullptr, nullptr, nullptr, n, k, block};
  if (fmt == kQuantInt8) {
    w.scale_f = ptr<const float>(scales);
  } else {
    w.scale_bf = ptr<const BF16>(scales);
    w.zeros = ptr<const uint8_t>(*zeros);
  }
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = bias->to(at::kFloat).contiguous();
  const float* bp = bias_f.defined() ? ptr<const float>(bias_f) : nullptr;
  const QuantizedRows xr =
      quantize_rows_avx512(ptr<const float>(xf), m, k, fmt == kQuantInt8 ? k : block,
                    fmt == kQuantInt4);
  float* yp = ptr<float>(yf);
  const int64_t groups4 = (n + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, groups4 / (4 * at::get_num_threads())));
  at::parallel_for(0, groups4, grain, [&](int64_t b, int64_t e) {
    channels_vnni(int(fmt), xr, w, b * 4, std::min(e * 4, n), bp, yp);
  });
  return x.scalar_type() == at::kFloat ? yf : yf.to(x.scalar_type());
#else
  return at::Tensor();
#endif
}

bool dynamic_int8_native() {
#ifdef MG_HAVE_VNNI_KERNEL
  return cpu_has_avx512_vnni() && active_isa() == Isa::AVX512;
#else
  return false;
#endif
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def("quant_linear_dynamic(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int fmt, int block) -> Tensor");
  m.def("quant_dynamic_native() -> bool", &minigpt::cpu::dynamic_int8_native);
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) { m.impl("quant_linear_dynamic", &minigpt::cpu::quant_linear_dynamic); }
