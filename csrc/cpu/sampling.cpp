// csrc/cpu/sampling.cpp -- fused sampling (temperature, top-k, top-p, min-p) on the CPU.
//
// The row algorithm lives in sampling_kernel.h; this file checks arguments,
// allocates outputs, spreads rows over threads and picks the SIMD variant.
// Registered as
//   torch.ops.minigpt.sampling_sample(logits, temperature, top_k, top_p, min_p,
//       uniforms, want_logprobs) -> (ids, logprobs, raw_logprobs, status)
//   torch.ops.minigpt.sampling_filter(logits, temperature, top_k, top_p, min_p)
//       -> (filtered float32 logits, status)
// with (B, V) contiguous logits and (B,) per-row parameters: temperature,
// top_p, min_p float32, top_k int64, uniforms float64. `status` (int32) is 0 for a
// good row, 1 for a row holding NaN/+inf, 2 for a row without a finite logit;
// minigpt/kernels/sampling.py turns those into errors.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "cpu/common.h"
#include "cpu/isa.h"

#define MG_KERNEL_FILE "cpu/sampling_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

void check_param(const at::Tensor& t, int64_t rows, at::ScalarType st, const char* name) {
  check_cpu_contiguous(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, "sampling: ", name, " must have shape (", rows,
              ",)");
  TORCH_CHECK(t.scalar_type() == st, "sampling: ", name, " must be ", st);
}

void check_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                const at::Tensor& top_p, const at::Tensor& min_p) {
  check_cpu_contiguous(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "sampling: logits must be 2-D (batch, vocab)");
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) < (int64_t{1} << 31),
              "sampling: vocab size must be in [1, 2^31)");
  const int64_t rows = logits.size(0);
  check_param(temperature, rows, at::kFloat, "temperature");
  check_param(top_k, rows, at::kLong, "top_k");
  check_param(top_p, rows, at::kFloat, "top_p");
  check_param(min_p, rows, at::kFloat, "min_p");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampling_sample(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniforms,
    bool want_logprobs) {
  check_args(logits, temperature, top_k, top_p, min_p);
  const int64_t rows = logits.size(0), V = logits.size(1);
  check_param(uniforms, rows, at::kDouble, "uniforms");
  auto opts = logits.options();
  at::Tensor ids = at::empty({rows}, opts.dtype(at::kLong));
  at::Tensor lp = at::empty({rows}, opts.dtype(at::kFloat));
  at::Tensor raw = at::empty({rows}, opts.dtype(at::kFloat));
  at::Tensor status = at::empty({rows}, opts.dtype(at::kInt));
  if (rows == 0) return {ids, lp, raw, status};
  dispatch_float_types(logits.scalar_type(), "sampling_sample", [&]<typename T>() {
    auto kernel = MG_ISA_CALL(sample_rows<T>);
    const T* xp = ptr<const T>(logits);
    const float* tp = ptr<const float>(temperature);
    const int64_t* kp = ptr<const int64_t>(top_k);
    const float* pp = ptr<const float>(top_p);
    const float* mp = ptr<const float>(min_p);
    const double* up = ptr<const double>(uniforms);
    int64_t* ip = ptr<int64_t>(ids);
    float* lpp = ptr<float>(lp);
    float* rp = ptr<float>(raw);
    int32_t* sp = ptr<int32_t>(status);
    // one row is already tens of thousands of elements: split by rows, grain 1
    at::parallel_for(0, rows, row_grain(V), [&](int64_t b, int64_t e) {
      kernel(xp + b * V, e - b, V, tp + b, kp + b, pp + b, mp + b, up + b, want_logprobs, ip + b,
             lpp + b, rp + b, sp + b);
    });
  });
  return {ids, lp, raw, status};
}

std::tuple<at::Tensor, at::Tensor> sampling_filter(const at::Tensor& logits,
                                                   const at::Tensor& temperature,
                                                   const at::Tensor& top_k,
                                                   const at::Tensor& top_p,
                                                   const at::Tensor& min_p) {
  check_args(logits, temperature, top_k, top_p, min_p);
  const int64_t rows = logits.size(0), V = logits.size(1);
  auto opts = logits.options();
  at::Tensor out = at::empty({rows, V}, opts.dtype(at::kFloat));
  at::Tensor status = at::empty({rows}, opts.dtype(at::kInt));
  if (rows == 0) return {out, status};
  dispatch_float_types(logits.scalar_type(), "sampling_filter", [&]<typename T>() {
    auto kernel = MG_ISA_CALL(filter_rows<T>);
    const T* xp = ptr<const T>(logits);
    const float* tp = ptr<const float>(temperature);
    const int64_t* kp = ptr<const int64_t>(top_k);
    const float* pp = ptr<const float>(top_p);
    const float* mp = ptr<const float>(min_p);
    float* op = ptr<float>(out);
    int32_t* sp = ptr<int32_t>(status);
    at::parallel_for(0, rows, row_grain(V), [&](int64_t b, int64_t e) {
      kernel(xp + b * V, e - b, V, tp + b, kp + b, pp + b, mp + b, op + b * V, sp + b);
    });
  });
  return {out, status};
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def(
      "sampling_sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor min_p, Tensor uniforms, bool want_logprobs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sampling_filter(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor min_p) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("sampling_sample", &minigpt::cpu::sampling_sample);
  m.impl("sampling_filter", &minigpt::cpu::sampling_filter);
}
