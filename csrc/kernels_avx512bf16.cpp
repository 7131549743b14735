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
  // Up to 5 rows (beam 5) take 4 W rows per block (20 accumulators), more rows 2 W rows and at most 8
  // rows per block (16 accumulators). At 11-12 rows (22-24 accumulators, the FMA policy's 12)
  // GCC 12 spills accumulators inside the K loop here (objdump of block<12, 2>).
  static constexpr int kMaxMB = 8, kSmallM = 5;

  // One K step at k: acc[i][j] += x[i, k:k+32] . w[j][k:k+32], by masked loads (kMasked) or whole
  // vectors. A masked load in the loop stops GCC 12 from keeping acc in registers (it stores every
  // accumulator to the stack at every step, 2-3x slower where compute bounds the block), so from 3
  // rows of x on only the last step masks. At 1-2 rows W's stream bounds the block, and there
  // masked loads (mask all ones in the loop) read W faster on Zen 5 than whole-vector loads: q/o at
  // M = 1 50-59 vs 67-98 us, gate/up 201-294 vs 278-427 us (cold W, A/B in alternating processes;
  // the cause is not known).
  template <int MB, int NB, bool kMasked>
  static void step(__m512 (&acc)[MB][NB], const uint16_t* const* w, const uint16_t* x, int64_t ldx, int64_t k,
                   __mmask32 mask) {
    const auto load = [mask](const uint16_t* p) {
      if constexpr (kMasked)
        return _mm512_maskz_loadu_epi16(mask, p);
      else
        return _mm512_loadu_si512(p);
    };
    __m512i wv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) wv[j] = load(w[j] + k);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = load(x + i * ldx + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], as_bh(xv), as_bh(wv[j]));
    }
  }

  // pf, pf_ld: a block of W rows ahead, prefetched as in FmaDot::block (kernel_body.h).
  template <int MB, int NB, bool kL2>
  static void block(const uint16_t* const* w, const uint16_t* pf, int64_t pf_ld, const uint16_t* x, int64_t ldx,
                    int64_t K, const Expand& e, float (*out)[4]) {
    __m512 acc[MB][NB];
    clear<Avx512>(acc);
    __mmask32 all = ~__mmask32(0);
    asm("" : "+r"(all));  // opaque: GCC turns a load under a known all-ones mask into a plain one
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      prefetch_step<kL2, NB, 64>(pf, pf_ld, k);
      step<MB, NB, (MB <= 2)>(acc, w, x, ldx, k, all);
    }
    if (k < K) step<MB, NB, true>(acc, w, x, ldx, k, (__mmask32(1) << (K - k)) - 1);
    fold<Avx512>(acc, e);
    reduce<Avx512>(acc, out);
  }
};

}  // namespace

void rows_avx512bf16(const BankArgs& a, int64_t n0, int64_t n1) { rows_impl<Bf16Dot>(a, n0, n1); }

}  // namespace modlora_cpu

#pragma GCC pop_options

#endif  // x86
