// csrc/cpu/attention_kernel.h -- flash attention (forward, backward, decode), written
// once against Vec.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose).
// Threading, argument checks and buffer allocation live in attention.cpp; here are
//
//   * two register-blocked micro-kernels on float32 tiles:
//       qk_tile:  S  = A  @ Bt        (A: rows x dp, Bt: dp x 64 keys, "transposed" keys)
//       pv_tile:  C += P  @ B         (P: rows x inner, read with arbitrary strides, so
//                                      P^T @ B is the same kernel)
//   * packing (convert to float32, pad the head dim, optionally transpose),
//   * attn_fwd_block: one (sequence, head, query block) with the online softmax,
//   * attn_bwd_kv_head: one (sequence, kv head) of the backward pass,
//   * attn_decode_kv_head: one (sequence, kv head) of decoding (all query heads that
//     share the kv head at once, so grouped-query attention reads the cache once).
//
// No std:: templates are instantiated here: this text is compiled with different
// `#pragma GCC target` settings and shared inline instantiations could leak
// AVX-512 code into paths meant for older CPUs.

constexpr float kNegInf = -__builtin_inff();

inline int64_t mg_min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t mg_max(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- micro-kernel 1: S[MR x NV vectors] = A[MR x dp] @ Bt[dp x NV vectors] ---------
// The keys are packed transposed (Bt[dd * ldb + j]) so each step broadcasts one
// query element and multiplies NV vectors of keys: MR * NV accumulators stay in
// registers for the whole head-dim loop.
template <int MR, int NV>
inline void qk_tile(const float* A, int64_t lda, const float* Bt, int64_t ldb, int64_t dp,
                    float* C, int64_t ldc) {
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec::zero();
  for (int64_t dd = 0; dd < dp; ++dd) {
    const float* b = Bt + dd * ldb;
    Vec bv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) bv[c] = Vec::load(b + c * Vec::N);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      Vec a = Vec::set1(A[r * lda + dd]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = fmadd(a, bv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c].store(C + r * ldc + c * Vec::N);
}

// Rows per register tile: 6 x 4 accumulators + 4 operand vectors fit AVX-512's 32
// registers; AVX2 has 16, so 2 x 4 + 4.
constexpr int kTileRows = Vec::N == 8 ? 2 : 6;

template <int NV>
inline void qk_rows(const float* A, int64_t lda, const float* Bt, int64_t ldb, int64_t dp, int64_t rows,
                    float* S, int64_t lds) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    qk_tile<kTileRows, NV>(A + r * lda, lda, Bt, ldb, dp, S + r * lds, lds);
  switch (rows - r) {
    case 5: qk_tile<5, NV>(A + r * lda, lda, Bt, ldb, dp, S + r * lds, lds); break;
    case 4: qk_tile<4, NV>(A + r * lda, lda, Bt, ldb, dp, S + r * lds, lds); break;
    case 3: qk_tile<3, NV>(A + r * lda, lda, Bt, ldb, dp, S + r * lds, lds); break;
    case 2: qk_tile<2, NV>(A + r * lda, lda, Bt, ldb, dp, S + r * lds, lds); break;
    case 1: qk_tile<1, NV>(A + r * lda, lda, Bt, ldb, dp, S + r * lds, lds); break;
    default: break;
  }
}

// S[rows x (c_begin..c_end)] = A[rows x dp] @ Bt[dp x (c_begin..c_end)]; the column range
// is a multiple of 16 (a whole number of vectors for every ISA), 64 columns by default.
inline void qk_block(const float* A, int64_t lda, const float* Bt, int64_t ldb, int64_t dp,
                     int64_t rows, float* S, int64_t lds, int64_t c_begin = 0,
                     int64_t c_end = kAttnBlockK) {
  for (int64_t j0 = c_begin; j0 < c_end; j0 += 4 * Vec::N) {
    switch (mg_min(4, (c_end - j0) / Vec::N)) {
      case 4: qk_rows<4>(A, lda, Bt + j0, ldb, dp, rows, S + j0, lds); break;
      case 3: qk_rows<3>(A, lda, Bt + j0, ldb, dp, rows, S + j0, lds); break;
      case 2: qk_rows<2>(A, lda, Bt + j0, ldb, dp, rows, S + j0, lds); break;
      default: qk_rows<1>(A, lda, Bt + j0, ldb, dp, rows, S + j0, lds); break;
    }
  }
}

// Tiles that cross a mask edge are done in groups of 16 rows, each computing only the
// 16-column stripes [c_begin, c_end) that some row of the group can see: on the causal
// diagonal that skips almost half the work. Columns left out are masked by the caller.
constexpr int64_t kEdgeRows = 16;
inline int64_t floor16(int64_t x) { return mg_max(0, mg_min(64, x)) / 16 * 16; }
inline int64_t ceil16(int64_t x) { return (mg_max(0, mg_min(64, x)) + 15) / 16 * 16; }

// ---- micro-kernel 2: C[MR x NV vectors] += P[MR x inner] @ B[inner x NV vectors] ---
// P(r, k) is read at P[r * ps_r + k * ps_k]: (ps_r, ps_k) = (ld, 1) gives P @ B and
// (1, ld) gives P^T @ B, which the backward pass needs for dK and dV.
template <int MR, int NV>
inline void pv_tile(float* C, int64_t ldc, const float* P, int64_t ps_r, int64_t ps_k,
                    int64_t inner, const float* B, int64_t ldb) {
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec::load(C + r * ldc + c * Vec::N);
  for (int64_t k = 0; k < inner; ++k) {
    const float* b = B + k * ldb;
    Vec bv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) bv[c] = Vec::load(b + c * Vec::N);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      Vec p = Vec::set1(P[r * ps_r + k * ps_k]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = fmadd(p, bv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c].store(C + r * ldc + c * Vec::N);
}

template <int NV>
inline void pv_rows(float* C, int64_t ldc, const float* P, int64_t ps_r, int64_t ps_k,
                    int64_t rows, int64_t inner, const float* B, int64_t ldb) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    pv_tile<kTileRows, NV>(C + r * ldc, ldc, P + r * ps_r, ps_r, ps_k, inner, B, ldb);
  switch (rows - r) {
    case 5: pv_tile<5, NV>(C + r * ldc, ldc, P + r * ps_r, ps_r, ps_k, inner, B, ldb); break;
    case 4: pv_tile<4, NV>(C + r * ldc, ldc, P + r * ps_r, ps_r, ps_k, inner, B, ldb); break;
    case 3: pv_tile<3, NV>(C + r * ldc, ldc, P + r * ps_r, ps_r, ps_k, inner, B, ldb); break;
    case 2: pv_tile<2, NV>(C + r * ldc, ldc, P + r * ps_r, ps_r, ps_k, inner, B, ldb); break;
    case 1: pv_tile<1, NV>(C + r * ldc, ldc, P + r * ps_r, ps_r, ps_k, inner, B, ldb); break;
    default: break;
  }
}

// C[rows x dp] += P[rows x inner] @ B[inner x dp]; dp is a multiple of Vec::N.
inline void pv_block(float* C, int64_t ldc, const float* P, int64_t ps_r, int64_t ps_k,
                     int64_t rows, int64_t inner, const float* B, int64_t ldb, int64_t dp) {
  if (rows <= 0 || inner <= 0) return;
  for (int64_t c0 = 0; c0 < dp; c0 += 4 * Vec::N) {
    const int64_t nv = mg_min(4, (dp - c0) / Vec::N);
    switch (nv) {
      case 4: pv_rows<4>(C + c0, ldc, P, ps_r, ps_k, rows, inner, B + c0, ldb); break;
      case 3: pv_rows<3>(C + c0, ldc, P, ps_r, ps_k, rows, inner, B + c0, ldb); break;
      case 2: pv_rows<2>(C + c0, ldc, P, ps_r, ps_k, rows, inner, B + c0, ldb); break;
      default: pv_rows<1>(C + c0, ldc, P, ps_r, ps_k, rows, inner, B + c0, ldb); break;
    }
  }
}

// ---- packing -------------------------------------------------------------------------

// Rows of q/k/v/out are (heads * head_dim) elements apart, often a page or more, so
// the hardware prefetcher does not follow them: packers ask for rows a few ahead.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// The same for output rows about to be written (fresh memory: the write would otherwise
// wait for each line); `rows` rows of `bytes` bytes, `stride` elements apart.
template <typename T>
inline void prefetch_rows_for_write(T* p, int64_t rows, int64_t stride, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r) {
    char* c = reinterpret_cast<char*>(p + r * stride);
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 1);
  }
}

