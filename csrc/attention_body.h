// The decode attention task (decode_attention.h), included by each ISA file inside its
// `#pragma GCC target` region, on GCC vectors as wide as that ISA's registers (Lanes<16> for
// AVX-512, <8> for AVX2, <4> for the baseline: GCC spills wider ones to the stack). No std::
// templates or torch headers here (see lora_bank.h): scratch comes from the caller.
//
// Scores and outputs are small GEMMs on fp32 copies of the keys and values: scores with queries in
// vector lanes (kLanes queries x kBlock keys per block; the softmax then runs down columns, lanes still
// queries), outputs with head dimensions in lanes (kBlock queries x kLanes dimensions per block).
#pragma once
// Vectors passed by value between these internal functions only: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#include <cstdint>

#include "decode_attention.h"
#include "bf16.h"

namespace modlora_cpu {
namespace {

inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = f32_to_bf16(v); }

// N fp32 lanes: the vector type, its int32 twin, unaligned load and store, and e^x.
template <int N>
struct Lanes {
  typedef float vec __attribute__((vector_size(4 * N)));
  typedef int32_t ivec __attribute__((vector_size(4 * N)));
  static constexpr int64_t kLanes = N;

  static vec load(const float* p) {
    vec v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, vec v) { __builtin_memcpy(p, &v, sizeof v); }

  // e^x for x <= 0 (scores less their maximum; -inf gives 0): 2^n 2^f with n = round(x log2 e),
  // |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (truncation error 1.2e-7 relative), 2^n by the
  // exponent bits; e^x < 2^-126 -> 0. Rounding by adding 1.5 * 2^23 (whose float then holds n in its
  // low mantissa bits): plain vector arithmetic, which GCC vectorises in a template.
  static vec exp(vec x) {
    constexpr float kShift = 12582912.f;  // 1.5 * 2^23, bits 0x4B400000
    const vec t = x * 1.44269504f;
    const vec tc = t < -126.f ? vec{} - 126.f : t;
    const vec shifted = tc + kShift;
    const vec y = (tc - (shifted - kShift)) * 0.693147181f;
    vec p = 1.f + y * (1.f + y * (0.5f + y * (1.f / 6 + y * (1.f / 24 + y * (1.f / 120 + y * (1.f / 720))))));
    ivec bits;
    __builtin_memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23;
    vec scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    p *= scale;
    return t < -126.f ? vec{} : p;
  }
};

// Rotate-half RoPE of one head, times `scale`: out = (x cos + (-x[D/2:], x[:D/2]) sin) scale.
template <typename T>
void rope(const T* x, const T* cs, const T* sn, int64_t D, float scale, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float lo = to_f32(x[d]), hi = to_f32(x[d + half]);
    out[d] = (lo * to_f32(cs[d]) - hi * to_f32(sn[d])) * scale;
    out[d + half] = (hi * to_f32(cs[d + half]) + lo * to_f32(sn[d + half])) * scale;
  }
}

// One task's scratch (decode_attention.h's ScratchShape for kLanes) as pointers.
struct Scratch : ScratchShape {
  float *qt, *st, *o, *kv;
};

inline Scratch scratch_of(const AttnArgs& a, int64_t task, int64_t lanes) {
  Scratch w;
  static_cast<ScratchShape&>(w) = scratch_shape(a, lanes);
  w.qt = a.scratch + task * a.scratch_per_task;
  w.st = w.qt + w.lds * w.Dp;
  w.o = w.st + w.L * w.lds;
  w.kv = w.o + w.lds * w.Dp;
  return w;
}

// n rows of D elements into w.kv as fp32 (row stride Dp, zeros past D: whole vectors read them).
template <typename T>
void widen(const Scratch& w, const T* src, int64_t n, int64_t D) {
  for (int64_t r = 0; r < n; ++r) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) w.kv[r * w.Dp + d] = to_f32(src[r * D + d]);
    for (int64_t d = D; d < w.Dp; ++d) w.kv[r * w.Dp + d] = 0.f;
  }
}

