// csrc/cpu/cross_entropy_kernel.h -- fused softmax + cross-entropy over rows of logits.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose).
// One call handles a contiguous block of rows of a (rows, V) logits chunk; the
// threading lives in cross_entropy.cpp. For every row with target t != ignore:
//
//   y      = softcap > 0 ? softcap * tanh(x / softcap) : x     (optional logit capping)
//   lse    = log(sum_j exp(y_j))                                (max-shifted, float32)
//   loss   = lse - y_t + z_loss * lse^2                         (z-loss: keeps lse near 0)
//   grad_j = (exp(y_j - lse) * (1 + 2 z_loss lse) - [j == t]) * scale * dy_j/dx_j
//                                                               (written over x, in place)
//
// Ignored rows get loss 0, lse 0 and a zero gradient row. When `lse_in` is given
// (the backward of reduction="none") the max / sum passes are skipped and the
// saved lse is used; `row_scale` then gives each row its own upstream gradient.
// All arithmetic is float32 whatever T (float, BF16, F16) is.

// tanh(z) = 1 - 2 / (exp(2z) + 1): exact limits +-1 (vexp saturates instead of
// overflowing) and an absolute error of a few 1e-8 near 0, which is all the
// softcap needs (it multiplies tanh by the cap, ~30).
inline Vec ce_vtanh(Vec z) {
  const Vec one = Vec::set1(1.0f);
  return one - Vec::set1(2.0f) / (vexp(z + z) + one);
}
inline float ce_tanh(float z) { return 1.0f - 2.0f / (std::exp(std::min(z + z, 88.0f)) + 1.0f); }

template <bool kCap>
inline Vec ce_cap(Vec x, Vec cap, Vec inv_cap) {
  if constexpr (kCap) return cap * ce_vtanh(x * inv_cap);
  return x;
}

template <typename T, bool kCap>
void cross_entropy_rows_impl(T* logits, const int64_t* targets, float* loss, float* lse_out,
                             const float* lse_in, const float* row_scale, float scale,
                             int64_t ignore_index, float softcap, float z_loss, bool write_grad,
                             int64_t rows, int64_t V) {
  const int64_t nv = V - V % Vec::N;  // end of the full-vector part of a row
  const int tail = int(V - nv);
  const float inv_cap_s = kCap ? 1.0f / softcap : 1.0f;
  const Vec cap = Vec::set1(softcap), inv_cap = Vec::set1(inv_cap_s);
  auto cap_scalar = [&](float x) { return kCap ? softcap * ce_tanh(x * inv_cap_s) : x; };
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = logits + r * V;
    const int64_t t = targets[r];
    if (t == ignore_index) {
      loss[r] = 0.0f;
      if (lse_out) lse_out[r] = 0.0f;
      if (write_grad) std::memset(static_cast<void*>(xr), 0, sizeof(T) * V);
      continue;
    }
    float lse;
    if (lse_in) {
      lse = lse_in[r];
    } else {
      // Pass 1: row max (the shift that keeps exp from overflowing). The tail is
      // done in scalar code: zero-filled lanes must not take part in the max.
      Vec m0 = Vec::set1(-INFINITY), m1 = m0;
      int64_t i = 0;
      for (; i + 2 * Vec::N <= nv; i += 2 * Vec::N) {
        m0 = vmax(m0, ce_cap<kCap>(Vec::load(xr + i), cap, inv_cap));
        m1 = vmax(m1, ce_cap<kCap>(Vec::load(xr + i + Vec::N), cap, inv_cap));
      }
      for (; i < nv; i += Vec::N) m0 = vmax(m0, ce_cap<kCap>(Vec::load(xr + i), cap, inv_cap));
      float m = vmax(m0, m1).reduce_max();
      for (int64_t j = nv; j < V; ++j) m = std::max(m, cap_scalar(to_f32(xr[j])));
      // Pass 2: sum of exp(y - max); two accumulators hide the exp latency. The
      // row (<= a few hundred KB) is still in L2 from pass 1.
      const Vec vm = Vec::set1(m);
      Vec s0 = Vec::zero(), s1 = Vec::zero();
      for (i = 0; i + 2 * Vec::N <= nv; i += 2 * Vec::N) {
        s0 = s0 + vexp(ce_cap<kCap>(Vec::load(xr + i), cap, inv_cap) - vm);
        s1 = s1 + vexp(ce_cap<kCap>(Vec::load(xr + i + Vec::N), cap, inv_cap) - vm);
      }
      for (; i < nv; i += Vec::N) s0 = s0 + vexp(ce_cap<kCap>(Vec::load(xr + i), cap, inv_cap) - vm);
      float s = (s0 + s1).reduce_add();
      for (int64_t j = nv; j < V; ++j) s += std::exp(cap_scalar(to_f32(xr[j])) - m);
      lse = m + std::log(s);
    }
    const float y_t = cap_scalar(to_f32(xr[t]));
    loss[r] = lse - y_t + z_loss * lse * lse;
    if (lse_out) lse_out[r] = lse;
    if (!write_grad) continue;
    // Pass 3: overwrite the logits with d loss / d logits = softmax - onehot
    // (times the chain factor of the softcap), scaled by the upstream gradient.
    const float sc = row_scale ? row_scale[r] : scale;
    const float zc = 1.0f + 2.0f * z_loss * lse;  // d(z lse^2)/d lse adds 2 z lse * softmax
    const Vec vlse = Vec::set1(lse), vsc = Vec::set1(sc * zc), one = Vec::set1(1.0f);
    auto grad = [&](Vec x) {
      if constexpr (kCap) {
        Vec th = ce_vtanh(x * inv_cap);
        return vexp(cap * th - vlse) * vsc * (one - th * th);
      } else {
        return vexp(x - vlse) * vsc;
      }
    };
    int64_t i = 0;
    for (; i < nv; i += Vec::N) grad(Vec::load(xr + i)).store(xr + i);
    if (tail) grad(Vec::load_partial(xr + i, tail)).store_partial(xr + i, tail);
    // the target column: (p_t - 1) * scale * chain, from the saved capped logit
    float g_t = (std::exp(y_t - lse) * zc - 1.0f) * sc;
    if (kCap) {
      const float th = y_t * inv_cap_s;
      g_t *= 1.0f - th * th;
    }
    xr[t] = from_f32<T>(g_t);
  }
}

