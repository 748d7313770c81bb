// csrc/cpu/vec.h -- a tiny SIMD vocabulary, one implementation per instruction set.
//
// This file is NOT a normal header: isa_expand.h includes it once per instruction
// set, inside namespace minigpt::cpu::<isa> and inside a `#pragma GCC target`
// region, with exactly one of MG_ISA_AVX512 / MG_ISA_AVX2 / MG_ISA_SCALAR defined.
// Kernels are then written once against `Vec` (N float32 lanes):
//
//     Vec acc = Vec::zero();
//     for (i = 0; i + Vec::N <= n; i += Vec::N) acc = fmadd(Vec::load(x + i), Vec::load(x + i), acc);
//     float ss = acc.reduce_add();
//
// and compile to AVX-512, AVX2 or plain scalar code. Loads and stores take
// float, BF16 or F16 pointers and convert to/from float32 lanes, so a kernel
// is dtype-generic by being a template on the element type. `load_partial` and
// `store_partial` handle the tail of a row with masks (never touching memory
// past the end), so kernels need no scalar epilogue.

#if defined(MG_ISA_AVX512)

struct Vec {
  static constexpr int N = 16;
  __m512 r;
  Vec() = default;
  Vec(__m512 v) : r(v) {}
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float f) { return _mm512_set1_ps(f); }

  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const BF16* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static Vec load(const F16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __mmask16 mask(int n) { return __mmask16((n >= 16) ? 0xffffu : ((1u << n) - 1u)); }
  static Vec load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static Vec load_partial(const BF16* p, int n) {
    __m256i h = _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static Vec load_partial(const F16* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p));
  }

  void store(float* p) const { _mm512_storeu_ps(p, r); }
  void store(BF16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits()); }
  void store(F16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, mask(n), r); }
  void store_partial(BF16* p, int n) const { _mm256_mask_storeu_epi16(p, mask(n), to_bf16_bits()); }
  void store_partial(F16* p, int n) const {
    _mm256_mask_storeu_epi16(p, mask(n), _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  // float32 -> bfloat16 bits, round to nearest even, NaN kept quiet.
  __m256i to_bf16_bits() const {
    __m512i u = _mm512_castps_si512(r);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  }

  float reduce_add() const { return _mm512_reduce_add_ps(r); }
  float reduce_max() const { return _mm512_reduce_max_ps(r); }
};
inline Vec operator+(Vec a, Vec b) { return _mm512_add_ps(a.r, b.r); }
inline Vec operator-(Vec a, Vec b) { return _mm512_sub_ps(a.r, b.r); }
inline Vec operator*(Vec a, Vec b) { return _mm512_mul_ps(a.r, b.r); }
inline Vec operator/(Vec a, Vec b) { return _mm512_div_ps(a.r, b.r); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a.r, b.r, c.r); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a.r, b.r); }
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a.r, b.r); }
// 2^n for integer-valued float n in [-126, 127]: build the exponent bits directly.
inline Vec exp2_int(Vec n) {
  __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.r), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}
