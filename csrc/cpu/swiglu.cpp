// csrc/cpu/swiglu.cpp -- SwiGLU activation, silu(gate) * up, on the CPU.
//
// The math lives in swiglu_kernel.h; this file checks arguments, allocates
// outputs (from the output pool, see output_pool.h), splits the elements
// across threads and picks the SIMD variant.
// Registered as
//   torch.ops.minigpt.swiglu_fwd(gate, up) -> y
//   torch.ops.minigpt.swiglu_bwd(dy, gate, up) -> (dgate, dup)
// on tensors of one shape and dtype: contiguous (any rank: the kernel sees a
// flat array), or 2-D (rows, n) views with a unit last stride, such as the two
// halves of a fused gate/up projection. Outputs are contiguous. Shapes for
// torch.compile come from the fake implementations in minigpt/kernels/swiglu.py.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <type_traits>

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

// Streaming (non-temporal) stores pay off only when the outputs are large next
// to the caches. Here the test is on each output tensor: from 8 MiB on (a quarter
// of this machine's L3) they are streamed. Measured at 1024x2816 (1 thread, caches
// disturbed between calls as in the benches): float32 (11.5 MB per tensor)
// forward + backward 10-15% faster when streamed, bfloat16 (5.8 MB) ~8% slower,
// so bfloat16 at that size keeps normal stores. MINIGPT_STREAM_STORES_MB sets the
// threshold (MiB per output tensor; 0 turns streaming off), for measurements.
size_t stream_threshold_bytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("MINIGPT_STREAM_STORES_MB");
    const size_t mb = (env && *env) ? size_t(std::strtoull(env, nullptr, 10)) : 8;
    return mb == 0 ? SIZE_MAX : mb << 20;
  }();
  return bytes;
}

bool stream_outputs(size_t out_bytes) { return out_bytes >= stream_threshold_bytes(); }

// The AVX512-BF16 variants of the bfloat16 kernels (swiglu_kernel.h): only when
// the AVX-512 kernels are the active ones and the CPU converts natively.
// MINIGPT_NATIVE_BF16=0 turns them off (to compare, and to test the other path).
bool native_bf16() {
#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
  static const bool supported = [] {
    const char* env = std::getenv("MINIGPT_NATIVE_BF16");
    if (env && env[0] == '0') return false;
    return cpu_has_avx512_bf16();
  }();
  return supported && active_isa() == Isa::AVX512;
#else
  return false;
#endif
}

// How the kernel walks an input: `rows` rows of `n` contiguous elements,
// `stride` elements apart. A contiguous tensor is one row of numel elements; a
// 2-D view with a unit last stride (e.g. gate = fused[:, :H] of a fused
// gate/up projection) is read in place, without a copy.
struct Rows {
  int64_t rows, n, stride;
};

Rows rows_of(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  if (t.is_contiguous()) return {1, t.numel(), t.numel()};
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, op, ": ", name,
              " must be contiguous or a 2-D view with unit last stride");
  return {t.size(0), t.size(1), t.stride(0)};
}

void check_match(const at::Tensor& a, const at::Tensor& gate, const char* name, const char* op) {
  TORCH_CHECK(a.sizes() == gate.sizes() && a.scalar_type() == gate.scalar_type(), op, ": ", name,
              " must match gate in shape and dtype");
}

// Run body(row_begin, row_end, elem_begin, elem_end) over all elements: split by
// elements when there is one row, by rows otherwise.
template <typename Body>
void for_each_span(const Rows& r, const Body& body) {
  if (r.rows == 1) {
    at::parallel_for(0, r.n, kGrain, [&](int64_t b, int64_t e) { body(0, 1, b, e); });
  } else {
    at::parallel_for(0, r.rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(r.n, 1)),
                     [&](int64_t b, int64_t e) { body(b, e, 0, r.n); });
  }
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_match(up, gate, "up", "swiglu_fwd");
  Rows rg = rows_of(gate, "gate", "swiglu_fwd"), ru = rows_of(up, "up", "swiglu_fwd");
  if (rg.rows != ru.rows) {  // one is contiguous, the other a strided view: walk both by rows
    rg = {gate.size(0), gate.size(1), gate.stride(0)};
    ru = {up.size(0), up.size(1), up.stride(0)};
  }
  at::Tensor y = pooled_empty(gate.sizes(), gate.scalar_type());
  if (gate.numel() == 0) return y;
  dispatch_float_types(gate.scalar_type(), "swiglu_fwd", [&]<typename T>() {
    auto kernel = stream_outputs(y.nbytes()) ? MG_ISA_CALL(swiglu_fwd_span<T, true>)
                                     : MG_ISA_CALL(swiglu_fwd_span<T, false>);
#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
    if constexpr (std::is_same_v<T, BF16>)
      if (native_bf16())
        kernel = stream_outputs(y.nbytes()) ? avx512::swiglu_fwd_span_bf16_native<true>
                                            : avx512::swiglu_fwd_span_bf16_native<false>;
#endif
    const T* gp = ptr<const T>(gate);
    const T* up_ = ptr<const T>(up);
    T* yp = ptr<T>(y);
    for_each_span(rg, [&](int64_t r0, int64_t r1, int64_t b, int64_t e) {
      for (int64_t r = r0; r < r1; ++r)
        kernel(gp + r * rg.stride + b, up_ + r * ru.stride + b, yp + r * rg.n + b, e - b);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  check_match(up, gate, "up", "swiglu_bwd");
  check_match(dy, gate, "dy", "swiglu_bwd");
  check_cpu_contiguous(dy, "dy");
  Rows rg = rows_of(gate, "gate", "swiglu_bwd"), ru = rows_of(up, "up", "swiglu_bwd");
  if (rg.rows != ru.rows) {
    rg = {gate.size(0), gate.size(1), gate.stride(0)};
    ru = {up.size(0), up.size(1), up.stride(0)};
  }
  at::Tensor dg = pooled_empty(gate.sizes(), gate.scalar_type());
  at::Tensor du = pooled_empty(gate.sizes(), gate.scalar_type());
  if (gate.numel() == 0) return {dg, du};
  dispatch_float_types(gate.scalar_type(), "swiglu_bwd", [&]<typename T>() {
    auto kernel = stream_outputs(dg.nbytes()) ? MG_ISA_CALL(swiglu_bwd_span<T, true>)
                                      : MG_ISA_CALL(swiglu_bwd_span<T, false>);
#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
    if constexpr (std::is_same_v<T, BF16>)
      if (native_bf16())
        kernel = stream_outputs(dg.nbytes()) ? avx512::swiglu_bwd_span_bf16_native<true>
                                                 : avx512::swiglu_bwd_span_bf16_native<false>;
#endif
    const T* dyp = ptr<const T>(dy);
    const T* gp = ptr<const T>(gate);
    const T* up_ = ptr<const T>(up);
    T* dgp = ptr<T>(dg);
    T* dup = ptr<T>(du);
    for_each_span(rg, [&](int64_t r0, int64_t r1, int64_t b, int64_t e) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * rg.n + b;  // outputs and dy are contiguous
        kernel(dyp + o, gp + r * rg.stride + b, up_ + r * ru.stride + b, dgp + o, dup + o, e - b);
      }
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
