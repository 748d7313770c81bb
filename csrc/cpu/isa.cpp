// csrc/cpu/isa.cpp -- run-time CPU feature detection for the SIMD dispatch in isa.h.
#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace minigpt::cpu {

namespace {
Isa detect() {
#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
  __builtin_cpu_init();
  // Our AVX-512 kernels use the F, BW (16-bit masked loads), VL and DQ subsets.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::AVX2;
#endif
  return Isa::Scalar;
}

Isa initial_active() {
  Isa best = detected_isa();
  if (const char* env = std::getenv("MINIGPT_CPU_ISA")) {
    if (*env) {
      Isa want = parse_isa(env);
      if (static_cast<int>(want) < static_cast<int>(best)) return want;
    }
  }
  return best;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_active())};
  return slot;
}
}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

void set_active_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(detected_isa()))
    throw std::invalid_argument(std::string("this CPU does not support ") + isa_name(isa) +
                                " (best available: " + isa_name(detected_isa()) + ")");
  active_slot().store(static_cast<int>(isa));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512:
      return "avx512";
    case Isa::AVX2:
      return "avx2";
    default:
      return "scalar";
  }
}

Isa parse_isa(const std::string& name) {
  if (name == "avx512") return Isa::AVX512;
  if (name == "avx2") return Isa::AVX2;
  if (name == "scalar") return Isa::Scalar;
  throw std::invalid_argument("unknown CPU instruction set '" + name +
                              "' (expected scalar, avx2 or avx512)");
}

#if !defined(MINIGPT_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
// __builtin_cpu_supports takes only a string literal, so one line per feature.
#define MG_CPU_SUPPORTS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature) != 0)
#else
#define MG_CPU_SUPPORTS(feature) false
#endif

bool cpu_has_avx512_bf16() {
  static const bool has = detected_isa() == Isa::AVX512 && MG_CPU_SUPPORTS("avx512bf16");
  return has;
}

bool cpu_has_avx512_vnni() {
  static const bool has = detected_isa() == Isa::AVX512 && MG_CPU_SUPPORTS("avx512vnni");
  return has;
}

}  // namespace minigpt::cpu
