// csrc/cpu/swiglu_kernel.h -- SwiGLU element kernels, written once against Vec.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose).
// One call handles a contiguous span of elements; threading happens in swiglu.cpp.
//
//   forward   s  = sigmoid(g)
//             y  = g * s * u                       (silu(g) * u)
//   backward  du = dy * g * s                      (dy * silu(g))
//             dg = dy * u * s * (1 + g * (1 - s))  (d silu / dg = s + g * s * (1 - s))
//
// Each element is read once and written once per direction; sigmoid is
// recomputed in the backward pass instead of being saved (recomputing costs a
// few dozen flops, saving it would cost a full extra write and read).

// sigmoid(x) = 1 / (1 + exp(-x)). On AVX-512 a leaner version than vec.h's
// general vexp: exp's 2^n scaling is one vscalefps, the division is a 14-bit
// reciprocal estimate refined by one Newton step (~1 ulp), and no special case
// for exp(-inf) is needed because -x is clamped to [-87, 87], where sigmoid is
// already 0 or 1 to float32 precision. About a third fewer instructions per
// vector, which matters once the data is in cache or in bfloat16.
#if defined(MG_ISA_AVX512)
inline Vec swiglu_sigmoid(Vec x) {
  __m512 t = _mm512_sub_ps(_mm512_setzero_ps(), x.r);
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), t);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));  // 1 + exp(-x)
  __m512 e = _mm512_rcp14_ps(d);
  // Newton: e' = e * (2 - d * e)
  return _mm512_mul_ps(e, _mm512_fnmadd_ps(d, e, _mm512_set1_ps(2.0f)));
}
#else
inline Vec swiglu_sigmoid(Vec x) { return vsigmoid(x); }
#endif

// Non-temporal ("streaming") stores write a full cache line straight to memory
// without first reading it into cache (a normal store to memory not in cache
// reads the line first: 2 bytes of traffic per byte written). For outputs much
// larger than the caches that saves a quarter of the traffic of the forward
// pass and two sevenths of the backward; for small outputs it would only evict
// data the next op wants, so swiglu.cpp enables it by size. They need aligned
// addresses: the span functions peel elements until the output is aligned.
// (stream_store / stream_fence come from vec.h.)
// Store a full vector (n_partial == Vec::N, streaming if STREAM) or a partial one.
template <bool STREAM, typename T>
inline void put(T* p, Vec v, int n_partial) {
  if (n_partial < Vec::N)
    v.store_partial(p, n_partial);
  else if (STREAM)
    stream_store(p, v);
  else
    v.store(p);
}

template <typename T>
inline Vec load_n(const T* p, int n_partial) {
  return n_partial < Vec::N ? Vec::load_partial(p, n_partial) : Vec::load(p);
}

// Elements to handle before `p` is aligned to a full vector (for streaming stores).
template <typename T>
inline int64_t peel_to_alignment(const T* p, int64_t n) {
  constexpr uintptr_t bytes = Vec::N * sizeof(T);
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % bytes;
  if (mis == 0 || mis % sizeof(T)) return 0;
  return std::min<int64_t>(n, int64_t((bytes - mis) / sizeof(T)));
}
template <typename T>
inline bool vector_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (Vec::N * sizeof(T)) == 0;
}

template <bool STREAM, typename T>
inline void swiglu_fwd_vec(const T* g, const T* u, T* y, int n_partial) {
  Vec gv = load_n(g, n_partial);
  put<STREAM>(y, gv * swiglu_sigmoid(gv) * load_n(u, n_partial), n_partial);
}

template <typename T, bool STREAM>
void swiglu_fwd_span(const T* g, const T* u, T* y, int64_t n) {
  int64_t i = STREAM ? peel_to_alignment(y, n) : 0;
  if (STREAM && i < n && !vector_aligned(y + i)) return swiglu_fwd_span<T, false>(g, u, y, n);
  if (i) swiglu_fwd_vec<false>(g, u, y, int(i));
  for (; i + Vec::N <= n; i += Vec::N) swiglu_fwd_vec<STREAM>(g + i, u + i, y + i, Vec::N);
  if (i < n) swiglu_fwd_vec<false>(g + i, u + i, y + i, int(n - i));
  if (STREAM) stream_fence();
}

