// Portable vector traits for kernel_body.h (8-float structs; the compiler vectorises what the
// baseline ISA allows), shared by kernels_scalar.cpp and kernels_amx_emulated.cpp. No intrinsics.
#pragma once
#include "kernel_body.h"

namespace modlora_cpu {
namespace {

struct Scalar {
  struct vec {
    float v[8];
  };
  static constexpr int kLanes = 8, kMaxMB = 4, kSmallM = 2;
  static constexpr bool kHsum4 = false;
  static vec zero() { return vec{}; }
  static vec load(const float* p) {
    vec r;
    for (int l = 0; l < 8; ++l) r.v[l] = p[l];
    return r;
  }
  static vec load(const uint16_t* p) {
    vec r;
    for (int l = 0; l < 8; ++l) r.v[l] = bf16_to_f32(p[l]);
    return r;
  }
  static vec fma(const vec& a, const vec& b, vec c) {
    for (int l = 0; l < 8; ++l) c.v[l] += a.v[l] * b.v[l];
    return c;
  }
  static void pin(vec&) {}
  static float hsum(const vec& a) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += a.v[l];
    return s;
  }
};

}  // namespace
}  // namespace modlora_cpu
