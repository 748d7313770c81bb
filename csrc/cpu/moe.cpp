// csrc/cpu/moe.cpp -- mixture-of-experts data movement and grouped GEMM on the CPU.
//
// A MoE layer sends each token to k of E experts. To run every expert as one
// dense matrix multiply, the token rows are first *permuted* into expert order
// (all rows of expert 0, then expert 1, ...), the experts run as a *grouped
// GEMM* over those variable-size groups, and the results are *unpermuted* back
// to token order, each weighted by its router weight and summed.
//
// Registered as
//   moe_permute_fwd(x, expert_ids, n_experts) -> (x_perm, offsets, slot_of)
//   moe_permute_bwd(dx_perm, slot_of) -> dx
//   moe_unpermute_fwd(y_perm, slot_of, weights) -> y
//   moe_unpermute_bwd(dy, y_perm, slot_of, weights) -> (dy_perm, dweights)
//   grouped_mm_fwd(x, w, offsets) -> y
//   grouped_mm_bwd(dy, x, w, offsets, need_dx, need_dw) -> (dx, dw)
//   moe_swiglu_bwd(dh, gate_up) -> dgate_up        (the expert MLP's activation)
// and in-place forms of the three backward ops (moe_unpermute_bwd_, grouped_mm_bwd_,
// moe_swiglu_bwd_) that write the gradient over the input it replaces, so the fused
// expert MLP's backward allocates almost nothing beyond the weight gradients.
// Shapes: x (N, d), expert_ids / slot_of / weights (N, k) (int64, int64, float32),
// offsets (E+1,) int64, w (E, n_out, n_in). The semantics are defined by
// minigpt/kernels/reference/moe.py; fakes for torch.compile live in
// minigpt/kernels/moe.py.
//
// The grouped GEMM calls at::mm_out on each group's contiguous row slice: the
// permutation makes every group a plain dense matrix, so the best GEMM on the
// machine (oneDNN / MKL, with native bf16 where the CPU has it) does the work
// and no padding to a fixed capacity is needed.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "cpu/common.h"
#include "cpu/isa.h"
#include "cpu/output_pool.h"

// GCC 12 flags the _mm512_undefined_* idiom inside its own _mm512_reduce_add_ps
// (a false positive; see the same note in attention.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#define MG_KERNEL_FILE "cpu/moe_kernel.h"
#include "cpu/isa_expand.h"

namespace minigpt::cpu {
namespace {

void check_index(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 2 &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous 2-D int64 CPU tensor");
}

void check_rows(const at::Tensor& t, const char* name, const char* op) {
  check_cpu_contiguous(t, name);
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D");
}

void check_weights(const at::Tensor& w, const at::Tensor& slot_of, const char* op) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.sizes() == slot_of.sizes() && w.is_contiguous(),
              op, ": weights must be a contiguous float32 tensor shaped like slot_of");
}

// Slots of x_perm must be in [-1, M): the kernels index rows with them.
void check_slots(const at::Tensor& slot_of, int64_t m, const char* op) {
  const int64_t* s = ptr<const int64_t>(slot_of);
  for (int64_t i = 0, n = slot_of.numel(); i < n; ++i)
    TORCH_CHECK(s[i] >= -1 && s[i] < m, op, ": slot_of holds ", s[i], ", outside [-1, ", m, ")");
}

// Offsets must run from 0 to rows, non-decreasing, one per group plus one.
void check_offsets(const at::Tensor& offsets, int64_t groups, int64_t rows, const char* op) {
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong &&
                  offsets.dim() == 1 && offsets.size(0) == groups + 1 && offsets.is_contiguous(),
              op, ": offsets must be a contiguous (E+1,) int64 CPU tensor");
  const int64_t* o = ptr<const int64_t>(offsets);
  TORCH_CHECK(o[0] == 0 && o[groups] == rows, op, ": offsets must start at 0 and end at ", rows);
  for (int64_t e = 0; e < groups; ++e)
    TORCH_CHECK(o[e] <= o[e + 1], op, ": offsets must be non-decreasing");
}