// Score columns [c0, c0 + n) = keys w.kv[0, n) against queries [i0, i1), in the lanes of their
// groups; with `own`, the group's other lanes keep their value (a beam's keys score its queries only).
template <typename V, int kBlock>
void scores(const Scratch& w, int64_t D, int64_t n, int64_t i0, int64_t i1, int64_t c0, bool own) {
  for (int64_t v = i0 / V::kLanes; v * V::kLanes < i1; ++v) {
    const float* qt = w.qt + v * w.Dp * V::kLanes;
    typename V::ivec mine;
    for (int64_t l = 0; l < V::kLanes; ++l) mine[l] = v * V::kLanes + l >= i0 && v * V::kLanes + l < i1 ? -1 : 0;
    for (int64_t p0 = 0; p0 < n; p0 += kBlock) {
      const int64_t nk = n - p0 < kBlock ? n - p0 : kBlock;
      const float* key[kBlock];
      for (int64_t k = 0; k < kBlock; ++k) key[k] = w.kv + (p0 + (k < nk ? k : 0)) * w.Dp;
      typename V::vec acc[kBlock] = {};
      for (int64_t d = 0; d < D; ++d) {
        const typename V::vec q = V::load(qt + d * V::kLanes);
        for (int64_t k = 0; k < kBlock; ++k) acc[k] += q * key[k][d];
      }
      for (int64_t k = 0; k < nk; ++k) {
        float* out = w.st + (c0 + p0 + k) * w.lds + v * V::kLanes;
        V::store(out, own ? (mine ? acc[k] : V::load(out)) : acc[k]);
      }
    }
  }
}

// Softmax down each column of st, per lane (query); -inf columns get 0.
template <typename V>
void softmax(const Scratch& w) {
  for (int64_t v = 0; v < w.nqv; ++v) {
    float* col = w.st + v * V::kLanes;
    typename V::vec mx = V::load(col + (w.L - 1) * w.lds);  // every query's own new key: finite
    for (int64_t c = 0; c < w.L; ++c) {
      const typename V::vec s = V::load(col + c * w.lds);
      mx = s > mx ? s : mx;
    }
    typename V::vec sum = {};
    for (int64_t c = 0; c < w.L; ++c) {
      const typename V::vec e = V::exp(V::load(col + c * w.lds) - mx);
      V::store(col + c * w.lds, e);
      sum += e;
    }
    const typename V::vec inv = 1.f / sum;
    for (int64_t c = 0; c < w.L; ++c) V::store(col + c * w.lds, V::load(col + c * w.lds) * inv);
  }
}

// Outputs o_i += sum_c st[c0 + c, i] w.kv[c] over n values, queries [i0, i1).
template <typename V, int kBlock>
void weighted_sum(const Scratch& w, int64_t n, int64_t i0, int64_t i1, int64_t c0) {
  for (int64_t i = i0; i < i1; i += kBlock) {
    const int64_t nj = i1 - i < kBlock ? i1 - i : kBlock;
    for (int64_t d0 = 0; d0 < w.Dp; d0 += V::kLanes) {
      typename V::vec acc[kBlock] = {};
      for (int64_t c = 0; c < n; ++c) {
        const typename V::vec val = V::load(w.kv + c * w.Dp + d0);
        const float* prob = w.st + (c0 + c) * w.lds + i;  // lanes past i1 are in bounds: st rows are whole groups
        for (int64_t j = 0; j < kBlock; ++j) acc[j] += prob[j < nj ? j : 0] * val;
      }
      for (int64_t j = 0; j < nj; ++j) V::store(w.o + (i + j) * w.Dp + d0, V::load(w.o + (i + j) * w.Dp + d0) + acc[j]);
    }
  }
}

