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
  static void pin(vec& v) { asm("" : "+v"(v)); }  // see kernels_avx2.cpp
};

}  // namespace
}  // namespace modlora_cpu
