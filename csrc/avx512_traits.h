// AVX-512 vector traits for kernel_body.h, shared by kernels_avx512.cpp and kernels_avx512bf16.cpp
// (include inside a target region that enables avx512f and avx512bw).
#pragma once
#include <immintrin.h>

#include "kernel_body.h"

namespace modlora_cpu {
namespace {

// 32 zmm registers: up to 12x2 or 4x4 accumulators plus W and x vectors.
struct Avx512 : VecBase<f32x16> {
  static constexpr int kMaxMB = 12, kSmallM = 4;
  using VecBase::load;
  static vec load(const uint16_t* p) {  // bf16 -> fp32: zero extension and a 16-bit shift
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(vec v) { return _mm512_reduce_add_ps(v); }
  // out[j] = hsum(a[j]), j < 4, as one transposing reduction: 13 instructions instead of 4 x 8.
  static constexpr bool kHsum4 = true;
  static void hsum4(const vec (&a)[4], float* out) {
    // In each 128-bit lane: unpack + add leaves [x0+x2 of a0, of a1, x1+x3 of a0, of a1] (and of
    // a2/a3), the 64-bit unpack + add the lane's partial sums [s0 s1 s2 s3]; then the 4 lanes add up.
    const __m512 p01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 p23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    const __m512d d01 = _mm512_castps_pd(p01), d23 = _mm512_castps_pd(p23);
    const __m512 q = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));  // [s0 s1 s2 s3] per lane
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(q), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(q), 1)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  static void pin(vec& v) { asm("" : "+v"(v)); }  // see kernels_avx2.cpp
};

}  // namespace
}  // namespace modlora_cpu
