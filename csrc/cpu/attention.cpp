// csrc/cpu/attention.cpp -- flash attention on the CPU: forward, backward and decode.
//
// The math lives in attention_kernel.h; this file checks arguments, describes the
// sequences, packs keys/values once per call, splits the work across threads and
// picks the SIMD variant. Registered ops (all on flat (tokens, heads, head_dim)
// tensors; a dense (B, T, H, D) batch is B sequences of T tokens):
//
//   attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window)
//       -> (out, lse)                     out like q, lse (total_q, Hq) float32
//   attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, causal,
//                 window) -> (dq, dk, dv)
//   attention_kvcache(q, k_cache!, v_cache!, cache_seqlens, k_new?, v_new?, scale,
//                     causal) -> out      (B, Tq, Hq, D); appends k_new/v_new in place
//
// Parallel work units: forward (sequence, query head, 64-query block); backward
// (sequence, kv head) so that the dK/dV of a key block, which sum over the heads of
// a group, are written by one thread; decode (sequence, kv head) so the cache is
// read once for all query heads that share it.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <immintrin.h>
#include <vector>

#include "cpu/attention.h"
#include "cpu/common.h"
#include "cpu/isa.h"

// GCC 12 flags its own _mm512_undefined_* idiom inside vexp once vexp is inlined
// into the AVX512_BF16 functions (a false positive; see the same note in setup.py).
#pragma GCC diagnostic ignored "-Wuninitialized"
#define MG_KERNEL_FILE "cpu/attention_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

// Head dims are padded to a multiple of 16 floats: a whole number of vectors for
// every ISA (16 / 8 / 1 lanes), so kernels never need a column tail.
int64_t padded_head_dim(int64_t d) { return (d + 15) / 16 * 16; }

// Sequence table from cumulative offsets: start and length of each sequence.
struct SeqTable {
  std::vector<int64_t> q_start, q_len, k_start, k_len;
  int64_t max_q = 0, max_k = 0;
  int64_t count() const { return int64_t(q_len.size()); }
};

SeqTable seqs_from_cu(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t total_q,
                      int64_t total_k, const char* op) {
  TORCH_CHECK(cu_q.dim() == 1 && cu_k.dim() == 1 && cu_q.numel() == cu_k.numel() && cu_q.numel() >= 1,
              op, ": cu_seqlens_q and cu_seqlens_k must be 1-D with the same length >= 1");
  TORCH_CHECK(cu_q.device().is_cpu() && cu_k.device().is_cpu(), op, ": cu_seqlens must be on the CPU");
  TORCH_CHECK(!at::isFloatingType(cu_q.scalar_type()) && !at::isFloatingType(cu_k.scalar_type()), op,
              ": cu_seqlens must be integer tensors");
  at::Tensor cq = cu_q.to(at::kLong).contiguous(), ck = cu_k.to(at::kLong).contiguous();
  const int64_t* a = cq.data_ptr<int64_t>();
  const int64_t* b = ck.data_ptr<int64_t>();
  const int64_t n = cq.numel() - 1;
  SeqTable t;
  t.q_start.resize(n), t.q_len.resize(n), t.k_start.resize(n), t.k_len.resize(n);
  TORCH_CHECK(a[0] == 0 && b[0] == 0, op, ": cu_seqlens must start at 0");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(a[i + 1] >= a[i] && b[i + 1] >= b[i], op, ": cu_seqlens must be non-decreasing");
    t.q_start[i] = a[i], t.q_len[i] = a[i + 1] - a[i];
    t.k_start[i] = b[i], t.k_len[i] = b[i + 1] - b[i];
    t.max_q = std::max(t.max_q, t.q_len[i]);
    t.max_k = std::max(t.max_k, t.k_len[i]);
  }
  TORCH_CHECK(a[n] <= total_q && b[n] <= total_k, op, ": cu_seqlens run past the end of q or k");
  return t;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_cpu_contiguous(q, "q");
  check_cpu_contiguous(k, "k");
  check_cpu_contiguous(v, "v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q, k, v must be (tokens, heads, head_dim)");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must have one dtype");
  TORCH_CHECK(q.size(2) == k.size(2) && q.size(2) >= 1 && q.size(2) <= kAttnMaxHeadDim, op,
              ": head_dim must match and be in 1..", kAttnMaxHeadDim);
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op,
              ": query heads must be a multiple of key/value heads");
}

