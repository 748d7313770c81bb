// csrc/cpu/bpe.cpp -- the C++ core of the byte-level BPE tokenizer.
//
// Two TorchScript custom classes (reachable from Python as torch.classes.minigpt.*):
//   BpeCore(pattern, byte_ids[256], merges[M,3], token_bytes uint8, token_offsets[V+1])
//       .encode(text) -> int64 ids; .encode_batch(texts, threads) -> (flat ids, offsets)
//       .decode(ids) -> uint8 bytes; .clear_cache()
//   BpeTrainer(pattern)
//       .add_texts(texts, threads)  count pre-tokens (streaming: only the counts are kept)
//       .prune(min_count)           drop rare pre-tokens (bounds memory)
//       .start(); .train(n) -> next n merges [k,3]; .token_bytes() -> (uint8, offsets)
// and one op, torch.ops.minigpt.bpe_pretokenize(text, pattern) -> piece end offsets,
// which the tests compare with the Python regex split.
//
// The algorithms are the ones of minigpt/tokenizer/reference.py (read that first); this
// file gives the same merges and ids, only faster: hand-written pre-split
// (bpe_pretokenize.h), flat hash tables (bpe_tables.h), a per-thread cache of encoded
// pre-tokens, and a heap for the merge order of long pieces.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <mutex>
#include <queue>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cpu/bpe_pretokenize.h"
#include "cpu/bpe_tables.h"

