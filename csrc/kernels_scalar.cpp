// Portable fallback: the kernel body over 8-float structs (the compiler vectorises what the
// baseline ISA allows). Compiled without any target attribute.
#include <cstdint>

#include "lora_bank.h"

namespace modlora_cpu {
namespace {

struct V {
  struct vec {
    float v[8];
  };
  static constexpr int kLanes = 8, kMaxMB = 4, kSmallM = 2;
  static inline vec zero() { return vec{}; }
  static inline vec load(const float* p) {
    vec r;
    for (int l = 0; l < 8; ++l) r.v[l] = p[l];
    return r;
  }
  static inline vec load(const uint16_t* p) {
    vec r;
    for (int l = 0; l < 8; ++l) {
      uint32_t bits = static_cast<uint32_t>(p[l]) << 16;
      __builtin_memcpy(&r.v[l], &bits, 4);
    }
    return r;
  }
  static inline vec fma(const vec& a, const vec& b, vec c) {
    for (int l = 0; l < 8; ++l) c.v[l] += a.v[l] * b.v[l];
    return c;
  }
  static inline void pin(vec&) {}
  static inline float hsum(const vec& a) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += a.v[l];
    return s;
  }
};

#include "kernel_body.h"

}  // namespace

void rows_scalar(const BankArgs& a, int64_t n0, int64_t n1) { rows_entry(a, n0, n1); }

}  // namespace modlora_cpu
