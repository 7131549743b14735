// AVX-512 BF16: when x and W are both bf16, the main product uses vdpbf16ps (32 bf16 products per
// instruction, exact products, fp32 accumulation), so W is never converted. The driver calls this
// only for bf16 x and bf16 W on CPUs with avx512_bf16; everything else goes to rows_avx512.
// x86 only: on other CPUs this file compiles to nothing and the scalar kernel serves (rows_for).
#if defined(__x86_64__) || defined(__i386__)
// GCC 12 warns about deliberately undefined lanes inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "lora_bank.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

namespace modlora_cpu {
namespace {

#include "avx512_traits.h"
#include "kernel_body.h"

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// out[i][j] = sum_k x[i, k] * w[j][k]; x and w bf16, 32 elements per step, masked tail.
// pf: the next block of W rows, prefetched as in dot_block (kernel_body.h).
template <int MB, int NB>
static inline void dot_block_dp(const uint16_t* const* w, const uint16_t* pf, const uint16_t* x, int64_t ldx,
                                int64_t K, float (*out)[4]) {
  __m512 acc[MB][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k < K; k += 32) {
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
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

using DpFn = void (*)(const uint16_t* const*, const uint16_t*, const uint16_t*, int64_t, int64_t, float (*)[4]);

template <int NB>
static DpFn pick_dp(int mb) {
  constexpr int kMax = NB == 4 ? V::kSmallM : V::kMaxMB;
  switch (mb) {
#define MODLORA_CASE(n)                                \
  case n:                                              \
    if constexpr (n <= kMax) return &dot_block_dp<n, NB>; \
    break;
    MODLORA_CASE(1) MODLORA_CASE(2) MODLORA_CASE(3) MODLORA_CASE(4) MODLORA_CASE(5) MODLORA_CASE(6)
    MODLORA_CASE(7) MODLORA_CASE(8) MODLORA_CASE(9) MODLORA_CASE(10) MODLORA_CASE(11) MODLORA_CASE(12)
#undef MODLORA_CASE
  }
  return nullptr;
}

}  // namespace

void rows_avx512bf16(const BankArgs& a, int64_t n0, int64_t n1) {
  if (!(a.xb && a.w_bf16)) {
    rows_entry(a, n0, n1);
    return;
  }
  const uint16_t* W = static_cast<const uint16_t*>(a.w);
  const int64_t chunks = (a.M + V::kMaxMB - 1) / V::kMaxMB;
  const int mb_full = static_cast<int>((a.M + chunks - 1) / chunks);
  const int NB = a.M <= V::kSmallM ? 4 : 2;
  float acc[16][4];
  for (int64_t n = n0; n < n1; n += NB) {
    const int nb = static_cast<int>(n1 - n < NB ? n1 - n : NB);
    const uint16_t* wrows[4];
    for (int j = 0; j < nb; ++j) wrows[j] = W + (n + j) * a.ldw;
    const uint16_t* pf = W + (n + 2 * NB <= n1 ? n + NB : n) * a.ldw;
    for (int64_t m0 = 0; m0 < a.M; m0 += mb_full) {
      const int mb = static_cast<int>(a.M - m0 < mb_full ? a.M - m0 : mb_full);
      const uint16_t* x = a.xb + m0 * a.K;
      if (nb == NB) {
        (NB == 4 ? pick_dp<4>(mb) : pick_dp<2>(mb))(wrows, pf, x, a.K, a.K, acc);
      } else {
        DpFn one_row = pick_dp<1>(mb);
        for (int j = 0; j < nb; ++j) {
          float one[16][4];
          one_row(wrows + j, wrows[j], x, a.K, a.K, one);
          for (int i = 0; i < mb; ++i) acc[i][j] = one[i][0];
        }
      }
      if (a.b_bf16)
        epilogue<uint16_t>(a, m0, mb, n, nb, acc);
      else
        epilogue<float>(a, m0, mb, n, nb, acc);
    }
  }
}

}  // namespace modlora_cpu

#pragma GCC pop_options

#endif  // x86