// ---- permute ------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_fwd(const at::Tensor& x,
                                                               const at::Tensor& expert_ids,
                                                               int64_t n_experts) {
  const char* op = "moe_permute_fwd";
  check_rows(x, "x", op);
  check_index(expert_ids, "expert_ids", op);
  TORCH_CHECK(expert_ids.size(0) == x.size(0), op, ": expert_ids must have one row per token");
  TORCH_CHECK(n_experts >= 1, op, ": n_experts must be >= 1");
  const int64_t n = x.size(0), k = expert_ids.size(1), d = x.size(1);
  const int64_t* ids = ptr<const int64_t>(expert_ids);

  // Histogram -> offsets (an exclusive prefix sum) -> each assignment's row. A
  // counting sort: stable, so within a group the tokens keep their order. The
  // index work is O(N k) integer ops, negligible next to moving the rows.
  at::Tensor offsets = at::zeros({n_experts + 1}, expert_ids.options());
  int64_t* off = ptr<int64_t>(offsets);
  for (int64_t i = 0; i < n * k; ++i) {
    TORCH_CHECK(ids[i] >= -1 && ids[i] < n_experts, op, ": expert id ", ids[i],
                " outside [-1, ", n_experts, ")");
    if (ids[i] >= 0) ++off[ids[i] + 1];
  }
  for (int64_t e = 0; e < n_experts; ++e) off[e + 1] += off[e];
  const int64_t m = off[n_experts];
  at::Tensor slot_of = at::empty({n, k}, expert_ids.options());
  int64_t* slot = ptr<int64_t>(slot_of);
  std::vector<int64_t> cursor(off, off + n_experts);
  std::vector<int64_t> token_of(m);
  for (int64_t i = 0; i < n * k; ++i) {
    if (ids[i] < 0) {
      slot[i] = -1;
      continue;
    }
    const int64_t s = cursor[ids[i]]++;
    slot[i] = s;
    token_of[s] = i / k;
  }

  at::Tensor x_perm = pooled_empty({m, d}, x.scalar_type());
  const size_t row_bytes = size_t(d) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(x_perm.data_ptr());
  at::parallel_for(0, m, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s)
      std::memcpy(dst + s * row_bytes, src + token_of[s] * row_bytes, row_bytes);
  });
  return {x_perm, offsets, slot_of};
}

// Gather each token's rows of x_perm (with per-row weights, or 1) and sum them.
// Used by the permute backward (weights = 1) and the unpermute forward.
at::Tensor combine(const at::Tensor& rows_perm, const at::Tensor& slot_of, const float* weights,
                   const char* op) {
  const int64_t n = slot_of.size(0), k = slot_of.size(1), d = rows_perm.size(1);
  at::Tensor out = pooled_empty({n, d}, rows_perm.scalar_type());
  if (n == 0 || d == 0) return out;
  const int64_t* slot = ptr<const int64_t>(slot_of);
  dispatch_float_types(rows_perm.scalar_type(), op, [&]<typename T>() {
    auto kernel = MG_ISA_CALL(moe_combine_row<T>);
    const T* src = ptr<const T>(rows_perm);
    T* dst = ptr<T>(out);
    at::parallel_for(0, n, row_grain(d * k), [&](int64_t b, int64_t e) {
      std::vector<const T*> rows(k);
      std::vector<float> w(k);
      for (int64_t t = b; t < e; ++t) {
        int count = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t s = slot[t * k + j];
          if (s < 0) continue;
          rows[count] = src + s * d;
          w[count++] = weights ? weights[t * k + j] : 1.0f;
        }
        kernel(rows.data(), w.data(), count, dst + t * d, d);
      }
    });
  });
  return out;
}

at::Tensor moe_permute_bwd(const at::Tensor& dx_perm, const at::Tensor& slot_of) {
  const char* op = "moe_permute_bwd";
  check_rows(dx_perm, "dx_perm", op);
  check_index(slot_of, "slot_of", op);
  check_slots(slot_of, dx_perm.size(0), op);
  return combine(dx_perm, slot_of, nullptr, op);
}

// ---- unpermute ----------------------------------------------------------------------------

at::Tensor moe_unpermute_fwd(const at::Tensor& y_perm, const at::Tensor& slot_of,
                             const at::Tensor& weights) {
  const char* op = "moe_unpermute_fwd";
  check_rows(y_perm, "y_perm", op);
  check_index(slot_of, "slot_of", op);
  check_weights(weights, slot_of, op);
  check_slots(slot_of, y_perm.size(0), op);
  return combine(y_perm, slot_of, ptr<const float>(weights), op);
}

