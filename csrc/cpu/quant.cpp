// csrc/cpu/quant.cpp -- weight-only quantized linear layers on the CPU.
//
// The math lives in quant_kernel.h (Vec float kernel, every ISA) and
// quant_bf16.cpp (AVX512-BF16 kernels, tried first; see there when they apply);
// this file checks arguments, converts the activations to float32 once, splits
// output channels across threads and picks the SIMD variant. Registered as
//   torch.ops.minigpt.quant_linear(x, qweight, scales, zeros?, bias?, fmt, block) -> y
// with x (M, K) float32/bfloat16/float16 contiguous and y (M, N) of x's dtype.
// fmt: 0 int8, 1 int4, 2 nf4 (layouts in quant.h). The fake implementation for
// torch.compile is in minigpt/kernels/quant.py.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <immintrin.h>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/quant.h"

#define MG_KERNEL_FILE "cpu/quant_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

// NF4 code values (same as NF4_CODEBOOK in minigpt/kernels/reference/quant.py).
alignas(64) const float kNF4Codebook[16] = {
    -1.0f,        -0.69619289f, -0.52507304f, -0.39491749f, -0.28444136f, -0.18477344f,
    -0.09104999f, 0.0f,         0.07958033f,  0.16093017f,  0.24611229f,  0.33791519f,
    0.4407098f,   0.56261697f,  0.72295673f,  1.0f};

}  // namespace

// quant_bf16.cpp: the AVX512-BF16 kernels; false when they do not apply.
bool quant_linear_bf16dot(const at::Tensor& x, const at::Tensor& xf, const QuantWeightView& w, int fmt,
                          const float* bias, float* y, const float* codebook);

at::Tensor quant_linear_float(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                        int64_t fmt, int64_t block) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(qweight, "qweight");
  check_cpu_contiguous(scales, "scales");
  TORCH_CHECK(fmt >= 0 && fmt <= 2, "quant_linear: fmt must be 0 (int8), 1 (int4) or 2 (nf4)");
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "quant_linear: x and qweight must be 2-D");
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  QuantWeightView w{qweight.data_ptr(), nullptr, nullptr, nullptr, n, k, block};
  if (fmt == kQuantInt8) {
    TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.size(1) == k,
                "quant_linear: int8 qweight must be int8 (N, K)");
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == n,
                "quant_linear: int8 scales must be float32 (N,)");
    w.scale_f = ptr<const float>(scales);
  } else {
    TORCH_CHECK(block > 0 && block % kQuantPackRun == 0 && k % block == 0,
                "quant_linear: block must be a multiple of 32 that divides K");
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.size(1) * 2 == k,
                "quant_linear: 4-bit qweight must be uint8 (N, K/2)");
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == k / block,
                "quant_linear: scales must have shape (N, K/block)");
    if (fmt == kQuantInt4) {
      TORCH_CHECK(scales.scalar_type() == at::kBFloat16, "quant_linear: int4 scales must be bfloat16");
      TORCH_CHECK(zeros.has_value() && zeros->defined(), "quant_linear: int4 needs zeros");
      check_cpu_contiguous(*zeros, "zeros");
      TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->sizes() == scales.sizes(),
                  "quant_linear: int4 zeros must be uint8 of scales' shape");
      w.scale_bf = ptr<const BF16>(scales);
      w.zeros = ptr<const uint8_t>(*zeros);
    } else {
      TORCH_CHECK(scales.scalar_type() == at::kFloat, "quant_linear: nf4 absmax must be float32");
      w.scale_f = ptr<const float>(scales);
    }
  }
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n, "quant_linear: bias must have shape (N,)");
    TORCH_CHECK(bias->device().is_cpu(), "quant_linear: bias must be a CPU tensor");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "quant_linear: x must be float32, bfloat16 or float16");
  at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor yf = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return yf.to(x.scalar_type());
  if (k == 0) {
    yf.zero_();
    if (bias_f.defined()) yf.add_(bias_f);
    return yf.to(x.scalar_type());
  }
  const float* xp = ptr<const float>(xf);
  const float* bp = bias_f.defined() ? ptr<const float>(bias_f) : nullptr;
  float* yp = ptr<float>(yf);
  if (quant_linear_bf16dot(x, xf, w, int(fmt), bp, yp, kNF4Codebook))
    return x.scalar_type() == at::kFloat ? yf : yf.to(x.scalar_type());
  auto kernel = MG_ISA_CALL(quant_linear_channels);
  // Threads own disjoint groups of 4 output channels; each reads its weights once.
  const int64_t groups = (n + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, groups / (4 * at::get_num_threads())));
  at::parallel_for(0, groups, grain, [&](int64_t b, int64_t e) {
    kernel(int(fmt), xp, m, w, b * 4, std::min(e * 4, n), bp, yp, kNF4Codebook);
  });
  return x.scalar_type() == at::kFloat ? yf : yf.to(x.scalar_type());
}