template <typename T, typename V, int kBlock>
void attention_task(const AttnArgs& a, int64_t task) {
  const int64_t D = a.D, G = a.H / a.Hkv, nq = a.beams * G, n_gen = a.step + 1;
  const int64_t b = task / a.Hkv, h = task % a.Hkv;
  const Scratch w = scratch_of(a, task, V::kLanes);
  const auto cache_row = [&](void* base, int64_t r, int64_t t) {
    return static_cast<T*>(base) + ((r * a.Hkv + h) * a.T + t) * D;
  };
  const float scale = 1.f / __builtin_sqrtf(static_cast<float>(D));
  for (int64_t i = 0; i < w.lds * w.Dp; ++i) w.qt[i] = 0.f;
  for (int64_t i = 0; i < w.lds * w.Dp; ++i) w.o[i] = 0.f;
  for (int64_t i = 0; i < w.L * w.lds; ++i) w.st[i] = 0.f;  // lanes past the queries stay finite

  for (int64_t j = 0; j < a.beams; ++j) {  // this step's k (rotated) and v into the cache; q rotated, scaled
    const int64_t r = b * a.beams + j;
    const T* cs = static_cast<const T*>(a.cos) + r * a.ldr;
    const T* sn = static_cast<const T*>(a.sin) + r * a.ldr;
    rope(static_cast<const T*>(a.k) + r * a.ldk + h * D, cs, sn, D, 1.f, w.kv);
    T* k_out = cache_row(a.gen_k, r, a.step);
    T* v_out = cache_row(a.gen_v, r, a.step);
    const T* v_in = static_cast<const T*>(a.v) + r * a.ldv + h * D;
    for (int64_t d = 0; d < D; ++d) {
      store(k_out + d, w.kv[d]);
      v_out[d] = v_in[d];
    }
    for (int64_t g = 0; g < G; ++g) {  // query i = j G + g (beam j, head h G + g): lane i % kLanes of group i / kLanes
      const int64_t i = j * G + g;
      rope(static_cast<const T*>(a.q) + r * a.ldq + (h * G + g) * D, cs, sn, D, scale, w.kv);
      for (int64_t d = 0; d < D; ++d) w.qt[((i / V::kLanes) * w.Dp + d) * V::kLanes + i % V::kLanes] = w.kv[d];
    }
  }

  const T* prompt_k = static_cast<const T*>(a.prompt_k) + (b * a.Hkv + h) * a.P * D;
  const T* prompt_v = static_cast<const T*>(a.prompt_v) + (b * a.Hkv + h) * a.P * D;
  widen(w, prompt_k, a.P, D);
  scores<V, kBlock>(w, D, a.P, 0, w.lds, 0, false);
  const bool* valid = a.prompt_mask + b * a.P;
  for (int64_t p = 0; p < a.P; ++p)
    if (!valid[p])
      for (int64_t l = 0; l < w.lds; ++l) w.st[p * w.lds + l] = -__builtin_inff();
  for (int64_t j = 0; j < a.beams; ++j) {  // a beam's own keys, for its G queries
    widen(w, cache_row(a.gen_k, b * a.beams + j, 0), n_gen, D);
    scores<V, kBlock>(w, D, n_gen, j * G, (j + 1) * G, a.P, true);
  }
  softmax<V>(w);

  widen(w, prompt_v, a.P, D);
  weighted_sum<V, kBlock>(w, a.P, 0, nq, 0);
  for (int64_t j = 0; j < a.beams; ++j) {
    widen(w, cache_row(a.gen_v, b * a.beams + j, 0), n_gen, D);
    weighted_sum<V, kBlock>(w, n_gen, j * G, (j + 1) * G, a.P);
  }

  for (int64_t j = 0; j < a.beams; ++j) {
    T* out = static_cast<T*>(a.out) + (b * a.beams + j) * a.H * D + h * G * D;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) store(out + g * D + d, w.o[(j * G + g) * w.Dp + d]);
  }
}

// N lanes per vector; kBlock keys (scores) or queries (outputs) per block, kBlock independent
// accumulators: each ISA file takes its register width and as many accumulators as its registers
// hold (an FMA's latency needs about 8 in flight).
template <int N, int kBlock>
void attention_any(const AttnArgs& a, int64_t task) {
  if (a.bf16)
    attention_task<uint16_t, Lanes<N>, kBlock>(a, task);
  else
    attention_task<float, Lanes<N>, kBlock>(a, task);
}

}  // namespace
}  // namespace modlora_cpu
