// bf16 <-> fp32 scalar conversions, bit for bit as torch does them. Internal linkage (anonymous
// namespace): the ISA files include this under their `#pragma GCC target`, so no copy compiled for
// one ISA may be merged by the linker into code that runs on a CPU without it.
#pragma once
#include <cstdint>

namespace modlora_cpu {
namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

}  // namespace
}  // namespace modlora_cpu
