// AVX-512F: 16 fp32 lanes, bf16 -> fp32 by zero extension and a shift.
// Only called when __builtin_cpu_supports("avx512f") && ("avx512bw") (see lora_bank_cpu.cpp).
// x86 only: on other CPUs this file compiles to nothing and the scalar kernel serves (kernel_for).
#if defined(__x86_64__) || defined(__i386__)
// GCC 12 warns about deliberately undefined lanes inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")

#include "attention_body.h"
#include "avx512_traits.h"
#include "kernel_body.h"

namespace modlora_cpu {
void rows_avx512(const BankArgs& a, int64_t n0, int64_t n1) { rows_fma<Avx512>(a, n0, n1); }
void attention_avx512(const AttnArgs& a, int64_t task) { attention_any<16, 8>(a, task); }
}  // namespace modlora_cpu

#pragma GCC pop_options

#endif  // x86
