// csrc/cpu/gemv_decode_step.cpp -- one whole Llama decode step in one C++ call.
//
// At batch 1 a decode step is ~10 small kernels per layer plus the LM head. Called
// one by one, each costs interpreter/dispatcher time, an output allocation and a
// thread fork/join -- for a 30-layer model milliseconds per token, a real share of
// a step whose useful work (reading the weights) takes ~10-20 ms. This op starts
// the thread team once per step and runs every layer and the LM head inside it
// (the math, and which thread does what, is in gemv_decode_kernel.h).
//
// Registered as torch.ops.minigpt.gemv_decode_step(h, attn_norm_w, qkv_w, o_w,
// mlp_norm_w, up_w, down_w, k_caches, v_caches, cache_row, positions, head_rows, cos,
// sin, final_norm_w, head_w, n_head, n_kv_head, head_dim, eps, scale) -> float32
// logits (len(head_rows), V). Row r of h is the token at positions[r] of sequence
// cache_row[r]: decoding passes one row per sequence (positions = seqlens), a
// prefill the tokens of a prompt. Keys/values are appended at those positions;
// the caller advances seqlens.
// minigpt/infer/fast_decode.py is the caller (and the readable Python version of
// the same step).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/common.h"
#include "cpu/gemv_decode_args.h"
#include "cpu/isa.h"

#define MG_KERNEL_FILE "cpu/gemv_decode_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

using Tensor = at::Tensor;