// dy_perm[slot] = w * dy[token] and dweights[token, j] = dy[token] . y_perm[slot], with
// dy_perm written into `dy_perm` -- which may be y_perm itself: each row's dot product
// is taken before the same row is overwritten, and no other assignment reads that row.
at::Tensor unpermute_bwd_into(const at::Tensor& dy, const at::Tensor& y_perm,
                              const at::Tensor& slot_of, const at::Tensor& weights,
                              at::Tensor& dy_perm, const char* op) {
  check_rows(dy, "dy", op);
  check_rows(y_perm, "y_perm", op);
  check_index(slot_of, "slot_of", op);
  check_weights(weights, slot_of, op);
  TORCH_CHECK(dy.size(0) == slot_of.size(0) && dy.size(1) == y_perm.size(1) &&
                  dy.scalar_type() == y_perm.scalar_type(),
              op, ": dy must be (N, d) of y_perm's dtype");
  check_slots(slot_of, y_perm.size(0), op);
  const int64_t n = slot_of.size(0), k = slot_of.size(1), d = y_perm.size(1);
  at::Tensor dw = at::zeros({n, k}, weights.options());
  if (n == 0) return dw;
  const int64_t* slot = ptr<const int64_t>(slot_of);
  const float* w = ptr<const float>(weights);
  float* dwp = ptr<float>(dw);
  dispatch_float_types(y_perm.scalar_type(), op, [&]<typename T>() {
    auto scale = MG_ISA_CALL(moe_scale_row<T>);
    auto dot = MG_ISA_CALL(moe_dot_row<T>);
    const T* dyp = ptr<const T>(dy);
    const T* yp = ptr<const T>(y_perm);
    T* dpp = ptr<T>(dy_perm);
    at::parallel_for(0, n, row_grain(2 * d * k), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t s = slot[t * k + j];
          if (s < 0) continue;
          dwp[t * k + j] = dot(dyp + t * d, yp + s * d, d);  // before the row is overwritten
          scale(dyp + t * d, w[t * k + j], dpp + s * d, d);
        }
      }
    });
  });
  return dw;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_bwd(const at::Tensor& dy,
                                                     const at::Tensor& y_perm,
                                                     const at::Tensor& slot_of,
                                                     const at::Tensor& weights) {
  check_rows(y_perm, "y_perm", "moe_unpermute_bwd");
  // Every row of y_perm belongs to exactly one assignment (the permutation is a
  // bijection onto the non-dropped slots), so every row of dy_perm is written.
  at::Tensor dy_perm = pooled_empty(y_perm.sizes(), y_perm.scalar_type());
  at::Tensor dw = unpermute_bwd_into(dy, y_perm, slot_of, weights, dy_perm, "moe_unpermute_bwd");
  return {dy_perm, dw};
}

// In place: y_perm's storage becomes dy_perm (the fused expert MLP's backward no
// longer needs y_perm after this; one (M, d) buffer fewer at the peak).
at::Tensor moe_unpermute_bwd_(const at::Tensor& dy, at::Tensor& y_perm, const at::Tensor& slot_of,
                              const at::Tensor& weights) {
  return unpermute_bwd_into(dy, y_perm, slot_of, weights, y_perm, "moe_unpermute_bwd_");
}

// ---- grouped GEMM -------------------------------------------------------------------------

// Run fn(e) for every group, the groups split between threads in contiguous runs of
// about equal cost (rows + fixed_cost each), every GEMM single-threaded inside one
// parallel region. Why not a loop of multi-threaded GEMMs: with E = 64 small groups
// that is 64 fork/join barriers per grouped GEMM, and on a busy machine (threads
// descheduled while others wait at the barrier) those cost more than the math.
template <typename Fn>
void for_each_group(const int64_t* off, int64_t groups, int64_t fixed_cost, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), groups);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t g = 0; g < groups; ++g) fn(g);
    return;
  }
  const double total = double(off[groups]) + double(fixed_cost) * double(groups);
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    // worker threads start with autograd on; these GEMMs are never differentiated
    at::NoGradGuard no_grad;
    for (int64_t task = b; task < e; ++task) {
      for (int64_t g = 0; g < groups; ++g) {
        // the group goes to the task whose share of the total cost holds its midpoint
        const double mid = double(off[g]) + double(fixed_cost) * double(g) +
                           0.5 * double(off[g + 1] - off[g] + fixed_cost);
        const int64_t owner = std::min<int64_t>(threads - 1, int64_t(mid / total * threads));
        if (owner == task) fn(g);
      }
    }
  });
}

