// csrc/cpu/rms_norm.cpp -- RMSNorm (and fused residual-add + RMSNorm) on the CPU.
//
// The math lives in rms_norm_kernel.h; this file checks arguments, allocates
// outputs, splits rows across threads and picks the SIMD variant. Registered as
//   torch.ops.minigpt.rms_norm_fwd(x, residual?, weight, eps) -> (y, h, rstd)
//   torch.ops.minigpt.rms_norm_bwd(dy, h, weight, rstd, dh_extra?) -> (dh, dw)
// on contiguous inputs of any rank >= 1, seen as (rows, n) with n the last
// dimension (taking any rank saves the Python side two reshapes, whose autograd
// view nodes cost as much as the kernel on small inputs). Shapes for torch.compile come from the fake
// implementations in minigpt/kernels/rms_norm.py.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/output_pool.h"

#define MG_KERNEL_FILE "cpu/rms_norm_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

// bfloat16 outputs converted by the CPU's own instruction (the kNativeBF16 kernels):
// only when the AVX-512 kernels are active and the CPU has AVX512-BF16.
// MINIGPT_NATIVE_BF16=0 turns it off (to compare, and to test the other path).
bool native_bf16() {
  static const bool allowed = [] {
    const char* env = std::getenv("MINIGPT_NATIVE_BF16");
    return !(env && env[0] == '0') && cpu_has_avx512_bf16();
  }();
  return allowed && active_isa() == Isa::AVX512;
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(weight, "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (..., n)");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op,
              ": weight must have shape (n,)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, op,
              ": weight must have x's dtype or float32");
}

// Rows of a (..., n) tensor: the product of all but the last dimension.
int64_t rows_of(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                            const std::optional<at::Tensor>& residual,
                                                            const at::Tensor& weight, double eps) {
  check_args(x, weight, "rms_norm_fwd");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_cpu_contiguous(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm_fwd: residual must match x in shape and dtype");
  }
  const int64_t rows = rows_of(x), n = x.size(-1);
  // Large outputs come from the output pool: no fresh page faults every step.
  at::Tensor y = pooled_empty(x.sizes(), x.scalar_type());
  at::Tensor h = has_res ? pooled_empty(x.sizes(), x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return {y, h, rstd};
  dispatch_float_types(x.scalar_type(), "rms_norm_fwd", [&]<typename T>() {
    auto run = [&]<typename W>() {
      auto kernel = MG_ISA_CALL(rms_norm_fwd_rows<T, W>);
      if (std::is_same_v<T, BF16> && native_bf16())
        kernel = MG_ISA_CALL(rms_norm_fwd_rows<T, W, true>);
      const T* xp = ptr<const T>(x);
      const T* rp = has_res ? ptr<const T>(*residual) : nullptr;
      T* yp = ptr<T>(y);
      T* hp = has_res ? ptr<T>(h) : nullptr;
      const W* wp = ptr<const W>(weight);
      float* sp = ptr<float>(rstd);
      at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
        kernel(xp + b * n, rp ? rp + b * n : nullptr, wp, yp + b * n, hp ? hp + b * n : nullptr,
               sp + b, e - b, n, float(eps));
      });
    };
    if (weight.scalar_type() == at::kFloat)
      run.template operator()<float>();
    else
      run.template operator()<T>();
  });
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& h,
                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& dh_extra) {
  check_args(h, weight, "rms_norm_bwd");
  check_cpu_contiguous(dy, "dy");
  check_cpu_contiguous(rstd, "rstd");
  TORCH_CHECK(dy.sizes() == h.sizes() && dy.scalar_type() == h.scalar_type(),
              "rms_norm_bwd: dy must match h in shape and dtype");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows_of(h),
              "rms_norm_bwd: rstd must be float32 with one value per row");
  const bool has_extra = dh_extra.has_value() && dh_extra->defined();
  if (has_extra) {
    check_cpu_contiguous(*dh_extra, "dh_extra");
    TORCH_CHECK(dh_extra->sizes() == h.sizes() && dh_extra->scalar_type() == h.scalar_type(),
                "rms_norm_bwd: dh_extra must match h in shape and dtype");
  }
  const int64_t rows = rows_of(h), n = h.size(-1);
  at::Tensor dh = pooled_empty(h.sizes(), h.scalar_type());
  // Each thread sums its rows' weight gradient into its own float32 row, so no
  // atomics are needed; the rows are added at the end, here rather than with
  // ATen ops (zeros + sum + cast would be three more dispatches, which show at
  // small sizes where the whole backward takes ~0.1 ms).
  const int64_t nthreads = at::get_num_threads();
  std::vector<float> dw_acc(size_t(nthreads * n), 0.0f);
  at::Tensor dw = at::empty({n}, weight.options());
  if (rows > 0 && n > 0) {
    dispatch_float_types(h.scalar_type(), "rms_norm_bwd", [&]<typename T>() {
      auto run = [&]<typename W>() {
        auto kernel = MG_ISA_CALL(rms_norm_bwd_rows<T, W>);
        if (std::is_same_v<T, BF16> && native_bf16())
          kernel = MG_ISA_CALL(rms_norm_bwd_rows<T, W, true>);
        const T* dyp = ptr<const T>(dy);
        const T* hp = ptr<const T>(h);
        const T* ep = has_extra ? ptr<const T>(*dh_extra) : nullptr;
        const W* wp = ptr<const W>(weight);
        const float* sp = ptr<const float>(rstd);
        T* dhp = ptr<T>(dh);
        float* accp = dw_acc.data();
        at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
          float* acc = accp + int64_t(at::get_thread_num()) * n;
          kernel(dyp + b * n, hp + b * n, wp, sp + b, ep ? ep + b * n : nullptr, dhp + b * n, acc,
                 e - b, n);
        });
        W* dwp = ptr<W>(dw);
        for (int64_t i = 0; i < n; ++i) {
          float sum = 0.0f;
          for (int64_t t = 0; t < nthreads; ++t) sum += accp[t * n + i];
          dwp[i] = from_f32<W>(sum);
        }
      };
      if (weight.scalar_type() == at::kFloat)
        run.template operator()<float>();
      else
        run.template operator()<T>();
    });
  } else {
    dw.zero_();
  }
  return {dh, dw};
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor rstd, Tensor? dh_extra) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("rms_norm_fwd", &minigpt::cpu::rms_norm_fwd);
  m.impl("rms_norm_bwd", &minigpt::cpu::rms_norm_bwd);
}
