// csrc/cpu/bpe_pretokenize.h -- the BPE pre-split ("gpt2" / "gpt4" patterns) matched by hand.
//
// The Python reference runs these regular expressions (minigpt/tokenizer/pretokenize.py):
//   gpt2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   gpt4: '(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
//         | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// A regex engine tries the alternatives left to right at each position and takes the
// first that matches. next_piece_* below does the same, one alternative after the other,
// on UTF-8 bytes, with the character classes of unicode_tables.h (generated from the
// Python `regex` module, so both sides classify every code point alike). This is ~10x
// faster than a general regex engine and has no dependency. Bytes that are not valid
// UTF-8 (never produced from a Python str) count as one "other" character each.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/unicode_tables.h"

namespace minigpt::cpu::bpe {

enum CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };
enum class Pattern { kGpt2, kGpt4 };

inline Pattern parse_pattern(const std::string& name) {
  if (name == "gpt2") return Pattern::kGpt2;
  if (name == "gpt4") return Pattern::kGpt4;
  throw std::invalid_argument("pattern must be 'gpt2' or 'gpt4', got '" + name + "'");
}

// Class of every code point of the Basic Multilingual Plane, expanded once from the ranges.
inline const uint8_t* bmp_classes() {
  static const std::vector<uint8_t> table = [] {
    std::vector<uint8_t> t(0x10000, kOther);
    for (const auto& r : unicode::kClassRanges) {
      for (uint32_t cp = r.first; cp <= r.last && cp < 0x10000; ++cp) t[cp] = r.cls;
    }
    return t;
  }();
  return table.data();
}

// Loaded once when the library loads, so the hot loops read a plain pointer.
inline const uint8_t* const kBmpClasses = bmp_classes();

inline uint8_t class_of(uint32_t cp) {
  if (cp < 0x10000) return kBmpClasses[cp];
  int lo = 0, hi = unicode::kNumClassRanges - 1;  // binary search above the BMP
  while (lo <= hi) {
    const int mid = (lo + hi) / 2;
    const auto& r = unicode::kClassRanges[mid];
    if (cp < r.first)
      hi = mid - 1;
    else if (cp > r.last)
      lo = mid + 1;
    else
      return r.cls;
  }
  return kOther;
}

struct Char {
  uint32_t cp;  // code point (0xFFFFFFFF for an invalid byte)
  uint32_t len;  // bytes
  uint8_t cls;
};

