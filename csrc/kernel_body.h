// The blocked small-M kernel: one row driver, templated over a dot-product policy, compiled once
// per ISA. Each kernels_*.cpp includes this inside its `#pragma GCC target` region and
// instantiates `rows_impl` with its own policy. Everything here has internal linkage (anonymous
// namespace): each ISA file gets its own copy compiled for its target, which the linker can never
// merge with another file's copy and run on a CPU without that ISA.
//
// A dot-product policy `Dot` (derived from DotTypes) supplies:
//   Dot::V        vector traits: vec, kLanes, zero(), load(const float*), load(const uint16_t*)
//                 (bf16 -> fp32), fma(a, b, acc), hsum(vec), pin(vec&) (keep a value in a
//                 register), kMaxMB (rows of x per register block), kSmallM; VecBase below gives
//                 the members that need no intrinsics;
//   Dot::X, Dot::W  element types of x and W (float or uint16_t = raw bf16);
//   Dot::kMaxMB, Dot::kSmallM  the traits' register blocking unless the policy sets its own;
//   Dot::block<MB, NB>(w, pf, pf_ld, x, ldx, K, e, out)   out[i][j] = sum_k x[i, k] * w[j][k] plus
//                 the block's LoRA expand e folded in (Expand, fold below), i < MB, j < NB, k < K;
//                 pf, pf_ld: the block ahead to prefetch (prefetch_step).
// FmaDot<V, WT> below is the policy for fp32 x (W converted to fp32 as it is loaded).
//
// Work split: the caller gives each thread a contiguous range of output columns n (= rows of W).
// For NB rows of W at a time and MB rows of x at a time, MB*NB accumulators stay in registers for
// the whole K loop; W is loaded once per (K step, W row). M > MB re-reads the same NB rows of W
// from L1/L2, not from memory. The LoRA expand u[m] . B_bank[p_m][n, :] joins the accumulators
// before their horizontal sums (fold); the epilogue adds the bias (and the expand's last R mod
// lanes ranks) and writes y once.
#pragma once
#include <cstdint>

#include "bf16.h"
#include "lora_bank.h"

namespace modlora_cpu {
namespace {

// Accumulator tile of one block: up to 16 rows of x by 4 rows of W.
using Tile = float[16][4];

// One line of a block of W ahead (prefetch_block), prefetched into L1 (prefetcht0) or, kL2, into L2
// only (prefetcht1). On one Zen 4 core, W cold, bf16, both a block ahead: 4864 x 896 at 5 rows of x
// 640 -> 370 us with kL2, at 1 row 330 -> 530 us; 896 x 4864 at 2 rows 580 -> 330 us. The L1
// prefetch is early by a whole block (28 K steps at K = 896, 152 at 4864) and, as the rows of x
// grow, its lines are evicted before they are read; at 1 row the light loop wants its lines in L1. Which wins depends
// on the CPU, K and the rows, so the op takes it per call (BankArgs::prefetch_l2) and
// modlora.dispatch measures both.
template <bool kL2>
__attribute__((always_inline)) inline void prefetch_w(const void* p) {
  if constexpr (kL2)
    __builtin_prefetch(p, 0, 2);
  else
    __builtin_prefetch(p, 0, 3);
}

// kBytes bytes of W's lines from p into L1 or, kL2, L2: a K step's share of the block ahead, which
// the K loop walks as one range (every driver: the vector blocks here, the AMX tiles).
template <bool kL2, int kBytes>
__attribute__((always_inline)) inline void prefetch_lines(const void* p) {
#pragma GCC unroll 16
  for (int b = 0; b < kBytes; b += 64) prefetch_w<kL2>(static_cast<const char*>(p) + b);
}

// A K step's share of the block ahead, kStepBytes of each of its NB rows: pf_ld = 0, the K loop
// covers whole rows and W's are contiguous, so the block is one range (its NB * kStepBytes bytes
// at NB * k, prefetch_lines); else the loop covers a chunk of each row (BankArgs::k_chunk), and
// each row's bytes at k, pf_ld elements apart.
template <bool kL2, int NB, int kStepBytes, typename T>
__attribute__((always_inline)) inline void prefetch_step(const T* pf, int64_t pf_ld, int64_t k) {
  if (pf_ld == 0) {
    prefetch_lines<kL2, NB * kStepBytes>(pf + NB * k);
    return;
  }
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) prefetch_lines<kL2, kStepBytes>(pf + j * pf_ld + k);
}

// The first W row of the block whose lines the K loop of the block at row n prefetches (nb rows a
// block, this thread's rows end at n1), linearly over its rows: the next block into L1; into L2 the
// one after it. One block ahead, the first lines of its last row lead their use by only K/128 K
// steps (7 at K = 896 and 4 rows a block), too few to hide memory's latency; two blocks ahead, every
// line leads by at least K/32 (one core, W cold, 5 rows: 4864 x 896 345-357 -> 279-284 us, 896 x 896
// 70-71 -> 57; 896 x 4864, a 39 KB block, the same). The last blocks prefetch a nearer one or
// themselves: the range stays inside this thread's rows [n0, n1).
inline int64_t prefetch_block(int64_t n, int64_t n1, int64_t nb, bool l2) {
  const int64_t ahead = l2 ? 2 : 1;
  return n + (ahead + 1) * nb <= n1 ? n + ahead * nb : n + 2 * nb <= n1 ? n + nb : n;
}

// Vector types of the ISA traits (the intrinsics' __m256/__m512 less their may_alias attribute,
// which a template argument cannot carry; loads go through memcpy, which needs no exemption).
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));

