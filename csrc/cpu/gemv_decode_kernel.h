// csrc/cpu/gemv_decode_kernel.h -- one whole Llama decode step, run by a team of threads.
//
// Included by isa_expand.h once per instruction set (no include guard on purpose);
// gemv_decode_step.cpp starts the team and calls decode_step_team on every thread.
//
// At batch 1 a decode step reads every weight once, so its speed is the memory
// bandwidth -- as long as nothing else gets in the way. Called op by op, a step is
// ~300 small kernels, each a thread fork/join, an allocation and a dispatcher call.
// Here the team is started ONCE per step and every thread streams its own disjoint
// share of the rows of every weight matrix; threads only meet at a barrier where a
// result is needed whole (6 per layer):
//
//   every thread:  x = rms_norm(h += delta)        (each keeps its own copy of h and
//                                                   x: computing them twice is cheaper
//                                                   than a barrier)
//   split rows:    qkv = x Wqkv^T                   | barrier
//   split kv heads: k = rope(k); append k, v to the cache at each row's position
//                                                   | barrier
//   split heads:   q = rope(q); y = attention(q, cache, cache) | barrier
//   split rows:    o = y Wo^T                       | barrier
//   every thread:  x = rms_norm(h += o)
//   split rows:    act = silu(x Wgate^T) * (x Wup^T) (gate and up rows of the same
//                  features in one pass: SwiGLU fused into the GEMV) | barrier
//   split rows:    delta = act Wdown^T              | barrier
//   ... then x = final_norm(h += delta); split rows: logits = x Whead^T (float32),
//   for the rows listed in head_rows only.
//
// Rows are tokens: row r is the token at positions[r] of cache row cache_row[r].
// Decoding has one row per sequence; a prefill passes a prompt's tokens as rows of
// one sequence (the causal mask falls out: a row reads positions 0..its own, all
// appended before the barrier).
//
// Rounding follows the op-by-op path: activations are stored in T between steps
// (q, k after rope, y, o, gate/up outputs, act), sums are float32.

#include "cpu/gemv_kernel.h"

// DecodeStepArgs (the step's pointers and sizes) is in gemv_decode_args.h.

// Rows [n0, n1) of y = x W^T for the M rows of x, by the fastest kernel for T.
template <typename T, typename O>
inline void decode_gemv(const DecodeStepArgs<T>& a, const T* x, int64_t K, const T* W, O* y,
                        int64_t ldy, int64_t n0, int64_t n1) {
  if (n0 >= n1) return;
#if defined(MG_ISA_AVX512)
  if constexpr (std::is_same_v<T, BF16>) {
    if (a.bf16dp) return gemv_rows_bf16dp<O>(x, a.B, K, W, nullptr, y, ldy, n0, n1);
  }
#endif
  gemv_rows<T, O>(x, a.B, K, W, nullptr, y, ldy, n0, n1);
}

// This thread's share [first, last) of `n` rows, split in blocks of 4 (the GEMV's).
inline std::pair<int64_t, int64_t> decode_share(int64_t n, int tid, int team) {
  const int64_t blocks = (n + 3) / 4;
  const int64_t b0 = blocks * tid / team, b1 = blocks * (tid + 1) / team;
  return {std::min(n, 4 * b0), std::min(n, 4 * b1)};
}

// y = rms_norm(x + residual) * w and h_out = round(x + residual) (when residual is
// given), like rms_norm_kernel.h: the norm is taken of the float32 sum, not the
// rounded h.
template <typename T>
inline void decode_norm(const T* x, const T* residual, const T* w, T* y, T* h_out, int64_t B,
                        int64_t d, float eps) {
  for (int64_t r = 0; r < B; ++r) {
    const T* xr = x + r * d;
    const T* rr = residual ? residual + r * d : nullptr;
    Vec acc = Vec::zero();
    for (int64_t i = 0; i < d; i += Vec::N) {
      const int m = int(std::min<int64_t>(Vec::N, d - i));
      Vec v = Vec::load_partial(xr + i, m);
      if (rr) {
        v = v + Vec::load_partial(rr + i, m);
        v.store_partial(h_out + r * d + i, m);
      }
      acc = fmadd(v, v, acc);
    }
    const Vec inv = Vec::set1(1.0f / std::sqrt(acc.reduce_add() / float(d) + eps));
    for (int64_t i = 0; i < d; i += Vec::N) {
      const int m = int(std::min<int64_t>(Vec::N, d - i));
      Vec v = Vec::load_partial(xr + i, m);
      if (rr) v = v + Vec::load_partial(rr + i, m);
      (v * inv * Vec::load_partial(w + i, m)).store_partial(y + r * d + i, m);
    }
  }
}