// dst[j * dp + dd] = scale * src[j * stride + dd] as float32, zero for d <= dd < dp.
template <typename T>
void attn_pack_rows(const T* src, int64_t stride, int64_t n, int64_t d, int64_t dp, float scale,
                    float* dst) {
  const int64_t dv = d - d % Vec::N;
  const Vec s = Vec::set1(scale);
  for (int64_t j = 0; j < n; ++j) {
    const T* x = src + j * stride;
    float* y = dst + j * dp;
    if (j + 8 < n) prefetch_row(x + 8 * stride, d * int64_t(sizeof(T)));
    int64_t dd = 0;
    for (; dd < dv; dd += Vec::N) (Vec::load(x + dd) * s).store(y + dd);
    if (dd < d) (Vec::load_partial(x + dd, int(d - dd)) * s).store(y + dd);  // zero-filled tail
    for (dd = dv + (d > dv ? Vec::N : 0); dd < dp; ++dd) y[dd] = 0.0f;
  }
}

#if defined(MG_ISA_AVX512)
// In-register transpose of a 16 x 16 block of 32-bit elements: r[i] lane c -> r[c] lane i.
// Works on any 32-bit data (floats, pairs of bf16): the shuffles only move bits.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // pairs of rows, interleaved per 128-bit lane
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // r[4i + e], lane L: rows 4i..4i+3 of column 4L + e
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), e = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {  // gather the four 128-bit lanes of column 4L + e
    const __m512 a = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88), b = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88),
                 f = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xDD);
    t[e] = _mm512_shuffle_f32x4(a, c, 0x88);
    t[8 + e] = _mm512_shuffle_f32x4(a, c, 0xDD);
    t[4 + e] = _mm512_shuffle_f32x4(b, f, 0x88);
    t[12 + e] = _mm512_shuffle_f32x4(b, f, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// dst[dd * ld + j] = src[j * stride + dd] as float32 (keys become columns), zero rows
// for d <= dd < dp. Done once per call, so its cost is linear in the sequence length.
template <typename T>
void attn_pack_transposed(const T* src, int64_t stride, int64_t n, int64_t d, int64_t dp,
                          float* dst, int64_t ld) {
#if defined(MG_ISA_AVX512)
  // 16 keys x 16 head dims per step, transposed in registers (zero past d and n)
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int m = int(mg_min(16, n - j0));
    for (int64_t j = j0 + 16; j < mg_min(n, j0 + 32); ++j) prefetch_row(src + j * stride, d * int64_t(sizeof(T)));
    for (int64_t c0 = 0; c0 < dp; c0 += 16) {
      const int cols = int(mg_max(0, mg_min(16, d - c0)));
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < m ? Vec::load_partial(src + (j0 + i) * stride + c0, cols).r : _mm512_setzero_ps();
      transpose16x16(r);
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) Vec(r[c]).store_partial(dst + (c0 + c) * ld + j0, m);
    }
  }
#else
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t j1 = mg_min(n, j0 + 16);
    for (int64_t dd = 0; dd < d; ++dd)
      for (int64_t j = j0; j < j1; ++j) dst[dd * ld + j] = to_f32(src[j * stride + dd]);
  }
  for (int64_t dd = d; dd < dp; ++dd)
    for (int64_t j = 0; j < n; ++j) dst[dd * ld + j] = 0.0f;
#endif
}

// ---- shared softmax pieces ----------------------------------------------------------

// Overwrite S[j] with -inf outside [lo, hi) for j in [0, 64).
inline void mask_outside(float* S, int64_t lo, int64_t hi) {
  lo = mg_max(0, mg_min(lo, kAttnBlockK));
  hi = mg_max(lo, mg_min(hi, kAttnBlockK));
  for (int64_t j = 0; j < lo; ++j) S[j] = kNegInf;
  for (int64_t j = hi; j < kAttnBlockK; ++j) S[j] = kNegInf;
}

inline float row_max64(const float* S) {
  Vec m = Vec::load(S);
  for (int j = Vec::N; j < kAttnBlockK; j += Vec::N) m = vmax(m, Vec::load(S + j));
  return m.reduce_max();
}

// S[j] = exp(S[j] - sub) in place; returns the sum.
inline float exp_row64(float* S, float sub) {
  const Vec vs = Vec::set1(sub);
  Vec sum = Vec::zero();
  for (int j = 0; j < kAttnBlockK; j += Vec::N) {
    Vec p = vexp(Vec::load(S + j) - vs);
    p.store(S + j);
    sum = sum + p;
  }
  return sum.reduce_add();
}

inline void scale_row(float* x, int64_t dp, float s) {
  const Vec vs = Vec::set1(s);
  for (int64_t i = 0; i < dp; i += Vec::N) (Vec::load(x + i) * vs).store(x + i);
}

// Online softmax update of `rows` score rows S (already masked) against running
// max m, sum l and output accumulator O; leaves the probabilities in S.
inline void online_softmax(float* S, int64_t rows, float* m, float* l, float* O, int64_t dp) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * kAttnBlockK;
    const float mx = row_max64(s);
    if (mx == kNegInf) {  // nothing visible in this block for this row
      for (int j = 0; j < kAttnBlockK; ++j) s[j] = 0.0f;
      continue;
    }
    const float m_new = m[i] > mx ? m[i] : mx;
    const float alpha = __builtin_expf(m[i] - m_new);  // 0 when m[i] == -inf
    const float sum = exp_row64(s, m_new);
    if (alpha != 1.0f) {
      scale_row(O + i * dp, dp, alpha);
      l[i] *= alpha;
    }
    l[i] += sum;
    m[i] = m_new;
  }
}

// out row = O / l (or zeros if the row saw no key); lse = m + log(l) (or -inf).
template <typename T>
inline void finish_row(const float* O, float m, float l, int64_t d, T* out, float* lse) {
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  const Vec vinv = Vec::set1(inv);
  int64_t dd = 0;
  for (; dd + Vec::N <= d; dd += Vec::N) (Vec::load(O + dd) * vinv).store(out + dd);
  if (dd < d) (Vec::load(O + dd) * vinv).store_partial(out + dd, int(d - dd));
  if (lse) *lse = l > 0.0f ? m + __builtin_logf(l) : kNegInf;
}

