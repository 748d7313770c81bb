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

template <typename T>
inline void swiglu_fwd_vec(const T* g, const T* u, T* y, int n_partial) {
  Vec gv = n_partial < Vec::N ? Vec::load_partial(g, n_partial) : Vec::load(g);
  Vec uv = n_partial < Vec::N ? Vec::load_partial(u, n_partial) : Vec::load(u);
  Vec out = gv * vsigmoid(gv) * uv;
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
    (gv * vsigmoid(gv) * Vec::load(u + i)).store(y + i);
  }
  if (i < n) swiglu_fwd_vec(g + i, u + i, y + i, int(n - i));
}

template <typename T>
inline void swiglu_bwd_vec(const T* dy, const T* g, const T* u, T* dg, T* du, int n_partial) {
  const bool part = n_partial < Vec::N;
  Vec d = part ? Vec::load_partial(dy, n_partial) : Vec::load(dy);
  Vec gv = part ? Vec::load_partial(g, n_partial) : Vec::load(g);
  Vec uv = part ? Vec::load_partial(u, n_partial) : Vec::load(u);
  Vec s = vsigmoid(gv);
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
