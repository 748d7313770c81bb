// csrc/cpu/gemv_kernel.h -- y = x W^T (+ b) for a few rows of x: the decode-time linear layer.
//
// At batch 1 a transformer's linear layers are matrix-VECTOR products: every weight
// is read once per token and used for a single multiply-add, so the speed limit is
// memory bandwidth, not arithmetic. These kernels therefore do one thing well: stream
// each weight row through the cache exactly once. For a block of 4 output rows
// (4 independent accumulators hide the FMA latency) they loop over the M input rows
// while the 4 weight rows sit in L1, so M > 1 (beams, a small batch) costs extra
// arithmetic but no extra memory traffic.
//
//   gemv_rows<T, O>   any ISA (Vec): loads widen to float32, fmadd, float32 sums.
//   gemv_rows_bf16dp  AVX512-BF16 only: `vdpbf16ps` multiplies 32 bf16 pairs per
//                     instruction with exact products and float32 accumulation, and
//                     reads bf16 weights without widening them first.
//
// Layout: x (M, K) and W (N, K) row-major (nn.Linear's layout), y (M, ldy) of type O
// (T, or float32 for logits), bias (N,) of type T or null. One call computes output
// columns [n0, n1), so threads split N.

// Weight rows are short (K elements, often ~1 KB), so each 4-row block is only a few
// hardware-prefetch streams long; asking for the block kPrefetchBlocks ahead keeps
// DRAM busy across block boundaries. A prefetch never faults, even past the end.
constexpr int64_t kPrefetchBlocks = 2;
// (The address is formed as an integer: it may lie past the weights' allocation.)
template <typename T>
inline void gemv_prefetch(const T* base, int64_t offset) {
#if defined(MG_ISA_AVX512) || defined(MG_ISA_AVX2)
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base) + uintptr_t(offset) * sizeof(T);
  _mm_prefetch(reinterpret_cast<const char*>(addr), _MM_HINT_T0);
#else
  (void)base, (void)offset;
#endif
}

// Sum of the 4 accumulators of one output row, plus bias, rounded to O once.
template <typename T, typename O>
inline void gemv_store(float s, const T* bias, int64_t n, O* out) {
  if (bias) s += to_f32(bias[n]);
  *out = from_f32<O>(s);
}

template <typename T, typename O>
void gemv_rows(const T* x, int64_t M, int64_t K, const T* W, const T* bias, O* y, int64_t ldy,
               int64_t n0, int64_t n1) {
  constexpr int R = 4;  // output rows per block
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const T* w0 = W + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const T* xr = x + m * K;
      Vec acc[R] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
      int64_t k = 0;
      for (; k + Vec::N <= K; k += Vec::N) {
        const Vec xv = Vec::load(xr + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          if (m == 0) gemv_prefetch(w0, (kPrefetchBlocks * R + r) * K + k);
          acc[r] = fmadd(Vec::load(w0 + r * K + k), xv, acc[r]);
        }
      }
      if (k < K) {
        const int left = int(K - k);
        const Vec xv = Vec::load_partial(xr + k, left);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          acc[r] = fmadd(Vec::load_partial(w0 + r * K + k, left), xv, acc[r]);
      }
      for (int r = 0; r < R; ++r) gemv_store(acc[r].reduce_add(), bias, n + r, y + m * ldy + n + r);
    }
  }
  for (; n < n1; ++n) {  // the last < 4 rows, one at a time
    const T* wr = W + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const T* xr = x + m * K;
      Vec acc = Vec::zero();
      int64_t k = 0;
      for (; k + Vec::N <= K; k += Vec::N) acc = fmadd(Vec::load(wr + k), Vec::load(xr + k), acc);
      if (k < K) {
        const int left = int(K - k);
        acc = fmadd(Vec::load_partial(wr + k, left), Vec::load_partial(xr + k, left), acc);
      }
      gemv_store(acc.reduce_add(), bias, n, y + m * ldy + n);
    }
  }
}

#if defined(MG_ISA_AVX512)
#define MG_GEMV_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,bmi2")))

// 32 bf16 values from p (only the first `left` when left < 32; the rest read as 0).
MG_GEMV_BF16_TARGET inline __m512bh gemv_load_bf16(const BF16* p, int left) {
  if (left >= 32) return (__m512bh)_mm512_loadu_si512(p);
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);
}

// The bf16 x bf16 -> float32 GEMV on vdpbf16ps (only called when the CPU has AVX512_BF16).
// Each float32 lane accumulates the two products of one bf16 pair, so a row's sum is
// exact products added in float32, in a different order than the Vec kernel.
template <typename O>
MG_GEMV_BF16_TARGET void gemv_rows_bf16dp(const BF16* x, int64_t M, int64_t K, const BF16* W,
                                          const BF16* bias, O* y, int64_t ldy, int64_t n0,
                                          int64_t n1) {
  constexpr int R = 4;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const BF16* w0 = W + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const BF16* xr = x + m * K;
      __m512 acc[R] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                       _mm512_setzero_ps()};
      for (int64_t k = 0; k < K; k += 32) {
        const int left = int(K - k);
        const __m512bh xv = gemv_load_bf16(xr + k, left);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          if (m == 0) gemv_prefetch(w0, (kPrefetchBlocks * R + r) * K + k);
          acc[r] = _mm512_dpbf16_ps(acc[r], gemv_load_bf16(w0 + r * K + k, left), xv);
        }
      }
      for (int r = 0; r < R; ++r)
        gemv_store(_mm512_reduce_add_ps(acc[r]), bias, n + r, y + m * ldy + n + r);
    }
  }
  for (; n < n1; ++n) {
    const BF16* wr = W + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const BF16* xr = x + m * K;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        const int left = int(K - k);
        acc = _mm512_dpbf16_ps(acc, gemv_load_bf16(wr + k, left), gemv_load_bf16(xr + k, left));
      }
      gemv_store(_mm512_reduce_add_ps(acc), bias, n, y + m * ldy + n);
    }
  }
}
#endif
