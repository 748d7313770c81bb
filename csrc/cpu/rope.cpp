// csrc/cpu/rope.cpp -- rotary position embedding (RoPE) of queries and keys on the CPU.
//
// The math lives in rope_kernel.h; this file checks arguments, allocates
// outputs (from the output pool, see output_pool.h), splits tokens across
// threads and picks the SIMD variant. Registered as
//   torch.ops.minigpt.rope_rotate(q, k, cos, sin, inverse) -> (q_rot, k_rot)
// with q (B, T, Hq, D) and k (B, T, Hk, D) of one dtype, each head's D values
// contiguous (other strides are free: q may be a view into a fused QKV tensor),
// and cos/sin (Bc, T, D/2) contiguous with Bc = 1 (shared positions) or B
// (per-row positions), float32 or the activation dtype. inverse=true rotates by
// the negative angle, which is the backward pass. Outputs are contiguous.
// Shapes for torch.compile come from the fake implementation in
// minigpt/kernels/rope.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/output_pool.h"

#define MG_KERNEL_FILE "cpu/rope_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

// Streaming (non-temporal) stores pay off only when the outputs are larger than
// the caches. MINIGPT_STREAM_STORES_MB sets the threshold (total output MiB,
// default 16; 0 turns streaming off), for measurements.
size_t stream_threshold_bytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("MINIGPT_STREAM_STORES_MB");
    const size_t mb = (env && *env) ? size_t(std::strtoull(env, nullptr, 10)) : 16;
    return mb == 0 ? SIZE_MAX : mb << 20;
  }();
  return bytes;
}

void check_qk(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, "rope_rotate: ", name, " must be 4-D (B, T, H, D)");
  TORCH_CHECK(x.size(3) == 0 || x.stride(3) == 1, "rope_rotate: ", name,
              " must be contiguous in its last (head) dimension");
}

std::tuple<at::Tensor, at::Tensor> rope_rotate(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& cos, const at::Tensor& sin,
                                               bool inverse) {
  check_qk(q, "q");
  check_qk(k, "k");
  check_cpu_contiguous(cos, "cos");
  check_cpu_contiguous(sin, "sin");
  const int64_t B = q.size(0), T = q.size(1), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == T && k.size(3) == D,
              "rope_rotate: k must match q in batch, sequence and head-dim sizes");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "rope_rotate: k must have q's dtype");
  TORCH_CHECK(D % 2 == 0, "rope_rotate: head dim must be even");
  const int64_t half = D / 2;
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(1) == T &&
                  cos.size(2) == half && (cos.size(0) == 1 || cos.size(0) == B),
              "rope_rotate: cos and sin must have shape (1 or B, T, D/2)");
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type() &&
                  (cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat),
              "rope_rotate: cos/sin must have q's dtype or float32");
  at::Tensor qo = pooled_empty(q.sizes(), q.scalar_type());
  at::Tensor ko = pooled_empty(k.sizes(), k.scalar_type());
  const int64_t tokens = B * T, hq = q.size(2), hk = k.size(2);
  if (tokens == 0 || D == 0 || (hq == 0 && hk == 0)) return {qo, ko};
  const int64_t cos_sb = cos.size(0) == 1 ? 0 : T * half;
  const float sign = inverse ? -1.0f : 1.0f;
  dispatch_float_types(q.scalar_type(), "rope_rotate", [&]<typename T_>() {
    auto run = [&]<typename C>() {
      // Non-temporal stores for outputs larger than the caches (see vec.h).
      const bool stream = qo.nbytes() + ko.nbytes() >= stream_threshold_bytes();
      auto kernel = stream ? MG_ISA_CALL(rope_tokens<T_, C, true>)
                           : MG_ISA_CALL(rope_tokens<T_, C, false>);
      const C* cp = ptr<const C>(cos);
      const C* sp = ptr<const C>(sin);
      const T_* qp = ptr<const T_>(q);
      const T_* kp = ptr<const T_>(k);
      T_* qop = ptr<T_>(qo);
      T_* kop = ptr<T_>(ko);
      at::parallel_for(0, tokens, row_grain((hq + hk) * D), [&](int64_t b, int64_t e) {
        // q then k for the same tokens, while their cos/sin rows are in L1.
        kernel(qp, q.stride(0), q.stride(1), q.stride(2), qop, cp, sp, cos_sb, T, hq, half, sign,
               b, e);
        kernel(kp, k.stride(0), k.stride(1), k.stride(2), kop, cp, sp, cos_sb, T, hk, half, sign,
               b, e);
      });
    };
    if (cos.scalar_type() == at::kFloat)
      run.template operator()<float>();
    else
      run.template operator()<T_>();
  });
  return {qo, ko};
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def("rope_rotate(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) { m.impl("rope_rotate", &minigpt::cpu::rope_rotate); }
