// csrc/cpu/cross_entropy.cpp -- the fused softmax + cross-entropy step of
// linear_cross_entropy on the CPU.
//
// The math lives in cross_entropy_kernel.h; this file checks arguments,
// allocates the per-row outputs, splits rows across threads and picks the SIMD
// variant. Registered as
//
//   torch.ops.minigpt.cross_entropy_chunk(Tensor(a!) logits, Tensor targets,
//       Tensor? lse_in, Tensor? row_scale, float scale, int ignore_index,
//       float softcap, float z_loss, bool write_grad) -> (Tensor loss, Tensor lse)
//   torch.ops.minigpt.accumulate_f32_(Tensor(a!) acc, Tensor part, float alpha) -> ()
//       (acc += alpha * part: a low-precision dW partial into the float32 accumulator)
//   torch.ops.minigpt.accumulate_split_f32_(Tensor(a!) hi, Tensor(b!) lo, Tensor part,
//       float alpha) -> ()
//   torch.ops.minigpt.round_split_to_bf16_(Tensor(a!) hi, Tensor lo) -> ()
//       (the same float32 accumulation with the accumulator stored as a bfloat16 top
//       half `hi` and an int16 bottom half `lo`; the second op rounds it into `hi`)
//
// on a 2-D contiguous (rows, V) logits chunk. With write_grad the logits are
// overwritten in place by the gradient of the loss (so the caller's chunk
// buffer doubles as the gradient buffer and the (rows, V) block is never
// allocated twice). The matmuls around it stay in torch (minigpt/kernels/
// linear_cross_entropy.py). Shapes for torch.compile come from the fake
// implementation registered in that Python module.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>

#include "cpu/common.h"
#include "cpu/isa.h"

#define MG_KERNEL_FILE "cpu/cross_entropy_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

void check_row_vector(const std::optional<at::Tensor>& t, int64_t rows, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_cpu_contiguous(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows,
              "cross_entropy_chunk: ", name, " must be float32 of shape (rows,)");
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk(
    const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& lse_in,
    const std::optional<at::Tensor>& row_scale, double scale, int64_t ignore_index, double softcap,
    double z_loss, bool write_grad) {
  check_cpu_contiguous(logits, "logits");
  check_cpu_contiguous(targets, "targets");
  TORCH_CHECK(logits.dim() == 2, "cross_entropy_chunk: logits must be 2-D (rows, V)");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == logits.size(0),
              "cross_entropy_chunk: targets must be int64 of shape (rows,)");
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 || rows == 0, "cross_entropy_chunk: logits must have at least one column");
  check_row_vector(lse_in, rows, "lse_in");
  check_row_vector(row_scale, rows, "row_scale");
  TORCH_CHECK(softcap >= 0.0, "cross_entropy_chunk: softcap must be >= 0 (0 = off)");
  // A target outside [0, V) would index past the row: refuse before any thread runs.
  const int64_t* tp = ptr<const int64_t>(targets);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < V),
                "cross_entropy_chunk: target ", tp[r], " at row ", r, " is outside [0, ", V,
                ") and is not ignore_index ", ignore_index);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {loss, lse};
  const float* lse_in_p = ptr_or_null<const float>(lse_in);
  const float* scale_p = ptr_or_null<const float>(row_scale);
  dispatch_float_types(logits.scalar_type(), "cross_entropy_chunk", [&]<typename T>() {
    auto kernel = MG_ISA_CALL(cross_entropy_rows<T>);
    T* xp = ptr<T>(logits);
    float* lp = ptr<float>(loss);
    float* zp = ptr<float>(lse);
    at::parallel_for(0, rows, row_grain(V), [&](int64_t b, int64_t e) {
      kernel(xp + b * V, tp + b, lp + b, zp + b, lse_in_p ? lse_in_p + b : nullptr,
             scale_p ? scale_p + b : nullptr, float(scale), ignore_index, float(softcap),
             float(z_loss), write_grad, e - b, V);
    });
  });
  return {loss, lse};
}