// ---- forward: one (sequence, query head, query block) ----------------------------------
//
// q_tok0: first query token (global row) of the block, rows: block height,
// i0: index of the block's first query inside its sequence.
// kt: this kv head's transposed keys, column k_start = the sequence's first key.
// vp: this kv head's packed values (row-major, dp columns).
// work: 2 * kAttnBlockQ * dp + kAttnBlockQ * kAttnBlockK + 2 * kAttnBlockQ floats.
template <typename T>
void attn_fwd_block(const AttnShape& sh, const T* q, int64_t q_stride, T* out, int64_t o_stride,
                    float* lse, int64_t lse_stride, int64_t rows, int64_t i0, int64_t q_len,
                    const float* kt, int64_t kt_ld, const float* vp, int64_t k_len, float* work) {
  const int64_t dp = sh.dp;
  float* Q = work;
  float* O = Q + kAttnBlockQ * dp;
  float* S = O + kAttnBlockQ * dp;
  float* m = S + kAttnBlockQ * kAttnBlockK;
  float* l = m + kAttnBlockQ;
  attn_pack_rows(q, q_stride, rows, sh.d, dp, sh.scale, Q);
  prefetch_rows_for_write(out, rows, o_stride, sh.d * int64_t(sizeof(T)));
  for (int64_t i = 0; i < rows * dp; ++i) O[i] = 0.0f;
  for (int64_t i = 0; i < rows; ++i) {
    m[i] = kNegInf;
    l[i] = 0.0f;
  }
  const int64_t shift = k_len - q_len;  // bottom-right alignment
  int64_t lo_first, hi_first, lo_last, hi_last;
  attn_visible_keys(sh, i0 + shift, k_len, &lo_first, &hi_first);
  attn_visible_keys(sh, i0 + rows - 1 + shift, k_len, &lo_last, &hi_last);
  const int64_t k_begin = lo_first, k_end = hi_last;  // both bounds grow with the row
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kAttnBlockK) {
    const int64_t n = mg_min(kAttnBlockK, k_end - k0);
    const bool full = n == kAttnBlockK && k0 >= lo_last && k0 + n <= hi_first;
    if (full) {  // every row sees every key: no mask
      qk_block(Q, dp, kt + k0, kt_ld, dp, rows, S, kAttnBlockK);
      online_softmax(S, rows, m, l, O, dp);
      pv_block(O, dp, S, kAttnBlockK, 1, rows, n, vp + k0 * dp, dp, dp);
      continue;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kEdgeRows) {  // mask edge: visible stripes only
      const int64_t rr = mg_min(kEdgeRows, rows - r0);
      int64_t lo, hi, lo2, hi2;  // keys seen by the group's first and last row
      attn_visible_keys(sh, i0 + r0 + shift, k_len, &lo, &hi);
      attn_visible_keys(sh, i0 + r0 + rr - 1 + shift, k_len, &lo2, &hi2);
      const int64_t cb = floor16(lo - k0), ce = ceil16(mg_min(hi2, k0 + n) - k0);
      float* Sr = S + r0 * kAttnBlockK;
      if (ce > cb) qk_block(Q + r0 * dp, dp, kt + k0, kt_ld, dp, rr, Sr, kAttnBlockK, cb, ce);
      for (int64_t i = 0; i < rr; ++i) {  // also overwrites the stale columns outside [cb, ce)
        attn_visible_keys(sh, i0 + r0 + i + shift, k_len, &lo, &hi);
        mask_outside(Sr + i * kAttnBlockK, lo - k0, mg_min(hi, k0 + n) - k0);
      }
      online_softmax(Sr, rr, m + r0, l + r0, O + r0 * dp, dp);
      const int64_t ce_n = mg_min(ce, n);
      if (ce_n > cb) pv_block(O + r0 * dp, dp, Sr + cb, kAttnBlockK, 1, rr, ce_n - cb, vp + (k0 + cb) * dp, dp, dp);
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    finish_row(O + i * dp, m[i], l[i], sh.d, out + i * o_stride, lse ? lse + i * lse_stride : nullptr);
}

// ---- backward: one (sequence, kv head), all query heads of its group ------------------
//
// Recomputes P = exp(S - lse) block by block (the (Tq, Tk) matrix is never stored):
//   dV += P^T dO;  dP = dO V^T;  dS = P * (dP - delta);  dQ += dS K * scale;  dK += dS^T (Q * scale)
// with delta = rowsum(dO * O). dK and dV of a key block sum over every query head of
// the group, so no two threads ever write the same gradient row.
//
// q/out/dout/dq point at the group's first query head of the sequence's first token
// (head h of the group is at + h * d); k/dk/dv at the kv head's first key token.
// kt, vt: transposed keys/values of this kv head at the sequence's first key;
// kp: row-packed keys. work: see attn_bwd_work_floats in attention.cpp.
template <typename T>
void attn_bwd_kv_head(const AttnShape& sh, int64_t group, int64_t q_len, int64_t k_len,
                      const T* q, const T* out, const T* dout, const float* lse, int64_t q_stride,
                      int64_t lse_stride, T* dq, T* dk, T* dv, int64_t k_stride, const float* kt,
                      const float* vt, int64_t t_ld, const float* kp, float* work) {
  const int64_t dp = sh.dp, d = sh.d;
  const int64_t nq = group * q_len;
  float* Qs = work;               // [group][q_len][dp]  q * scale
  float* dO = Qs + nq * dp;       // [group][q_len][dp]
  float* dQ = dO + nq * dp;       // [group][q_len][dp]  accumulated dS @ K
  float* L = dQ + nq * dp;        // [group][q_len]      lse (+inf for empty rows)
  float* delta = L + nq;          // [group][q_len]
  float* dK = delta + nq;         // [64][dp]
  float* dV = dK + kAttnBlockK * dp;
  float* P = dV + kAttnBlockK * dp;  // [64][64]
  float* dS = P + kAttnBlockQ * kAttnBlockK;
  float* orow = dS + kAttnBlockQ * kAttnBlockK;  // [dp] scratch
  for (int64_t g = 0; g < group; ++g) {
    attn_pack_rows(q + g * d, q_stride, q_len, d, dp, sh.scale, Qs + g * q_len * dp);
    attn_pack_rows(dout + g * d, q_stride, q_len, d, dp, 1.0f, dO + g * q_len * dp);
    for (int64_t i = 0; i < q_len; ++i) {
      if (i + 8 < q_len) prefetch_row(out + g * d + (i + 8) * q_stride, d * int64_t(sizeof(T)));
      attn_pack_rows(out + g * d + i * q_stride, q_stride, 1, d, dp, 1.0f, orow);
      const float* go = dO + (g * q_len + i) * dp;
      Vec acc = Vec::zero();
      for (int64_t dd = 0; dd < dp; dd += Vec::N) acc = fmadd(Vec::load(go + dd), Vec::load(orow + dd), acc);
      delta[g * q_len + i] = acc.reduce_add();
      const float v = lse[g + i * lse_stride];
      // exp(S - (+inf)) == 0: a row that saw no key gets no gradient
      L[g * q_len + i] = v == kNegInf ? __builtin_inff() : v;
    }
  }
  for (int64_t i = 0; i < nq * dp; ++i) dQ[i] = 0.0f;
  const int64_t shift = k_len - q_len;
  for (int64_t k0 = 0; k0 < k_len; k0 += kAttnBlockK) {
    const int64_t n = mg_min(kAttnBlockK, k_len - k0);
    prefetch_rows_for_write(dk + k0 * k_stride, n, k_stride, d * int64_t(sizeof(T)));
    prefetch_rows_for_write(dv + k0 * k_stride, n, k_stride, d * int64_t(sizeof(T)));
    for (int64_t i = 0; i < kAttnBlockK * dp; ++i) dK[i] = dV[i] = 0.0f;
    for (int64_t i0 = 0; i0 < q_len; i0 += kAttnBlockQ) {
      const int64_t rows = mg_min(kAttnBlockQ, q_len - i0);
      int64_t lo_first, hi_first, lo_last, hi_last;
      attn_visible_keys(sh, i0 + shift, k_len, &lo_first, &hi_first);
      attn_visible_keys(sh, i0 + rows - 1 + shift, k_len, &lo_last, &hi_last);
      if (hi_last <= k0 || lo_first >= k0 + n) continue;  // block pair fully masked
      const bool full = n == kAttnBlockK && k0 >= lo_last && k0 + n <= hi_first;
      for (int64_t g = 0; g < group; ++g) {
        const float* Qg = Qs + (g * q_len + i0) * dp;
        const float* dOg = dO + (g * q_len + i0) * dp;
        const float* Lg = L + g * q_len + i0;
        const float* Dg = delta + g * q_len + i0;
        // full block: one pass over all rows and keys; on a mask edge, groups of 16 query
        // rows over the 16-key stripes [cb, ce) some row of the group sees
        for (int64_t r0 = 0; r0 < rows; r0 += (full ? rows : kEdgeRows)) {
          const int64_t rr = full ? rows : mg_min(kEdgeRows, rows - r0);
          int64_t cb = 0, ce = kAttnBlockK;
          if (!full) {
            int64_t lo, hi, lo2, hi2;
            attn_visible_keys(sh, i0 + r0 + shift, k_len, &lo, &hi);
            attn_visible_keys(sh, i0 + r0 + rr - 1 + shift, k_len, &lo2, &hi2);
            cb = floor16(lo - k0), ce = ceil16(mg_min(hi2, k0 + n) - k0);
          }
          const int64_t ce_n = mg_min(ce, n);
          if (ce_n <= cb) continue;  // no row of the group sees a key of this block
          float* Pr = P + r0 * kAttnBlockK;
          float* dSr = dS + r0 * kAttnBlockK;
          qk_block(Qg + r0 * dp, dp, kt + k0, t_ld, dp, rr, Pr, kAttnBlockK, cb, ce);
          for (int64_t i = 0; i < rr; ++i) {
            float* s = Pr + i * kAttnBlockK;
            if (!full) {  // also overwrites the stale columns outside [cb, ce)
              int64_t lo, hi;
              attn_visible_keys(sh, i0 + r0 + i + shift, k_len, &lo, &hi);
              mask_outside(s, lo - k0, mg_min(hi, k0 + n) - k0);
            }
            exp_row64(s, Lg[r0 + i]);
          }
          // dV[j] += sum_i P[i, j] dO[i]
          pv_block(dV + cb * dp, dp, Pr + cb, 1, kAttnBlockK, ce_n - cb, rr, dOg + r0 * dp, dp, dp);
          qk_block(dOg + r0 * dp, dp, vt + k0, t_ld, dp, rr, dSr, kAttnBlockK, cb, ce);
          for (int64_t i = 0; i < rr; ++i) {
            const Vec dl = Vec::set1(Dg[r0 + i]);
            float* ds = dSr + i * kAttnBlockK;
            const float* p = Pr + i * kAttnBlockK;
            for (int64_t j = cb; j < ce; j += Vec::N) (Vec::load(p + j) * (Vec::load(ds + j) - dl)).store(ds + j);
          }
          pv_block(dQ + (g * q_len + i0 + r0) * dp, dp, dSr + cb, kAttnBlockK, 1, rr, ce_n - cb,
                   kp + (k0 + cb) * dp, dp, dp);
          pv_block(dK + cb * dp, dp, dSr + cb, 1, kAttnBlockK, ce_n - cb, rr, Qg + r0 * dp, dp, dp);
        }
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      finish_row<T>(dK + j * dp, 0.0f, 1.0f, d, dk + (k0 + j) * k_stride, nullptr);
      finish_row<T>(dV + j * dp, 0.0f, 1.0f, d, dv + (k0 + j) * k_stride, nullptr);
    }
  }
  // dQ = scale * (dS @ K); finish_row multiplies by 1 / l, so pass l = 1 / scale.
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < q_len; ++i) {
      if (i + 8 < q_len) prefetch_rows_for_write(dq + g * d + (i + 8) * q_stride, 1, 0, d * int64_t(sizeof(T)));
      finish_row<T>(dQ + (g * q_len + i) * dp, 0.0f, 1.0f / sh.scale, d, dq + g * d + i * q_stride,
                    nullptr);
    }
}

// ---- decode: one (sequence, kv head) against its cache ----------------------------------
//
// All group * q_len query rows that share the kv head are processed together, so the
// cache rows are read from memory once. Keys are visited in blocks of 64: the block
// is converted to float32 rows (kc, vc), scores are dot products (the block is read
// from L1 by every query row), then the same online softmax and pv micro-kernel as
// the forward pass. q/out: first query head of the group at the first token; k/v:
// the kv head's row 0 of this sequence's cache. work: see attention.cpp.
template <typename T>
void attn_decode_kv_head(const AttnShape& sh, int64_t group, int64_t q_len, int64_t k_len,
                         const T* q, int64_t q_stride, T* out, const T* k, const T* v,
                         int64_t k_stride, float* work) {
  const int64_t dp = sh.dp, d = sh.d;
  const int64_t rows = group * q_len;  // row r = (g, t) with r = g * q_len + t
  float* Q = work;                     // [rows][dp]
  float* O = Q + rows * dp;            // [rows][dp]
  float* S = O + rows * dp;            // [rows][64]
  float* m = S + rows * kAttnBlockK;
  float* l = m + rows;
  float* kc = l + rows;                // [64][dp]
  float* vc = kc + kAttnBlockK * dp;   // [64][dp]
  for (int64_t g = 0; g < group; ++g)
    attn_pack_rows(q + g * d, q_stride, q_len, d, dp, sh.scale, Q + g * q_len * dp);
  for (int64_t i = 0; i < rows * dp; ++i) O[i] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
  }
  const int64_t shift = k_len - q_len;
  int64_t k_begin = k_len, k_end = 0;
  for (int64_t t = 0; t < q_len; ++t) {
    int64_t lo, hi;
    attn_visible_keys(sh, t + shift, k_len, &lo, &hi);
    if (lo < hi) {
      k_begin = mg_min(k_begin, lo);
      k_end = mg_max(k_end, hi);
    }
  }
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kAttnBlockK) {
    const int64_t n = mg_min(kAttnBlockK, k_end - k0);
    // float32 caches with a whole number of vectors per row are read in place; other
    // dtypes (or padded head dims) are widened into kc / vc first
    const float* kb = kc;
    const float* vb = vc;
    int64_t kld = dp;
    if constexpr (sizeof(T) == sizeof(float)) {
      if (d == dp) {
        kb = reinterpret_cast<const float*>(k + k0 * k_stride);
        vb = reinterpret_cast<const float*>(v + k0 * k_stride);
        kld = k_stride;
      }
    }
    if (kb == kc) {
      attn_pack_rows(k + k0 * k_stride, k_stride, n, d, dp, 1.0f, kc);
      attn_pack_rows(v + k0 * k_stride, k_stride, n, d, dp, 1.0f, vc);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = Q + r * dp;
      float* s = S + r * kAttnBlockK;
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {  // 4 keys at a time: 4 independent FMA chains
        const float* k0p = kb + j * kld;
        Vec a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
        for (int64_t dd = 0; dd < dp; dd += Vec::N) {
          const Vec x = Vec::load(qr + dd);
          a0 = fmadd(x, Vec::load(k0p + dd), a0);
          a1 = fmadd(x, Vec::load(k0p + kld + dd), a1);
          a2 = fmadd(x, Vec::load(k0p + 2 * kld + dd), a2);
          a3 = fmadd(x, Vec::load(k0p + 3 * kld + dd), a3);
        }
        s[j] = a0.reduce_add();
        s[j + 1] = a1.reduce_add();
        s[j + 2] = a2.reduce_add();
        s[j + 3] = a3.reduce_add();
      }
      for (; j < n; ++j) {
        Vec a = Vec::zero();
        for (int64_t dd = 0; dd < dp; dd += Vec::N) a = fmadd(Vec::load(qr + dd), Vec::load(kb + j * kld + dd), a);
        s[j] = a.reduce_add();
      }
      int64_t lo, hi;
      attn_visible_keys(sh, r % q_len + shift, k_len, &lo, &hi);
      mask_outside(s, lo - k0, mg_min(hi, k0 + n) - k0);
    }
    online_softmax(S, rows, m, l, O, dp);
    pv_block(O, dp, S, kAttnBlockK, 1, rows, n, vb, kld, dp);
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t t = 0; t < q_len; ++t) {
      const int64_t r = g * q_len + t;
      finish_row(O + r * dp, m[r], l[r], d, out + g * d + t * q_stride, nullptr);
    }
}

