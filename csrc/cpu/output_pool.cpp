// csrc/cpu/output_pool.cpp -- a small cache of large, page-faulted-in output buffers.
// See output_pool.h for why. Registered helpers:
//   torch.ops.minigpt.cpu_pool_empty_cache() -> ()      free every cached block
//   torch.ops.minigpt.cpu_pool_cached_bytes() -> int     bytes held in free blocks
#include "cpu/output_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace minigpt::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

size_t cap_from_env() {
  const char* env = std::getenv("MINIGPT_CPU_POOL_MB");
  if (env == nullptr || *env == '\0') return size_t{1024} << 20;
  return size_t(std::strtoull(env, nullptr, 10)) << 20;
}

// Fresh block: mmap with 2 MiB alignment (over-map, trim the edges) so that
// transparent huge pages can back it.
void* map_block(size_t bytes) {
  void* raw = mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "out of memory allocating ", bytes, " bytes");
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = start + bytes + kHugePage, used_end = aligned + bytes;
  if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
  void* p = reinterpret_cast<void*>(aligned);
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
  return p;
}

class OutputPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (std::max<size_t>(nbytes, 1) + kHugePage - 1) & ~(kHugePage - 1);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
      }
    }
    if (p == nullptr) p = map_block(bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = bytes;
    }
    return {p, p, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  void empty_cache() {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [bytes, blocks] : free_)
        for (void* p : blocks) drop.emplace_back(p, bytes);
      free_.clear();
      cached_ = 0;
    }
    for (auto& [p, bytes] : drop) munmap(p, bytes);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

  const size_t cap = cap_from_env();

  static OutputPool& get() {
    // Never destroyed: tensors may be freed during interpreter shutdown.
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

 private:
  static void release(void* p) { get().give_back(p); }

  void give_back(void* p) {
    size_t bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      bytes = it->second;
      live_.erase(it);
      if (cached_ + bytes <= cap) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    munmap(p, bytes);
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // block size -> free blocks
  std::unordered_map<void*, size_t> live_;               // handed-out block -> size
  size_t cached_ = 0;
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  OutputPool& pool = OutputPool::get();
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (pool.cap == 0 || bytes < kMinPooledBytes)
    return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, &pool, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

}  // namespace minigpt::cpu

namespace {
void cpu_pool_empty_cache() { minigpt::cpu::OutputPool::get().empty_cache(); }
int64_t cpu_pool_cached_bytes() { return int64_t(minigpt::cpu::OutputPool::get().cached_bytes()); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def("cpu_pool_empty_cache() -> ()", &cpu_pool_empty_cache);
  m.def("cpu_pool_cached_bytes() -> int", &cpu_pool_cached_bytes);
}