// The vector-trait members that need no intrinsics: lane count, zero, unaligned fp32 load.
template <typename Vec>
struct VecBase {
  using vec = Vec;
  static constexpr int kLanes = sizeof(Vec) / sizeof(float);
  static constexpr bool kHsum4 = false;  // a transposing hsum4(const vec (&)[4], float*) (Avx512)
  static vec zero() { return vec{}; }
  static vec load(const float* p) {
    vec v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
};

// A policy's vector traits, element types, and the rows of x it reads (fp32 or bf16 copy).
template <typename VT, typename XT, typename WT>
struct DotTypes {
  using V = VT;
  using X = XT;
  using W = WT;
  // Rows of x per register block, and the most rows that take 4 W rows per block (a policy may change them).
  static constexpr int kMaxMB = VT::kMaxMB, kSmallM = VT::kSmallM;
  static const XT* x(const BankArgs& a) {
    if constexpr (sizeof(XT) == sizeof(uint16_t))
      return a.xb;
    else
      return a.xf;
  }
};

// Register accumulators of a block: cleared before the K loop, reduced to floats after it.
template <typename V, int MB, int NB>
inline void clear(typename V::vec (&acc)[MB][NB]) {
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = V::zero();
}

// A block's LoRA expand, folded into its accumulators before the horizontal sums: lane l of
// acc[i][j] gains the sum over r < r_vec, r = l (mod lanes), of u[i, lo + r] B_bank[p_i][n + j, r]
// ([lo, hi): the block's rank range, rank_range below; lo = 0 without parts), so the one sum per
// output adds the expand too. (A dot and a horizontal sum per output of its own cost about a third
// of the block's work at M = 5, K = 896, R = 32.) The epilogue adds the ranks from lo + r_vec to
// hi. A row's B row is found from its pair (row()): a per-row pointer array, zeroed for every
// block, took 5% of a 4864 x 896 call at M = 5 (perf: `rep stos` in expand_of), adapters or not.
struct Expand {
  const float* u = nullptr;       // u[m0, lo] of the block's first row of x (row stride R); null: nothing to fold
  const char* b = nullptr;        // B_bank[0][n, 0] as bytes: pair 0's B row of the block's first column
  const int64_t* pair = nullptr;  // the pairs of the block's rows; null: pair 0 for every row
  int64_t pair_bytes = 0;         // from one pair's B to the next (N * ldb elements)
  int64_t R = 0, r_vec = 0, row_bytes = 0;
  bool b_bf16 = false;
  bool shared = true;  // every row reads the same pair's B (no per-row pairs, or one sentence's beams)

  const char* row(int i) const { return pair ? b + pair[i] * pair_bytes : b; }
};

// One K (or rank) step of a block: acc[i][j] += rows[i * ld ..] * cols[j] over MB rows, each row's
// vector loaded once and kept in a register for the NB products.
template <typename V, int MB, int NB>
__attribute__((always_inline)) inline void outer_step(typename V::vec (&acc)[MB][NB], const typename V::vec (&cols)[NB],
                                                      const float* rows, int64_t ld) {
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
    typename V::vec v = V::load(rows + i * ld);
    V::pin(v);
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = V::fma(v, cols[j], acc[i][j]);
  }
}

