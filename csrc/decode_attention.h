// modlora._C CPU decode attention: shared declarations (plain C++, no torch headers; see lora_bank.h).
//
// One decode step of one layer's attention, for rows = B sentences x `beams` beams, one new token
// each: rotate q and k (RoPE, rotate-half), write k and v into the generated segment of the cache at
// position `step`, and attend each query head to its sentence's prompt keys (shared by its beams,
// left padding masked) and to its own beam's generated keys 0..step. GQA: query head i reads kv head
// i / (H / Hkv). fp32 math throughout; the cache and the output hold the tensors' dtype.
#pragma once
#include <cstdint>

namespace modlora_cpu {

struct AttnArgs {
  int64_t beams = 1, H = 0, Hkv = 0, D = 0, P = 0, T = 0, step = 0;
  bool bf16 = false;                      // every tensor below is bf16 (raw uint16), else fp32
  const void *q = nullptr, *k = nullptr, *v = nullptr;  // [rows, H*D], [rows, Hkv*D] x2; row strides:
  int64_t ldq = 0, ldk = 0, ldv = 0;
  const void *cos = nullptr, *sin = nullptr;  // [rows, D], row stride ldr
  int64_t ldr = 0;
  const void *prompt_k = nullptr, *prompt_v = nullptr;  // [B, Hkv, P, D] contiguous
  const bool* prompt_mask = nullptr;                     // [B, P], false on padding
  void *gen_k = nullptr, *gen_v = nullptr;               // [rows, Hkv, T, D] contiguous
  void* out = nullptr;                                   // [rows, H*D] contiguous
  float* scratch = nullptr;                              // task t's at scratch + t * scratch_per_task
  int64_t scratch_per_task = 0;                          // scratch_shape(*this, kMaxLanes).floats()
};

// Internal linkage (each file its own copy): inline code shared with the ISA files must not be
// merged by the linker across target regions (see lora_bank.h).
namespace {

// The fp32 scratch of one task (one sentence, one kv head), for vectors of `lanes` floats: its queries
// transposed in groups of `lanes` (qt [nqv, Dp, lanes]: dimension d of the group's queries), their
// scores transposed (st [L, lds]: the prompt's P keys, then the step + 1 generated ones; lds = nqv *
// lanes), their outputs (o [lds, Dp]), and the keys or values being read, widened to fp32
// (kv [max(P, step + 1), Dp]). Dp: D padded to whole vectors. Grows with `lanes`.
struct ScratchShape {
  int64_t Dp, nqv, lds, L, rows;  // padded head dim, query groups, score row stride, score rows, rows of kv
  int64_t floats() const { return lds * (2 * Dp + L) + rows * Dp; }
};

inline ScratchShape scratch_shape(const AttnArgs& a, int64_t lanes) {
  const int64_t queries = a.beams * (a.H / a.Hkv), nqv = (queries + lanes - 1) / lanes;
  return {(a.D + lanes - 1) / lanes * lanes, nqv, nqv * lanes, a.P + a.step + 1, a.P > a.step + 1 ? a.P : a.step + 1};
}

constexpr int64_t kMaxLanes = 16;  // the widest vectors (AVX-512): the binding sizes scratch for them

}  // namespace

// Task t = (sentence t / Hkv, kv head t % Hkv); tasks write disjoint cache rows and outputs.
using AttnFn = void (*)(const AttnArgs&, int64_t task);

void attention_scalar(const AttnArgs& a, int64_t task);
void attention_avx2(const AttnArgs& a, int64_t task);
void attention_avx512(const AttnArgs& a, int64_t task);

// The task function for the ISA set by set_isa / MODLORA_CPU_ISA (lora_bank_cpu.cpp).
AttnFn attention_kernel();

}  // namespace modlora_cpu
