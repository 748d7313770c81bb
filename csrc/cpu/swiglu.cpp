// csrc/cpu/swiglu.cpp -- SwiGLU activation, silu(gate) * up, on the CPU.
//
// The math lives in swiglu_kernel.h; this file checks arguments, allocates
// outputs (from the output pool, see output_pool.h), splits the elements
// across threads and picks the SIMD variant.
// Registered as
//   torch.ops.minigpt.swiglu_fwd(gate, up) -> y
//   torch.ops.minigpt.swiglu_bwd(dy, gate, up) -> (dgate, dup)
// on contiguous tensors of one shape and dtype (any rank: the kernel sees a
// flat array). Shapes for torch.compile come from the fake implementations in
// minigpt/kernels/swiglu.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <immintrin.h>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/output_pool.h"

#define MG_KERNEL_FILE "cpu/swiglu_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

// Elements per parallel task: big enough to amortize a thread hand-off, and a
// multiple of 64 so every task but the last starts on a cache-line boundary.
constexpr int64_t kGrain = 1 << 15;

void check_same(const at::Tensor& a, const at::Tensor& ref, const char* name, const char* op) {
  check_cpu_contiguous(a, name);
  TORCH_CHECK(a.sizes() == ref.sizes() && a.scalar_type() == ref.scalar_type(), op, ": ", name,
              " must match gate in shape and dtype");
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_cpu_contiguous(gate, "gate");
  check_same(up, gate, "up", "swiglu_fwd");
  at::Tensor y = pooled_empty(gate.sizes(), gate.scalar_type());
  const int64_t n = gate.numel();
  if (n == 0) return y;
  dispatch_float_types(gate.scalar_type(), "swiglu_fwd", [&]<typename T>() {
    auto kernel = MG_ISA_CALL(swiglu_fwd_span<T>);
    const T* gp = ptr<const T>(gate);
    const T* up_ = ptr<const T>(up);
    T* yp = ptr<T>(y);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      kernel(gp + b, up_ + b, yp + b, e - b);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  check_cpu_contiguous(gate, "gate");
  check_same(up, gate, "up", "swiglu_bwd");
  check_same(dy, gate, "dy", "swiglu_bwd");
  at::Tensor dg = pooled_empty(gate.sizes(), gate.scalar_type());
  at::Tensor du = pooled_empty(gate.sizes(), gate.scalar_type());
  const int64_t n = gate.numel();
  if (n == 0) return {dg, du};
  dispatch_float_types(gate.scalar_type(), "swiglu_bwd", [&]<typename T>() {
    auto kernel = MG_ISA_CALL(swiglu_bwd_span<T>);
    const T* dyp = ptr<const T>(dy);
    const T* gp = ptr<const T>(gate);
    const T* up_ = ptr<const T>(up);
    T* dgp = ptr<T>(dg);
    T* dup = ptr<T>(du);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      kernel(dyp + b, gp + b, up_ + b, dgp + b, dup + b, e - b);
    });
  });
  return {dg, du};
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("swiglu_fwd", &minigpt::cpu::swiglu_fwd);
  m.impl("swiglu_bwd", &minigpt::cpu::swiglu_bwd);
}
