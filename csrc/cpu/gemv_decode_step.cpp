// csrc/cpu/gemv_decode_step.cpp -- all layers of one Llama decode step in one C++ call.
//
// At batch 1 a decode step is ~10 small kernels per layer. Called one by one from
// Python each costs several microseconds of interpreter and dispatcher time, which
// for a 30-layer model adds up to milliseconds per token -- a real share of a step
// whose useful work (reading the weights) takes ~10-20 ms. This op runs the layer
// loop in C++ and reaches the other kernels through the dispatcher (~1 us a call):
//
//   per layer:  x, h = add_rms_norm(delta, h)   (plain rms_norm on layer 0)
//               qkv = gemv(x, Wqkv);  q, k = rope(q, k);  y = attention_kvcache(q, k, v)
//               x, h = add_rms_norm(gemv(y, Wo), h)
//               delta = gemv(swiglu(gemv(x, Wup)), Wdown)
//
// Registered as torch.ops.minigpt.gemv_decode_layers(h, norm_w, qkv_w, o_w, mlp_norm_w,
// up_w, down_w, k_caches, v_caches, seqlens, cos, sin, n_head, n_kv_head, head_dim,
// eps, scale) -> (delta, h); minigpt/infer/fast_decode.py is the caller (and the
// readable Python version of the same loop). It does not advance seqlens.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cpu/common.h"

namespace minigpt::cpu {
namespace {

using Tensor = at::Tensor;

std::tuple<Tensor, Tensor> gemv_decode_layers(const Tensor& h_in, at::TensorList norm_w,
                                              at::TensorList qkv_w, at::TensorList o_w,
                                              at::TensorList mlp_norm_w, at::TensorList up_w,
                                              at::TensorList down_w, at::TensorList k_caches,
                                              at::TensorList v_caches, const Tensor& seqlens,
                                              const Tensor& cos, const Tensor& sin, int64_t n_head,
                                              int64_t n_kv_head, int64_t head_dim, double eps,
                                              double scale) {
  const size_t L = norm_w.size();
  TORCH_CHECK(L >= 1 && qkv_w.size() == L && o_w.size() == L && mlp_norm_w.size() == L &&
                  up_w.size() == L && down_w.size() == L && k_caches.size() == L &&
                  v_caches.size() == L,
              "gemv_decode_layers: every weight / cache list needs one entry per layer");
  TORCH_CHECK(h_in.dim() == 2, "gemv_decode_layers: h must be (B, d_model)");
  auto& dispatcher = c10::Dispatcher::singleton();
  static auto rms = dispatcher.findSchemaOrThrow("minigpt::rms_norm_fwd", "")
                        .typed<std::tuple<Tensor, Tensor, Tensor>(
                            const Tensor&, const std::optional<Tensor>&, const Tensor&, double)>();
  static auto rope = dispatcher.findSchemaOrThrow("minigpt::rope_rotate", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, bool)>();
  static auto attn = dispatcher.findSchemaOrThrow("minigpt::attention_kvcache", "")
                         .typed<Tensor(const Tensor&, Tensor&, Tensor&, const Tensor&,
                                       const std::optional<Tensor>&, const std::optional<Tensor>&,
                                       double, bool)>();
  static auto swiglu = dispatcher.findSchemaOrThrow("minigpt::swiglu_fwd", "")
                           .typed<Tensor(const Tensor&, const Tensor&)>();
  static auto gemv = dispatcher.findSchemaOrThrow("minigpt::gemv", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, bool)>();
  const int64_t B = h_in.size(0), H = n_head, Hkv = n_kv_head, D = head_dim;
  const std::optional<Tensor> none;
  Tensor h = h_in, delta;
  for (size_t i = 0; i < L; ++i) {
    Tensor x;
    if (i == 0) {
      x = std::get<0>(rms.call(h, none, norm_w[i], eps));
    } else {
      auto [y, hs, r] = rms.call(delta, std::optional<Tensor>(h), norm_w[i], eps);
      x = y, h = hs;
    }
    Tensor qkv = gemv.call(x, qkv_w[i], none, false);
    Tensor q = qkv.narrow(1, 0, H * D).view({B, 1, H, D});
    Tensor k = qkv.narrow(1, H * D, Hkv * D).view({B, 1, Hkv, D});
    Tensor v = qkv.narrow(1, (H + Hkv) * D, Hkv * D).contiguous().view({B, 1, Hkv, D});
    auto [qr, kr] = rope.call(q, k, cos, sin, false);
    Tensor kc = k_caches[i], vc = v_caches[i];
    Tensor y = attn.call(qr, kc, vc, seqlens, std::optional<Tensor>(kr), std::optional<Tensor>(v),
                         scale, true);
    Tensor o = gemv.call(y.view({B, H * D}), o_w[i], none, false);
    auto [x2, h2, r2] = rms.call(o, std::optional<Tensor>(h), mlp_norm_w[i], eps);
    h = h2;
    Tensor gate_up = gemv.call(x2, up_w[i], none, false);
    const int64_t F = gate_up.size(1) / 2;
    Tensor act = swiglu.call(gate_up.narrow(1, 0, F), gate_up.narrow(1, F, F));
    delta = gemv.call(act, down_w[i], none, false);
  }
  return {delta, h};
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def(
      "gemv_decode_layers(Tensor h, Tensor[] norm_w, Tensor[] qkv_w, Tensor[] o_w, Tensor[] mlp_norm_w, "
      "Tensor[] up_w, Tensor[] down_w, Tensor[] k_caches, Tensor[] v_caches, Tensor seqlens, Tensor cos, "
      "Tensor sin, int n_head, int n_kv_head, int head_dim, float eps, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) { m.impl("gemv_decode_layers", &minigpt::cpu::gemv_decode_layers); }