template <typename V, typename BT, typename Vec, int MB, int NB>
inline void fold_typed(Vec (&acc)[MB][NB], const Expand& e) {
  if (e.shared) {  // as the K loop: each B vector loaded and converted once, for all rows
    const char* b = e.row(0);
    for (int64_t r = 0; r < e.r_vec; r += V::kLanes) {
      typename V::vec bv[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) bv[j] = V::load(reinterpret_cast<const BT*>(b + j * e.row_bytes) + r);
      outer_step<V>(acc, bv, e.u + r, e.R);
    }
    return;
  }
  const char* b[MB];
  for (int i = 0; i < MB; ++i) b[i] = e.row(i);
  for (int64_t r = 0; r < e.r_vec; r += V::kLanes)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      typename V::vec uv = V::load(e.u + i * e.R + r);
      V::pin(uv);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j)
        acc[i][j] = V::fma(uv, V::load(reinterpret_cast<const BT*>(b[i] + j * e.row_bytes) + r), acc[i][j]);
    }
}

template <typename V, typename Vec, int MB, int NB>
inline void fold(Vec (&acc)[MB][NB], const Expand& e) {
  if (e.u == nullptr) return;
  if (e.b_bf16)
    fold_typed<V, uint16_t>(acc, e);
  else
    fold_typed<V, float>(acc, e);
}

template <typename V, int MB, int NB>
inline void reduce(const typename V::vec (&acc)[MB][NB], float (*out)[4]) {
  for (int i = 0; i < MB; ++i) {
    if constexpr (NB == 4 && V::kHsum4) {
      V::hsum4(acc[i], out[i]);
      continue;
    }
    for (int j = 0; j < NB; ++j) out[i][j] = V::hsum(acc[i][j]);
  }
}

// FMA policy: x fp32, W of type WT loaded and converted to fp32 per K step.
// pf: a block of W rows ahead (prefetch_block), prefetched a K step's share at a time
// (prefetch_step: whole rows as one contiguous range of NB * K elements, exact when ldw == K, a
// mere hint otherwise). Rows are short (lm_head: 1.8 KB in bf16), so the hardware prefetcher
// restarts on new streams all the time and, without this, the core stalls on memory between the
// FMAs instead of overlapping the two.
template <typename VT, typename WT>
struct FmaDot : DotTypes<VT, float, WT> {
  using V = VT;

  template <int MB, int NB, bool kL2>
  static void block(const WT* const* w, const WT* pf, int64_t pf_ld, const float* x, int64_t ldx, int64_t K,
                    const Expand& e, float (*out)[4]) {
    constexpr int kStepBytes = V::kLanes * static_cast<int>(sizeof(WT));
    typename V::vec acc[MB][NB];
    clear<V>(acc);
    int64_t k = 0;
    for (; k + V::kLanes <= K; k += V::kLanes) {
      prefetch_step<kL2, NB, kStepBytes>(pf, pf_ld, k);
      typename V::vec wv[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) wv[j] = V::load(w[j] + k);
      outer_step<V>(acc, wv, x + k, ldx);
    }
    fold<V>(acc, e);
    reduce<V>(acc, out);
    for (; k < K; ++k)  // K tail (< kLanes elements)
      for (int j = 0; j < NB; ++j) {
        const float wk = to_f32(w[j][k]);
        for (int i = 0; i < MB; ++i) out[i][j] += x[i * ldx + k] * wk;
      }
  }
};

template <typename Dot>
using BlockFn = void (*)(const typename Dot::W* const*, const typename Dot::W*, int64_t, const typename Dot::X*,
                         int64_t, int64_t, const Expand&, float (*)[4]);

// The block kernel for mb rows of x and NB rows of W (mb is known only at run time).
template <typename Dot, int NB, bool kL2>
BlockFn<Dot> pick_block(int mb) {
  constexpr int kMax = NB == 4 ? Dot::kSmallM : Dot::kMaxMB;
  switch (mb) {
#define MODLORA_CASE(n)                                                \
  case n:                                                              \
    if constexpr (n <= kMax) return &Dot::template block<n, NB, kL2>;  \
    break;
    MODLORA_CASE(1) MODLORA_CASE(2) MODLORA_CASE(3) MODLORA_CASE(4) MODLORA_CASE(5) MODLORA_CASE(6)
    MODLORA_CASE(7) MODLORA_CASE(8) MODLORA_CASE(9) MODLORA_CASE(10) MODLORA_CASE(11) MODLORA_CASE(12)
#undef MODLORA_CASE
  }
  return nullptr;
}