template <typename T>
void cross_entropy_rows(T* logits, const int64_t* targets, float* loss, float* lse_out,
                        const float* lse_in, const float* row_scale, float scale,
                        int64_t ignore_index, float softcap, float z_loss, bool write_grad,
                        int64_t rows, int64_t V) {
  if (softcap > 0.0f)
    cross_entropy_rows_impl<T, true>(logits, targets, loss, lse_out, lse_in, row_scale, scale,
                                     ignore_index, softcap, z_loss, write_grad, rows, V);
  else
    cross_entropy_rows_impl<T, false>(logits, targets, loss, lse_out, lse_in, row_scale, scale,
                                      ignore_index, softcap, z_loss, write_grad, rows, V);
}

// acc[i] += alpha * part[i] for a float32 accumulator and a float / BF16 / F16 part,
// in one pass (torch's mixed-dtype add_ first copies the part to float32). Used to
// sum the low-precision dW partial of each chunk into the float32 weight gradient.
template <typename T>
void accumulate_f32(float* acc, const T* part, float alpha, int64_t n) {
  const Vec va = Vec::set1(alpha);
  int64_t i = 0;
  for (; i + Vec::N <= n; i += Vec::N)
    fmadd(Vec::load(part + i), va, Vec::load(acc + i)).store(acc + i);
  if (i < n) {
    const int tail = int(n - i);
    fmadd(Vec::load_partial(part + i, tail), va, Vec::load_partial(acc + i, tail))
        .store_partial(acc + i, tail);
  }
}

// A float32 accumulator kept as two 16-bit halves: `hi` holds the top 16 bits of
// each float32 (its sign, exponent and the 7 mantissa bits a bfloat16 has), `lo`
// the other 16. The sum is exactly a float32 sum; the point is the end: the
// bfloat16 result is `hi` rounded in place with `lo`'s bits (round_split_to_bf16),
// so the (V, H) weight gradient never exists as a float32 array *and* a bfloat16
// copy at once (one third less peak memory), and `lo` is simply dropped.
// Plain loops over 16-bit integers: -O3 vectorizes them for each instruction set.
inline void accumulate_split_f32(uint16_t* hi, uint16_t* lo, const BF16* part, float alpha,
                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = bits_to_f32((uint32_t(hi[i]) << 16) | lo[i]);
    const float p = bits_to_f32(uint32_t(part[i].bits) << 16);
    const uint32_t u = f32_to_bits(std::fma(p, alpha, a));  // fma: as accumulate_f32
    hi[i] = uint16_t(u >> 16);
    lo[i] = uint16_t(u);
  }
}

// hi <- bfloat16(hi:lo), round to nearest even (as to_bf16), NaN kept quiet.
inline void round_split_to_bf16(uint16_t* hi, const uint16_t* lo, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = (uint32_t(hi[i]) << 16) | lo[i];
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    hi[i] = uint16_t(nan ? ((u >> 16) | 0x40u) : rounded);
  }
}
