// csrc/cpu/output_pool.h -- reuse large output buffers instead of faulting in fresh pages.
//
// Why: an op that returns a new 64 MiB tensor gets it from malloc, which for
// blocks above ~32 MiB maps fresh pages from the kernel on every call; the
// first write to each 4 KiB page then takes a page fault and a zero-fill. On
// small VMs that costs more than the kernel itself (here ~1.8 GB/s to write
// fresh memory vs ~10 GB/s to reused memory), so memory-bound ops spend most of
// their time in the kernel's page-fault handler.
//
// pooled_empty() returns an uninitialized contiguous CPU tensor. Blocks of at
// least kMinPooledBytes come from a cache of blocks freed earlier (the tensor's
// deleter puts them back), so a training loop that produces the same shapes
// every step stops paying for fresh pages after the first step; new blocks are
// 2 MiB aligned and marked for transparent huge pages, so even a miss faults
// 512x less often. Smaller tensors go to the normal allocator (malloc's own
// free lists already serve them without faults).
//
// The cache holds at most MINIGPT_CPU_POOL_MB MiB of *free* blocks (default
// 1024; 0 turns pooling off); torch.ops.minigpt.cpu_pool_empty_cache() returns
// them all to the OS. Only ops whose kernels overwrite every output element may
// use it: memory is not zeroed.
#pragma once

#include <ATen/core/Tensor.h>

namespace minigpt::cpu {

constexpr size_t kMinPooledBytes = size_t{1} << 20;

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace minigpt::cpu
