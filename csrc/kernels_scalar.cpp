// Portable fallback: the kernel body over the portable vector traits. Compiled without any target
// attribute.
#include "attention_body.h"
#include "scalar_traits.h"

namespace modlora_cpu {
void rows_scalar(const BankArgs& a, int64_t n0, int64_t n1) { rows_fma<Scalar>(a, n0, n1); }
void attention_scalar(const AttnArgs& a, int64_t task) { attention_any<4, 4>(a, task); }
}  // namespace modlora_cpu
