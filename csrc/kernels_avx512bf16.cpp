// AVX-512 BF16: when x and W are both bf16, the main product uses vdpbf16ps (32 bf16 products per
// instruction, exact products, fp32 accumulation), so W is never converted. The driver calls this
// only for bf16 x and bf16 W on CPUs with avx512_bf16 (kernel_for in lora_bank_cpu.cpp); every other
// case runs rows_avx512.
// x86 only: on other CPUs this file compiles to nothing and the scalar kernel serves (kernel_for).
#if defined(__x86_64__) || defined(__i386__)
// GCC 12 warns about deliberately undefined lanes inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

#include "avx512_traits.h"
#include "kernel_body.h"

namespace modlora_cpu {
namespace {

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// Dot-product policy for kernel_body.h: x and W bf16, 32 elements per step, masked K tail.
struct Bf16Dot : DotTypes<Avx512, uint16_t, uint16_t> {

  // pf: the next block of W rows, prefetched as in FmaDot::block (kernel_body.h).
  template <int MB, int NB>
  static void block(const uint16_t* const* w, const uint16_t* pf, const uint16_t* x, int64_t ldx, int64_t K,
                    float (*out)[4]) {
    __m512 acc[MB][NB];
    clear<Avx512>(acc);
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t left = K - k;
      const __mmask32 mask = left >= 32 ? ~__mmask32(0) : ((__mmask32(1) << left) - 1);
#pragma GCC unroll 4
      for (int b = 0; b < NB * 64; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(pf + NB * k) + b);
      __m512i wv[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, w[j] + k);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], as_bh(xv), as_bh(wv[j]));
      }
    }
    reduce<Avx512>(acc, out);
  }
};

}  // namespace

void rows_avx512bf16(const BankArgs& a, int64_t n0, int64_t n1) { rows_impl<Bf16Dot>(a, n0, n1); }

}  // namespace modlora_cpu

#pragma GCC pop_options

#endif  // x86
