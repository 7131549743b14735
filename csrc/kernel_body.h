// The blocked small-M kernel, compiled once per ISA. Included inside an anonymous namespace and a
// `#pragma GCC target` region by kernels_*.cpp, after a `struct V` that supplies the vector type:
//   V::vec, V::kLanes, V::zero(), V::load(const float*), V::load(const uint16_t*) (bf16 -> fp32),
//   V::fma(a, b, acc), V::hsum(vec), V::pin(vec&) (keep a value in a register), V::kMaxMB (rows of x
//   per register block), V::kSmallM.
//
// Work split: the caller gives each thread a contiguous range of output columns n (= rows of W).
// For NB rows of W at a time and MB rows of x at a time, MB*NB accumulators stay in registers for
// the whole K loop; W is loaded once per (K step, W row) and converted bf16 -> fp32 by a zero
// extension and a 16-bit shift. M > MB re-reads the same NB rows of W from L1/L2, not from memory.
// The epilogue adds the bias and u[m] . B_bank[p_m][n, :] and writes y once.

static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

static inline float to_f32(float v) { return v; }
static inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

// out[i][j] = sum_k x[i, k] * w[j][k] for i < MB, j < NB.
// pf: the next block of W rows, prefetched as one contiguous range of NB * K elements (exact when
// ldw == K, a mere hint otherwise). Rows are short (lm_head: 1.8 KB in bf16), so the hardware
// prefetcher restarts on new streams all the time and, without this, the core stalls on memory
// between the FMAs instead of overlapping the two.
template <int MB, int NB, typename WT>
static inline void dot_block(const WT* const* w, const WT* pf, const float* x, int64_t ldx, int64_t K,
                             float (*out)[4]) {
  constexpr int kStepBytes = NB * V::kLanes * static_cast<int>(sizeof(WT));
  typename V::vec acc[MB][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = V::zero();
  int64_t k = 0;
  for (; k + V::kLanes <= K; k += V::kLanes) {
#pragma GCC unroll 8
    for (int b = 0; b < kStepBytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(pf + NB * k) + b);
    typename V::vec wv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) wv[j] = V::load(w[j] + k);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      typename V::vec xv = V::load(x + i * ldx + k);
      V::pin(xv);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = V::fma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i][j] = V::hsum(acc[i][j]);
  for (; k < K; ++k)  // K tail (< kLanes elements)
    for (int j = 0; j < NB; ++j) {
      const float wk = to_f32(w[j][k]);
      for (int i = 0; i < MB; ++i) out[i][j] += x[i * ldx + k] * wk;
    }
}

template <typename BT>
static inline float rank_dot(const float* u, const BT* b, int64_t R) {
  typename V::vec acc = V::zero();
  int64_t r = 0;
  for (; r + V::kLanes <= R; r += V::kLanes) acc = V::fma(V::load(u + r), V::load(b + r), acc);
  float s = V::hsum(acc);
  for (; r < R; ++r) s += u[r] * to_f32(b[r]);
  return s;
}

template <typename WT>
using DotFn = void (*)(const WT* const*, const WT*, const float*, int64_t, int64_t, float (*)[4]);

template <typename WT, int NB>
static DotFn<WT> pick_dot(int mb) {
  constexpr int kMax = NB == 4 ? V::kSmallM : V::kMaxMB;
  switch (mb) {
#define MODLORA_CASE(n)                                    \
  case n:                                                  \
    if constexpr (n <= kMax) return &dot_block<n, NB, WT>; \
    break;
    MODLORA_CASE(1) MODLORA_CASE(2) MODLORA_CASE(3) MODLORA_CASE(4) MODLORA_CASE(5) MODLORA_CASE(6)
    MODLORA_CASE(7) MODLORA_CASE(8) MODLORA_CASE(9) MODLORA_CASE(10) MODLORA_CASE(11) MODLORA_CASE(12)
#undef MODLORA_CASE
  }
  return nullptr;
}

// Epilogue for rows [m0, m0 + mb) and columns [n, n + nb): bias, LoRA expand, store.
template <typename BT>
static inline void epilogue(const BankArgs& a, int64_t m0, int mb, int64_t n, int nb, float (*acc)[4]) {
  const BT* bank = static_cast<const BT*>(a.bank_b);
  for (int i = 0; i < mb; ++i) {
    const int64_t m = m0 + i;
    const float* um = a.R > 0 ? a.u + m * a.R : nullptr;
    const BT* bp = um ? bank + ((a.pair ? a.pair[m] : 0) * a.N) * a.R : nullptr;
    for (int j = 0; j < nb; ++j) {
      float v = acc[i][j];
      if (a.bias) v += a.bias[n + j];
      if (um) v += rank_dot(um, bp + (n + j) * a.R, a.R);
      if (a.y_bf16)
        static_cast<uint16_t*>(a.y)[m * a.N + n + j] = f32_to_bf16(v);
      else
        static_cast<float*>(a.y)[m * a.N + n + j] = v;
    }
  }
}

template <typename WT>
static void rows_impl(const BankArgs& a, int64_t n0, int64_t n1) {
  const WT* W = static_cast<const WT*>(a.w);
  // Rows of x per register block: as even as possible, at most kMaxMB.
  const int64_t chunks = (a.M + V::kMaxMB - 1) / V::kMaxMB;
  const int mb_full = static_cast<int>((a.M + chunks - 1) / chunks);
  const bool wide = a.M <= V::kSmallM;  // few x rows: 4 W rows per block for more independent FMAs
  const int NB = wide ? 4 : 2;
  float acc[16][4];
  for (int64_t n = n0; n < n1; n += NB) {
    const int nb = static_cast<int>(n1 - n < NB ? n1 - n : NB);
    const WT* wrows[4];
    for (int j = 0; j < nb; ++j) wrows[j] = W + (n + j) * a.ldw;
    // The last full block prefetches itself: the range stays inside this thread's rows [n0, n1).
    const WT* pf = W + (n + 2 * NB <= n1 ? n + NB : n) * a.ldw;
    for (int64_t m0 = 0; m0 < a.M; m0 += mb_full) {
      const int mb = static_cast<int>(a.M - m0 < mb_full ? a.M - m0 : mb_full);
      const float* x = a.xf + m0 * a.K;
      if (nb == NB) {
        (NB == 4 ? pick_dot<WT, 4>(mb) : pick_dot<WT, 2>(mb))(wrows, pf, x, a.K, a.K, acc);
      } else {  // last, partial block of W rows: one row at a time
        DotFn<WT> one_row = pick_dot<WT, 1>(mb);
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

static void rows_entry(const BankArgs& a, int64_t n0, int64_t n1) {
  if (a.w_bf16)
    rows_impl<uint16_t>(a, n0, n1);
  else
    rows_impl<float>(a, n0, n1);
}
