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

template <typename T>
inline void swiglu_fwd_vec(const T* g, const T* u, T* y, int n_partial) {
  Vec gv = n_partial < Vec::N ? Vec::load_partial(g, n_partial) : Vec::load(g);
  Vec uv = n_partial < Vec::N ? Vec::load_partial(u, n_partial) : Vec::load(u);
  Vec out = gv * swiglu_sigmoid(gv) * uv;
  if (n_partial < Vec::N)
    out.store_partial(y, n_partial);
  else
    out.store(y);
}

template <typename T>
void swiglu_fwd_span(const T* g, const T* u, T* y, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::N <= n; i += Vec::N) {
    Vec gv = Vec::load(g + i);
    (gv * swiglu_sigmoid(gv) * Vec::load(u + i)).store(y + i);
  }
  if (i < n) swiglu_fwd_vec(g + i, u + i, y + i, int(n - i));
}

template <typename T>
inline void swiglu_bwd_vec(const T* dy, const T* g, const T* u, T* dg, T* du, int n_partial) {
  const bool part = n_partial < Vec::N;
  Vec d = part ? Vec::load_partial(dy, n_partial) : Vec::load(dy);
  Vec gv = part ? Vec::load_partial(g, n_partial) : Vec::load(g);
  Vec uv = part ? Vec::load_partial(u, n_partial) : Vec::load(u);
  Vec s = swiglu_sigmoid(gv);
  Vec silu = gv * s;
  Vec dgv = d * uv * fmadd(silu, Vec::set1(1.0f) - s, s);
  Vec duv = d * silu;
  if (part) {
    dgv.store_partial(dg, n_partial);
    duv.store_partial(du, n_partial);
  } else {
    dgv.store(dg);
    duv.store(du);
  }
}

template <typename T>
void swiglu_bwd_span(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::N <= n; i += Vec::N) swiglu_bwd_vec(dy + i, g + i, u + i, dg + i, du + i, Vec::N);
  if (i < n) swiglu_bwd_vec(dy + i, g + i, u + i, dg + i, du + i, int(n - i));
}