AttnShape make_shape(const at::Tensor& q, const at::Tensor& k, double scale, bool causal, int64_t window) {
  AttnShape s;
  s.hq = q.size(1);
  s.hkv = k.size(1);
  s.d = q.size(2);
  s.dp = padded_head_dim(s.d);
  s.scale = float(scale);
  s.causal = causal;
  s.window = window > 0 ? window : -1;
  return s;
}

// Keys (and optionally values) of every kv head packed once per call:
//   transposed  [hkv][dp][ld]      column = key token, ld = total_k + one block of zeros
//   rows        [hkv][total_k][dp]
template <typename T>
void pack_keys(const at::Tensor& src, const AttnShape& sh, float* transposed, int64_t ld, float* rows) {
  const int64_t total = src.size(0), dp = sh.dp, hkv = sh.hkv, d = sh.d;
  const T* p = ptr<const T>(src);
  constexpr int64_t chunk = 256;
  const int64_t chunks = (total + chunk - 1) / chunk;
  auto pack_t = MG_ISA_CALL(attn_pack_transposed<T>);
  auto pack_r = MG_ISA_CALL(attn_pack_rows<T>);
  at::parallel_for(0, hkv * chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t h = task / chunks, j0 = (task % chunks) * chunk;
      const int64_t n = std::min(chunk, total - j0);
      const T* s = p + j0 * hkv * d + h * d;
      if (transposed) pack_t(s, hkv * d, n, d, dp, transposed + h * dp * ld + j0, ld);
      if (rows) pack_r(s, hkv * d, n, d, dp, 1.0f, rows + (h * total + j0) * dp);
    }
  });
  if (transposed)
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t dd = 0; dd < dp; ++dd)
        std::fill(transposed + (h * dp + dd) * ld + total, transposed + (h * dp + dd + 1) * ld, 0.0f);
}

// Packing buffers are allocated uninitialized (tens of MB that a zero fill would touch
// once more for nothing): packers write every element a kernel reads.
template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[size_t(n)]);
}

// Outputs are allocated uninitialized and every row inside a sequence is written by a
// kernel; rows past the last sequence (cu_seqlens may stop short of the tensor) are
// set here.
void fill_rows_from(at::Tensor& t, int64_t first, double value) {
  if (first < t.size(0)) t.narrow(0, first, t.size(0) - first).fill_(value);
}

// ---- AVX512-BF16 path ----------------------------------------------------------------------

// Tests switch the bf16 dot-product kernels off to exercise the Vec path on this CPU too.
std::atomic<bool>& bf16_dot_enabled() {
  static std::atomic<bool> on{true};
  return on;
}

bool use_bf16_dot(at::ScalarType st) {
  return st == at::kBFloat16 && active_isa() == Isa::AVX512 && cpu_has_avx512_bf16() &&
         bf16_dot_enabled().load();
}

bool attention_set_bf16_dot(bool enable) { return bf16_dot_enabled().exchange(enable); }