// Rotate one head (half-split convention, like rope_kernel.h) and round to T.
template <typename T>
inline void decode_rope_head(const T* x, const float* c, const float* s, int64_t half, T* out) {
  int64_t i = 0;
  for (; i < half; i += Vec::N) {
    const int n = int(std::min<int64_t>(Vec::N, half - i));
    const Vec a = Vec::load_partial(x + i, n), b = Vec::load_partial(x + half + i, n);
    const Vec cv = Vec::load_partial(c + i, n), sv = Vec::load_partial(s + i, n);
    fmadd(a, cv, -(b * sv)).store_partial(out + i, n);
    fmadd(b, cv, a * sv).store_partial(out + half + i, n);
  }
}

template <typename T>
inline float decode_dot(const T* a, const T* b, int64_t n) {
  Vec acc = Vec::zero();
  for (int64_t i = 0; i < n; i += Vec::N) {
    const int m = int(std::min<int64_t>(Vec::N, n - i));
    acc = fmadd(Vec::load_partial(a + i, m), Vec::load_partial(b + i, m), acc);
  }
  return acc.reduce_add();
}

// acc[0..n) += p * v[0..n)  (acc float32, n <= 256)
template <typename T>
inline void decode_axpy(float p, const T* v, float* acc, int64_t n) {
  const Vec pv = Vec::set1(p);
  for (int64_t i = 0; i < n; i += Vec::N) {
    const int m = int(std::min<int64_t>(Vec::N, n - i));
    fmadd(pv, Vec::load_partial(v + i, m), Vec::load_partial(acc + i, m)).store_partial(acc + i, m);
  }
}

// Step 1 of attention: rope the new keys and append keys/values to the cache, for
// the (row, kv head) pairs this thread owns.
template <typename T>
void decode_append_kv(const DecodeStepArgs<T>& a, int64_t layer, int tid, int team) {
  const int64_t H = a.H, Hkv = a.Hkv, D = a.D, half = D / 2;
  const int64_t qkv_n = (H + 2 * Hkv) * D;
  for (int64_t pair = tid; pair < a.B * Hkv; pair += team) {
    const int64_t r = pair / Hkv, g = pair % Hkv, pos = a.positions[r];
    const T* row = a.qkv + r * qkv_n;
    const int64_t at = ((a.cache_row[r] * a.max_len + pos) * Hkv + g) * D;
    decode_rope_head(row + (H + g) * D, a.cos + pos * half, a.sin + pos * half, half,
                     a.k_cache[layer] + at);
    std::copy(row + (H + Hkv + g) * D, row + (H + Hkv + g + 1) * D, a.v_cache[layer] + at);
  }
}

