// csrc/cpu/attention.h -- the problem description shared by attention.cpp and the
// per-ISA kernels in attention_kernel.h.
//
// Every attention call (dense batch, packed variable-length documents, decode
// against a KV cache) is described the same way: a list of sequences, each with
// its own query rows and key rows inside flat (tokens, heads, head_dim) arrays.
// Sequence b owns query tokens q_start[b] .. q_start[b] + q_len[b] and key
// tokens k_start[b] .. k_start[b] + k_len[b]; queries are aligned bottom-right,
// so query i of the sequence sits at key position i + k_len[b] - q_len[b].
//
// The struct lives outside the ISA namespaces so all three kernel variants share
// one type (MG_ISA_CALL needs identical function signatures).
#pragma once

#include <cstdint>

namespace minigpt::cpu {

// Keys per block (columns of the score tile) and queries per block (rows).
// 64 is a multiple of 4 vectors for every ISA (4 x 16 / 2 x 4 x 8 / 16 x 4 x 1).
constexpr int kAttnBlockK = 64;
constexpr int kAttnBlockQ = 64;
constexpr int kAttnMaxHeadDim = 256;

struct AttnSeqs {
  const int64_t* q_start;
  const int64_t* q_len;
  const int64_t* k_start;
  const int64_t* k_len;
  int64_t count;
};

struct AttnShape {
  int64_t hq, hkv;     // query heads, key/value heads (hq % hkv == 0)
  int64_t d, dp;       // head dim, and head dim padded to a whole number of vectors
  float scale;         // softmax scale
  bool causal;
  int64_t window;      // sliding window width, or -1 for none
};

// Which keys query position p (bottom-right aligned) may see, as [lo, hi).
inline void attn_visible_keys(const AttnShape& s, int64_t p, int64_t k_len, int64_t* lo,
                              int64_t* hi) {
  int64_t a = 0, b = k_len;
  if (s.causal && p + 1 < b) b = p + 1;
  if (s.window > 0) {
    if (p - s.window + 1 > a) a = p - s.window + 1;
    if (!s.causal && p + s.window < b) b = p + s.window;
  }
  if (b < a) b = a;
  *lo = a;
  *hi = b;
}

// Which query rows i (0 <= i < q_len, at position i + shift) see key j, as [lo, hi): the
// same rule as attn_visible_keys read the other way round. Both bounds grow with j.
inline void attn_visible_queries(const AttnShape& s, int64_t j, int64_t shift, int64_t q_len, int64_t* lo,
                                 int64_t* hi) {
  int64_t a = 0, b = q_len;
  if (s.causal && j - shift > a) a = j - shift;  // p >= j
  if (s.window > 0) {
    if (j + s.window - shift < b) b = j + s.window - shift;                      // p <= j + w - 1
    if (!s.causal && j - s.window + 1 - shift > a) a = j - s.window + 1 - shift;  // p >= j - w + 1
  }
  if (b < a) b = a;
  *lo = a;
  *hi = b;
}

}  // namespace minigpt::cpu