namespace minigpt::cpu::bpe {
namespace {

at::Tensor to_tensor(const std::vector<int64_t>& v) {
  at::Tensor t = at::empty({int64_t(v.size())}, at::kLong);
  if (!v.empty()) std::memcpy(t.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
  return t;
}

at::Tensor ids_to_tensor(const std::vector<int32_t>& v) {
  at::Tensor t = at::empty({int64_t(v.size())}, at::kLong);
  int64_t* p = t.data_ptr<int64_t>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = v[i];
  return t;
}

const uint8_t* bytes_of(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }

int resolve_threads(int64_t requested, size_t work) {
  int64_t n = requested > 0 ? requested : int64_t(std::max(1u, std::thread::hardware_concurrency()));
  return int(std::max<int64_t>(1, std::min<int64_t>(n, int64_t(work))));
}

// Run fn(thread_index) on `threads` threads (the calling thread is one of them).
template <typename Fn>
void run_threads(int threads, Fn&& fn) {
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back([&fn, t] { fn(t); });
  fn(0);
  for (auto& th : pool) th.join();
}

struct MergeInfo {
  int32_t rank = -1;
  int32_t id = -1;
};

// Scratch memory for encoding one piece (one per thread).
struct Scratch {
  std::vector<int32_t> sym, rank, next_id, prev, next;
  struct Item {
    int32_t rank, pos, left, right, id;
    bool operator>(const Item& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Item> heap;
};

// Cache of already-encoded pre-tokens: key bytes -> (offset, count) into `ids`.
struct EncodeCache {
  BytesMap<std::pair<uint32_t, uint32_t>> map{1 << 12};
  std::vector<int32_t> ids;
  void limit() {
    if (map.size() > (1u << 20) || ids.size() > (1u << 24) || map.key_bytes() > (1u << 26)) {
      map.clear(1 << 12);
      ids.clear();
    }
  }
};

class BpeCore : public torch::CustomClassHolder {
 public:
  BpeCore(const std::string& pattern, const at::Tensor& byte_ids, const at::Tensor& merges,
          const at::Tensor& token_bytes, const at::Tensor& token_offsets) {
    try {
      pattern_ = parse_pattern(pattern);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK_VALUE(false, e.what());
    }
    TORCH_CHECK_VALUE(token_offsets.dim() == 1 && token_offsets.scalar_type() == at::kLong &&
                          token_offsets.size(0) >= 1,
                      "BpeCore: token_offsets must be a 1-D int64 tensor");
    TORCH_CHECK_VALUE(token_bytes.dim() == 1 && token_bytes.scalar_type() == at::kByte,
                      "BpeCore: token_bytes must be a 1-D uint8 tensor");
    at::Tensor off = token_offsets.contiguous();
    vocab_ = off.size(0) - 1;
    offsets_.assign(off.data_ptr<int64_t>(), off.data_ptr<int64_t>() + off.size(0));
    TORCH_CHECK_VALUE(offsets_[0] == 0 && offsets_.back() == token_bytes.size(0),
                      "BpeCore: token_offsets must run from 0 to len(token_bytes)");
    for (int64_t i = 0; i < vocab_; ++i)
      TORCH_CHECK_VALUE(offsets_[i] <= offsets_[i + 1], "BpeCore: token_offsets must not decrease");
    at::Tensor tb = token_bytes.contiguous();
    bytes_.assign(tb.data_ptr<uint8_t>(), tb.data_ptr<uint8_t>() + tb.size(0));

    TORCH_CHECK_VALUE(byte_ids.dim() == 1 && byte_ids.size(0) == 256 &&
                          byte_ids.scalar_type() == at::kLong,
                      "BpeCore: byte_ids must be 256 int64 ids");
    at::Tensor bi = byte_ids.contiguous();
    for (int b = 0; b < 256; ++b) {
      const int64_t id = bi.data_ptr<int64_t>()[b];
      TORCH_CHECK_VALUE(id >= 0 && id < vocab_, "BpeCore: byte id out of range");
      byte_ids_[b] = int32_t(id);
    }
    TORCH_CHECK_VALUE(merges.dim() == 2 && merges.size(1) == 3 && merges.scalar_type() == at::kLong,
                      "BpeCore: merges must be an int64 tensor of shape (M, 3)");
    at::Tensor m = merges.contiguous();
    const int64_t* mp = m.data_ptr<int64_t>();
    ranks_.clear(size_t(m.size(0)) + 16);
    for (int64_t r = 0; r < m.size(0); ++r) {
      const int64_t a = mp[3 * r], b = mp[3 * r + 1], c = mp[3 * r + 2];
      TORCH_CHECK_VALUE(a >= 0 && a < vocab_ && b >= 0 && b < vocab_ && c >= 0 && c < vocab_,
                        "BpeCore: merge ids out of range");
      MergeInfo& info = ranks_.get_or_insert(PairMap<MergeInfo>::key(int32_t(a), int32_t(b)));
      if (info.rank < 0) info = {int32_t(r), int32_t(c)};  // first (lowest) rank wins
    }
  }

  at::Tensor encode(const std::string& text) {
    std::vector<int32_t> out;
    out.reserve(text.size() / 3 + 16);
    // the shared cache serves one caller at a time; a concurrent caller uses its own
    std::unique_lock<std::mutex> lock(cache_mutex_, std::try_to_lock);
    if (lock.owns_lock()) {
      encode_text(bytes_of(text), text.size(), out, cache_, scratch_);
    } else {
      EncodeCache cache;
      Scratch scratch;
      encode_text(bytes_of(text), text.size(), out, cache, scratch);
    }
    return ids_to_tensor(out);
  }

  std::tuple<at::Tensor, at::Tensor> encode_batch(const std::vector<std::string>& texts,
                                                  int64_t num_threads) {
    std::vector<std::vector<int32_t>> results(texts.size());
    const int threads = resolve_threads(num_threads, texts.size());
    std::atomic<size_t> next{0};
    run_threads(threads, [&](int t) {
      // thread 0 reuses the long-lived cache when no other call holds it
      std::unique_lock<std::mutex> lock(cache_mutex_, std::defer_lock);
      const bool shared = t == 0 && lock.try_lock();
      EncodeCache local;
      Scratch local_scratch;
      EncodeCache& cache = shared ? cache_ : local;
      Scratch& scratch = shared ? scratch_ : local_scratch;
      for (size_t i = next++; i < texts.size(); i = next++)
        encode_text(bytes_of(texts[i]), texts[i].size(), results[i], cache, scratch);
    });
    std::vector<int64_t> offsets(texts.size() + 1, 0);
    for (size_t i = 0; i < texts.size(); ++i) offsets[i + 1] = offsets[i] + results[i].size();
    at::Tensor flat = at::empty({offsets.back()}, at::kLong);
    int64_t* fp = flat.data_ptr<int64_t>();
    for (size_t i = 0; i < texts.size(); ++i)
      std::copy(results[i].begin(), results[i].end(), fp + offsets[i]);
    return {flat, to_tensor(offsets)};
  }

  at::Tensor decode(const at::Tensor& ids) {
    TORCH_CHECK_VALUE(ids.dim() == 1 && ids.scalar_type() == at::kLong,
                      "decode: ids must be a 1-D int64 tensor");
    at::Tensor c = ids.contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t i = 0; i < c.size(0); ++i) {
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < vocab_, "decode: token id ", p[i], " is outside 0..",
                        vocab_ - 1);
      total += offsets_[p[i] + 1] - offsets_[p[i]];
    }
    at::Tensor out = at::empty({total}, at::kByte);
    uint8_t* o = out.data_ptr<uint8_t>();
    for (int64_t i = 0; i < c.size(0); ++i) {
      const int64_t len = offsets_[p[i] + 1] - offsets_[p[i]];
      std::memcpy(o, bytes_.data() + offsets_[p[i]], size_t(len));
      o += len;
    }
    return out;
  }

  int64_t vocab_size() const { return vocab_; }

  // Forget the cached pre-token encodings (benchmarks measure a cold cache with this).
  void clear_cache() {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    cache_.map.clear(1 << 12);
    cache_.ids.clear();
  }

 private:
  MergeInfo lookup(int32_t a, int32_t b) const {
    const MergeInfo* m = ranks_.find(PairMap<MergeInfo>::key(a, b));
    return m ? *m : MergeInfo{};
  }

  void encode_text(const uint8_t* s, size_t n, std::vector<int32_t>& out, EncodeCache& cache,
                   Scratch& scratch) const {
    for_each_piece(pattern_, s, n, [&](const uint8_t* p, size_t len) {
      if (len == 1) {
        out.push_back(byte_ids_[p[0]]);
        return;
      }
      const uint64_t h = hash_bytes(p, len);
      if (const auto* hit = cache.map.find(p, len, h)) {
        out.insert(out.end(), cache.ids.begin() + hit->first,
                   cache.ids.begin() + hit->first + hit->second);
        return;
      }
      const size_t before = out.size();
      encode_piece(p, len, out, scratch);
      cache.limit();
      auto& slot = cache.map.get_or_insert(p, len, h);
      slot = {uint32_t(cache.ids.size()), uint32_t(out.size() - before)};
      cache.ids.insert(cache.ids.end(), out.begin() + before, out.end());
    });
  }

  // Merge the lowest-rank adjacent pair (leftmost on ties) until none has a merge.
  void encode_piece(const uint8_t* p, size_t len, std::vector<int32_t>& out, Scratch& sc) const {
    if (len > 128) return encode_long_piece(p, len, out, sc);
    auto& sym = sc.sym;
    auto& rank = sc.rank;
    auto& nid = sc.next_id;
    sym.resize(len);
    for (size_t i = 0; i < len; ++i) sym[i] = byte_ids_[p[i]];
    size_t m = len;
    rank.resize(len);
    nid.resize(len);
    auto refresh = [&](size_t i) {
      const MergeInfo mi = lookup(sym[i], sym[i + 1]);
      rank[i] = mi.rank < 0 ? INT_MAX : mi.rank;
      nid[i] = mi.id;
    };
    for (size_t i = 0; i + 1 < m; ++i) refresh(i);
    while (m > 1) {
      size_t best = 0;
      for (size_t i = 1; i + 1 < m; ++i)
        if (rank[i] < rank[best]) best = i;
      if (rank[best] == INT_MAX) break;
      sym[best] = nid[best];
      for (size_t i = best + 1; i + 1 < m; ++i) {
        sym[i] = sym[i + 1];
        rank[i] = rank[i + 1];
        nid[i] = nid[i + 1];
      }
      --m;
      if (best > 0) refresh(best - 1);
      if (best + 1 < m) refresh(best);
    }
    out.insert(out.end(), sym.begin(), sym.begin() + m);
  }

  // Same result as encode_piece, O(n log n): a linked list of symbols + a heap of pairs.
  void encode_long_piece(const uint8_t* p, size_t len, std::vector<int32_t>& out,
                         Scratch& sc) const {
    const int32_t n = int32_t(len);
    auto& sym = sc.sym;
    auto& prev = sc.prev;
    auto& next = sc.next;
    sym.resize(n);
    prev.resize(n);
    next.resize(n);
    for (int32_t i = 0; i < n; ++i) {
      sym[i] = byte_ids_[p[i]];
      prev[i] = i - 1;
      next[i] = i + 1 < n ? i + 1 : -1;
    }
    auto& heap = sc.heap;
    heap.clear();
    auto cmp = [](const Scratch::Item& a, const Scratch::Item& b) { return a > b; };
    auto push = [&](int32_t i) {
      if (i < 0 || next[i] < 0) return;
      const MergeInfo mi = lookup(sym[i], sym[next[i]]);
      if (mi.rank < 0) return;
      heap.push_back({mi.rank, i, sym[i], sym[next[i]], mi.id});
      std::push_heap(heap.begin(), heap.end(), cmp);
    };
    for (int32_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), cmp);
      const Scratch::Item it = heap.back();
      heap.pop_back();
      const int32_t q = next[it.pos];
      // stale: the position was merged away or one of its symbols changed
      if (sym[it.pos] != it.left || q < 0 || sym[q] != it.right || prev[it.pos] == -2) continue;
      sym[it.pos] = it.id;
      next[it.pos] = next[q];
      if (next[q] >= 0) prev[next[q]] = it.pos;
      prev[q] = -2;  // dead
      sym[q] = -1;
      push(prev[it.pos]);
      push(it.pos);
    }
    for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
  }