template <bool STREAM, typename T>
inline void swiglu_bwd_vec(const T* dy, const T* g, const T* u, T* dg, T* du, int n_partial) {
  Vec d = load_n(dy, n_partial), gv = load_n(g, n_partial), uv = load_n(u, n_partial);
  Vec s = swiglu_sigmoid(gv);
  Vec silu = gv * s;
  put<STREAM>(dg, d * uv * fmadd(silu, Vec::set1(1.0f) - s, s), n_partial);
  put<STREAM>(du, d * silu, n_partial);
}

// dg and du come from one allocator and have one size, so they normally share
// alignment; if not, no streaming.
template <typename T, bool STREAM>
void swiglu_bwd_span(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  int64_t i = STREAM ? peel_to_alignment(dg, n) : 0;
  if (STREAM && i < n && !(vector_aligned(dg + i) && vector_aligned(du + i)))
    return swiglu_bwd_span<T, false>(dy, g, u, dg, du, n);
  if (i) swiglu_bwd_vec<false>(dy, g, u, dg, du, int(i));
  for (; i + Vec::N <= n; i += Vec::N)
    swiglu_bwd_vec<STREAM>(dy + i, g + i, u + i, dg + i, du + i, Vec::N);
  if (i < n) swiglu_bwd_vec<false>(dy + i, g + i, u + i, dg + i, du + i, int(n - i));
  if (STREAM) stream_fence();
}

// ---- bfloat16 with the CPU's own float32 -> bfloat16 conversion ---------------
// Converting a vector to bfloat16 in software (Vec::store: round to nearest even
// with integer ops and a NaN fix-up) costs about 8 instructions; with
// AVX512-BF16 it is one (vcvtneps2bf16, same rounding; it flushes float32
// denormals, below 1e-38, to zero). In bfloat16 these kernels are limited by
// instructions rather than memory, so the forward and backward spans exist a
// second time, compiled with that extension, and swiglu.cpp calls them when the
// CPU has it (checked at run time; every function touching the instruction is
// compiled for it, the rest of the library is not).
#if defined(MG_ISA_AVX512)
#define MG_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,bmi2,avx512bf16")))

template <bool STREAM>
MG_TARGET_AVX512_BF16 inline void put_bf16_native(BF16* p, Vec v, int n_partial) {
  if (n_partial < Vec::N) return v.store_partial(p, n_partial);
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v.r);
  if (STREAM)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
}

template <bool STREAM>
MG_TARGET_AVX512_BF16 void swiglu_fwd_span_bf16_native(const BF16* g, const BF16* u, BF16* y,
                                                        int64_t n) {
  int64_t i = STREAM ? peel_to_alignment(y, n) : 0;
  if (STREAM && i < n && !vector_aligned(y + i))
    return swiglu_fwd_span_bf16_native<false>(g, u, y, n);
  auto step = [&](int64_t at, int np, auto stream) {
    Vec gv = load_n(g + at, np);
    put_bf16_native<decltype(stream)::value>(y + at, gv * swiglu_sigmoid(gv) * load_n(u + at, np),
                                             np);
  };
  if (i) step(0, int(i), std::false_type{});
  for (; i + Vec::N <= n; i += Vec::N) step(i, Vec::N, std::bool_constant<STREAM>{});
  if (i < n) step(i, int(n - i), std::false_type{});
  if (STREAM) stream_fence();
}

template <bool STREAM>
MG_TARGET_AVX512_BF16 void swiglu_bwd_span_bf16_native(const BF16* dy, const BF16* g,
                                                        const BF16* u, BF16* dg, BF16* du,
                                                        int64_t n) {
  int64_t i = STREAM ? peel_to_alignment(dg, n) : 0;
  if (STREAM && i < n && !(vector_aligned(dg + i) && vector_aligned(du + i)))
    return swiglu_bwd_span_bf16_native<false>(dy, g, u, dg, du, n);
  auto step = [&](int64_t at, int np, auto stream) {
    constexpr bool S = decltype(stream)::value;
    Vec d = load_n(dy + at, np), gv = load_n(g + at, np), uv = load_n(u + at, np);
    Vec s = swiglu_sigmoid(gv);
    Vec silu = gv * s;
    put_bf16_native<S>(dg + at, d * uv * fmadd(silu, Vec::set1(1.0f) - s, s), np);
    put_bf16_native<S>(du + at, d * silu, np);
  };
  if (i) step(0, int(i), std::false_type{});
  for (; i + Vec::N <= n; i += Vec::N) step(i, Vec::N, std::bool_constant<STREAM>{});
  if (i < n) step(i, int(n - i), std::false_type{});
  if (STREAM) stream_fence();
}
#undef MG_TARGET_AVX512_BF16
#endif