// ---- AVX512-BF16 forward (bf16 inputs) ---------------------------------------------------
//
// `vdpbf16ps` multiplies pairs of bf16 numbers and adds both products to a float32 lane:
// twice the multiply-adds of an fp32 FMA per instruction, with exact products and
// float32 accumulation. Operands are laid out so that each 32-bit lane holds a pair
// along the reduction dimension:
//   scores  S[i, j] = sum_d Q[i, d] K[j, d]: keys pair-transposed, ktp[d/2][j][2]
//   output  O[i, c] += sum_j P[i, j] V[j, c]: values pair-interleaved, vpi[j/2][c][2]
// P is rounded to bf16 before the second product (as GPU flash attention does).
// Only compiled into the AVX-512 variant and only called after a run-time check
// that the CPU has AVX512_BF16 (attention.cpp).
#if defined(MG_ISA_AVX512)
#define MG_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,bmi2")))

template <int MR, int NV>
MG_BF16_TARGET inline void qk_tile_bf16(const uint16_t* A, int64_t lda, const uint16_t* Bp,
                                        int64_t ldbp, int64_t dp, float* C, int64_t ldc) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < dp / 2; ++d2) {
    const uint16_t* b = Bp + d2 * ldbp;
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) bv[c] = (__m512bh)_mm512_loadu_si512(b + 32 * c);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, A + r * lda + 2 * d2, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, bv[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(C + r * ldc + c * 16, acc[r][c]);
}

