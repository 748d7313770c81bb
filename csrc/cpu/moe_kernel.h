// csrc/cpu/moe_kernel.h -- row kernels of the mixture-of-experts permute/unpermute ops.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose).
// A MoE layer moves token rows between token order (N, d) and expert order
// (M, d); these kernels do the per-row arithmetic of those moves, in float32
// whatever the storage dtype:
//
//   moe_combine_row   out = sum_j w[j] * rows[j]     (unpermute forward: the fused
//                                                      top-k weighting; permute
//                                                      backward with w = 1)
//   moe_scale_row     out = w * src                  (unpermute backward, dy_perm)
//   moe_dot_row       sum_i a[i] * b[i]              (unpermute backward, dweights)
//
// Threading over rows happens in moe.cpp.

template <typename T>
inline Vec moe_load(const T* p, int n_partial) {
  return n_partial < Vec::N ? Vec::load_partial(p, n_partial) : Vec::load(p);
}

template <typename T>
inline void moe_store(T* p, Vec v, int n_partial) {
  if (n_partial < Vec::N)
    v.store_partial(p, n_partial);
  else
    v.store(p);
}

// out[0:d] = sum_{j < count} w[j] * rows[j][0:d]; count == 0 writes zeros. The
// accumulator of one vector of columns stays in a register across the k rows.
template <typename T>
void moe_combine_row(const T* const* rows, const float* w, int count, T* out, int64_t d) {
  for (int64_t i = 0; i < d; i += Vec::N) {
    const int n = int(std::min<int64_t>(Vec::N, d - i));
    Vec acc = Vec::zero();
    for (int j = 0; j < count; ++j) acc = fmadd(Vec::set1(w[j]), moe_load(rows[j] + i, n), acc);
    moe_store(out + i, acc, n);
  }
}

template <typename T>
void moe_scale_row(const T* src, float w, T* out, int64_t d) {
  const Vec wv = Vec::set1(w);
  for (int64_t i = 0; i < d; i += Vec::N) {
    const int n = int(std::min<int64_t>(Vec::N, d - i));
    moe_store(out + i, wv * moe_load(src + i, n), n);
  }
}

template <typename T>
float moe_dot_row(const T* a, const T* b, int64_t d) {
  Vec acc = Vec::zero();
  for (int64_t i = 0; i < d; i += Vec::N) {
    const int n = int(std::min<int64_t>(Vec::N, d - i));
    acc = fmadd(moe_load(a + i, n), moe_load(b + i, n), acc);
  }
  return acc.reduce_add();
}

// SwiGLU backward written straight into the fused (gate | up) gradient row, so the
// expert MLP's backward can feed one (M, 2F) matrix to the grouped GEMM without
// concatenating two halves first (s = sigmoid(g)):
//   dg = dh * u * s * (1 + g * (1 - s)),   du = dh * g * s
template <typename T>
void moe_swiglu_bwd_row(const T* dh, const T* g, const T* u, T* dg, T* du, int64_t n) {
  const Vec one = Vec::set1(1.0f);
  for (int64_t i = 0; i < n; i += Vec::N) {
    const int c = int(std::min<int64_t>(Vec::N, n - i));
    Vec d = moe_load(dh + i, c), gv = moe_load(g + i, c), uv = moe_load(u + i, c);
    Vec s = vsigmoid(gv);
    Vec silu = gv * s;
    moe_store(dg + i, d * uv * fmadd(silu, one - s, s), c);
    moe_store(du + i, d * silu, c);
  }
}