// Step 2 (after a barrier): attention of the (row, head) pairs this thread owns over
// cache positions 0..pos of the row's sequence (its own key included).
template <typename T>
void decode_attention(const DecodeStepArgs<T>& a, int64_t layer, int tid, int team, T* q_rot,
                      float* f) {
  const int64_t H = a.H, Hkv = a.Hkv, D = a.D, half = D / 2, group = H / Hkv;
  const int64_t qkv_n = (H + 2 * Hkv) * D, stride = Hkv * D;
  float* out = f;  // D floats
  float* scores = f + D;
  for (int64_t pair = tid; pair < a.B * H; pair += team) {
    const int64_t r = pair / H, h = pair % H, g = h / group, pos = a.positions[r];
    decode_rope_head(a.qkv + r * qkv_n + h * D, a.cos + pos * half, a.sin + pos * half, half,
                     q_rot);
    const int64_t base = (a.cache_row[r] * a.max_len * Hkv + g) * D;
    const T* kb = a.k_cache[layer] + base;  // position j at kb + j * stride
    const T* vb = a.v_cache[layer] + base;
    float mx = -INFINITY;
    for (int64_t j = 0; j <= pos; ++j) {
      scores[j] = decode_dot(q_rot, kb + j * stride, D) * a.scale;
      mx = std::max(mx, scores[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j <= pos; ++j) sum += scores[j] = std::exp(scores[j] - mx);
    std::fill(out, out + D, 0.f);
    for (int64_t j = 0; j <= pos; ++j) decode_axpy(scores[j], vb + j * stride, out, D);
    const float inv = 1.f / sum;
    T* yo = a.y + r * H * D + h * D;
    for (int64_t i = 0; i < D; ++i) yo[i] = from_f32<T>(out[i] * inv);
  }
}

// The whole step on one thread of a team of `team` (tid in [0, team)); the caller
// runs it on every thread at once and `barrier` synchronizes them.
template <typename T>
void decode_step_team(const DecodeStepArgs<T>& a, int tid, int team, void (*barrier)()) {
  const int64_t B = a.B, d = a.d, H = a.H, Hkv = a.Hkv, D = a.D, F = a.F;
  const int64_t qkv_n = (H + 2 * Hkv) * D;
  // per-thread scratch: two residual buffers (h alternates: the norm reads the old
  // h while writing the new), x, rope'd q/k, and gate/up outputs of this share
  T* hbuf[2] = {a.scratch, a.scratch + B * d};
  T* x = a.scratch + 2 * B * d;
  T* rot = x + B * d;
  T* gate = rot + 2 * D;
  float* f = a.fscratch;  // D output floats + max_len + 1 scores
  const auto [f0, f1] = decode_share(F, tid, team);
  const int64_t fn = f1 - f0;
  T* up = gate + B * std::max<int64_t>(fn, 1);
  int cur = 0;
  const T* h = a.h_in;
  for (int64_t l = 0; l < a.L; ++l) {
    if (l == 0) {
      decode_norm<T>(h, nullptr, a.attn_norm_w[l], x, nullptr, B, d, a.eps);
    } else {
      decode_norm<T>(a.delta, h, a.attn_norm_w[l], x, hbuf[cur], B, d, a.eps);
      h = hbuf[cur], cur ^= 1;
    }
    {
      const auto [n0, n1] = decode_share(qkv_n, tid, team);
      decode_gemv<T, T>(a, x, d, a.qkv_w[l], a.qkv, qkv_n, n0, n1);
    }
    barrier();
    decode_append_kv<T>(a, l, tid, team);
    barrier();
    decode_attention<T>(a, l, tid, team, rot, f);
    barrier();
    {
      const auto [n0, n1] = decode_share(d, tid, team);
      decode_gemv<T, T>(a, a.y, H * D, a.o_w[l], a.o, d, n0, n1);
    }
    barrier();
    decode_norm<T>(a.o, h, a.mlp_norm_w[l], x, hbuf[cur], B, d, a.eps);
    h = hbuf[cur], cur ^= 1;
    if (fn > 0) {
      const T* W = a.up_w[l];
      decode_gemv<T, T>(a, x, d, W + f0 * d, gate, fn, 0, fn);
      decode_gemv<T, T>(a, x, d, W + (F + f0) * d, up, fn, 0, fn);
      for (int64_t b = 0; b < B; ++b) {
        const T* gr = gate + b * fn;
        const T* ur = up + b * fn;
        T* out = a.act + b * F + f0;
        for (int64_t j = 0; j < fn; j += Vec::N) {
          const int m = int(std::min<int64_t>(Vec::N, fn - j));
          const Vec g = Vec::load_partial(gr + j, m);
          (g * vsigmoid(g) * Vec::load_partial(ur + j, m)).store_partial(out + j, m);
        }
      }
    }
    barrier();
    {
      const auto [n0, n1] = decode_share(d, tid, team);
      decode_gemv<T, T>(a, a.act, F, a.down_w[l], a.delta, d, n0, n1);
    }
    barrier();
  }
  // the final norm and the LM head, only for the rows that need logits
  T* xh = hbuf[cur];  // h's spare buffer, free now
  for (int64_t i = 0; i < a.n_head_rows; ++i) {
    const int64_t r = a.head_rows[i];
    decode_norm<T>(a.delta + r * d, h + r * d, a.final_norm_w, xh + i * d, x, 1, d, a.eps);
  }
  const auto [n0, n1] = decode_share(a.V, tid, team);
  auto head = a;
  head.B = a.n_head_rows;
  decode_gemv<T, float>(head, xh, d, a.head_w, a.logits, a.V, n0, n1);
}