template <int NV>
MG_BF16_TARGET inline void qk_rows_bf16(const uint16_t* A, int64_t lda, const uint16_t* Bp, int64_t ldbp,
                                        int64_t dp, int64_t rows, float* S) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) qk_tile_bf16<6, NV>(A + r * lda, lda, Bp, ldbp, dp, S + r * kAttnBlockK, kAttnBlockK);
  switch (rows - r) {
    case 5: qk_tile_bf16<5, NV>(A + r * lda, lda, Bp, ldbp, dp, S + r * kAttnBlockK, kAttnBlockK); break;
    case 4: qk_tile_bf16<4, NV>(A + r * lda, lda, Bp, ldbp, dp, S + r * kAttnBlockK, kAttnBlockK); break;
    case 3: qk_tile_bf16<3, NV>(A + r * lda, lda, Bp, ldbp, dp, S + r * kAttnBlockK, kAttnBlockK); break;
    case 2: qk_tile_bf16<2, NV>(A + r * lda, lda, Bp, ldbp, dp, S + r * kAttnBlockK, kAttnBlockK); break;
    case 1: qk_tile_bf16<1, NV>(A + r * lda, lda, Bp, ldbp, dp, S + r * kAttnBlockK, kAttnBlockK); break;
    default: break;
  }
}

// S[rows x ncols] = A[rows x dp] (bf16 rows) @ keys (pair-transposed, ldbp elements per d
// pair); S rows are kAttnBlockK floats apart, ncols is 16, 32, 48 or 64.
MG_BF16_TARGET inline void qk_block_bf16(const uint16_t* A, int64_t lda, const uint16_t* Bp, int64_t ldbp,
                                         int64_t dp, int64_t rows, float* S, int64_t ncols = kAttnBlockK) {
  switch (ncols / 16) {
    case 4: qk_rows_bf16<4>(A, lda, Bp, ldbp, dp, rows, S); break;
    case 3: qk_rows_bf16<3>(A, lda, Bp, ldbp, dp, rows, S); break;
    case 2: qk_rows_bf16<2>(A, lda, Bp, ldbp, dp, rows, S); break;
    case 1: qk_rows_bf16<1>(A, lda, Bp, ldbp, dp, rows, S); break;
    default: break;
  }
}

// C[MR x NV*16] += P[MR x inner] (bf16 rows, zero past `inner`) @ B (pair-interleaved rows)
template <int MR, int NV>
MG_BF16_TARGET inline void pv_tile_bf16(float* C, int64_t ldc, const uint16_t* P, int64_t ldp,
                                        int64_t pairs, const uint16_t* Bp, int64_t ldbp) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_loadu_ps(C + r * ldc + c * 16);
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    const uint16_t* b = Bp + k2 * ldbp;
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) bv[c] = (__m512bh)_mm512_loadu_si512(b + c * 32);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, P + r * ldp + 2 * k2, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, bv[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(C + r * ldc + c * 16, acc[r][c]);
}

template <int NV>
MG_BF16_TARGET inline void pv_rows_bf16(float* C, int64_t ldc, const uint16_t* P, int64_t ldp,
                                        int64_t rows, int64_t pairs, const uint16_t* Bp, int64_t ldbp) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) pv_tile_bf16<6, NV>(C + r * ldc, ldc, P + r * ldp, ldp, pairs, Bp, ldbp);
  switch (rows - r) {
    case 5: pv_tile_bf16<5, NV>(C + r * ldc, ldc, P + r * ldp, ldp, pairs, Bp, ldbp); break;
    case 4: pv_tile_bf16<4, NV>(C + r * ldc, ldc, P + r * ldp, ldp, pairs, Bp, ldbp); break;
    case 3: pv_tile_bf16<3, NV>(C + r * ldc, ldc, P + r * ldp, ldp, pairs, Bp, ldbp); break;
    case 2: pv_tile_bf16<2, NV>(C + r * ldc, ldc, P + r * ldp, ldp, pairs, Bp, ldbp); break;
    case 1: pv_tile_bf16<1, NV>(C + r * ldc, ldc, P + r * ldp, ldp, pairs, Bp, ldbp); break;
    default: break;
  }
}

// C[rows x dp] += P[rows x inner] @ B; B pair-interleaved with 2 * dp elements per key pair.
MG_BF16_TARGET inline void pv_block_bf16(float* C, int64_t ldc, const uint16_t* P, int64_t ldp,
                                         int64_t rows, int64_t inner, const uint16_t* Bp, int64_t dp) {
  if (rows <= 0 || inner <= 0) return;
  const int64_t pairs = (inner + 1) / 2, ldbp = 2 * dp;
  for (int64_t c0 = 0; c0 < dp; c0 += 64) {
    switch (mg_min(4, (dp - c0) / 16)) {
      case 4: pv_rows_bf16<4>(C + c0, ldc, P, ldp, rows, pairs, Bp + 2 * c0, ldbp); break;
      case 3: pv_rows_bf16<3>(C + c0, ldc, P, ldp, rows, pairs, Bp + 2 * c0, ldbp); break;
      case 2: pv_rows_bf16<2>(C + c0, ldc, P, ldp, rows, pairs, Bp + 2 * c0, ldbp); break;
      default: pv_rows_bf16<1>(C + c0, ldc, P, ldp, rows, pairs, Bp + 2 * c0, ldbp); break;
    }
  }
}

// online_softmax for raw (unscaled, masked) scores, fused into one pass per row: the scale
// is applied inside the exponent and the probabilities are written as bf16 rows to Pb
// (the A operand of the P @ V product). The running sum uses the float32 values.
MG_BF16_TARGET inline void online_softmax_bf16(const float* S, int64_t rows, float scale, float* m, float* l,
                                               float* O, int64_t dp, uint16_t* Pb) {
  const Vec vscale = Vec::set1(scale);
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * kAttnBlockK;
    uint16_t* pb = Pb + i * kAttnBlockK;
    const float mx = row_max64(s) * scale;  // scale > 0: the max commutes with it
    if (mx == kNegInf) {  // nothing visible in this block for this row
      for (int j = 0; j < kAttnBlockK; j += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j), _mm256_setzero_si256());
      continue;
    }
    const float m_new = m[i] > mx ? m[i] : mx;
    const float alpha = __builtin_expf(m[i] - m_new);  // 0 when m[i] == -inf
    const Vec neg_m = Vec::set1(-m_new);
    Vec sum = Vec::zero();
    for (int j = 0; j < kAttnBlockK; j += 16) {
      const Vec p = vexp(fmadd(Vec::load(s + j), vscale, neg_m));
      sum = sum + p;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j), (__m256i)_mm512_cvtneps_pbh(p.r));
    }
    if (alpha != 1.0f) {
      scale_row(O + i * dp, dp, alpha);
      l[i] *= alpha;
    }
    l[i] += sum.reduce_add();
    m[i] = m_new;
  }
}