// Key/value packings for the vdpbf16ps kernels (raw bf16 bits, no rounding):
//   ktp [hkv][panel][dp/2][64][2]  keys pair-transposed in panels of 64 keys (lane = key,
//                                  pair = two head dims); sequence b owns panels
//                                  panel_start[b] ..; padding is 0
//   vpi [hkv][npairs][dp][2]       values pair-interleaved: lane = head dim, pair = two keys;
//                                  each sequence starts on a pair (pair_start), padding is 0
void pack_keys_bf16(const at::Tensor& k, const AttnShape& sh, const SeqTable& seqs,
                    const std::vector<int64_t>& panel_start, int64_t panels, uint16_t* ktp) {
  const int64_t hkv = sh.hkv, d = sh.d, dp = sh.dp;
  const BF16* src = ptr<const BF16>(k);
  std::vector<int64_t> first_key(size_t(panels), -1), n_keys(size_t(panels), 0);
  for (int64_t b = 0; b < seqs.count(); ++b)
    for (int64_t j0 = 0; j0 < seqs.k_len[b]; j0 += kAttnBlockK) {
      const int64_t p = panel_start[b] + j0 / kAttnBlockK;
      first_key[p] = seqs.k_start[b] + j0;
      n_keys[p] = std::min<int64_t>(kAttnBlockK, seqs.k_len[b] - j0);
    }
  at::parallel_for(0, hkv * panels, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t h = t / panels, p = t % panels;
      uint16_t* panel = ktp + (h * panels + p) * kAttnBlockK * dp;
      const int64_t nk = n_keys[p];
      if (nk > 0) avx512::pack_pairs_over_d(src + first_key[p] * hkv * d + h * d, hkv * d, nk, d, dp, panel, kAttnBlockK);
      if (nk < kAttnBlockK)  // keys past the end of a panel are 0
        for (int64_t d2 = 0; d2 < dp / 2; ++d2)
          std::memset(panel + (d2 * kAttnBlockK + nk) * 2, 0, size_t(kAttnBlockK - nk) * 4);
    }
  });
}