// The ranks [lo, hi) that output columns [n, n + nb) read; false when they span two parts (then
// each column's own range applies, in the epilogue).
inline bool rank_range(const BankArgs& a, int64_t n, int64_t nb, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = a.R;
  if (a.parts == nullptr) return true;
  int64_t q = 0;
  while (q + 1 < a.n_parts && a.parts[3 * q] <= n) ++q;
  lo = a.parts[3 * q + 1];
  hi = a.parts[3 * q + 2];
  return n + nb <= a.parts[3 * q];
}

template <typename V, typename BT>
inline float rank_dot(const float* u, const BT* b, int64_t R) {
  typename V::vec acc = V::zero();
  int64_t r = 0;
  for (; r + V::kLanes <= R; r += V::kLanes) acc = V::fma(V::load(u + r), V::load(b + r), acc);
  float s = V::hsum(acc);
  for (; r < R; ++r) s += u[r] * to_f32(b[r]);
  return s;
}

// Ranks of columns [n, n + nb) still to add: [lo, hi) of their part (the driver moves lo past
// what the block folded), or, when they span parts, each column's own range (nothing folded).
// Rank r is entry r - first of the column's B row.
struct Rest {
  int64_t lo = 0, hi = 0, first = 0;
  bool per_column = false;
};

inline Rest rest_of(const BankArgs& a, int64_t n, int64_t nb) {
  Rest rest;
  if (a.R == 0) return rest;
  rest.per_column = !rank_range(a, n, nb, rest.lo, rest.hi);
  rest.first = rest.lo;
  return rest;
}

// A row of a block's outputs as one vector (GCC's vector_size takes no template parameter).
typedef float f32x2 __attribute__((vector_size(8)));
typedef uint32_t u32x2 __attribute__((vector_size(8)));
typedef uint16_t u16x2 __attribute__((vector_size(4)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));
template <int NB>
struct RowVec;
template <>
struct RowVec<2> {
  using f = f32x2;
  using u = u32x2;
  using h = u16x2;
};
template <>
struct RowVec<4> {
  using f = f32x4;
  using u = u32x4;
  using h = u16x4;
};