// Decode the character starting at s[i] (i < n).
inline Char decode_at(const uint8_t* s, size_t n, size_t i) {
  const uint8_t b = s[i];
  if (b < 0x80) return {b, 1, kBmpClasses[b]};
  constexpr Char invalid{0xFFFFFFFFu, 1, kOther};
  uint32_t cp, len;
  if ((b & 0xE0) == 0xC0) {
    cp = b & 0x1F;
    len = 2;
  } else if ((b & 0xF0) == 0xE0) {
    cp = b & 0x0F;
    len = 3;
  } else if ((b & 0xF8) == 0xF0) {
    cp = b & 0x07;
    len = 4;
  } else {
    return invalid;
  }
  if (i + len > n) return invalid;
  for (uint32_t k = 1; k < len; ++k) {
    const uint8_t c = s[i + k];
    if ((c & 0xC0) != 0x80) return invalid;
    cp = (cp << 6) | (c & 0x3F);
  }
  if ((len == 2 && cp < 0x80) || (len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
      (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
    return invalid;
  return {cp, len, class_of(cp)};
}

// End of the run of characters of class `cls` starting at j.
inline size_t run_end(const uint8_t* s, size_t n, size_t j, uint8_t cls) {
  while (j < n) {
    if (s[j] < 0x80) {  // ASCII fast path
      if (kBmpClasses[s[j]] != cls) break;
      ++j;
      continue;
    }
    const Char c = decode_at(s, n, j);
    if (c.cls != cls) break;
    j += c.len;
  }
  return j;
}

// `\s*[\r\n]+` (if with_newlines), then `\s+(?!\S)|\s+`, at a white-space character s[i].
inline size_t whitespace_end(const uint8_t* s, size_t n, size_t i, bool with_newlines) {
  size_t j = i, last_start = i, after_newline = 0, count = 0;
  while (j < n) {
    const Char c = decode_at(s, n, j);
    if (c.cls != kSpace) break;
    last_start = j;
    j += c.len;
    ++count;
    if (c.cp == '\r' || c.cp == '\n') after_newline = j;
  }
  // \s*[\r\n]+ : the longest match ends right after the last CR/LF of the run
  if (with_newlines && after_newline) return after_newline;
  if (j == n) return j;  // \s+(?!\S) at the end of the text takes the whole run
  // followed by a non-space: \s+(?!\S) leaves the last character for the next piece,
  // unless the run is one character, which \s+ then takes alone
  return count >= 2 ? last_start : j;
}

inline bool is_contraction_letter(uint8_t c, bool any_case, char lower) {
  return c == uint8_t(lower) || (any_case && c == uint8_t(lower - 'a' + 'A'));
}

// Length of a contraction ('s 't 're 've 'm 'll 'd) at s[i] == '\'', or 0.
inline size_t contraction_len(const uint8_t* s, size_t n, size_t i, bool any_case) {
  if (i + 1 >= n) return 0;
  const uint8_t c1 = s[i + 1];
  for (char one : {'s', 't', 'm', 'd'})
    if (is_contraction_letter(c1, any_case, one)) return 2;
  if (i + 2 >= n) return 0;
  const uint8_t c2 = s[i + 2];
  static constexpr char kTwo[3][2] = {{'r', 'e'}, {'v', 'e'}, {'l', 'l'}};
  for (const auto& two : kTwo)
    if (is_contraction_letter(c1, any_case, two[0]) && is_contraction_letter(c2, any_case, two[1]))
      return 3;
  return 0;
}

// End of the gpt2 piece that starts at s[i] (i < n).
inline size_t next_piece_gpt2(const uint8_t* s, size_t n, size_t i) {
  if (s[i] == '\'') {
    if (size_t k = contraction_len(s, n, i, false)) return i + k;
  }
  const Char c0 = decode_at(s, n, i);
  if (c0.cp == ' ' && i + 1 < n) {  // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+"
    const Char c1 = decode_at(s, n, i + 1);
    if (c1.cls != kSpace) return run_end(s, n, i + 1 + c1.len, c1.cls);
  }
  if (c0.cls != kSpace) return run_end(s, n, i + c0.len, c0.cls);
  return whitespace_end(s, n, i, false);
}

// End of the gpt4 piece that starts at s[i] (i < n).
inline size_t next_piece_gpt4(const uint8_t* s, size_t n, size_t i) {
  if (s[i] == '\'') {
    if (size_t k = contraction_len(s, n, i, true)) return i + k;
  }
  const Char c0 = decode_at(s, n, i);
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (c0.cls == kLetter) return run_end(s, n, i + c0.len, kLetter);
  if (c0.cls != kNumber && c0.cp != '\r' && c0.cp != '\n' && i + c0.len < n) {
    const Char c1 = decode_at(s, n, i + c0.len);
    if (c1.cls == kLetter) return run_end(s, n, i + c0.len + c1.len, kLetter);
  }
  // \p{N}{1,3}
  if (c0.cls == kNumber) {
    size_t j = i + c0.len;
    for (int k = 0; k < 2 && j < n; ++k) {
      const Char c = decode_at(s, n, j);
      if (c.cls != kNumber) break;
      j += c.len;
    }
    return j;
  }
  // " ?[^\s\p{L}\p{N}]+[\r\n]*"
  size_t j = n + 1;
  if (c0.cls == kOther) {
    j = i;
  } else if (c0.cp == ' ' && i + 1 < n && decode_at(s, n, i + 1).cls == kOther) {
    j = i + 1;
  }
  if (j <= n) {
    j = run_end(s, n, j, kOther);
    while (j < n && (s[j] == '\r' || s[j] == '\n')) ++j;
    return j;
  }
  // c0 is white space
  return whitespace_end(s, n, i, true);
}

inline size_t next_piece(Pattern p, const uint8_t* s, size_t n, size_t i) {
  return p == Pattern::kGpt2 ? next_piece_gpt2(s, n, i) : next_piece_gpt4(s, n, i);
}

// Call fn(begin, length) for every piece of s[0..n).
template <typename Fn>
inline void for_each_piece(Pattern p, const uint8_t* s, size_t n, Fn&& fn) {
  size_t i = 0;
  while (i < n) {
    const size_t j = next_piece(p, s, n, i);
    fn(s + i, j - i);
    i = j;
  }
}

}  // namespace minigpt::cpu::bpe