// The float (N, K) weight in `dtype` (float32 / bfloat16 / float16), decoded with
// the same SIMD code as the matmul; threads split the output channels.
at::Tensor quant_dequantize(const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t block,
                            int64_t k, at::ScalarType dtype) {
  TORCH_CHECK(qweight.dim() == 2, "quant_dequantize: qweight must be 2-D");
  const int64_t n = qweight.size(0);
  // reuse quant_linear's argument checks on an empty batch
  quant_linear_float(at::empty({0, k}, qweight.options().dtype(at::kFloat)), qweight, scales, zeros,
                     std::nullopt, fmt, block);
  QuantWeightView w{qweight.data_ptr(), nullptr, nullptr, nullptr, n, k, block};
  if (fmt == kQuantInt4) {
    w.scale_bf = ptr<const BF16>(scales);
    w.zeros = ptr<const uint8_t>(*zeros);
  } else {
    w.scale_f = ptr<const float>(scales);
  }
  at::Tensor out = at::empty({n, k}, qweight.options().dtype(dtype));
  if (n == 0 || k == 0) return out;
  dispatch_float_types(dtype, "quant_dequantize", [&]<typename T>() {
    auto kernel = MG_ISA_CALL(dequantize_channels<T>);
    T* o = ptr<T>(out);
    at::parallel_for(0, n, std::max<int64_t>(1, 4096 / k), [&](int64_t b, int64_t e) {
      kernel(int(fmt), w, b, e, o, 0, kNF4Codebook);
    });
  });
  return out;
}

// Prefill (many rows): y = x @ dequantize(W)^T (+ bias) as a float GEMM on tiles of
// output channels. Each tile of W is decoded into one reused buffer in x's dtype
// (small enough to stay in cache; no whole-matrix temporary and its page faults)
// and multiplied by at::mm, which brings its own blocked, multithreaded GEMM.
at::Tensor quant_linear_prefill(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros,
                                const std::optional<at::Tensor>& bias, int64_t fmt, int64_t block) {
  quant_linear_float(x.narrow(0, 0, 0), qweight, scales, zeros, bias, fmt, block);  // checks
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  QuantWeightView w{qweight.data_ptr(), nullptr, nullptr, nullptr, n, k, block};
  if (fmt == kQuantInt4) {
    w.scale_bf = ptr<const BF16>(scales);
    w.zeros = ptr<const uint8_t>(*zeros);
  } else {
    w.scale_f = ptr<const float>(scales);
  }
  // ~1 MiB of decoded weights per tile, a multiple of 64 channels
  const int64_t tile = std::max<int64_t>(64, ((int64_t{1} << 20) / std::max<int64_t>(1, k * x.element_size())) / 64 * 64);
  at::Tensor buf = at::empty({std::min(tile, n), k}, x.options());
  dispatch_float_types(x.scalar_type(), "quant_linear_prefill", [&]<typename T>() {
    auto kernel = MG_ISA_CALL(dequantize_channels<T>);
    for (int64_t n0 = 0; n0 < n; n0 += tile) {
      const int64_t nt = std::min(tile, n - n0);
      T* b = ptr<T>(buf);
      at::parallel_for(n0, n0 + nt, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)),
                       [&](int64_t s, int64_t e) { kernel(int(fmt), w, s, e, b, n0, kNF4Codebook); });
      at::Tensor part = at::mm(x, buf.narrow(0, 0, nt).t());
      y.narrow(1, n0, nt).copy_(part);
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(bias->to(x.scalar_type()));
  return y;
}

}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def("quant_linear_prefill(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int fmt, int block) -> Tensor");
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int fmt, int block) -> Tensor");
  m.def("quant_dequantize(Tensor qweight, Tensor scales, Tensor? zeros, int fmt, int block, int k, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("quant_linear", &minigpt::cpu::quant_linear_float);
  m.impl("quant_dequantize", &minigpt::cpu::quant_dequantize);
  m.impl("quant_linear_prefill", &minigpt::cpu::quant_linear_prefill);
}