  Pattern pattern_;
  int64_t vocab_ = 0;
  int32_t byte_ids_[256];
  PairMap<MergeInfo> ranks_;
  std::vector<uint8_t> bytes_;
  std::vector<int64_t> offsets_;
  std::mutex cache_mutex_;
  EncodeCache cache_;
  Scratch scratch_;
};

class BpeTrainer : public torch::CustomClassHolder {
 public:
  explicit BpeTrainer(const std::string& pattern) {
    try {
      pattern_ = parse_pattern(pattern);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK_VALUE(false, e.what());
    }
    for (int b = 0; b < 256; ++b) {
      token_bytes_.emplace_back(1, char(b));
      id_of_[token_bytes_.back()] = b;
    }
  }

  // Count the pre-tokens of `texts` (split across threads); the texts are not kept.
  void add_texts(const std::vector<std::string>& texts, int64_t num_threads) {
    TORCH_CHECK_VALUE(!started_, "BpeTrainer: add_texts after start()");
    const int threads = resolve_threads(num_threads, texts.size());
    std::vector<BytesMap<int64_t>> local(threads);
    std::atomic<size_t> next{0};
    run_threads(threads, [&](int t) {
      auto& counts = local[t];
      for (size_t i = next++; i < texts.size(); i = next++) {
        const std::string& s = texts[i];
        for_each_piece(pattern_, bytes_of(s), s.size(), [&](const uint8_t* p, size_t len) {
          counts.get_or_insert(p, len, hash_bytes(p, len)) += 1;
        });
      }
    });
    for (auto& counts : local)
      counts.for_each([&](const uint8_t* p, size_t len, uint64_t h, int64_t c) {
        counts_.get_or_insert(p, len, h) += c;
      });
  }