// Forward of one (sequence, query head, query block) for bf16 inputs with AVX512_BF16.
// ktp: this kv head's pair-transposed keys at the sequence's first panel (panels of 64
// keys, [dp/2][64][2] each, contiguous so a tile touches few pages); vpi: pair-interleaved values at the sequence's first key
// (which starts a pair). work: floats as attn_fwd_block, plus bf16 Q and P tiles.
MG_BF16_TARGET void attn_fwd_block_bf16(const AttnShape& sh, const BF16* q, int64_t q_stride, BF16* out,
                                        int64_t o_stride, float* lse, int64_t lse_stride, int64_t rows,
                                        int64_t i0, int64_t q_len, const uint16_t* ktp,
                                        const uint16_t* vpi, int64_t k_len, float* work) {
  const int64_t dp = sh.dp, d = sh.d;
  float* O = work;
  float* S = O + kAttnBlockQ * dp;
  float* m = S + kAttnBlockQ * kAttnBlockK;
  float* l = m + kAttnBlockQ;
  uint16_t* Qb = reinterpret_cast<uint16_t*>(l + kAttnBlockQ);  // [rows][dp]
  uint16_t* Pb = Qb + kAttnBlockQ * dp;                            // [rows][64]
  for (int64_t i = 0; i < rows; ++i) {
    if (i + 8 < rows) prefetch_row(q + (i + 8) * q_stride, 2 * d);
    for (int64_t dd = 0; dd < dp; dd += 16)  // zero past d
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(Qb + i * dp + dd),
                          _mm256_maskz_loadu_epi16(Vec::mask(int(mg_max(0, mg_min(16, d - dd)))), q + i * q_stride + dd));
    m[i] = kNegInf;
    l[i] = 0.0f;
  }
  prefetch_rows_for_write(out, rows, o_stride, 2 * d);
  for (int64_t i = 0; i < rows * dp; ++i) O[i] = 0.0f;
  const int64_t shift = k_len - q_len;
  int64_t lo_first, hi_first, lo_last, hi_last;
  attn_visible_keys(sh, i0 + shift, k_len, &lo_first, &hi_first);
  attn_visible_keys(sh, i0 + rows - 1 + shift, k_len, &lo_last, &hi_last);
  // blocks start on a panel (a window's first block may hold masked keys)
  const int64_t k_begin = lo_first / kAttnBlockK * kAttnBlockK, k_end = hi_last;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kAttnBlockK) {
    const int64_t n = mg_min(kAttnBlockK, k_end - k0);
    const uint16_t* kb = ktp + k0 * dp;  // this block's panel
    const bool full = n == kAttnBlockK && k0 >= lo_last && k0 + n <= hi_first;
    if (full) {
      qk_block_bf16(Qb, dp, kb, 2 * kAttnBlockK, dp, rows, S);
      online_softmax_bf16(S, rows, sh.scale, m, l, O, dp, Pb);
      pv_block_bf16(O, dp, Pb, kAttnBlockK, rows, n, vpi + k0 * dp, dp);
      continue;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kEdgeRows) {
      const int64_t rr = mg_min(kEdgeRows, rows - r0);
      int64_t lo, hi, lo2, hi2;  // keys seen by the group's first and last row
      attn_visible_keys(sh, i0 + r0 + shift, k_len, &lo, &hi);
      attn_visible_keys(sh, i0 + r0 + rr - 1 + shift, k_len, &lo2, &hi2);
      const int64_t cb = floor16(lo - k0), ce = ceil16(mg_min(hi2, k0 + n) - k0);
      if (ce > cb)
        qk_block_bf16(Qb + r0 * dp, dp, kb + 2 * cb, 2 * kAttnBlockK, dp, rr, S + r0 * kAttnBlockK + cb, ce - cb);
      for (int64_t i = r0; i < r0 + rr; ++i) {
        attn_visible_keys(sh, i0 + i + shift, k_len, &lo, &hi);
        mask_outside(S + i * kAttnBlockK, lo - k0, mg_min(hi, k0 + n) - k0);
      }
      online_softmax_bf16(S + r0 * kAttnBlockK, rr, sh.scale, m + r0, l + r0, O + r0 * dp, dp,
                          Pb + r0 * kAttnBlockK);
      if (ce > cb)  // probabilities outside [cb, ce) are 0
        pv_block_bf16(O + r0 * dp, dp, Pb + r0 * kAttnBlockK + cb, kAttnBlockK, rr, mg_min(ce, n) - cb,
                      vpi + (k0 + cb) * dp, dp);
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    finish_row(O + i * dp, m[i], l[i], d, out + i * o_stride, lse ? lse + i * lse_stride : nullptr);
}

// ---- AVX512-BF16 backward -------------------------------------------------------------------
//
// Every product of the backward pass is the same micro-kernel as above, C += A @ B with
// A in bf16 rows (reduction dimension contiguous) and B "pair-interleaved" along the
// reduction dimension. To avoid transposing tiles element by element, one thread owns a
// (sequence, kv head) and works key-major: for a block of 64 keys j and 64 queries i
//   S^T  = K  Q^T     A = key rows,          B = Q  pairs over d  (QTv)
//   dP^T = V  dO^T    A = value rows,        B = dO pairs over d  (dOTv)
//   P^T  = exp(S^T * scale - lse[i]),  dS^T = P^T * (dP^T - delta[i])
//   dV  += P^T dO     A = P^T (bf16),        B = dO pairs over i  (dOpi)
//   dK  += dS^T Q     A = dS^T (bf16),       B = Q  pairs over i  (Qpi)
//   dQ^T += K^T dS^T  A = transposed keys KT, B = dS^T pairs over j (built with vpermt2w)
// so the only transposes are O(T * D) packings per thread, never per tile. dQ is kept
// transposed (dQT[d][i]) in float32 and written out once at the end.

// 16 bf16 of `a` and 16 of `b` -> a0 b0 a1 b1 ... a15 b15 (one vpermt2w).
MG_BF16_TARGET inline __m512i interleave16(__m256i a, __m256i b) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b));
}

// Pairs along the head dim: dst[(d2 * ld + j) * 2 + e] = src[j * stride + 2 * d2 + e] for
// j < n, zero for head dims d..dp (a 32-bit transpose; columns n..ld are left alone).
// 16 tokens x 16 pairs at a time: 16 row loads, a transpose in registers, 16 stores.
MG_BF16_TARGET inline void pack_pairs_over_d(const BF16* src, int64_t stride, int64_t n, int64_t d, int64_t dp,
                                             uint16_t* dst, int64_t ld) {
  const int64_t half = dp / 2;
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int m = int(mg_min(16, n - j0));
    const __mmask16 rows = m == 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1u);
    for (int64_t j = j0 + 16; j < mg_min(n, j0 + 32); ++j) prefetch_row(src + j * stride, 2 * d);
    for (int64_t p0 = 0; p0 < half; p0 += 16) {
      const int64_t cnt = mg_max(0, mg_min(32, d - 2 * p0));  // bf16 elements of this chunk (odd d: last pair (x, 0))
      const __mmask32 elems = cnt == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << cnt) - 1u);
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < m ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(elems, src + (j0 + i) * stride + 2 * p0))
                     : _mm512_setzero_ps();
      transpose16x16(r);
      const int64_t np = mg_min(16, half - p0);
      for (int64_t c = 0; c < np; ++c) _mm512_mask_storeu_epi32(out + (p0 + c) * ld + j0, rows, _mm512_castps_si512(r[c]));
    }
  }
}

// Pairs along the rows: dst[((i / 2) * dp + c) * 2 + (i & 1)] = src[i * stride + c] for
// i < n, zero for columns d..dp and rows n..2 * pairs.
MG_BF16_TARGET inline void pack_pairs_over_rows(const BF16* src, int64_t stride, int64_t n, int64_t d,
                                                int64_t dp, uint16_t* dst, int64_t pairs) {
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t i = 2 * p;
    const uint16_t* a = reinterpret_cast<const uint16_t*>(src + i * stride);
    const uint16_t* b = reinterpret_cast<const uint16_t*>(src + (i + 1) * stride);
    uint16_t* o = dst + p * 2 * dp;
    for (int64_t c = 0; c < dp; c += 16) {
      const int64_t cnt = mg_max(0, mg_min(16, d - c));
      const __mmask16 m = cnt == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1u);
      const __m256i va = i < n ? _mm256_maskz_loadu_epi16(m, a + c) : _mm256_setzero_si256();
      const __m256i vb = i + 1 < n ? _mm256_maskz_loadu_epi16(m, b + c) : _mm256_setzero_si256();
      _mm512_storeu_si512(o + 2 * c, interleave16(va, vb));
    }
  }
}

// One key block against one query block of one query head (see the comment above).
// Kr/Vr: key/value rows at the block's first key (lda elements apart, dp valid),
// QTv/dOTv: the query block's panel ([dp/2][64][2]), Qpi/dOpi at the
// block's first query pair, L/delta at the first query, KT at the block's first key.
struct BwdTileArgs {
  const uint16_t *Kr, *Vr, *QTv, *dOTv, *Qpi, *dOpi, *KT;
  int64_t lda_k, lda_v, q_ld, k_ld;
  const float *L, *delta;
  float* dQT;  // at the block's first query column, q_ld floats per head dim
};

