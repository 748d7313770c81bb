// csrc/cpu/gemv_decode_args.h -- the arguments of one decode step (gemv_decode_kernel.h).
//
// A plain struct outside the per-ISA namespaces, so gemv_decode_step.cpp fills one
// and hands it to whichever ISA variant of the kernel runs.
#pragma once

#include <cstdint>

namespace minigpt::cpu {

// Everything one step needs; pointers of per-layer arrays index by layer.
template <typename T>
struct DecodeStepArgs {
  int64_t B, d, H, Hkv, D, F, V, L, max_len;
  const T* const* attn_norm_w;  // (d,)
  const T* const* qkv_w;        // ((H + 2 Hkv) D, d)
  const T* const* o_w;          // (d, H D)
  const T* const* mlp_norm_w;   // (d,)
  const T* const* up_w;         // (2F, d): gate rows, then up rows
  const T* const* down_w;       // (d, F)
  T* const* k_cache;            // (B, max_len, Hkv, D)
  T* const* v_cache;
  const int64_t* cache_row;  // (B,) the cache row (sequence) each input row belongs to
  const int64_t* positions;  // (B,) the position of each input row's token in it
  const int64_t* head_rows;  // (n_head_rows,) the input rows that get logits
  int64_t n_head_rows;
  const float* cos;        // (max_len, D/2)
  const float* sin;
  const T* final_norm_w;  // (d,)
  const T* head_w;        // (V, d)
  float eps, scale;
  bool bf16dp;  // use the AVX512-BF16 GEMV
  const T* h_in;  // (B, d) embeddings of the new tokens
  // shared results (written by parts, read whole after a barrier)
  T* qkv;         // (B, (H + 2 Hkv) D)
  T* y;           // (B, H D)
  T* o;           // (B, d)
  T* act;         // (B, F)
  T* delta;       // (B, d)
  float* logits;  // (n_head_rows, V)
  // per-thread scratch, `scratch_elems` T's each, `scratch_floats` floats each
  T* scratch;
  int64_t scratch_elems;
  float* fscratch;
  int64_t scratch_floats;
};

}  // namespace minigpt::cpu