  int64_t num_words() const { return int64_t(started_ ? words_.size() : counts_.size()); }

  // Drop the pre-tokens seen fewer than min_count times (bounds memory on huge corpora);
  // returns how many distinct pre-tokens remain.
  int64_t prune(int64_t min_count) {
    TORCH_CHECK_VALUE(!started_, "BpeTrainer: prune after start()");
    BytesMap<int64_t> kept(counts_.size() / 2 + 16);
    counts_.for_each([&](const uint8_t* p, size_t len, uint64_t h, int64_t c) {
      if (c >= min_count) kept.get_or_insert(p, len, h) = c;
    });
    std::swap(counts_, kept);
    return int64_t(counts_.size());
  }

  // (bytes, offsets, counts) of every distinct pre-token (before start()).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> words() const {
    TORCH_CHECK_VALUE(!started_, "BpeTrainer: words() is only available before start()");
    std::vector<uint8_t> data;
    std::vector<int64_t> offsets{0}, counts;
    counts_.for_each([&](const uint8_t* p, size_t len, uint64_t, int64_t c) {
      data.insert(data.end(), p, p + len);
      offsets.push_back(int64_t(data.size()));
      counts.push_back(c);
    });
    at::Tensor d = at::empty({int64_t(data.size())}, at::kByte);
    if (!data.empty()) std::memcpy(d.data_ptr<uint8_t>(), data.data(), data.size());
    return {d, to_tensor(offsets), to_tensor(counts)};
  }