void check_shape(const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const char* name) {
  check_cpu_contiguous(t, name);
  TORCH_CHECK(t.sizes() == shape, "gemv_decode_step: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "gemv_decode_step: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

template <typename T>
std::vector<T*> pointers(at::TensorList ts) {
  std::vector<T*> out;
  for (const Tensor& t : ts) out.push_back(ptr<T>(t));
  return out;
}

Tensor gemv_decode_step(const Tensor& h, at::TensorList attn_norm_w, at::TensorList qkv_w,
                        at::TensorList o_w, at::TensorList mlp_norm_w, at::TensorList up_w,
                        at::TensorList down_w, at::TensorList k_caches, at::TensorList v_caches,
                        const Tensor& cache_row, const Tensor& positions, const Tensor& head_rows,
                        const Tensor& cos, const Tensor& sin,
                        const Tensor& final_norm_w, const Tensor& head_w, int64_t n_head,
                        int64_t n_kv_head, int64_t head_dim, double eps, double scale) {
  const int64_t L = int64_t(attn_norm_w.size());
  TORCH_CHECK(L >= 1 && int64_t(qkv_w.size()) == L && int64_t(o_w.size()) == L &&
                  int64_t(mlp_norm_w.size()) == L && int64_t(up_w.size()) == L &&
                  int64_t(down_w.size()) == L && int64_t(k_caches.size()) == L &&
                  int64_t(v_caches.size()) == L,
              "gemv_decode_step: every weight / cache list needs one entry per layer");
  check_cpu_contiguous(h, "h");
  TORCH_CHECK(h.dim() == 2 && h.size(0) >= 1, "gemv_decode_step: h must be (B, d_model)");
  const int64_t B = h.size(0), d = h.size(1), H = n_head, Hkv = n_kv_head, D = head_dim;
  TORCH_CHECK(H >= 1 && Hkv >= 1 && H % Hkv == 0 && D >= 2 && D % 2 == 0,
              "gemv_decode_step: need n_head a multiple of n_kv_head and an even head_dim");
  const auto dt = h.scalar_type();
  TORCH_CHECK(k_caches[0].dim() == 4, "gemv_decode_step: caches must be (B, max_len, Hkv, D)");
  const int64_t batch = k_caches[0].size(0), max_len = k_caches[0].size(1);
  TORCH_CHECK(up_w[0].dim() == 2 && up_w[0].size(0) % 2 == 0, "gemv_decode_step: bad up_w");
  const int64_t F = up_w[0].size(0) / 2, qkv_n = (H + 2 * Hkv) * D;
  for (int64_t l = 0; l < L; ++l) {
    check_shape(attn_norm_w[l], {d}, dt, "attn_norm_w");
    check_shape(qkv_w[l], {qkv_n, d}, dt, "qkv_w");
    check_shape(o_w[l], {d, H * D}, dt, "o_w");
    check_shape(mlp_norm_w[l], {d}, dt, "mlp_norm_w");
    check_shape(up_w[l], {2 * F, d}, dt, "up_w");
    check_shape(down_w[l], {d, F}, dt, "down_w");
    check_shape(k_caches[l], {batch, max_len, Hkv, D}, dt, "k_caches");
    check_shape(v_caches[l], {batch, max_len, Hkv, D}, dt, "v_caches");
  }
  check_shape(final_norm_w, {d}, dt, "final_norm_w");
  TORCH_CHECK(head_w.dim() == 2, "gemv_decode_step: head_w must be (V, d_model)");
  const int64_t V = head_w.size(0);
  check_shape(head_w, {V, d}, dt, "head_w");
  check_shape(cos, {cos.size(0), D / 2}, at::kFloat, "cos");
  check_shape(sin, cos.sizes(), at::kFloat, "sin");
  check_shape(cache_row, {B}, at::kLong, "cache_row");
  check_shape(positions, {B}, at::kLong, "positions");
  check_cpu_contiguous(head_rows, "head_rows");
  TORCH_CHECK(head_rows.dim() == 1 && head_rows.scalar_type() == at::kLong,
              "gemv_decode_step: head_rows must be a 1-D int64 tensor");
  TORCH_CHECK(cos.size(0) >= max_len, "gemv_decode_step: cos/sin need max_len rows");
  const int64_t* seq = ptr<const int64_t>(cache_row);
  const int64_t* pos = ptr<const int64_t>(positions);
  for (int64_t r = 0; r < B; ++r) {
    TORCH_CHECK(seq[r] >= 0 && seq[r] < batch, "gemv_decode_step: row ", r, " has cache row ",
                seq[r], " but the cache has ", batch);
    TORCH_CHECK(pos[r] >= 0 && pos[r] < max_len, "gemv_decode_step: row ", r, " at position ",
                pos[r], " is outside the KV cache (", max_len, " positions)");
    for (int64_t q = 0; q < r; ++q)  // two rows writing one cache slot would race
      TORCH_CHECK(seq[q] != seq[r] || pos[q] != pos[r], "gemv_decode_step: rows ", q, " and ", r,
                  " are the same position of the same sequence");
  }
  const int64_t n_head_rows = head_rows.size(0);
  const int64_t* hrows = ptr<const int64_t>(head_rows);
  for (int64_t i = 0; i < n_head_rows; ++i)
    TORCH_CHECK(hrows[i] >= 0 && hrows[i] < B, "gemv_decode_step: head_rows[", i, "] = ",
                hrows[i], " is not a row");
  TORCH_CHECK(n_head_rows <= B, "gemv_decode_step: more head_rows than rows");

  int team = 1;
#ifdef _OPENMP
  if (!at::in_parallel_region()) team = std::max(1, at::get_num_threads());
#endif
  Tensor logits = at::empty({n_head_rows, V}, h.options().dtype(at::kFloat));
  // one workspace: shared results, then each thread's scratch (see the kernel)
  const int64_t shared = B * (qkv_n + H * D + d + F + d);
  const int64_t share_f = (F + 4 * team - 1) / team + 4;  // >= any thread's feature share
  const int64_t per_thread = 3 * B * d + 2 * D + 2 * B * share_f;
  const int64_t per_thread_f = D + max_len + 1;
  Tensor work = at::empty({shared + team * per_thread}, h.options());
  Tensor fwork = at::empty({team * per_thread_f}, h.options().dtype(at::kFloat));

  dispatch_float_types(dt, "gemv_decode_step", [&]<typename T>() {
    auto norm1 = pointers<const T>(attn_norm_w), qkv = pointers<const T>(qkv_w),
         o = pointers<const T>(o_w), norm2 = pointers<const T>(mlp_norm_w),
         up = pointers<const T>(up_w), down = pointers<const T>(down_w);
    auto kc = pointers<T>(k_caches), vc = pointers<T>(v_caches);
    T* w = ptr<T>(work);
    DecodeStepArgs<T> a{};
    a.B = B, a.d = d, a.H = H, a.Hkv = Hkv, a.D = D, a.F = F, a.V = V, a.L = L;
    a.max_len = max_len;
    a.attn_norm_w = norm1.data(), a.qkv_w = qkv.data(), a.o_w = o.data();
    a.mlp_norm_w = norm2.data(), a.up_w = up.data(), a.down_w = down.data();
    a.k_cache = kc.data(), a.v_cache = vc.data();
    a.cache_row = seq, a.positions = pos, a.head_rows = hrows, a.n_head_rows = n_head_rows;
    a.cos = ptr<const float>(cos), a.sin = ptr<const float>(sin);
    a.final_norm_w = ptr<const T>(final_norm_w), a.head_w = ptr<const T>(head_w);
    a.eps = float(eps), a.scale = float(scale);
    a.bf16dp = false;
#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
    a.bf16dp = std::is_same_v<T, BF16> && active_isa() == Isa::AVX512 && cpu_has_avx512_bf16();
#endif
    a.h_in = ptr<const T>(h);
    a.qkv = w, a.y = w + B * qkv_n, a.o = a.y + B * H * D, a.act = a.o + B * d;
    a.delta = a.act + B * F, a.logits = ptr<float>(logits);
    a.scratch_elems = per_thread, a.scratch_floats = per_thread_f;
    auto run = [&](int tid, int nt, void (*barrier)()) {
      auto args = a;
      args.scratch = w + shared + tid * per_thread;
      args.fscratch = ptr<float>(fwork) + tid * per_thread_f;
      MG_ISA_CALL(decode_step_team<T>)(args, tid, nt, barrier);
    };
    if (team == 1) {
      run(0, 1, [] {});
      return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(team)
    {
      run(omp_get_thread_num(), omp_get_num_threads(), [] {
#pragma omp barrier
      });
    }
#endif
  });
  return logits;
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def(
      "gemv_decode_step(Tensor h, Tensor[] attn_norm_w, Tensor[] qkv_w, Tensor[] o_w, "
      "Tensor[] mlp_norm_w, Tensor[] up_w, Tensor[] down_w, Tensor(a!)[] k_caches, "
      "Tensor(b!)[] v_caches, Tensor cache_row, Tensor positions, Tensor head_rows, Tensor cos, "
      "Tensor sin, Tensor final_norm_w, Tensor head_w, int n_head, int n_kv_head, int head_dim, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) { m.impl("gemv_decode_step", &minigpt::cpu::gemv_decode_step); }
