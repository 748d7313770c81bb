// csrc/cpu/rope_kernel.h -- rotary position embedding kernel, written once against Vec.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose).
// One call rotates every head of a range of tokens of one tensor; threading
// happens in rope.cpp.
//
// Half-split ("rotate_half") convention: dimension i pairs with i + D/2.
// With h = D/2, c = cos[token, i], s = sin[token, i] * sign:
//
//     out[i]     = x[i]     * c - x[i + h] * s
//     out[i + h] = x[i + h] * c + x[i]     * s
//
// sign = +1 rotates by +angle (forward); sign = -1 rotates back (the backward
// pass, since the transpose of a rotation is the rotation by -angle).
//
// T is the activation type, C the cos/sin table type (T or float). The input
// may be strided over (batch, token, head) but each head's D values are
// contiguous; the output is contiguous (B, T, H, D).

template <bool STREAM, typename T, typename C>
inline void rope_rotate_chunk(const T* x1, const T* x2, const C* cr, const C* sr, T* o1, T* o2,
                              Vec sign, int n_partial) {
  const bool part = n_partial < Vec::N;
  Vec c = part ? Vec::load_partial(cr, n_partial) : Vec::load(cr);
  Vec s = (part ? Vec::load_partial(sr, n_partial) : Vec::load(sr)) * sign;
  Vec a = part ? Vec::load_partial(x1, n_partial) : Vec::load(x1);
  Vec b = part ? Vec::load_partial(x2, n_partial) : Vec::load(x2);
  Vec ra = fmadd(a, c, -(b * s));
  Vec rb = fmadd(b, c, a * s);
  if (part) {
    ra.store_partial(o1, n_partial);
    rb.store_partial(o2, n_partial);
  } else if (STREAM) {
    stream_store(o1, ra);
    stream_store(o2, rb);
  } else {
    ra.store(o1);
    rb.store(o2);
  }
}

// Tokens [tok_begin, tok_end) of the flattened (B * T) token axis.
//   x strides (in elements): sb (batch), st (token), sh (head); last dim contiguous.
//   cos/sin: (Bc, T, half) contiguous, cos_sb = T * half when per-batch, else 0.
// STREAM: write the output with non-temporal stores (see vec.h), for outputs far
// larger than the caches; used only when every output vector is aligned (D/2 a
// multiple of the vector width and an aligned output), else plain stores.
template <typename T, typename C, bool STREAM>
void rope_tokens(const T* x, int64_t sb, int64_t st, int64_t sh, T* out, const C* cos,
                 const C* sin, int64_t cos_sb, int64_t seq_len, int64_t heads, int64_t half,
                 float sin_sign, int64_t tok_begin, int64_t tok_end) {
  const Vec sign = Vec::set1(sin_sign);
  const int64_t hv = half - half % Vec::N;  // end of the full-vector part of a half
  const int tail = int(half - hv);
  if (STREAM && (tail || reinterpret_cast<uintptr_t>(out) % (Vec::N * sizeof(T)))) {
    return rope_tokens<T, C, false>(x, sb, st, sh, out, cos, sin, cos_sb, seq_len, heads, half,
                                    sin_sign, tok_begin, tok_end);
  }
  for (int64_t r = tok_begin; r < tok_end; ++r) {
    const int64_t b = r / seq_len, t = r % seq_len;
    const T* xr = x + b * sb + t * st;
    T* orow = out + r * heads * 2 * half;
    const C* cr = cos + b * cos_sb + t * half;
    const C* sr = sin + b * cos_sb + t * half;
    for (int64_t h = 0; h < heads; ++h) {
      const T* x1 = xr + h * sh;
      const T* x2 = x1 + half;
      T* o1 = orow + h * 2 * half;
      T* o2 = o1 + half;
      int64_t i = 0;
      for (; i < hv; i += Vec::N)
        rope_rotate_chunk<STREAM>(x1 + i, x2 + i, cr + i, sr + i, o1 + i, o2 + i, sign, Vec::N);
      if (tail)
        rope_rotate_chunk<false>(x1 + i, x2 + i, cr + i, sr + i, o1 + i, o2 + i, sign, tail);
    }
  }
  if (STREAM) stream_fence();
}