void check_grouped(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                   const char* op) {
  check_rows(x, "x", op);
  check_cpu_contiguous(w, "w");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == x.size(1), op, ": w must be (E, n_out, n_in=",
              x.size(1), ")");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": w must have x's dtype");
  check_offsets(offsets, w.size(0), x.size(0), op);
}

at::Tensor grouped_mm_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  check_grouped(x, w, offsets, "grouped_mm_fwd");
  const int64_t groups = w.size(0);
  const int64_t* off = ptr<const int64_t>(offsets);
  at::Tensor y = pooled_empty({x.size(0), w.size(1)}, x.scalar_type());
  if (w.size(1) == 0) return y;
  for_each_group(off, groups, 0, [&](int64_t e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) return;
    at::Tensor out = y.narrow(0, off[e], rows);
    if (x.size(1) == 0) {
      out.zero_();
      return;
    }
    at::mm_out(out, x.narrow(0, off[e], rows), w.select(0, e).t());
  });
  return y;
}

// dx_e = dy_e @ w[e] into `dx` (may be x itself: each group's dw reads its rows of x
// before its dx overwrites them, and groups own disjoint rows), dw[e] = dy_e^T @ x_e.
at::Tensor grouped_mm_bwd_into(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor& offsets, at::Tensor* dx, bool need_dw,
                               const char* op) {
  check_grouped(x, w, offsets, op);
  check_rows(dy, "dy", op);
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(1) == w.size(1) &&
                  dy.scalar_type() == x.scalar_type(),
              op, ": dy must be (M, n_out) of x's dtype");
  const int64_t groups = w.size(0);
  const int64_t* off = ptr<const int64_t>(offsets);
  // The weight gradients are E/k times a dense MLP's (192 MiB in bf16 at E = 64): from
  // malloc they would be fresh pages every step, whose first-touch faults cost more
  // than a tenth of the backward; the output pool hands back last step's blocks.
  at::Tensor dw =
      need_dw ? pooled_empty(w.sizes(), w.scalar_type()) : at::empty({0}, w.options());
  // an expert's weight gradient costs a full (n_out, n_in) write even for few rows
  const int64_t fixed = need_dw ? 16 : 0;
  for_each_group(off, groups, fixed, [&](int64_t e) {
    const int64_t rows = off[e + 1] - off[e];
    at::Tensor dy_e = dy.narrow(0, off[e], rows);
    if (need_dw) {
      at::Tensor dw_e = dw.select(0, e);
      if (rows == 0)  // an expert that received no tokens gets a zero gradient
        dw_e.zero_();
      else
        at::mm_out(dw_e, dy_e.t(), x.narrow(0, off[e], rows));
    }
    if (dx != nullptr && rows > 0) {
      at::Tensor dx_e = dx->narrow(0, off[e], rows);
      if (w.size(1) == 0)
        dx_e.zero_();
      else
        at::mm_out(dx_e, dy_e, w.select(0, e));
    }
  });
  return dw;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                  const at::Tensor& w, const at::Tensor& offsets,
                                                  bool need_dx, bool need_dw) {
  check_rows(x, "x", "grouped_mm_bwd");
  at::Tensor dx = need_dx ? pooled_empty(x.sizes(), x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor dw =
      grouped_mm_bwd_into(dy, x, w, offsets, need_dx ? &dx : nullptr, need_dw, "grouped_mm_bwd");
  return {dx, dw};
}

// In place: x's storage becomes dx (x is dead after its groups' dw are taken).
at::Tensor grouped_mm_bwd_(const at::Tensor& dy, at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& offsets, bool need_dx, bool need_dw) {
  return grouped_mm_bwd_into(dy, x, w, offsets, need_dx ? &x : nullptr, need_dw,
                             "grouped_mm_bwd_");
}

// ---- SwiGLU backward into the fused gate/up gradient ------------------------------------

// The row kernel reads a vector of g, u and dh before it writes dg, du at the same
// columns, so `dgu` may be gate_up itself.
void swiglu_bwd_into(const at::Tensor& dh, const at::Tensor& gate_up, at::Tensor& dgu,
                     const char* op) {
  check_rows(dh, "dh", op);
  check_rows(gate_up, "gate_up", op);
  const int64_t m = dh.size(0), f = dh.size(1);
  TORCH_CHECK(gate_up.size(0) == m && gate_up.size(1) == 2 * f &&
                  gate_up.scalar_type() == dh.scalar_type(),
              op, ": gate_up must be (M, 2F) of dh's dtype");
  if (m == 0 || f == 0) return;
  dispatch_float_types(dh.scalar_type(), op, [&]<typename T>() {
    auto kernel = MG_ISA_CALL(moe_swiglu_bwd_row<T>);
    const T* dhp = ptr<const T>(dh);
    const T* gu = ptr<const T>(gate_up);
    T* out = ptr<T>(dgu);
    at::parallel_for(0, m, row_grain(3 * f), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        kernel(dhp + r * f, gu + r * 2 * f, gu + r * 2 * f + f, out + r * 2 * f,
               out + r * 2 * f + f, f);
    });
  });
}

