// csrc/cpu/isa.h -- which SIMD instruction set the CPU kernels use, chosen at run time.
//
// The library is built without -march flags; every SIMD kernel exists in three
// variants (isa_expand.h) and MG_ISA_CALL picks one per call from the CPU we are
// actually running on. Tests force each variant in turn (set_active_isa) so the
// AVX2 and scalar paths are checked on an AVX-512 machine too.
#pragma once

#include <string>

namespace minigpt::cpu {

enum class Isa : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

// Best instruction set this CPU supports (cached).
Isa detected_isa();
// The one kernels use now: detected_isa(), or a lower one forced by
// set_active_isa() or the MINIGPT_CPU_ISA=scalar|avx2|avx512 environment variable.
Isa active_isa();
// Force an instruction set; throws if the CPU does not support it.
void set_active_isa(Isa isa);
const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);

// Extensions beyond the AVX-512 base that some kernels use when present (cached;
// false off x86). Kernels check them together with active_isa() == Isa::AVX512,
// so forcing a lower ISA also turns these paths off.
bool cpu_has_avx512_bf16();  // vdpbf16ps, vcvtneps2bf16
bool cpu_has_avx512_vnni();  // vpdpbusd

}  // namespace minigpt::cpu

#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
// Variadic so that template arguments with commas pass through: MG_ISA_CALL(f<T, W>).
#define MG_ISA_CALL(...)                                                          \
  (::minigpt::cpu::active_isa() == ::minigpt::cpu::Isa::AVX512                    \
       ? ::minigpt::cpu::avx512::__VA_ARGS__                                      \
       : ::minigpt::cpu::active_isa() == ::minigpt::cpu::Isa::AVX2                \
             ? ::minigpt::cpu::avx2::__VA_ARGS__                                  \
             : ::minigpt::cpu::scalar::__VA_ARGS__)
#else
#define MG_ISA_CALL(...) (::minigpt::cpu::scalar::__VA_ARGS__)
#endif
