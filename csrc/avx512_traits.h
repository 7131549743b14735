// AVX-512 vector traits for kernel_body.h (include inside a target region that enables avx512f).
struct V {
  using vec = __m512;
  // 32 zmm registers: up to 12x2 or 4x4 accumulators plus W and x vectors.
  static constexpr int kLanes = 16, kMaxMB = 12, kSmallM = 4;
  static inline vec zero() { return _mm512_setzero_ps(); }
  static inline vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline vec load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void pin(vec& v) { asm("" : "+v"(v)); }  // see kernels_avx2.cpp
  static inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
};