// y[m, n .. n + NB) = v + bias, rounded as f32_to_bf16 does when y is bf16, as one NB-float vector.
template <int NB>
inline void store_row(const BankArgs& a, int64_t m, int64_t n, const float* v) {
  using fv = typename RowVec<NB>::f;
  using uv = typename RowVec<NB>::u;
  fv y;
  __builtin_memcpy(&y, v, sizeof y);
  if (a.bias) {
    fv b;
    __builtin_memcpy(&b, a.bias + n, sizeof b);
    y += b;
  }
  if (!a.y_bf16) {
    __builtin_memcpy(static_cast<float*>(a.y) + m * a.N + n, &y, sizeof y);
    return;
  }
  uv bits;
  __builtin_memcpy(&bits, &y, sizeof bits);
  const uv rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uv h = (bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded;
  const typename RowVec<NB>::h out = __builtin_convertvector(h, typename RowVec<NB>::h);
  __builtin_memcpy(static_cast<uint16_t*>(a.y) + m * a.N + n, &out, sizeof out);
}

// Epilogue for rows [m0, m0 + mb) and columns [n, n + nb): bias, the LoRA expand's ranks `rest`,
// store. A whole block (4 or 2 columns) with nothing left to add stores a row's outputs at once:
// one by one, with the checks per output, the epilogue took a third of a call's compute (M = 5,
// K = 896).
template <typename V, typename BT>
void epilogue(const BankArgs& a, int64_t m0, int mb, int64_t n, int nb, const Tile& acc, const Rest& rest) {
  if ((nb == 4 || nb == 2) && !rest.per_column && rest.lo >= rest.hi) {
    for (int i = 0; i < mb; ++i)  // direct calls: through a function pointer they were not inlined
      if (nb == 4)
        store_row<4>(a, m0 + i, n, acc[i]);
      else
        store_row<2>(a, m0 + i, n, acc[i]);
    return;
  }
  const BT* bank = static_cast<const BT*>(a.bank_b);
  for (int i = 0; i < mb; ++i) {
    const int64_t m = m0 + i;
    const float* um = a.R ? a.u + m * a.R : nullptr;
    const BT* bp = um ? bank + ((a.pair ? a.pair[m] : 0) * a.N) * a.ldb : nullptr;
    for (int j = 0; j < nb; ++j) {
      float v = acc[i][j];
      if (a.bias) v += a.bias[n + j];
      int64_t lo = rest.lo, hi = rest.hi, first = rest.first;
      if (rest.per_column) rank_range(a, n + j, 1, lo, hi), first = lo;
      if (um && lo < hi) v += rank_dot<V>(um + lo, bp + (n + j) * a.ldb + lo - first, hi - lo);
      if (a.y_bf16)
        static_cast<uint16_t*>(a.y)[m * a.N + n + j] = f32_to_bf16(v);
      else
        static_cast<float*>(a.y)[m * a.N + n + j] = v;
    }
  }
}

// Dot products over K elements of rows [m0, m0 + mb) of x (row stride ldx) with the nb (<= NB) W
// rows `wrows` into acc; pf, pf_ld: the block ahead (prefetch_step).
template <typename Dot, int NB, bool kL2>
void dot_rows(const typename Dot::W* const* wrows, const typename Dot::W* pf, int64_t pf_ld,
              const typename Dot::X* x, int64_t ldx, int64_t K, int mb, int nb, const Expand& e, Tile& acc) {
  if (nb == NB) {
    pick_block<Dot, NB, kL2>(mb)(wrows, pf, pf_ld, x, ldx, K, e, acc);
    return;
  }
  const BlockFn<Dot> one_row = pick_block<Dot, 1, kL2>(mb);  // last, partial block of W rows
  Expand ej = e;
  for (int j = 0; j < nb; ++j) {
    Tile one;
    one_row(wrows + j, wrows[j], 0, x, ldx, K, ej, one);
    ej.b += e.row_bytes;
    for (int i = 0; i < mb; ++i) acc[i][j] = one[i][0];
  }
}

// The LoRA expand of rows [m0, m0 + mb) for the columns from n whose ranks are `ranks`, to fold
// into their block: the whole vectors of that range, none when the columns span two parts.
template <typename V>
Expand expand_of(const BankArgs& a, int64_t m0, int mb, int64_t n, const Rest& ranks) {
  Expand e;
  if (a.R == 0 || ranks.per_column) return e;
  const int64_t lo = ranks.lo, hi = ranks.hi;
  const int64_t elem = a.b_bf16 ? 2 : 4;
  e.u = a.u + m0 * a.R + lo;
  e.R = a.R;
  e.r_vec = (hi - lo) - (hi - lo) % V::kLanes;
  e.row_bytes = a.ldb * elem;
  e.b_bf16 = a.b_bf16;
  e.b = static_cast<const char*>(a.bank_b) + n * a.ldb * elem;  // rank lo is the row's entry 0
  if (a.pair) {
    e.pair = a.pair + m0;
    e.pair_bytes = a.N * e.row_bytes;
    for (int i = 1; i < mb; ++i) e.shared = e.shared && e.pair[i] == e.pair[0];
  }
  return e;
}

// Prefetch the LoRA expand's B rows of output columns [n, n + nb) (their rank range, for every pair
// the rows use), a block ahead of the epilogue or fold that reads them. The K loop prefetches only
// W; B is a second stream, interleaved with W's block by block (measured with the shared-pair fold
// and the inlined stores: docs/design.md, Kernels, "C++ bank").
inline void prefetch_bank_rows(const BankArgs& a, int64_t n, int64_t nb) {
  if (a.R == 0 || nb <= 0) return;
  int64_t lo, hi;
  if (!rank_range(a, n, nb, lo, hi)) lo = 0, hi = a.ldb;  // spanning parts: whole rows
  const int64_t elem = a.b_bf16 ? 2 : 4, bytes = (hi - lo) * elem;
  if (bytes == 0) return;
  int64_t prev = -1;
  for (int64_t m = 0; m < (a.pair ? a.M : 1); ++m) {
    const int64_t p = a.pair ? a.pair[m] : 0;
    if (p == prev) continue;  // beams of one sentence share a pair: consecutive rows, one prefetch
    prev = p;
    const char* row = static_cast<const char*>(a.bank_b) + (p * a.N + n) * a.ldb * elem;
    for (int64_t j = 0; j < nb; ++j, row += a.ldb * elem) {
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
      __builtin_prefetch(row + bytes - 1);  // the last line when the range starts mid-line
    }
  }
}

// Output columns [n0, n1) for all M rows, NB rows of W per block, K in chunks of a.k_chunk (all of
// K when 0): the chunk's x stays in L1 while every block of this thread reads it, and the dot
// products of the chunks before the last wait in a.partial. The last chunk folds the expand and
// runs the epilogue.
template <typename Dot, int NB, bool kL2>
void rows_blocked(const BankArgs& a, int64_t n0, int64_t n1) {
  using V = typename Dot::V;
  const auto* W = static_cast<const typename Dot::W*>(a.w);
  // Rows of x per register block: as even as possible, at most kMaxMB.
  const int64_t chunks = (a.M + Dot::kMaxMB - 1) / Dot::kMaxMB;
  const int mb_full = static_cast<int>((a.M + chunks - 1) / chunks);
  const int64_t kc = a.k_chunk > 0 && a.k_chunk < a.K ? a.k_chunk : a.K;
  const int64_t pf_ld = kc < a.K ? a.ldw : 0;  // a chunk of each row: prefetched row by row
  Tile acc;
  for (int64_t k0 = 0;; k0 += kc) {  // until the last chunk; once for K = 0, which stores the bias
    const int64_t klen = a.K - k0 < kc ? a.K - k0 : kc;
    const bool last = k0 + klen == a.K;
    for (int64_t n = n0; n < n1; n += NB) {
      const int nb = static_cast<int>(n1 - n < NB ? n1 - n : NB);
      const typename Dot::W* wrows[NB];
      for (int j = 0; j < nb; ++j) wrows[j] = W + (n + j) * a.ldw + k0;
      const typename Dot::W* pf = W + prefetch_block(n, n1, NB, kL2) * a.ldw + k0;
      const Rest ranks = rest_of(a, n, nb);
      if (last) prefetch_bank_rows(a, n + NB, n1 - n - NB < NB ? n1 - n - NB : NB);
      for (int64_t m0 = 0; m0 < a.M; m0 += mb_full) {
        const int mb = static_cast<int>(a.M - m0 < mb_full ? a.M - m0 : mb_full);
        const Expand e = last ? expand_of<V>(a, m0, mb, n, ranks) : Expand{};
        dot_rows<Dot, NB, kL2>(wrows, pf, pf_ld, Dot::x(a) + m0 * a.K + k0, a.K, klen, mb, nb, e, acc);
        if (kc < a.K) {
          float* sums = a.partial + n * a.M + m0;
          for (int j = 0; j < nb; ++j)
            for (int i = 0; i < mb; ++i) {
              float& sum = sums[j * a.M + i];
              if (k0 == 0)
                sum = acc[i][j];
              else if (!last)
                sum += acc[i][j];
              else
                acc[i][j] += sum;
            }
        }
        if (!last) continue;
        Rest rest = ranks;
        rest.lo += e.r_vec;
        if (a.b_bf16)
          epilogue<V, uint16_t>(a, m0, mb, n, nb, acc, rest);
        else
          epilogue<V, float>(a, m0, mb, n, nb, acc, rest);
      }
    }
    if (last) return;
  }
}

// The row driver: few rows of x take 4 W rows per block (more independent accumulators), else 2.
template <typename Dot, bool kL2>
void rows_sized(const BankArgs& a, int64_t n0, int64_t n1) {
  if (a.M <= Dot::kSmallM)
    rows_blocked<Dot, 4, kL2>(a, n0, n1);
  else
    rows_blocked<Dot, 2, kL2>(a, n0, n1);
}

template <typename Dot>
void rows_impl(const BankArgs& a, int64_t n0, int64_t n1) {
  if (a.prefetch_l2)
    rows_sized<Dot, true>(a, n0, n1);
  else
    rows_sized<Dot, false>(a, n0, n1);
}

// Entry for the FMA policy: fp32 x, W in fp32 or bf16.
template <typename V>
void rows_fma(const BankArgs& a, int64_t n0, int64_t n1) {
  if (a.w_bf16)
    rows_impl<FmaDot<V, uint16_t>>(a, n0, n1);
  else
    rows_impl<FmaDot<V, float>>(a, n0, n1);
}

}  // namespace
}  // namespace modlora_cpu
