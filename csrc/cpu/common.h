// csrc/cpu/common.h -- helpers shared by the ATen-facing side of every CPU op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/dtype.h"

namespace minigpt::cpu {

// Typed raw pointer to a tensor's data, as our ATen-free element types.
template <typename T>
inline T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}
template <typename T>
inline T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? ptr<T>(*t) : nullptr;
}

// Call `fn.template operator()<T>()` with T the kernel element type for `st`
// (float, BF16 or F16); anything else is a clear error naming `what`.
template <typename Fn>
inline void dispatch_float_types(at::ScalarType st, const char* what, Fn&& fn) {
  switch (st) {
    case at::kFloat:
      fn.template operator()<float>();
      break;
    case at::kBFloat16:
      fn.template operator()<BF16>();
      break;
    case at::kHalf:
      fn.template operator()<F16>();
      break;
    default:
      TORCH_CHECK(false, what, ": expected float32, bfloat16 or float16, got ", st);
  }
}

// Minimum rows per parallel task: enough work (about 16k elements) to pay for a
// thread hand-off.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(row_len, 1));
}

inline void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace minigpt::cpu