at::Tensor moe_swiglu_bwd(const at::Tensor& dh, const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", "moe_swiglu_bwd");
  at::Tensor dgu = pooled_empty(gate_up.sizes(), gate_up.scalar_type());
  swiglu_bwd_into(dh, gate_up, dgu, "moe_swiglu_bwd");
  return dgu;
}

// In place: gate_up's storage becomes d(gate_up).
void moe_swiglu_bwd_(const at::Tensor& dh, at::Tensor& gate_up) {
  swiglu_bwd_into(dh, gate_up, gate_up, "moe_swiglu_bwd_");
}

}  // namespace
}  // namespace minigpt::cpu

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def("moe_permute_fwd(Tensor x, Tensor expert_ids, int n_experts) -> (Tensor, Tensor, Tensor)");
  m.def("moe_permute_bwd(Tensor dx_perm, Tensor slot_of) -> Tensor");
  m.def("moe_unpermute_fwd(Tensor y_perm, Tensor slot_of, Tensor weights) -> Tensor");
  m.def(
      "moe_unpermute_bwd(Tensor dy, Tensor y_perm, Tensor slot_of, Tensor weights) -> (Tensor, "
      "Tensor)");
  m.def("grouped_mm_fwd(Tensor x, Tensor w, Tensor offsets) -> Tensor");
  m.def(
      "grouped_mm_bwd(Tensor dy, Tensor x, Tensor w, Tensor offsets, bool need_dx, bool need_dw) "
      "-> (Tensor, Tensor)");
  m.def("moe_swiglu_bwd(Tensor dh, Tensor gate_up) -> Tensor");
  // in-place variants for the fused expert MLP's backward (the mutated input's
  // storage becomes the gradient; see the forms above for the math)
  m.def(
      "moe_unpermute_bwd_(Tensor dy, Tensor(a!) y_perm, Tensor slot_of, Tensor weights) -> "
      "Tensor");
  m.def(
      "grouped_mm_bwd_(Tensor dy, Tensor(a!) x, Tensor w, Tensor offsets, bool need_dx, bool "
      "need_dw) -> Tensor");
  m.def("moe_swiglu_bwd_(Tensor dh, Tensor(a!) gate_up) -> ()");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("moe_permute_fwd", &minigpt::cpu::moe_permute_fwd);
  m.impl("moe_permute_bwd", &minigpt::cpu::moe_permute_bwd);
  m.impl("moe_unpermute_fwd", &minigpt::cpu::moe_unpermute_fwd);
  m.impl("moe_unpermute_bwd", &minigpt::cpu::moe_unpermute_bwd);
  m.impl("grouped_mm_fwd", &minigpt::cpu::grouped_mm_fwd);
  m.impl("grouped_mm_bwd", &minigpt::cpu::grouped_mm_bwd);
  m.impl("moe_swiglu_bwd", &minigpt::cpu::moe_swiglu_bwd);
  m.impl("moe_unpermute_bwd_", &minigpt::cpu::moe_unpermute_bwd_);
  m.impl("grouped_mm_bwd_", &minigpt::cpu::grouped_mm_bwd_);
  m.impl("moe_swiglu_bwd_", &minigpt::cpu::moe_swiglu_bwd_);
}