  // Build the word list, the pair counts, the pair -> words index and the heap.
  void start() {
    TORCH_CHECK_VALUE(!started_, "BpeTrainer: start() called twice");
    started_ = true;
    words_.reserve(counts_.size());
    counts_.for_each([&](const uint8_t* p, size_t len, uint64_t, int64_t c) {
      if (c <= 0 || len == 0) return;
      words_.emplace_back(p, p + len);  // byte b is token b
      freqs_.push_back(c);
    });
    counts_.clear(16);
    stamp_.assign(words_.size(), 0);
    for (uint32_t w = 0; w < words_.size(); ++w) {
      const auto& s = words_[w];
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        const uint64_t k = PairMap<int64_t>::key(s[i], s[i + 1]);
        pair_counts_.get_or_insert(k) += freqs_[w];
        auto& list = where_.get_or_insert(k);
        if (list.empty() || list.back() != w) list.push_back(w);
      }
    }
    for (uint32_t w = 0; w < words_.size(); ++w) {
      const auto& s = words_[w];
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        const uint64_t k = PairMap<int64_t>::key(s[i], s[i + 1]);
        int64_t& c = *pair_counts_.find(k);
        if (c > 0) {
          heap_.push_back({c, s[i], s[i + 1]});
          c = -c;  // mark as pushed (restored below)
        }
      }
    }
    for (auto& e : heap_) *pair_counts_.find(PairMap<int64_t>::key(e.a, e.b)) = e.count;
    std::make_heap(heap_.begin(), heap_.end());
  }

  // Learn up to n more merges; returns them as an (k, 3) int64 tensor (k < n: no pairs left).
  at::Tensor train(int64_t n) {
    TORCH_CHECK_VALUE(started_, "BpeTrainer: call start() before train()");
    TORCH_CHECK_VALUE(n >= 0, "BpeTrainer: n must be >= 0");
    std::vector<int64_t> out;
    std::vector<std::pair<uint64_t, int64_t>> changed;
    std::vector<int32_t> merged;
    for (int64_t step = 0; step < n; ++step) {
      HeapEntry top{};
      bool found = false;
      while (!heap_.empty()) {
        std::pop_heap(heap_.begin(), heap_.end());
        top = heap_.back();
        heap_.pop_back();
        const int64_t* cur = pair_counts_.find(PairMap<int64_t>::key(top.a, top.b));
        const int64_t truth = cur ? *cur : 0;
        if (truth <= 0) continue;
        if (truth != top.count) {  // stale: went down since it was pushed
          heap_.push_back({truth, top.a, top.b});
          std::push_heap(heap_.begin(), heap_.end());
          continue;
        }
        found = true;
        break;
      }
      if (!found) break;
      const int32_t a = top.a, b = top.b;
      std::string bytes = token_bytes_[a] + token_bytes_[b];
      int32_t new_id;
      auto it = id_of_.find(bytes);
      if (it != id_of_.end()) {
        new_id = it->second;  // same bytes reached by another path: reuse the id
      } else {
        new_id = int32_t(token_bytes_.size());
        id_of_.emplace(bytes, new_id);
        token_bytes_.push_back(std::move(bytes));
      }
      out.insert(out.end(), {a, b, new_id});
      ++merge_count_;

      const uint64_t key = PairMap<int64_t>::key(a, b);
      std::vector<uint32_t> list = std::move(*where_.find(key));
      changed.clear();
      for (uint32_t w : list) {
        if (stamp_[w] == merge_count_) continue;  // listed twice
        stamp_[w] = merge_count_;
        auto& old = words_[w];
        merged.clear();
        for (size_t i = 0; i < old.size();) {
          if (i + 1 < old.size() && old[i] == a && old[i + 1] == b) {
            merged.push_back(new_id);
            i += 2;
          } else {
            merged.push_back(old[i]);
            i += 1;
          }
        }
        if (merged.size() == old.size()) continue;  // the pair left this word earlier
        const int64_t f = freqs_[w];
        for (size_t i = 0; i + 1 < old.size(); ++i)
          changed.emplace_back(PairMap<int64_t>::key(old[i], old[i + 1]), -f);
        for (size_t i = 0; i + 1 < merged.size(); ++i) {
          const uint64_t k = PairMap<int64_t>::key(merged[i], merged[i + 1]);
          changed.emplace_back(k, f);
          if (merged[i] == new_id || merged[i + 1] == new_id) where_.get_or_insert(k).push_back(w);
        }
        old.swap(merged);
      }
      std::sort(changed.begin(), changed.end());
      for (size_t i = 0; i < changed.size();) {
        const uint64_t k = changed[i].first;
        int64_t delta = 0;
        for (; i < changed.size() && changed[i].first == k; ++i) delta += changed[i].second;
        if (delta == 0) continue;
        int64_t& c = pair_counts_.get_or_insert(k);
        c += delta;
        if (delta > 0) {
          heap_.push_back({c, int32_t(k >> 32), int32_t(k & 0xffffffffu)});
          std::push_heap(heap_.begin(), heap_.end());
        }
      }
      *pair_counts_.find(key) = 0;
    }
    at::Tensor t = to_tensor(out);
    return t.reshape({int64_t(out.size() / 3), 3});
  }

  std::tuple<at::Tensor, at::Tensor> token_bytes() const {
    std::vector<int64_t> offsets{0};
    size_t total = 0;
    for (const auto& t : token_bytes_) offsets.push_back(int64_t(total += t.size()));
    at::Tensor d = at::empty({int64_t(total)}, at::kByte);
    uint8_t* p = d.data_ptr<uint8_t>();
    for (const auto& t : token_bytes_) {
      std::memcpy(p, t.data(), t.size());
      p += t.size();
    }
    return {d, to_tensor(offsets)};
  }

 private:
  struct HeapEntry {
    int64_t count;
    int32_t a, b;
    // max-heap order: higher count first, then smaller (a, b)
    bool operator<(const HeapEntry& o) const {
      if (count != o.count) return count < o.count;
      if (a != o.a) return a > o.a;
      return b > o.b;
    }
  };

  Pattern pattern_;
  bool started_ = false;
  BytesMap<int64_t> counts_{1 << 16};
  std::vector<std::vector<int32_t>> words_;
  std::vector<int64_t> freqs_;
  std::vector<uint32_t> stamp_;
  uint32_t merge_count_ = 0;
  PairMap<int64_t> pair_counts_{1 << 16};
  PairMap<std::vector<uint32_t>> where_{1 << 16};
  std::vector<HeapEntry> heap_;
  std::vector<std::string> token_bytes_;
  std::unordered_map<std::string, int32_t> id_of_;
};

