// csrc/cpu/bpe_tables.h -- small open-addressing hash tables used by the BPE core.
//
// std::unordered_map allocates a node per entry and hashes std::string keys that
// must be built first; for millions of short pre-tokens that dominates. These
// tables keep keys in one byte arena and slots in one flat array (linear probing).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace minigpt::cpu::bpe {

inline uint64_t hash_bytes(const uint8_t* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  uint64_t w = 0;
  std::memcpy(&w, p, n);
  h = (h ^ w) * 0x94d049bb133111ebull;
  return h ^ (h >> 29);
}

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return x;
}

// byte string -> V
template <typename V>
class BytesMap {
 public:
  struct Slot {
    uint64_t hash = 0;
    uint32_t off = 0, len = 0;
    V value{};
    bool used = false;
  };

  explicit BytesMap(size_t capacity = 1024) { clear(capacity); }

  void clear(size_t capacity = 1024) {
    size_t cap = 16;
    while (cap < capacity * 2) cap <<= 1;
    slots_.assign(cap, Slot{});
    keys_.clear();
    size_ = 0;
  }

  size_t size() const { return size_; }
  size_t key_bytes() const { return keys_.size(); }

  // Pointer to the value of key, or nullptr.
  V* find(const uint8_t* p, size_t n, uint64_t h) {
    const size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      Slot& s = slots_[i];
      if (!s.used) return nullptr;
      if (s.hash == h && s.len == n && std::memcmp(keys_.data() + s.off, p, n) == 0)
        return &s.value;
    }
  }

  // Value of key, inserted as V{} if absent.
  V& get_or_insert(const uint8_t* p, size_t n, uint64_t h) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    const size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      Slot& s = slots_[i];
      if (!s.used) {
        s.used = true;
        s.hash = h;
        s.off = uint32_t(keys_.size());
        s.len = uint32_t(n);
        keys_.insert(keys_.end(), p, p + n);
        ++size_;
        return s.value;
      }
      if (s.hash == h && s.len == n && std::memcmp(keys_.data() + s.off, p, n) == 0)
        return s.value;
    }
  }

  template <typename Fn>
  void for_each(Fn&& fn) const {
    for (const Slot& s : slots_)
      if (s.used) fn(keys_.data() + s.off, size_t(s.len), s.hash, s.value);
  }

 private:
  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.size() * 2, Slot{});
    const size_t mask = slots_.size() - 1;
    for (const Slot& s : old) {
      if (!s.used) continue;
      size_t i = s.hash & mask;
      while (slots_[i].used) i = (i + 1) & mask;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  std::vector<uint8_t> keys_;
  size_t size_ = 0;
};

// (left id, right id) -> V, keys packed in a uint64 (UINT64_MAX marks an empty slot).
template <typename V>
class PairMap {
 public:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

  explicit PairMap(size_t capacity = 1024) { clear(capacity); }

  void clear(size_t capacity = 1024) {
    size_t cap = 16;
    while (cap < capacity * 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    values_.assign(cap, V{});
    size_ = 0;
  }

  size_t size() const { return size_; }

  const V* find(uint64_t k) const {
    const size_t mask = keys_.size() - 1;
    for (size_t i = mix64(k) & mask;; i = (i + 1) & mask) {
      if (keys_[i] == k) return &values_[i];
      if (keys_[i] == kEmpty) return nullptr;
    }
  }
  V* find(uint64_t k) { return const_cast<V*>(static_cast<const PairMap*>(this)->find(k)); }

  V& get_or_insert(uint64_t k) {
    if ((size_ + 1) * 2 > keys_.size()) grow();
    const size_t mask = keys_.size() - 1;
    for (size_t i = mix64(k) & mask;; i = (i + 1) & mask) {
      if (keys_[i] == k) return values_[i];
      if (keys_[i] == kEmpty) {
        keys_[i] = k;
        ++size_;
        return values_[i];
      }
    }
  }

 private:
  void grow() {
    std::vector<uint64_t> old_keys;
    std::vector<V> old_values;
    old_keys.swap(keys_);
    old_values.swap(values_);
    keys_.assign(old_keys.size() * 2, kEmpty);
    values_.assign(old_keys.size() * 2, V{});
    const size_t mask = keys_.size() - 1;
    for (size_t j = 0; j < old_keys.size(); ++j) {
      if (old_keys[j] == kEmpty) continue;
      size_t i = mix64(old_keys[j]) & mask;
      while (keys_[i] != kEmpty) i = (i + 1) & mask;
      keys_[i] = old_keys[j];
      values_[i] = std::move(old_values[j]);
    }
  }

  std::vector<uint64_t> keys_;
  std::vector<V> values_;
  size_t size_ = 0;
};

}  // namespace minigpt::cpu::bpe