MG_BF16_TARGET inline void bwd_tile_bf16(const AttnShape& sh, const BwdTileArgs& a, int64_t n, int64_t rows_i,
                                         int64_t k0, int64_t i0, int64_t shift, int64_t q_len, bool full,
                                         float* dK, float* dV, float* ST, float* dPT, uint16_t* PTb,
                                         uint16_t* dSTb, uint16_t* dSv) {
  const int64_t dp = sh.dp;
  const Vec vscale = Vec::set1(sh.scale);
  for (int64_t j0 = 0; j0 < n; j0 += (full ? n : kEdgeRows)) {
    const int64_t jr = full ? n : mg_min(kEdgeRows, n - j0);
    int64_t cb = 0, ce = kAttnBlockQ;  // query columns some key of the group sees
    if (!full) {
      int64_t lo, hi, lo2, hi2;
      attn_visible_queries(sh, k0 + j0, shift, q_len, &lo, &hi);
      attn_visible_queries(sh, k0 + j0 + jr - 1, shift, q_len, &lo2, &hi2);
      cb = floor16(lo - i0), ce = ceil16(hi2 - i0);
    }
    if (ce > cb) {
      qk_block_bf16(a.Kr + j0 * a.lda_k, a.lda_k, a.QTv + 2 * cb, 2 * kAttnBlockQ, dp, jr,
                    ST + j0 * kAttnBlockQ + cb, ce - cb);
      qk_block_bf16(a.Vr + j0 * a.lda_v, a.lda_v, a.dOTv + 2 * cb, 2 * kAttnBlockQ, dp, jr,
                    dPT + j0 * kAttnBlockQ + cb, ce - cb);
    }
    for (int64_t j = j0; j < j0 + jr; ++j) {
      float* s = ST + j * kAttnBlockQ;
      float* dp_row = dPT + j * kAttnBlockQ;
      if (!full) {
        int64_t lo, hi;
        attn_visible_queries(sh, k0 + j, shift, q_len, &lo, &hi);
        mask_outside(s, lo - i0, hi - i0);
      }
      for (int c = 0; c < kAttnBlockQ; c += 16) {
        Vec p = Vec::zero(), ds = Vec::zero();  // columns outside [cb, ce) were not computed
        if (c >= cb && c < ce) {
          p = vexp(Vec::load(s + c) * vscale - Vec::load(a.L + c));
          ds = p * (Vec::load(dp_row + c) - Vec::load(a.delta + c));
        }
        ds.store(dp_row + c);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(PTb + j * kAttnBlockQ + c), (__m256i)_mm512_cvtneps_pbh(p.r));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dSTb + j * kAttnBlockQ + c),
                            (__m256i)_mm512_cvtneps_pbh(ds.r));
      }
    }
    const int64_t ie = mg_min(ce, rows_i);  // the products over queries skip zero columns too
    if (ie > cb) {
      pv_block_bf16(dV + j0 * dp, dp, PTb + j0 * kAttnBlockQ + cb, kAttnBlockQ, jr, ie - cb, a.dOpi + cb * dp, dp);
      pv_block_bf16(dK + j0 * dp, dp, dSTb + j0 * kAttnBlockQ + cb, kAttnBlockQ, jr, ie - cb, a.Qpi + cb * dp, dp);
    }
  }
  // dS^T rows (j, j + 1) -> pairs over j for the dQ product; a missing odd row is zero
  for (int64_t j = 0; j < n; j += 2) {
    for (int c = 0; c < kAttnBlockQ; c += 16) {
      const __m256i r0 = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(dPT + j * kAttnBlockQ + c));
      const __m256i r1 = j + 1 < n ? (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(dPT + (j + 1) * kAttnBlockQ + c))
                                   : _mm256_setzero_si256();
      _mm512_storeu_si512(dSv + (j / 2) * 2 * kAttnBlockQ + 2 * c, interleave16(r0, r1));
    }
  }
  if (full) {
    pv_block_bf16(a.dQT, a.q_ld, a.KT, a.k_ld, dp, n, dSv, kAttnBlockQ);
    return;
  }
  // mask edge: each group of 16 keys adds only to the 16-query stripes that see one of them
  for (int64_t kg = 0; kg < n; kg += 16) {
    const int64_t cnt = mg_min(16, n - kg);
    int64_t lo, hi, lo2, hi2;
    attn_visible_queries(sh, k0 + kg, shift, q_len, &lo, &hi);
    attn_visible_queries(sh, k0 + kg + cnt - 1, shift, q_len, &lo2, &hi2);
    const int64_t cs = floor16(lo - i0), ce = ceil16(hi2 - i0);
    float* C = a.dQT + cs;
    const uint16_t* A = a.KT + kg;
    const uint16_t* B = dSv + kg * kAttnBlockQ + 2 * cs;  // pair kg / 2, query cs
    const int64_t pairs = (cnt + 1) / 2;
    switch (ce > cs ? (ce - cs) / 16 : 0) {
      case 4: pv_rows_bf16<4>(C, a.q_ld, A, a.k_ld, dp, pairs, B, 2 * kAttnBlockQ); break;
      case 3: pv_rows_bf16<3>(C, a.q_ld, A, a.k_ld, dp, pairs, B, 2 * kAttnBlockQ); break;
      case 2: pv_rows_bf16<2>(C, a.q_ld, A, a.k_ld, dp, pairs, B, 2 * kAttnBlockQ); break;
      case 1: pv_rows_bf16<1>(C, a.q_ld, A, a.k_ld, dp, pairs, B, 2 * kAttnBlockQ); break;
      default: break;  // no query of the block sees these keys
    }
  }
}

// uint16 elements of workspace attn_bwd_kv_head_bf16 needs beyond its floats (see below).
inline int64_t attn_bwd_bf16_work_floats(int64_t group, int64_t q_len, int64_t k_len, int64_t dp) {
  const int64_t q_ld = (q_len + kAttnBlockQ - 1) / kAttnBlockQ * kAttnBlockQ;
  const int64_t k_ld = (k_len + kAttnBlockK - 1) / kAttnBlockK * kAttnBlockK;
  const int64_t floats = group * dp * q_ld + 2 * group * q_ld + 2 * kAttnBlockK * dp + 2 * kAttnBlockK * kAttnBlockQ +
                         16 * dp;
  const int64_t halves = 4 * group * dp * q_ld + 3 * k_ld * dp + 3 * kAttnBlockK * kAttnBlockQ;
  return floats + (halves + 1) / 2 + 32;
}