void pack_values_bf16(const at::Tensor& v, const AttnShape& sh, const SeqTable& seqs,
                      const std::vector<int64_t>& pair_start, int64_t npairs, uint16_t* vpi) {
  const int64_t hkv = sh.hkv, d = sh.d, dp = sh.dp;
  const BF16* src = ptr<const BF16>(v);
  at::parallel_for(0, hkv * seqs.count(), 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t h = t / seqs.count(), sq = t % seqs.count();
      avx512::pack_pairs_over_rows(src + seqs.k_start[sq] * hkv * d + h * d, hkv * d, seqs.k_len[sq], d, dp,
                                   vpi + (h * npairs + pair_start[sq] / 2) * dp * 2, (seqs.k_len[sq] + 1) / 2);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_bf16(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const AttnShape& sh,
                                                      const SeqTable& seqs, at::Tensor out, at::Tensor lse) {
  const int64_t dp = sh.dp, group = sh.hq / sh.hkv;
  std::vector<int64_t> pair_start(size_t(seqs.count())), panel_start(size_t(seqs.count()));
  int64_t slots = 0, panels = 0;
  for (int64_t b = 0; b < seqs.count(); ++b) {
    pair_start[b] = slots;
    slots += (seqs.k_len[b] + 1) / 2 * 2;
    panel_start[b] = panels;
    panels += (seqs.k_len[b] + kAttnBlockK - 1) / kAttnBlockK;
  }
  const int64_t npairs = slots / 2 + 1;
  auto ktp_buf = uninitialized<uint16_t>(sh.hkv * (panels + 1) * kAttnBlockK * dp);
  auto vpi_buf = uninitialized<uint16_t>(sh.hkv * npairs * dp * 2);
  uint16_t* ktp = ktp_buf.get();
  uint16_t* vpi = vpi_buf.get();
  pack_keys_bf16(k, sh, seqs, panel_start, panels + 1, ktp);
  pack_values_bf16(v, sh, seqs, pair_start, npairs, vpi);
  for (int64_t h = 0; h < sh.hkv; ++h)  // the spare pair after the last sequence
    std::memset(vpi + (h * npairs + npairs - 1) * dp * 2, 0, size_t(dp) * 4);
  std::vector<int64_t> units;
  for (int64_t b = 0; b < seqs.count(); ++b)
    for (int64_t h = 0; h < sh.hq; ++h)
      for (int64_t i0 = 0; i0 < seqs.q_len[b]; i0 += kAttnBlockQ) units.insert(units.end(), {b, h, i0});
  const int64_t n_units = int64_t(units.size() / 3), qs = sh.hq * sh.d;
  const BF16* qp = ptr<const BF16>(q);
  BF16* op = ptr<BF16>(out);
  float* lp = ptr<float>(lse);
  at::parallel_for(0, n_units, 1, [&](int64_t ub, int64_t ue) {
    std::vector<float> work(static_cast<size_t>(2 * kAttnBlockQ * dp + 2 * kAttnBlockQ * kAttnBlockK + 2 * kAttnBlockQ));
    for (int64_t u = ub; u < ue; ++u) {
      const int64_t b = units[3 * u], h = units[3 * u + 1], i0 = units[3 * u + 2];
      const int64_t kvh = h / group;
      const int64_t rows = std::min<int64_t>(kAttnBlockQ, seqs.q_len[b] - i0);
      const int64_t tok = seqs.q_start[b] + i0;
      avx512::attn_fwd_block_bf16(sh, qp + tok * qs + h * sh.d, qs, op + tok * qs + h * sh.d, qs,
                                  lp + tok * sh.hq + h, sh.hq, rows, i0, seqs.q_len[b],
                                  ktp + (kvh * (panels + 1) + panel_start[b]) * kAttnBlockK * dp,
                                  vpi + (kvh * npairs + pair_start[b] / 2) * dp * 2,
                                  seqs.k_len[b], work.data());
    }
  });
  return {out, lse};
}

void attention_bwd_bf16(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const AttnShape& sh, const SeqTable& seqs,
                        at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t group = sh.hq / sh.hkv;
  const int64_t qs = sh.hq * sh.d, ks = sh.hkv * sh.d;
  const int64_t work_floats = avx512::attn_bwd_bf16_work_floats(group, seqs.max_q, seqs.max_k, sh.dp);
  const BF16 *qp = ptr<const BF16>(q), *op = ptr<const BF16>(out), *dop = ptr<const BF16>(dout);
  const BF16 *kp = ptr<const BF16>(k), *vp = ptr<const BF16>(v);
  const float* lp = ptr<const float>(lse);
  BF16 *dqp = ptr<BF16>(dq), *dkp = ptr<BF16>(dk), *dvp = ptr<BF16>(dv);
  at::parallel_for(0, seqs.count() * sh.hkv, 1, [&](int64_t ub, int64_t ue) {
    std::vector<float> work(static_cast<size_t>(work_floats));
    for (int64_t u = ub; u < ue; ++u) {
      const int64_t b = u / sh.hkv, kvh = u % sh.hkv;
      const int64_t qo = seqs.q_start[b] * qs + kvh * group * sh.d;
      const int64_t ko = seqs.k_start[b] * ks + kvh * sh.d;
      if (seqs.q_len[b] == 0 || seqs.k_len[b] == 0) {  // nothing to attend: zero gradients
        for (int64_t i = 0; i < seqs.q_len[b]; ++i) std::memset(dqp + qo + i * qs, 0, size_t(group * sh.d) * 2);
        for (int64_t j = 0; j < seqs.k_len[b]; ++j) {
          std::memset(dkp + ko + j * ks, 0, size_t(sh.d) * 2);
          std::memset(dvp + ko + j * ks, 0, size_t(sh.d) * 2);
        }
        continue;
      }
      avx512::attn_bwd_kv_head_bf16(sh, group, seqs.q_len[b], seqs.k_len[b], qp + qo, op + qo, dop + qo,
                                    lp + seqs.q_start[b] * sh.hq + kvh * group, qs, sh.hq, dqp + qo, dkp + ko,
                                    dvp + ko, kp + ko, vp + ko, ks, work.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& cu_q,
                                                 const at::Tensor& cu_k, double scale, bool causal,
                                                 int64_t window) {
  check_qkv(q, k, v, "attention_fwd");
  const AttnShape sh = make_shape(q, k, scale, causal, window);
  const SeqTable seqs = seqs_from_cu(cu_q, cu_k, q.size(0), k.size(0), "attention_fwd");
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), sh.hq}, q.options().dtype(at::kFloat));
  const int64_t covered = seqs.count() ? seqs.q_start.back() + seqs.q_len.back() : 0;
  fill_rows_from(out, covered, 0.0);  // rows not covered by cu_seqlens are 0
  fill_rows_from(lse, covered, -INFINITY);
  const int64_t total_k = k.size(0), dp = sh.dp, group = sh.hq / sh.hkv;
  if (q.size(0) == 0 || seqs.count() == 0) return {out, lse};
  if (use_bf16_dot(q.scalar_type())) return attention_fwd_bf16(q, k, v, sh, seqs, out, lse);
  const int64_t ld = total_k + kAttnBlockK;
  auto kt_buf = uninitialized<float>(sh.hkv * dp * ld), vp_buf = uninitialized<float>(sh.hkv * total_k * dp);
  float* kt = kt_buf.get();
  float* vp = vp_buf.get();
  // work units: (sequence, head, query block)
  std::vector<int64_t> units;  // triples
  for (int64_t b = 0; b < seqs.count(); ++b)
    for (int64_t h = 0; h < sh.hq; ++h)
      for (int64_t i0 = 0; i0 < seqs.q_len[b]; i0 += kAttnBlockQ) units.insert(units.end(), {b, h, i0});
  const int64_t n_units = int64_t(units.size() / 3);
  const int64_t qs = sh.hq * sh.d;
  dispatch_float_types(q.scalar_type(), "attention_fwd", [&]<typename T>() {
    pack_keys<T>(k, sh, kt, ld, nullptr);
    pack_keys<T>(v, sh, nullptr, 0, vp);
    auto kernel = MG_ISA_CALL(attn_fwd_block<T>);
    const T* qp = ptr<const T>(q);
    T* op = ptr<T>(out);
    float* lp = ptr<float>(lse);
    at::parallel_for(0, n_units, 1, [&](int64_t ub, int64_t ue) {
      std::vector<float> work(size_t(2 * kAttnBlockQ * dp + kAttnBlockQ * kAttnBlockK + 2 * kAttnBlockQ));
      for (int64_t u = ub; u < ue; ++u) {
        const int64_t b = units[3 * u], h = units[3 * u + 1], i0 = units[3 * u + 2];
        const int64_t kvh = h / group;
        const int64_t rows = std::min<int64_t>(kAttnBlockQ, seqs.q_len[b] - i0);
        const int64_t tok = seqs.q_start[b] + i0;
        kernel(sh, qp + tok * qs + h * sh.d, qs, op + tok * qs + h * sh.d, qs, lp + tok * sh.hq + h, sh.hq,
               rows, i0, seqs.q_len[b], kt + kvh * dp * ld + seqs.k_start[b], ld,
               vp + (kvh * total_k + seqs.k_start[b]) * dp, seqs.k_len[b], work.data());
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    double scale, bool causal, int64_t window) {
  check_qkv(q, k, v, "attention_bwd");
  check_cpu_contiguous(dout, "dout");
  check_cpu_contiguous(out, "out");
  check_cpu_contiguous(lse, "lse");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "attention_bwd: dout and out must match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1),
              "attention_bwd: lse must be float32 (total_q, Hq)");
  const AttnShape sh = make_shape(q, k, scale, causal, window);
  const SeqTable seqs = seqs_from_cu(cu_q, cu_k, q.size(0), k.size(0), "attention_bwd");
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  fill_rows_from(dq, seqs.count() ? seqs.q_start.back() + seqs.q_len.back() : 0, 0.0);
  const int64_t covered_k = seqs.count() ? seqs.k_start.back() + seqs.k_len.back() : 0;
  fill_rows_from(dk, covered_k, 0.0);
  fill_rows_from(dv, covered_k, 0.0);
  const int64_t total_k = k.size(0), dp = sh.dp, group = sh.hq / sh.hkv;
  if (seqs.count() == 0 || total_k == 0) return {dq, dk, dv};
  if (use_bf16_dot(q.scalar_type())) {
    attention_bwd_bf16(dout, q, k, v, out, lse, sh, seqs, dq, dk, dv);
    return {dq, dk, dv};
  }
  const int64_t ld = total_k + kAttnBlockK;
  auto kt_buf = uninitialized<float>(sh.hkv * dp * ld), vt_buf = uninitialized<float>(sh.hkv * dp * ld),
       kp_buf = uninitialized<float>(sh.hkv * total_k * dp);
  float *kt = kt_buf.get(), *vt = vt_buf.get(), *kp = kp_buf.get();
  const int64_t qs = sh.hq * sh.d, ks = sh.hkv * sh.d;
  const int64_t nq = group * seqs.max_q;
  const int64_t work_floats =
      3 * nq * dp + 2 * nq + 2 * kAttnBlockK * dp + 2 * kAttnBlockQ * kAttnBlockK + dp;
  dispatch_float_types(q.scalar_type(), "attention_bwd", [&]<typename T>() {
    pack_keys<T>(k, sh, kt, ld, kp);
    pack_keys<T>(v, sh, vt, ld, nullptr);
    auto kernel = MG_ISA_CALL(attn_bwd_kv_head<T>);
    const T *qp = ptr<const T>(q), *op = ptr<const T>(out), *dop = ptr<const T>(dout);
    const float* lp = ptr<const float>(lse);
    T *dqp = ptr<T>(dq), *dkp = ptr<T>(dk), *dvp = ptr<T>(dv);
    at::parallel_for(0, seqs.count() * sh.hkv, 1, [&](int64_t ub, int64_t ue) {
      std::vector<float> work(static_cast<size_t>(work_floats));
      for (int64_t u = ub; u < ue; ++u) {
        const int64_t b = u / sh.hkv, kvh = u % sh.hkv;
        const int64_t qo = seqs.q_start[b] * qs + kvh * group * sh.d;
        const int64_t ko = seqs.k_start[b] * ks + kvh * sh.d;
        const int64_t col = kvh * dp * ld + seqs.k_start[b];
        kernel(sh, group, seqs.q_len[b], seqs.k_len[b], qp + qo, op + qo, dop + qo,
               lp + seqs.q_start[b] * sh.hq + kvh * group, qs, sh.hq, dqp + qo, dkp + ko, dvp + ko, ks,
               kt + col, vt + col, ld, kp + (kvh * total_k + seqs.k_start[b]) * dp,
               work.data());
      }
    });
  });
  return {dq, dk, dv};
}

at::Tensor attention_kvcache(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                             const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                             const std::optional<at::Tensor>& v_new, double scale, bool causal) {
  check_cpu_contiguous(q, "q");
  check_cpu_contiguous(k_cache, "k_cache");
  check_cpu_contiguous(v_cache, "v_cache");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "attention_kvcache: q (B, Tq, Hq, D) and caches (B, S, Hkv, D) of equal shape expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "attention_kvcache: q and caches must have one dtype");
  const int64_t B = q.size(0), Tq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t S = k_cache.size(1), hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == d && d >= 1 && d <= kAttnMaxHeadDim &&
                  hq % hkv == 0,
              "attention_kvcache: cache shape does not match q");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.numel() == B && cache_seqlens.device().is_cpu() &&
                  !at::isFloatingType(cache_seqlens.scalar_type()),
              "attention_kvcache: cache_seqlens must be an integer (B,) CPU tensor");
  const bool has_new = k_new.has_value() && k_new->defined();
  TORCH_CHECK(has_new == (v_new.has_value() && v_new->defined()),
              "attention_kvcache: pass both k_new and v_new or neither");
  int64_t tn = 0;
  if (has_new) {
    check_cpu_contiguous(*k_new, "k_new");
    check_cpu_contiguous(*v_new, "v_new");
    TORCH_CHECK(k_new->dim() == 4 && k_new->sizes() == v_new->sizes() && k_new->size(0) == B &&
                    k_new->size(2) == hkv && k_new->size(3) == d &&
                    k_new->scalar_type() == q.scalar_type() && v_new->scalar_type() == q.scalar_type(),
                "attention_kvcache: k_new/v_new must be (B, Tn, Hkv, D) of q's dtype");
    tn = k_new->size(1);
  }
  at::Tensor lens = cache_seqlens.to(at::kLong).contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] + tn <= S, "attention_kvcache: row ", b, " has ", lp[b],
                " cached entries; adding ", tn, " exceeds the cache capacity ", S);
  const int64_t row = hkv * d;
  if (has_new) {
    const size_t es = k_cache.element_size();
    char* kc = static_cast<char*>(k_cache.data_ptr());
    char* vc = static_cast<char*>(v_cache.data_ptr());
    const char* kn = static_cast<const char*>(k_new->data_ptr());
    const char* vn = static_cast<const char*>(v_new->data_ptr());
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(kc + ((b * S + lp[b]) * row) * es, kn + (b * tn * row) * es, size_t(tn * row) * es);
      std::memcpy(vc + ((b * S + lp[b]) * row) * es, vn + (b * tn * row) * es, size_t(tn * row) * es);
    }
  }
  at::Tensor out = at::empty_like(q);
  AttnShape sh;
  sh.hq = hq, sh.hkv = hkv, sh.d = d, sh.dp = padded_head_dim(d);
  sh.scale = float(scale), sh.causal = causal, sh.window = -1;
  const int64_t group = hq / hkv, rows = group * Tq, dp = sh.dp;
  if (B == 0 || Tq == 0) return out;
  const int64_t work_floats = 2 * rows * dp + rows * kAttnBlockK + 2 * rows + 2 * kAttnBlockK * dp;
  const int64_t qs = hq * d;
  dispatch_float_types(q.scalar_type(), "attention_kvcache", [&]<typename T>() {
    auto kernel = MG_ISA_CALL(attn_decode_kv_head<T>);
    const T* qp = ptr<const T>(q);
    T* op = ptr<T>(out);
    const T* kp = ptr<const T>(k_cache);
    const T* vp = ptr<const T>(v_cache);
    at::parallel_for(0, B * hkv, 1, [&](int64_t ub, int64_t ue) {
      std::vector<float> work(static_cast<size_t>(work_floats));
      for (int64_t u = ub; u < ue; ++u) {
        const int64_t b = u / hkv, kvh = u % hkv;
        const int64_t qo = b * Tq * qs + kvh * group * d;
        const int64_t ko = b * S * row + kvh * d;
        kernel(sh, group, Tq, lp[b] + tn, qp + qo, qs, op + qo, kp + ko, vp + ko, row, work.data());
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, float scale, "
      "bool causal, int window) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, float scale, bool causal, int window) -> (Tensor, Tensor, Tensor)");
  // no tensor arguments, so a catch-all kernel; returns the previous setting
  m.def("attention_set_bf16_dot(bool enable) -> bool", &minigpt::cpu::attention_set_bf16_dot);
  m.def(
      "attention_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
      "Tensor? k_new, Tensor? v_new, float scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("attention_fwd", &minigpt::cpu::attention_fwd);
  m.impl("attention_bwd", &minigpt::cpu::attention_bwd);
  m.impl("attention_kvcache", &minigpt::cpu::attention_kvcache);
}
