// AVX2 + FMA: 8 fp32 lanes, bf16 -> fp32 by zero extension and a 16-bit shift.
// Only called when __builtin_cpu_supports("avx2") && ("fma") (see lora_bank_cpu.cpp).
// x86 only: on other CPUs this file compiles to nothing and the scalar kernel serves (kernel_for).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include <immintrin.h>

#include "attention_body.h"
#include "kernel_body.h"

namespace modlora_cpu {
namespace {

// 16 ymm registers: MB*NB accumulators + NB W vectors + 1 x vector must fit.
struct Avx2 : VecBase<f32x8> {
  static constexpr int kMaxMB = 6, kSmallM = 2;
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Without this GCC folds the x load into each of the NB FMAs that use it (NB times the loads;
  // the load ports, not the FMA pipes, then set the pace).
  static void pin(vec& v) { asm("" : "+x"(v)); }
  using VecBase::load;
  static vec load(const uint16_t* p) {  // bf16 -> fp32: zero extension and a 16-bit shift
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
};

}  // namespace

void rows_avx2(const BankArgs& a, int64_t n0, int64_t n1) { rows_fma<Avx2>(a, n0, n1); }
void attention_avx2(const AttnArgs& a, int64_t task) { attention_any<8, 8>(a, task); }

}  // namespace modlora_cpu

#pragma GCC pop_options

#endif  // x86