inline Vec vround(Vec a) { return _mm512_roundscale_ps(a.r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec select_lt(Vec a, Vec b, Vec if_true, Vec if_false) {  // a < b ? t : f
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.r, b.r, _CMP_LT_OQ), if_false.r, if_true.r);
}
// Non-temporal store of a full vector: writes the cache lines straight to memory
// without reading them first. p must be aligned to Vec::N * sizeof(T) bytes.
// Call stream_fence() after a run of them (before other threads read the data).
inline void stream_store(float* p, Vec v) { _mm512_stream_ps(p, v.r); }
inline void stream_store(BF16* p, Vec v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v.to_bf16_bits());
}
inline void stream_store(F16* p, Vec v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v.r, _MM_FROUND_TO_NEAREST_INT));
}
inline void stream_fence() { _mm_sfence(); }
// float32 -> bfloat16 stores with AVX512-BF16's vcvtneps2bf16: one instruction
// instead of the eight of to_bf16_bits (same round to nearest even; float32
// denormals, below 1e-38, flush to zero). Written as inline asm so that kernels
// compiled for plain AVX-512 can contain it: run such code only when the CPU has
// AVX512-BF16 (cpu_has_avx512_bf16() in isa.h), e.g. through a kernel template
// parameter chosen at run time. The AVX2 and scalar versions are plain stores.
inline __m256i to_bf16_bits_native(Vec v) {
  __m256i out;
  asm("vcvtneps2bf16 %1, %0" : "=v"(out) : "v"(v.r));
  return out;
}
inline void store_bf16_native(BF16* p, Vec v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits_native(v));
}
inline void store_partial_bf16_native(BF16* p, Vec v, int n) {
  _mm256_mask_storeu_epi16(p, Vec::mask(n), to_bf16_bits_native(v));
}

#elif defined(MG_ISA_AVX2)

struct Vec {
  static constexpr int N = 8;
  __m256 r;
  Vec() = default;
  Vec(__m256 v) : r(v) {}
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float f) { return _mm256_set1_ps(f); }

  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const BF16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static Vec load(const F16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // AVX2 has no 16-bit masked loads: copy the tail through a small buffer.
  template <typename T>
  static Vec load_partial(const T* p, int n) {
    if (n >= N) return load(p);
    alignas(32) T buf[N];
    std::memset(buf, 0, sizeof(buf));
    std::memcpy(buf, p, sizeof(T) * n);
    return load(buf);
  }

  void store(float* p) const { _mm256_storeu_ps(p, r); }
  void store(BF16* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_bits()); }
  void store(F16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  template <typename T>
  void store_partial(T* p, int n) const {
    if (n >= N) return store(p);
    alignas(32) T buf[N];
    store(buf);
    std::memcpy(p, buf, sizeof(T) * n);
  }
  __m128i to_bf16_bits() const {
    __m256i u = _mm256_castps_si256(r);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256 nan = _mm256_cmp_ps(r, r, _CMP_UNORD_Q);
    __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    rounded = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), nan));
    __m256i hi = _mm256_srli_epi32(rounded, 16);
    // pack 8 x u32 (each < 65536) into 8 x u16
    __m128i lo128 = _mm256_castsi256_si128(hi);
    __m128i hi128 = _mm256_extracti128_si256(hi, 1);
    return _mm_packus_epi32(lo128, hi128);
  }

  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
inline Vec operator+(Vec a, Vec b) { return _mm256_add_ps(a.r, b.r); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_ps(a.r, b.r); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_ps(a.r, b.r); }
inline Vec operator/(Vec a, Vec b) { return _mm256_div_ps(a.r, b.r); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a.r, b.r, c.r); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a.r, b.r); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a.r, b.r); }
inline Vec exp2_int(Vec n) {
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n.r), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline Vec vround(Vec a) { return _mm256_round_ps(a.r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec select_lt(Vec a, Vec b, Vec if_true, Vec if_false) {
  return _mm256_blendv_ps(if_false.r, if_true.r, _mm256_cmp_ps(a.r, b.r, _CMP_LT_OQ));
}
inline void stream_store(float* p, Vec v) { _mm256_stream_ps(p, v.r); }
inline void stream_store(BF16* p, Vec v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), v.to_bf16_bits());
}
inline void stream_store(F16* p, Vec v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v.r, _MM_FROUND_TO_NEAREST_INT));
}
inline void stream_fence() { _mm_sfence(); }
// (the AVX-512 branch has the native bfloat16 conversion; here: plain stores)
inline void store_bf16_native(BF16* p, Vec v) { v.store(p); }
inline void store_partial_bf16_native(BF16* p, Vec v, int n) { v.store_partial(p, n); }

#elif defined(MG_ISA_SCALAR)

