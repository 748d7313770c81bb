// csrc/cpu/gemv.cpp -- the small-batch linear layer y = x W^T (+ b) on the CPU.
//
// The math lives in gemv_kernel.h; this file checks arguments, allocates the output,
// splits the output features across threads and picks the kernel. Registered as
//   torch.ops.minigpt.gemv(x, weight, bias?, float_out) -> y
// with x (M, K) and weight (N, K) contiguous, one dtype (float32 / bfloat16 /
// float16), bias (N,) of that dtype, y (M, N) in that dtype or float32 (float_out).
// Meant for M up to a few dozen rows (decoding); a large M works but a blocked GEMM
// (torch.mm) is faster there. The fake implementation is in minigpt/kernels/linear.py.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu/common.h"
#include "cpu/isa.h"

#define MG_KERNEL_FILE "cpu/gemv_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                bool float_out) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "gemv: x must be (M, K) and weight (N, K)");
  TORCH_CHECK(x.size(1) == weight.size(1), "gemv: x has ", x.size(1), " features but weight has ",
              weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "gemv: x and weight must have one dtype");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cpu_contiguous(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == weight.scalar_type(),
                "gemv: bias must be (N,) of weight's dtype");
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : x.scalar_type()));
  if (M == 0 || N == 0) return y;
  if (K == 0) {  // an empty sum: y is the bias (or zeros)
    y.zero_();
    if (has_bias) y.add_(bias->to(y.scalar_type()));
    return y;
  }
  // Blocks of 4 output rows; a task gets >= ~64 KiB of weights so a thread hand-off pays.
  const int64_t blocks = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 65536 / (4 * K * int64_t(weight.element_size())));
  dispatch_float_types(x.scalar_type(), "gemv", [&]<typename T>() {
    auto run = [&]<typename O>() {
      const T* xp = ptr<const T>(x);
      const T* wp = ptr<const T>(weight);
      const T* bp = has_bias ? ptr<const T>(*bias) : nullptr;
      O* yp = ptr<O>(y);
      auto kernel = MG_ISA_CALL(gemv_rows<T, O>);
#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
      if constexpr (std::is_same_v<T, BF16>) {
        if (active_isa() == Isa::AVX512 && cpu_has_avx512_bf16()) kernel = avx512::gemv_rows_bf16dp<O>;
      }
#endif
      at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
        kernel(xp, M, K, wp, bp, yp, N, b * 4, std::min(N, e * 4));
      });
    };
    if (float_out)
      run.template operator()<float>();
    else
      run.template operator()<T>();
  });
  return y;
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias, bool float_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) { m.impl("gemv", &minigpt::cpu::gemv); }
