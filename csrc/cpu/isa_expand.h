// csrc/cpu/isa_expand.h -- compile one kernel file once per instruction set.
//
// Usage, in an op's .cpp after all other #includes:
//
//     #define MG_KERNEL_FILE "cpu/rms_norm_kernel.h"
//     #include "cpu/isa_expand.h"
//
// This yields namespaces minigpt::cpu::avx512, ::avx2 and ::scalar, each holding
// the kernel compiled for that instruction set (via `#pragma GCC target`, so the
// build needs no -mavx512f and the library still loads on any x86-64 CPU). The
// op then calls MG_ISA_CALL(fn)(args...), which picks the variant for the CPU it
// is running on (isa.h). Standard and ATen headers must be included *before*
// this file: anything compiled inside a target region may use those
// instructions, and a shared inline function compiled that way could be picked
// by the linker for code that runs on a CPU without them.

#ifndef MG_KERNEL_FILE
#error "define MG_KERNEL_FILE before including isa_expand.h"
#endif

#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,bmi2")
namespace minigpt::cpu::avx512 {
#define MG_ISA_AVX512 1
#include "cpu/vec.h"
#include MG_KERNEL_FILE
#undef MG_ISA_AVX512
}  // namespace minigpt::cpu::avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
namespace minigpt::cpu::avx2 {
#define MG_ISA_AVX2 1
#include "cpu/vec.h"
#include MG_KERNEL_FILE
#undef MG_ISA_AVX2
}  // namespace minigpt::cpu::avx2
#pragma GCC pop_options

#endif

namespace minigpt::cpu::scalar {
#define MG_ISA_SCALAR 1
#include "cpu/vec.h"
#include MG_KERNEL_FILE
#undef MG_ISA_SCALAR
}  // namespace minigpt::cpu::scalar

#undef MG_KERNEL_FILE