struct Vec {
  static constexpr int N = 1;
  float r;
  Vec() = default;
  Vec(float v) : r(v) {}
  static Vec zero() { return 0.0f; }
  static Vec set1(float f) { return f; }
  template <typename T>
  static Vec load(const T* p) { return to_f32(*p); }
  template <typename T>
  static Vec load_partial(const T* p, int n) { return n > 0 ? to_f32(*p) : 0.0f; }
  template <typename T>
  void store(T* p) const { *p = from_f32<T>(r); }
  template <typename T>
  void store_partial(T* p, int n) const {
    if (n > 0) *p = from_f32<T>(r);
  }
  float reduce_add() const { return r; }
  float reduce_max() const { return r; }
};
inline Vec operator+(Vec a, Vec b) { return a.r + b.r; }
inline Vec operator-(Vec a, Vec b) { return a.r - b.r; }
inline Vec operator*(Vec a, Vec b) { return a.r * b.r; }
inline Vec operator/(Vec a, Vec b) { return a.r / b.r; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return std::fma(a.r, b.r, c.r); }
inline Vec vmax(Vec a, Vec b) { return a.r > b.r ? a.r : b.r; }
inline Vec vmin(Vec a, Vec b) { return a.r < b.r ? a.r : b.r; }
inline Vec exp2_int(Vec n) { return bits_to_f32(uint32_t(int32_t(n.r) + 127) << 23); }
inline Vec vround(Vec a) { return std::nearbyint(a.r); }
inline Vec select_lt(Vec a, Vec b, Vec if_true, Vec if_false) { return a.r < b.r ? if_true : if_false; }
template <typename T>
inline void stream_store(T* p, Vec v) { v.store(p); }
inline void stream_fence() {}
// (the AVX-512 branch has the native bfloat16 conversion; here: plain stores)
inline void store_bf16_native(BF16* p, Vec v) { v.store(p); }
inline void store_partial_bf16_native(BF16* p, Vec v, int n) { v.store_partial(p, n); }

#else
#error "vec.h: define one of MG_ISA_AVX512, MG_ISA_AVX2, MG_ISA_SCALAR"
#endif

// ---- ISA-independent math on Vec ----------------------------------------------

inline Vec operator-(Vec a) { return Vec::zero() - a; }

// exp(x) for float32 lanes, max error ~2 ulp; exp(-inf) = 0, large x saturates to
// exp(88.7) instead of producing inf (callers subtract the row max first).
// Method (Cephes): x = n*ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
// polynomial, then scale by 2^n through the exponent bits.
inline Vec vexp(Vec x) {
  x = vmin(vmax(x, Vec::set1(-87.33654f)), Vec::set1(88.3762626647949f));
  Vec n = vround(x * Vec::set1(1.44269504088896341f));
  Vec r = fmadd(n, Vec::set1(-0.693359375f), x);  // ln2 split in a high part ...
  r = fmadd(n, Vec::set1(2.12194440e-4f), r);     // ... and a low part, for accuracy
  Vec p = Vec::set1(1.9875691500e-4f);
  p = fmadd(p, r, Vec::set1(1.3981999507e-3f));
  p = fmadd(p, r, Vec::set1(8.3334519073e-3f));
  p = fmadd(p, r, Vec::set1(4.1665795894e-2f));
  p = fmadd(p, r, Vec::set1(1.6666665459e-1f));
  p = fmadd(p, r, Vec::set1(5.0000001201e-1f));
  p = fmadd(p * r, r, r + Vec::set1(1.0f));
  // lanes clamped at the bottom become exactly 0 (so exp(-inf) == 0)
  return select_lt(x, Vec::set1(-87.3365f), Vec::zero(), p * exp2_int(n));
}

// 1 / (1 + exp(-x)), the logistic sigmoid.
inline Vec vsigmoid(Vec x) { return Vec::set1(1.0f) / (Vec::set1(1.0f) + vexp(-x)); }