void accumulate_f32_(at::Tensor& acc, const at::Tensor& part, double alpha) {
  check_cpu_contiguous(acc, "acc");
  check_cpu_contiguous(part, "part");
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "accumulate_f32_: acc must be float32");
  TORCH_CHECK(acc.sizes() == part.sizes(), "accumulate_f32_: acc and part must have one shape");
  const int64_t n = acc.numel();
  if (n == 0) return;
  dispatch_float_types(part.scalar_type(), "accumulate_f32_", [&]<typename T>() {
    auto kernel = MG_ISA_CALL(accumulate_f32<T>);
    float* ap = ptr<float>(acc);
    const T* pp = ptr<const T>(part);
    at::parallel_for(0, n, int64_t{1} << 16, [&](int64_t b, int64_t e) {
      kernel(ap + b, pp + b, float(alpha), e - b);
    });
  });
}

void check_split(const at::Tensor& hi, const at::Tensor& lo, const char* op) {
  check_cpu_contiguous(hi, "hi");
  check_cpu_contiguous(lo, "lo");
  TORCH_CHECK(hi.scalar_type() == at::kBFloat16 && lo.scalar_type() == at::kShort, op,
              ": hi must be bfloat16 and lo int16");
  TORCH_CHECK(hi.sizes() == lo.sizes(), op, ": hi and lo must have one shape");
}

void accumulate_split_f32_(at::Tensor& hi, at::Tensor& lo, const at::Tensor& part, double alpha) {
  check_split(hi, lo, "accumulate_split_f32_");
  check_cpu_contiguous(part, "part");
  TORCH_CHECK(part.scalar_type() == at::kBFloat16 && part.sizes() == hi.sizes(),
              "accumulate_split_f32_: part must be bfloat16 of hi's shape");
  auto kernel = MG_ISA_CALL(accumulate_split_f32);
  uint16_t* hp = ptr<uint16_t>(hi);
  uint16_t* lp = ptr<uint16_t>(lo);
  const BF16* pp = ptr<const BF16>(part);
  at::parallel_for(0, hi.numel(), int64_t{1} << 16, [&](int64_t b, int64_t e) {
    kernel(hp + b, lp + b, pp + b, float(alpha), e - b);
  });
}

void round_split_to_bf16_(at::Tensor& hi, const at::Tensor& lo) {
  check_split(hi, lo, "round_split_to_bf16_");
  auto kernel = MG_ISA_CALL(round_split_to_bf16);
  uint16_t* hp = ptr<uint16_t>(hi);
  const uint16_t* lp = ptr<const uint16_t>(lo);
  at::parallel_for(0, hi.numel(), int64_t{1} << 16,
                   [&](int64_t b, int64_t e) { kernel(hp + b, lp + b, e - b); });
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def(
      "cross_entropy_chunk(Tensor(a!) logits, Tensor targets, Tensor? lse_in, Tensor? row_scale, "
      "float scale, int ignore_index, float softcap, float z_loss, bool write_grad) -> (Tensor, "
      "Tensor)");
  m.def("accumulate_f32_(Tensor(a!) acc, Tensor part, float alpha) -> ()");
  m.def("accumulate_split_f32_(Tensor(a!) hi, Tensor(b!) lo, Tensor part, float alpha) -> ()");
  m.def("round_split_to_bf16_(Tensor(a!) hi, Tensor lo) -> ()");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("cross_entropy_chunk", &minigpt::cpu::cross_entropy_chunk);
  m.impl("accumulate_f32_", &minigpt::cpu::accumulate_f32_);
  m.impl("accumulate_split_f32_", &minigpt::cpu::accumulate_split_f32_);
  m.impl("round_split_to_bf16_", &minigpt::cpu::round_split_to_bf16_);
}
