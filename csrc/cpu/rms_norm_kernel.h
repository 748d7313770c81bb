// csrc/cpu/rms_norm_kernel.h -- RMSNorm row kernels, written once against Vec.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose).
// One call handles a contiguous block of rows; threading happens in rms_norm.cpp.
//
//   forward   h    = x (+ residual)                 (the residual stream, optional)
//             rstd = 1 / sqrt(mean(h^2) + eps)     (saved for backward, float32)
//             y    = h * rstd * w
//   backward  g    = dy * w
//             dh   = rstd * (g - h * rstd^2 * mean(g * h))  (+ dh_extra, the gradient
//                                                        arriving through h itself)
//             dw  += dy * h * rstd                  (summed over rows, float32)
//
// T is the activation type, W the weight type (T or float). All sums are float32.
// kNativeBF16: bfloat16 outputs are converted with AVX512-BF16's single
// instruction (vec.h store_bf16_native); rms_norm.cpp sets it only on CPUs that
// have it. Without it a bfloat16 store costs ~8 instructions, which made the
// bfloat16 kernels twice as slow as the float32 ones on in-cache rows.

template <bool kNativeBF16, typename T>
inline void rms_store(T* p, Vec v) {
  if constexpr (kNativeBF16 && std::is_same_v<T, BF16>)
    store_bf16_native(p, v);
  else
    v.store(p);
}
template <bool kNativeBF16, typename T>
inline void rms_store_partial(T* p, Vec v, int n) {
  if constexpr (kNativeBF16 && std::is_same_v<T, BF16>)
    store_partial_bf16_native(p, v, n);
  else
    v.store_partial(p, n);
}

template <typename T, typename W, bool kNativeBF16 = false>
void rms_norm_fwd_rows(const T* x, const T* residual, const W* w, T* y, T* h_out, float* rstd,
                       int64_t rows, int64_t n, float eps) {
  const int64_t nv = n - n % Vec::N;  // end of the full-vector part of a row
  const int tail = int(n - nv);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    const T* rr = residual ? residual + r * n : nullptr;
    T* hr = h_out ? h_out + r * n : nullptr;
    // Pass 1: h = x + residual (written out as the new residual stream) and sum(h^2).
    // Two accumulators hide the FMA latency.
    Vec acc0 = Vec::zero(), acc1 = Vec::zero();
    int64_t i = 0;
    for (; i < nv; i += Vec::N) {
      Vec h = Vec::load(xr + i);
      if (rr) {
        h = h + Vec::load(rr + i);
        rms_store<kNativeBF16>(hr + i, h);
      }
      if ((i / Vec::N) & 1)
        acc1 = fmadd(h, h, acc1);
      else
        acc0 = fmadd(h, h, acc0);
    }
    if (tail) {
      Vec h = Vec::load_partial(xr + i, tail);
      if (rr) {
        h = h + Vec::load_partial(rr + i, tail);
        rms_store_partial<kNativeBF16>(hr + i, h, tail);
      }
      acc0 = fmadd(h, h, acc0);
    }
    const float inv = 1.0f / std::sqrt((acc0 + acc1).reduce_add() / float(n) + eps);
    rstd[r] = inv;
    // Pass 2: y = h * rstd * w. The row is still in L1, so re-reading it is cheap.
    // With a residual we recompute x + residual in float32 rather than re-reading
    // the rounded h, so y matches the float32 reference as closely as possible.
    const Vec vinv = Vec::set1(inv);
    for (i = 0; i < nv; i += Vec::N) {
      Vec h = Vec::load(xr + i);
      if (rr) h = h + Vec::load(rr + i);
      rms_store<kNativeBF16>(yr + i, h * vinv * Vec::load(w + i));
    }
    if (tail) {
      Vec h = Vec::load_partial(xr + i, tail);
      if (rr) h = h + Vec::load_partial(rr + i, tail);
      rms_store_partial<kNativeBF16>(yr + i, h * vinv * Vec::load_partial(w + i, tail), tail);
    }
  }
}

template <typename T, typename W, bool kNativeBF16 = false>
void rms_norm_bwd_rows(const T* dy, const T* h, const W* w, const float* rstd, const T* dh_extra,
                       T* dh, float* dw_acc, int64_t rows, int64_t n) {
  const int64_t nv = n - n % Vec::N;
  const int tail = int(n - nv);
  const float inv_n = 1.0f / float(n);
  for (int64_t r = 0; r < rows; ++r) {
    const T* dyr = dy + r * n;
    const T* hr = h + r * n;
    const float rs = rstd[r];
    // Pass 1: mean(dy * w * h), the projection the normalization removes.
    Vec acc = Vec::zero();
    int64_t i = 0;
    for (; i < nv; i += Vec::N)
      acc = fmadd(Vec::load(dyr + i) * Vec::load(w + i), Vec::load(hr + i), acc);
    if (tail)
      acc = fmadd(Vec::load_partial(dyr + i, tail) * Vec::load_partial(w + i, tail),
                  Vec::load_partial(hr + i, tail), acc);
    const float c = acc.reduce_add() * inv_n * rs * rs;
    const Vec vrs = Vec::set1(rs), vc = Vec::set1(c);
    // Pass 2: dh = rstd * (dy * w - h * c), and dw += dy * h * rstd.
    T* dhr = dh + r * n;
    const T* er = dh_extra ? dh_extra + r * n : nullptr;
    for (i = 0; i < nv; i += Vec::N) {
      Vec d = Vec::load(dyr + i), hv = Vec::load(hr + i);
      Vec g = vrs * (d * Vec::load(w + i) - hv * vc);
      if (er) g = g + Vec::load(er + i);
      rms_store<kNativeBF16>(dhr + i, g);
      fmadd(d, hv * vrs, Vec::load(dw_acc + i)).store(dw_acc + i);
    }
    if (tail) {
      Vec d = Vec::load_partial(dyr + i, tail), hv = Vec::load_partial(hr + i, tail);
      Vec g = vrs * (d * Vec::load_partial(w + i, tail) - hv * vc);
      if (er) g = g + Vec::load_partial(er + i, tail);
      rms_store_partial<kNativeBF16>(dhr + i, g, tail);
      fmadd(d, hv * vrs, Vec::load_partial(dw_acc + i, tail)).store_partial(dw_acc + i, tail);
    }
  }
}