// Backward of one (sequence, kv head) for bf16 inputs with AVX512_BF16 (all query heads of
// the group). q/out/dout/dq at the group's first query head of the sequence's first token,
// k/v/dk/dv at the kv head's first key; work: attn_bwd_bf16_work_floats floats.
MG_BF16_TARGET void attn_bwd_kv_head_bf16(const AttnShape& sh, int64_t group, int64_t q_len, int64_t k_len,
                                          const BF16* q, const BF16* out, const BF16* dout, const float* lse,
                                          int64_t q_stride, int64_t lse_stride, BF16* dq, BF16* dk, BF16* dv,
                                          const BF16* k, const BF16* v, int64_t k_stride, float* work) {
  const int64_t dp = sh.dp, d = sh.d;
  const int64_t q_ld = (q_len + kAttnBlockQ - 1) / kAttnBlockQ * kAttnBlockQ;
  const int64_t k_ld = (k_len + kAttnBlockK - 1) / kAttnBlockK * kAttnBlockK;
  float* dQT = work;                          // [group][dp][q_ld]
  float* L = dQT + group * dp * q_ld;         // [group][q_ld]  lse, +inf for empty/padded rows
  float* delta = L + group * q_ld;            // [group][q_ld]
  float* dK = delta + group * q_ld;           // [64][dp]
  float* dV = dK + kAttnBlockK * dp;          // [64][dp]
  float* ST = dV + kAttnBlockK * dp;          // [64][64]
  float* dPT = ST + kAttnBlockK * kAttnBlockQ;  // [64][64]
  float* rowbuf = dPT + kAttnBlockK * kAttnBlockQ;  // [16][dp]
  uint16_t* QTv = reinterpret_cast<uint16_t*>(rowbuf + 16 * dp);  // [group][q_ld/64][dp/2][64][2]
  uint16_t* dOTv = QTv + group * dp * q_ld;
  uint16_t* Qpi = dOTv + group * dp * q_ld;  // [group][q_ld/2][dp][2]
  uint16_t* dOpi = Qpi + group * dp * q_ld;
  uint16_t* KT = dOpi + group * dp * q_ld;   // [dp][k_ld]
  uint16_t* Kp = KT + dp * k_ld;             // [k_ld][dp] (only when d < dp)
  uint16_t* Vp = Kp + k_ld * dp;
  uint16_t* PTb = Vp + k_ld * dp;            // [64][64]
  uint16_t* dSTb = PTb + kAttnBlockK * kAttnBlockQ;
  uint16_t* dSv = dSTb + kAttnBlockK * kAttnBlockQ;  // [32][64][2]
  float* orow = rowbuf;
  float* gorow = rowbuf + dp;
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i0 = 0; i0 < q_ld; i0 += kAttnBlockQ) {  // panels of 64 queries, zero past q_len
      uint16_t* qt = QTv + g * dp * q_ld + i0 * dp;
      uint16_t* dot = dOTv + g * dp * q_ld + i0 * dp;
      const int64_t m = mg_max(0, mg_min(kAttnBlockQ, q_len - i0));
      pack_pairs_over_d(q + g * d + i0 * q_stride, q_stride, m, d, dp, qt, kAttnBlockQ);
      pack_pairs_over_d(dout + g * d + i0 * q_stride, q_stride, m, d, dp, dot, kAttnBlockQ);
      for (int64_t d2 = 0; d2 < dp / 2; ++d2)
        for (int64_t i = 2 * m; i < 2 * kAttnBlockQ; ++i) qt[d2 * 2 * kAttnBlockQ + i] = dot[d2 * 2 * kAttnBlockQ + i] = 0;
    }
    pack_pairs_over_rows(q + g * d, q_stride, q_len, d, dp, Qpi + g * dp * q_ld, q_ld / 2);
    pack_pairs_over_rows(dout + g * d, q_stride, q_len, d, dp, dOpi + g * dp * q_ld, q_ld / 2);
    for (int64_t i = 0; i < q_len; ++i) {
      if (i + 8 < q_len) prefetch_row(out + g * d + (i + 8) * q_stride, 2 * d);
      attn_pack_rows(out + g * d + i * q_stride, q_stride, 1, d, dp, 1.0f, orow);
      attn_pack_rows(dout + g * d + i * q_stride, q_stride, 1, d, dp, 1.0f, gorow);
      Vec acc = Vec::zero();
      for (int64_t dd = 0; dd < dp; dd += 16) acc = fmadd(Vec::load(gorow + dd), Vec::load(orow + dd), acc);
      delta[g * q_ld + i] = acc.reduce_add();
      const float x = lse[g + i * lse_stride];
      L[g * q_ld + i] = x == kNegInf ? __builtin_inff() : x;  // exp(S - inf) == 0: no gradient
    }
    for (int64_t i = q_len; i < q_ld; ++i) {
      delta[g * q_ld + i] = 0.0f;
      L[g * q_ld + i] = __builtin_inff();
    }
  }
  // keys and values as bf16 rows of dp elements (used in place when d == dp), keys transposed
  const uint16_t* Kr = reinterpret_cast<const uint16_t*>(k);
  const uint16_t* Vr = reinterpret_cast<const uint16_t*>(v);
  int64_t lda = k_stride;
  if (d != dp) {
    for (int64_t j = 0; j < k_len; ++j) {
      const uint16_t* ks = reinterpret_cast<const uint16_t*>(k + j * k_stride);
      const uint16_t* vs = reinterpret_cast<const uint16_t*>(v + j * k_stride);
      for (int64_t c = 0; c < dp; ++c) {
        Kp[j * dp + c] = c < d ? ks[c] : 0;
        Vp[j * dp + c] = c < d ? vs[c] : 0;
      }
    }
    Kr = Kp, Vr = Vp, lda = dp;
  }
  for (int64_t j0 = 0; j0 < k_ld; j0 += 16)  // KT[c][j]: 16 x 16 transposes of zero-extended bf16
    for (int64_t c0 = 0; c0 < dp; c0 += 16) {
      const __mmask16 cols = Vec::mask(int(mg_max(0, mg_min(16, d - c0))));
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < k_len ? _mm512_castsi512_ps(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cols, k + (j0 + i) * k_stride + c0)))
                              : _mm512_setzero_ps();
      transpose16x16(r);
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(KT + (c0 + c) * k_ld + j0),
                            _mm512_cvtepi32_epi16(_mm512_castps_si512(r[c])));
    }
  for (int64_t i = 0; i < group * dp * q_ld; ++i) dQT[i] = 0.0f;

  const int64_t shift = k_len - q_len;
  for (int64_t k0 = 0; k0 < k_len; k0 += kAttnBlockK) {
    const int64_t n = mg_min(kAttnBlockK, k_len - k0);
    int64_t lo_first, hi_first, lo_last, hi_last;  // queries that see the first / last key
    attn_visible_queries(sh, k0, shift, q_len, &lo_first, &hi_first);
    attn_visible_queries(sh, k0 + n - 1, shift, q_len, &lo_last, &hi_last);
    const int64_t i_end = lo_first >= hi_last ? 0 : hi_last;  // 0: no query sees this block, dk = dv = 0
    prefetch_rows_for_write(dk + k0 * k_stride, n, k_stride, 2 * d);
    prefetch_rows_for_write(dv + k0 * k_stride, n, k_stride, 2 * d);
    for (int64_t i = 0; i < n * dp; ++i) dK[i] = dV[i] = 0.0f;
    for (int64_t i0 = lo_first / kAttnBlockQ * kAttnBlockQ; i0 < i_end; i0 += kAttnBlockQ) {
      const int64_t rows_i = mg_min(kAttnBlockQ, q_len - i0);
      const bool full = lo_last <= i0 && hi_first >= i0 + rows_i;
      for (int64_t g = 0; g < group; ++g) {
        BwdTileArgs a;
        a.Kr = Kr + k0 * lda, a.Vr = Vr + k0 * lda, a.lda_k = a.lda_v = lda;
        a.QTv = QTv + g * dp * q_ld + i0 * dp, a.dOTv = dOTv + g * dp * q_ld + i0 * dp;
        a.Qpi = Qpi + g * dp * q_ld + i0 * dp, a.dOpi = dOpi + g * dp * q_ld + i0 * dp;
        a.KT = KT + k0, a.q_ld = q_ld, a.k_ld = k_ld;
        a.L = L + g * q_ld + i0, a.delta = delta + g * q_ld + i0;
        a.dQT = dQT + g * dp * q_ld + i0;
        bwd_tile_bf16(sh, a, n, rows_i, k0, i0, shift, q_len, full, dK, dV, ST, dPT, PTb, dSTb, dSv);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      finish_row<BF16>(dK + j * dp, 0.0f, 1.0f / sh.scale, d, dk + (k0 + j) * k_stride, nullptr);
      finish_row<BF16>(dV + j * dp, 0.0f, 1.0f, d, dv + (k0 + j) * k_stride, nullptr);
    }
  }
  // dQ = scale * (dQ^T)^T, 16 query rows at a time (contiguous reads along i)
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i0 = 0; i0 < q_len; i0 += 16) {
      const int64_t m = mg_min(16, q_len - i0);
      prefetch_rows_for_write(dq + g * d + (i0 + 16) * q_stride, mg_min(16, q_len - i0 - 16), q_stride, 2 * d);
      for (int64_t c0 = 0; c0 < dp; c0 += 16) {  // 16 x 16 transposes (i0 + 16 <= q_ld)
        __m512 r[16];
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_ps(dQT + (g * dp + c0 + c) * q_ld + i0);
        transpose16x16(r);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(rowbuf + i * dp + c0, r[i]);
      }
      for (int64_t i = 0; i < m; ++i)
        finish_row<BF16>(rowbuf + i * dp, 0.0f, 1.0f / sh.scale, d, dq + g * d + (i0 + i) * q_stride, nullptr);
    }
}
#endif  // MG_ISA_AVX512