at::Tensor bpe_pretokenize(const std::string& text, const std::string& pattern) {
  Pattern p;
  try {
    p = parse_pattern(pattern);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  std::vector<int64_t> ends;
  const uint8_t* s = bytes_of(text);
  for_each_piece(p, s, text.size(),
                 [&](const uint8_t* q, size_t len) { ends.push_back(int64_t(q - s + len)); });
  return to_tensor(ends);
}

}  // namespace
}  // namespace minigpt::cpu::bpe

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  using minigpt::cpu::bpe::BpeCore;
  using minigpt::cpu::bpe::BpeTrainer;
  m.class_<BpeCore>("BpeCore")
      .def(torch::init<std::string, at::Tensor, at::Tensor, at::Tensor, at::Tensor>())
      .def("encode", &BpeCore::encode)
      .def("encode_batch", &BpeCore::encode_batch)
      .def("decode", &BpeCore::decode)
      .def("vocab_size", &BpeCore::vocab_size)
      .def("clear_cache", &BpeCore::clear_cache);
  m.class_<BpeTrainer>("BpeTrainer")
      .def(torch::init<std::string>())
      .def("add_texts", &BpeTrainer::add_texts)
      .def("num_words", &BpeTrainer::num_words)
      .def("prune", &BpeTrainer::prune)
      .def("words", &BpeTrainer::words)
      .def("start", &BpeTrainer::start)
      .def("train", &BpeTrainer::train)
      .def("token_bytes", &BpeTrainer::token_bytes);
  m.def("bpe_pretokenize(str text, str pattern) -> Tensor", &minigpt::cpu::bpe::bpe_pretokenize);
}
